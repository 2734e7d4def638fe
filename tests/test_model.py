"""The µLM: shapes, presets, carried state, causality; line positions."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from streamlearn.config import PRESETS
from streamlearn.nn.model import LM, MicroLM, count_params

VOCAB = 259
B, T = 2, 50  # one token shape for every test: the full-length call compiles once


@pytest.fixture(scope="module")
def nano():
  # The trunk alone: line positions come from the predictor (tests/test_generate.py).
  lm = LM(dataclasses.replace(PRESETS["nano"], line_position=False), VOCAB)
  return lm, jax.jit(lm.init)(jax.random.key(0))


@pytest.fixture(scope="module")
def apply(nano):
  return jax.jit(nano[0].apply)  # shared: each shape compiles once per module


def test_presets_span_0p1m_to_30m_parameters():
  counts = {name: count_params(jax.eval_shape(LM(cfg, VOCAB).init, jax.random.key(0)))
            for name, cfg in PRESETS.items()}
  assert 0.08e6 <= min(counts.values()) <= 0.2e6
  assert 25e6 <= max(counts.values()) <= 35e6
  assert list(counts.values()) == sorted(counts.values())


def test_shapes_and_state(nano, apply):
  lm, params = nano
  tokens = jnp.zeros((B, T), jnp.int32)
  logits, state = apply(params, tokens, lm.init_state(B))
  assert logits.shape == (B, T, VOCAB) and logits.dtype == jnp.float32
  cfg = lm.cfg
  assert len(state) == cfg.n_layers
  for layer in state:
    assert layer.h_BxW.shape == (B, cfg.lru_width) and layer.h_BxW.dtype == jnp.float32
    assert layer.conv_BxKm1xW.shape == (B, cfg.conv_width - 1, cfg.lru_width)


def test_chunks_with_carried_state_equal_one_call(nano, apply, rng):
  lm, params = nano
  tokens = jnp.asarray(rng.integers(0, 256, (B, T)), jnp.int32)
  whole, whole_state = apply(params, tokens, lm.init_state(B))
  state, pieces = lm.init_state(B), []
  for lo in range(0, T, 2):  # pieces shorter than the conv's reach: one shape, one compile
    logits, state = apply(params, tokens[:, lo:lo + 2], state)
    pieces.append(logits)
  np.testing.assert_allclose(jnp.concatenate(pieces, 1), whole, rtol=1e-5, atol=1e-5)
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(whole_state)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_causality_by_gradient(nano, rng):
  lm, params = nano
  T, D = 9, lm.cfg.d_model
  x = jnp.asarray(rng.standard_normal((1, T, D)), jnp.float32)

  def logit_sums(x):
    logits, _ = lm.module.apply({"params": params}, x, lm.init_state(1),
                                method=MicroLM.from_embeddings)
    return jnp.sum(logits[0], axis=-1)  # [T]

  jac_TxTxD = np.asarray(jax.jit(jax.jacrev(logit_sums))(x))[:, 0]
  for t in range(T):
    assert np.all(jac_TxTxD[t, t + 1:] == 0.0), f"logits at {t} depend on later inputs"
    assert np.any(jac_TxTxD[t, t] != 0.0)


def test_padding_after_the_end_leaves_the_state_alone(nano, apply, rng):
  lm, params = nano
  tokens = jnp.asarray(rng.integers(0, 256, (B, T)), jnp.int32)
  n_real = jnp.asarray([5, T], jnp.int32)
  logits, state = apply(params, tokens, lm.init_state(B), n_real)
  _, short_state = apply(params, tokens[:1, :5], lm.init_state(1))
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(short_state)):
    np.testing.assert_allclose(got[:1], want, rtol=1e-6, atol=1e-6)
  full_logits, full_state = apply(params, tokens, lm.init_state(B))
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(full_state)):
    np.testing.assert_allclose(got[1:], want[1:], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(logits[0, :5], full_logits[0, :5], rtol=1e-5, atol=1e-5)


def test_line_positions_match_a_walk_over_the_stream(rng):
  # Chunks of random lengths, with padding after the real tokens, against counting the tokens
  # since the last line break one token at a time; capped as the model's embedding is.
  from streamlearn.learn.chunk import NEWLINE, line_positions
  cap, T = 9, 16
  stream = np.where(rng.random(200) < 0.08, NEWLINE, rng.integers(97, 100, 200))
  stream[60:90] = 97  # a line longer than the cap, across a chunk boundary
  want, since = [], 0
  for token in stream:
    want.append(min(since, cap))
    since = 0 if token == NEWLINE else since + 1
  fn = jax.jit(line_positions, static_argnums=3)
  before, got, at = jnp.zeros((1,), jnp.int32), [], 0
  while at < len(stream):
    n = int(rng.integers(0, T + 1))
    real = stream[at:at + n]
    chunk = np.concatenate([real, rng.integers(0, 256, T - len(real))])  # padding: anything
    positions, before = fn(before, jnp.asarray(chunk[None], jnp.int32),
                           jnp.asarray([len(real)], jnp.int32), cap)
    got.extend(np.asarray(positions[0, :len(real)]).tolist())
    at += len(real)
    assert int(before[0]) == (want[at] if at < len(want) else min(since, cap))
  assert got == want

"""The count models against a slow reference, their causality and memory; the mixer's identity."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from streamlearn.config import ConfigError, CountsConfig, MixerConfig, load_config
from streamlearn.learn.build import build
from streamlearn.nn.counts import CountFeatures, counts_update, init_counts, reference_counts
from streamlearn.nn.match import MatchFeatures
from streamlearn.nn.mixer import Mixer, gate_sets

from safety_runs import FULL_DELTA, MIXER, TINY

# Small tables, few kept tokens and a low limit: collisions, evictions and halving all happen,
# in the dense tables (order 1) and the others.
CFG = CountsConfig(enabled=True, orders=(1, 2, 4), dense_below=2, dense_log2=4, table_log2=5,
                   keep=3, limit=6)
V = 12


@functools.cache
def _jitted_update(cfg: CountsConfig):
  return jax.jit(lambda s, tok, n: counts_update(cfg, V, s, tok, n), donate_argnums=0)


def _run(stream: np.ndarray, T: int, cfg: CountsConfig = CFG):
  """Counts [n, O, V] over a whole stream fed in chunks of T (the last one padded)."""
  state, update, out = init_counts(cfg, 1, T, V), _jitted_update(cfg), []
  for lo in range(0, len(stream), T):
    piece = stream[lo:lo + T]
    padded = np.full(T, V - 1, np.int32)
    padded[:len(piece)] = piece
    features, state = update(state, jnp.asarray(padded[None]), jnp.asarray([len(piece)]))
    out.append(np.asarray(features.counts_BxTxOxV[0, :len(piece)]))
  return np.concatenate(out), state


@pytest.mark.parametrize("T", [1, 16, 57])
def test_counts_equal_a_slow_reference(rng, T):
  stream = rng.integers(0, 5, 300).astype(np.int32)
  counts, _ = _run(stream, T)
  np.testing.assert_array_equal(counts, reference_counts(CFG, V, stream, T))
  assert counts[:, 0].sum(-1).max() > 4  # contexts were seen often enough to count


def test_a_tokens_counts_never_see_it_or_later_tokens(rng):
  stream = rng.integers(0, 5, 200).astype(np.int32)
  p = 150  # mid-chunk: the change starts inside a chunk of 16
  changed = stream.copy()
  changed[p:] = (changed[p:] + 1) % 5
  counts, _ = _run(stream, 16)
  counts2, _ = _run(changed, 16)
  np.testing.assert_array_equal(counts[:p + 1], counts2[:p + 1])
  assert not np.array_equal(counts[p + 1:], counts2[p + 1:])


def test_memory_is_fixed_over_a_thousand_steps(rng):
  _, state = _run(rng.integers(0, 5, 1000).astype(np.int32), 1)
  spec = lambda s: jax.tree.map(lambda x: (x.shape, x.dtype), s)
  assert spec(state) == spec(init_counts(CFG, 1, 1, V))


def test_padding_is_neither_counted_nor_recorded(rng):
  stream = rng.integers(0, 5, 40).astype(np.int32)
  _, state = _run(stream, 57)  # 40 real tokens, 17 padding (token V - 1, never in the stream)
  counts = state.entry_BxPxSxK >> 16
  tokens = state.entry_BxPxSxK & 0xFFFF
  assert int(counts.sum()) > 0 and not np.any((tokens == V - 1) & (counts > 0))
  assert int(state.dense_BxDxSxV.sum()) > 0 and not state.dense_BxDxSxV[..., V - 1].any()
  np.testing.assert_array_equal(state.recent_BxN[0], stream[-4:])


def test_the_mixer_with_the_network_alone_gives_it_back(rng):
  mixer = Mixer(MixerConfig(enabled=True), n_orders=0, match=False)
  logits = jnp.asarray(rng.normal(size=(2, 5, V)) * 3, jnp.float32)
  params = jax.jit(mixer.init)(jax.random.PRNGKey(0), logits, None, None)
  mixed = jax.jit(mixer.apply)(params, logits, None, None)
  np.testing.assert_allclose(jax.nn.log_softmax(mixed), jax.nn.log_softmax(logits), atol=1e-5)


def test_the_mixer_weighs_each_input_by_its_gate(rng):
  cfg = MixerConfig(enabled=True, count_weight=0.0)
  mixer = Mixer(cfg, n_orders=2, match=True)
  logits = jnp.asarray(rng.normal(size=(1, 4, V)), jnp.float32)
  counts = CountFeatures(jnp.asarray(rng.integers(0, 3, (1, 4, 2, V)), jnp.float32))
  match = MatchFeatures(jnp.full((1, 4, 1), 3, jnp.int32), jnp.asarray([[[0], [5], [20], [0]]]))
  params = jax.jit(mixer.init)(jax.random.PRNGKey(0), logits, counts, match)
  weights = params["params"]["weights"]
  assert weights.shape == (gate_sets(2, True), 4)
  # Starting weights: the network alone. A weight on the match vote moves only the
  # predicted token's logit, and only where a match was found.
  apply = jax.jit(mixer.apply)
  mixed = apply(params, logits, counts, match)
  np.testing.assert_allclose(mixed, jax.nn.log_softmax(logits), atol=1e-5)
  bumped = {"params": {**params["params"], "weights": weights.at[:, 3].set(2.0)}}
  delta = np.asarray(apply(bumped, logits, counts, match) - mixed)
  assert np.allclose(delta[0, [0, 3]], 0) and np.allclose(delta[0, 1:3, 3], 2.0)
  assert np.allclose(np.delete(delta[0, 1:3], 3, axis=-1), 0)


def test_the_delta_learner_refuses_the_mixer_in_one_line():
  with pytest.raises(ConfigError, match=r"^mixer\.enabled: not built for the delta learner"):
    build(load_config(TINY, FULL_DELTA + MIXER), 259)

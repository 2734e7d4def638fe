"""The score-first learner step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from streamlearn.config import load_config
from streamlearn.learn.build import build
from streamlearn.learn.chunk import Chunk
from streamlearn.learn.state import init_learner
from streamlearn.learn.step import make_score

VOCAB, BOS = 259, 256


@pytest.fixture(scope="module")
def tiny():
  config = load_config(None, ["model.preset=nano", "data.chunk_tokens=32",
                              "optim.learning_rate=3e-3", "optim.warmup_steps=1"])
  lm, optimizer, step = build(config, VOCAB)
  return lm, optimizer, step


def make_chunk(tokens):
  tokens = jnp.asarray(tokens, jnp.int32)[None]
  return Chunk(tokens, jnp.ones(tokens.shape, jnp.float32),
               jnp.full((1,), tokens.shape[1], jnp.float32))


def copy(tree):
  return jax.tree.map(jnp.copy, tree)


def run(tiny, chunks):
  lm, optimizer, step = tiny
  state = init_learner(lm, optimizer, seed=0, bos_id=BOS)
  before, bits = [], []
  for chunk in chunks:
    before.append(copy(state))  # the step donates `state`
    state, metrics = step(state, chunk)
    bits.append(float(metrics["bits"]))
  return before, bits, state


def test_score_first(tiny, rng):
  lm = tiny[0]
  chunks = [make_chunk(rng.integers(0, 256, 32)) for _ in range(4)]
  before, bits, _ = run(tiny, chunks)
  # Chunk k's score is what the parameters and state *before* its update give it.
  score = make_score(lm)
  for k, chunk in enumerate(chunks):
    s = before[k]
    _, metrics = score(s.params, s.carry, chunk)
    assert float(metrics["bits"]) == pytest.approx(bits[k], rel=1e-6)
  # Changing chunk 2 changes no score before it, and does change its own.
  changed = list(chunks)
  changed[2] = make_chunk(rng.integers(0, 256, 32))
  _, bits_changed, _ = run(tiny, changed)
  assert bits_changed[:2] == bits[:2]
  assert bits_changed[2] != bits[2]


def test_a_tiny_repeated_stream_is_learned(tiny, rng):
  pattern = rng.integers(0, 256, 40)
  stream = np.tile(pattern, 200)[:32 * 120]
  chunks = [make_chunk(stream[i:i + 32]) for i in range(0, len(stream), 32)]
  _, bits, state = run(tiny, chunks)
  first, last = bits[0] / 32, np.mean(bits[-10:]) / 32
  assert first > 7.0            # ~log2(259) bits per byte before any learning
  assert last < 0.1 * first     # and a small fraction of that once the loop is learned
  assert int(state.step) == len(chunks)


def test_padding_is_neither_scored_nor_counted(tiny, rng):
  lm, optimizer, step = tiny
  tokens = rng.integers(0, 256, 32)
  mask = np.zeros(32, np.float32)
  mask[:10] = 1.0
  chunk = Chunk(jnp.asarray(tokens, jnp.int32)[None], jnp.asarray(mask)[None],
                jnp.full((1,), 10.0))
  state = init_learner(lm, optimizer, seed=0, bos_id=BOS)
  s0 = copy(state)
  state, metrics = step(state, chunk)
  _, want = make_score(lm)(s0.params, s0.carry, make_chunk(tokens[:10]))
  assert float(metrics["bits"]) == pytest.approx(float(want["bits"]), rel=1e-5)
  assert float(metrics["tokens"]) == 10.0
  assert int(state.carry.last_token_B[0]) == int(tokens[9])


@pytest.mark.parametrize("enabled", [True, False])
def test_the_match_model_predicts_a_far_repeat(rng, enabled):
  # 1,024 random tokens, then the same again: nothing a 0.1M-parameter
  # recurrence can memorise, but every token of the copy has a long match.
  config = load_config(None, ["model.preset=nano", "data.chunk_tokens=64",
                              "optim.warmup_steps=1", f"match.enabled={str(enabled).lower()}"])
  predictor, optimizer, step = build(config, VOCAB)
  block = rng.integers(0, 256, 1024)
  stream = np.concatenate([block, block])
  state = init_learner(predictor, optimizer, seed=0, bos_id=BOS)
  bits = []
  for i in range(0, len(stream), 64):
    state, metrics = step(state, make_chunk(stream[i:i + 64]))
    bits.append(float(metrics["bits_per_token"]))
  first, copy_tail = np.mean(bits[:16]), np.mean(bits[-8:])
  assert first > 7.0  # random bytes: 8 bits each at best, for a model that cannot copy
  if enabled:
    assert copy_tail < 4.0, bits
  else:
    assert copy_tail > 7.0, bits

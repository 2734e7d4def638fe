"""The score-first learner step."""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from streamlearn.config import OptimConfig, load_config
from streamlearn.learn import xla
from streamlearn.learn.build import build
from streamlearn.learn.chunk import Chunk
from streamlearn.learn.prequential import Totals
from streamlearn.learn.state import init_learner, learning_rate
from streamlearn.learn.step import make_score

VOCAB, BOS = 259, 256
TINY = str(Path(__file__).resolve().parent.parent / "configs" / "tiny.toml")
T = 32  # tokens per chunk


@functools.cache
def learner(match_enabled: bool = True):
  """(predictor, optimizer, step), built once per module: every test shares one compiled step.

  configs/tiny.toml's learner (its match model: orders [3, 8], 2^12 tokens of history)
  with 2^14 table slots instead of 2^10: the far-repeat test records ~2,000
  contexts per order, and in 2^10 slots collisions overwrite most of them before
  the copy looks them up (measured: the copy then scores ~4 bits/token, not ~0.2).
  The default match model (ten orders, 2^18-slot tables, ~14 MB a state) only
  made every test here slower.
  """
  config = load_config(TINY, [f"data.chunk_tokens={T}", "optim.warmup_steps=1",
                              "match.table_log2=14", f"match.enabled={str(match_enabled).lower()}"])
  return build(config, VOCAB)


@functools.cache
def score_fn(lm):
  return make_score(lm)  # one jitted function: each shape compiles once per module


@pytest.fixture(scope="module")
def tiny():
  return learner()


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
  chunks = [make_chunk(rng.integers(0, 256, T)) for _ in range(4)]
  before, bits, _ = run(tiny, chunks)
  # Chunk k's score is what the parameters and state *before* its update give it.
  score = score_fn(lm)
  for k, chunk in enumerate(chunks):
    s = before[k]
    _, metrics = score(s.params, s.carry, chunk)
    assert float(metrics["bits"]) == pytest.approx(bits[k], rel=1e-6)
  # Changing chunk 2 changes no score before it, and does change its own.
  changed = list(chunks)
  changed[2] = make_chunk(rng.integers(0, 256, T))
  _, bits_changed, _ = run(tiny, changed)
  assert bits_changed[:2] == bits[:2]
  assert bits_changed[2] != bits[2]


# Learning outcomes have thresholds, so their data is pinned (seeds chosen blind; the
# margins measured over other seeds are in the comments): a fresh seed could fail them.
def test_a_tiny_repeated_stream_is_learned_by_the_network():
  rng = np.random.default_rng(101)
  # The match model off: the network alone must learn the loop, by its updates. (With the
  # match model on, the loop falls to ~0 bits after one period with no update at all.)
  pattern = rng.integers(0, 256, 40)
  stream = np.tile(pattern, 200)[:T * 120]
  chunks = [make_chunk(stream[i:i + T]) for i in range(0, len(stream), T)]
  _, bits, state = run(learner(False), chunks)
  first, last = bits[0] / T, np.mean(bits[-10:]) / T
  assert first > 7.0            # ~log2(259) bits per byte before any learning
  assert last < 0.1 * first     # and a small fraction of that once the loop is learned
  assert int(state.step) == len(chunks)


def test_the_match_model_alone_predicts_a_loop_after_one_period(tiny):
  rng = np.random.default_rng(102)
  # Frozen parameters (no update at all): only the match model's history moves, and from
  # the second period on it predicts the loop; without it nothing is learned.
  lm, optimizer, _ = tiny
  pattern = rng.integers(0, 256, 40)
  stream = np.tile(pattern, 8)[:T * 8]
  state = init_learner(lm, optimizer, seed=0, bos_id=BOS)
  carry, bits = state.carry, []
  for i in range(0, len(stream), T):
    carry, metrics = score_fn(lm)(state.params, carry, make_chunk(stream[i:i + T]))
    bits.append(float(metrics["bits_per_token"]))
  # (Its trust in a match is still the untrained prior here: measured ~0.6 bits/token.)
  assert bits[0] > 7.0 and np.mean(bits[-4:]) < 0.1 * bits[0], bits


def test_padding_is_neither_scored_nor_counted(tiny, rng):
  lm, optimizer, step = tiny
  tokens = rng.integers(0, 256, T)
  mask = np.zeros(T, np.float32)
  mask[:10] = 1.0
  # n_bytes strongly typed float32, as make_chunk's: a weakly typed one would
  # compile the step anew for nothing this test checks.
  chunk = Chunk(jnp.asarray(tokens, jnp.int32)[None], jnp.asarray(mask)[None],
                jnp.full((1,), 10.0, jnp.float32))
  state = init_learner(lm, optimizer, seed=0, bos_id=BOS)
  s0 = copy(state)
  state, metrics = step(state, chunk)
  _, want = score_fn(lm)(s0.params, s0.carry, make_chunk(tokens[:10]))
  assert float(metrics["bits"]) == pytest.approx(float(want["bits"]), rel=1e-5)
  assert float(metrics["tokens"]) == 10.0
  assert int(state.carry.last_token_B[0]) == int(tokens[9])


@pytest.mark.parametrize("enabled", [True, False])
def test_the_match_model_predicts_a_far_repeat(enabled):
  rng = np.random.default_rng(103)
  # 1,024 random tokens, then the same again: nothing a 0.1M-parameter
  # recurrence can memorise, but every token of the copy has a long match.
  predictor, optimizer, step = learner(enabled)
  block = rng.integers(0, 256, 1024)
  stream = np.concatenate([block, block])
  state = init_learner(predictor, optimizer, seed=0, bos_id=BOS)
  bits = []
  for i in range(0, len(stream), T):
    state, metrics = step(state, make_chunk(stream[i:i + T]))
    bits.append(float(metrics["bits_per_token"]))
  # Per token over the first block's 1,024 tokens and the copy's last 512
  # (every chunk is full, so the mean over chunks is the mean over tokens).
  first, copy_tail = np.mean(bits[:1024 // T]), np.mean(bits[-512 // T:])
  assert first > 7.0  # random bytes: 8 bits each at best, for a model that cannot copy
  if enabled:
    assert copy_tail < 1.0, bits  # measured 0.16-0.20 bits/token over seeds
  else:
    assert copy_tail > 7.0, bits


def test_bytes_a_bpe_vocabulary_was_trained_on_are_learned_from_not_scored():
  totals = Totals()
  for n_bytes, bits in [(600, 1.0), (600, 2.0), (600, 30.0), (600, 60.0)]:
    totals.add(n_bytes, 64, bits, unscored_until=1000)  # the vocabulary saw bytes 0..999
  # The chunk that straddles byte 1000 is left out too: only bytes it never saw count.
  assert (totals.vocab_bytes, totals.vocab_last_chunk, totals.bits) == (1200, 2, 90.0)
  assert totals.bits_per_byte == 90.0 / 1200 and "after the BPE vocabulary's warm-up" in totals.scope()
  assert Totals(bytes=5, bits=5.0).scope() == ""


def test_cpu_steps_compile_without_ynnpack_fusions():
  """The learner's functions compile with XLA:CPU's YNNPACK fusions off (learn/xla.py: they made
  the mixer's reductions 1.3x slower): a reduction like the mixer's stays XLA's own."""
  if jax.default_backend() != "cpu":
    pytest.skip("a CPU compile option")
  x = jnp.ones((4, 9, 259))
  reduce = lambda x: jnp.sum(x * x, axis=-1)
  assert xla.compiler_options() == {"xla_cpu_experimental_ynn_fusion_type": ""}
  assert "__ynn_fusion" not in xla.jit(reduce).lower(x).compile().as_text()


def test_the_learning_rate_warms_up_linearly_or_starts_full_and_decays_as_one_over_sqrt():
  at = lambda cfg, steps: [float(learning_rate(cfg, jnp.asarray(s, jnp.float32))) for s in steps]
  # No warm-up (the default): the full rate from the first update on.
  assert at(OptimConfig(learning_rate=1e-3, warmup_steps=0), [0, 1, 500]) == pytest.approx(
      [1e-3] * 3)
  assert at(OptimConfig(learning_rate=1e-3, warmup_steps=4), [0, 2, 4, 9]) == pytest.approx(
      [0.0, 5e-4, 1e-3, 1e-3])
  assert at(OptimConfig(learning_rate=1e-3, warmup_steps=0, decay_steps=10), [0, 30]) == (
      pytest.approx([1e-3, 5e-4]))

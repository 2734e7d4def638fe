"""Generation reads what the step scores: the same logits, token by token, for every learner."""

import contextlib
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from streamlearn import Learner
from streamlearn.api import load_artifact
from streamlearn.config import config_to_dict
from streamlearn.learn import sample as sample_lib
from streamlearn.learn.chunk import Chunk
from streamlearn.store.artifact import pack

from safety_runs import ARRIVAL_DELTA, FULL_DELTA, MIXER

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.toml")
SENTENCE = "The quick brown fox jumps over the lazy dog. "

# Each kind of learner the sampler must follow: the byte model with and without the match
# model, a BPE vocabulary, count models with the mixer, the delta learner reading its
# forecast beside the chunk, and learning on arrival. (The delta configs are test_delta.py's:
# shared compilations. With lag 0 the delta learner reads no forecast: the plain path, as
# "bytes".)
CONFIGS = {
    "bytes": [],
    "no-match": ["match.enabled=false"],
    "bpe": ["tokenizer.kind=bpe", "tokenizer.vocab_size=300"],
    "mixer": MIXER,
    "delta": FULL_DELTA,
    "delta-arrival": ARRIVAL_DELTA,
}


@contextlib.contextmanager
def xla_optimized():
  """Compiles with XLA's optimizations, which the tests leave off (conftest.py)."""
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", False)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", before)


def words_text(rng, n_bytes: int) -> str:
  """Random text from a small vocabulary of words: repeats enough for the match model."""
  words = ["".join(chr(c) for c in rng.integers(97, 123, rng.integers(2, 7))) for _ in range(30)]
  text = " ".join(words[i] for i in rng.integers(0, len(words), n_bytes // 3))
  return text[:n_bytes]


def copy(tree):
  return jax.tree.map(jnp.copy, tree)


@pytest.mark.parametrize("kind", [
    pytest.param(k, marks=pytest.mark.xdist_group("delta")) if k.startswith("delta") else k
    for k in CONFIGS])
def test_the_sampler_reads_the_logits_the_step_scores(kind, rng):
  text = words_text(rng, 1200)
  learner = Learner.from_config(TINY, CONFIGS[kind], warmup=text)
  T = learner.config.data.chunk_tokens
  tokens = learner.tokenizer.encode(text.encode())
  learner.feed(learner.tokenizer.decode(tokens[:3 * T]))  # parameters and tables on the move
  assert len(learner._pending) == 0 or kind == "bpe"      # (BPE: decode/encode may regroup)
  learner._pending = np.zeros(0, np.int32)
  chunk = tokens[3 * T:4 * T]
  params, state = learner.state.params, copy(learner.state)

  # What the step scores: the chunk's bits, and (for the plain learner) each token's logits.
  _, metrics = learner._step(copy(learner.state), Chunk(
      jnp.asarray(chunk[None]), jnp.ones((1, T), jnp.float32), jnp.ones((1,), jnp.float32)))
  step_bits = float(metrics["bits"])

  want = None
  if learner.predictor.delta is None:
    want, _ = jax.jit(learner.predictor.advance)(params, state.carry, jnp.asarray(chunk[None]),
                                                 jnp.full((1,), T, jnp.int32))
  # The sampler's path: every prefix read as generate() reads it, then the next logits.
  next_logits, forecast = sample_lib.next_logits(learner.predictor), learner._forecast()
  bits = 0.0
  for t in range(T):
    carry, position = learner._read(chunk[:t])
    logits = next_logits(params, carry, position, *forecast)[0]
    bits -= float(jax.nn.log_softmax(logits)[chunk[t]]) / np.log(2)
    if want is not None:
      np.testing.assert_allclose(logits, want[0, t], rtol=1e-4, atol=1e-4)
  assert bits == pytest.approx(step_bits, rel=1e-5)


def test_one_pass_per_token_is_advance_over_that_token(rng):
  # The sampler reads the next prediction with a placeholder token, then puts the drawn one
  # in (Predictor.read_next / with_next): the carry must be advance's over the same token.
  # (The count models keep a generated token pending till its chunk is full: the mixer's
  # learner is checked against the step's chunks by the sampler test above.) Line breaks
  # among the tokens: the line position moves with them.
  learner = Learner.from_config(TINY, ["model.line_position=true"])
  learner.feed(words_text(rng, 700))
  predictor, params = learner.predictor, learner.state.params
  carry = learner.state.carry
  read_next, with_next = jax.jit(predictor.read_next), jax.jit(predictor.with_next)
  advance = jax.jit(predictor.advance)
  for token in [10, *rng.integers(0, 256, 3), 10]:
    logits, after = read_next(params, carry)
    mine = with_next(after, jnp.full((1,), token, jnp.int32))
    want_logits, want = advance(params, carry, jnp.full((1, 1), token, jnp.int32),
                                jnp.ones((1,), jnp.int32))
    np.testing.assert_allclose(logits, want_logits[:, 0], rtol=1e-6, atol=1e-6)
    for x, y in zip(jax.tree.leaves(mine), jax.tree.leaves(want), strict=True):
      np.testing.assert_array_equal(x, y)
    carry = mine


def test_with_the_mixer_a_tokens_score_never_sees_it_or_later_tokens(rng):
  learner = Learner.from_config(TINY, MIXER)
  T = learner.config.data.chunk_tokens
  stream = rng.integers(97, 103, 3 * T)  # six letters: every context repeats, the counts matter
  learner.feed(bytes(stream[:2 * T].astype(np.uint8)))  # weights and tables on the move
  state, p = learner.state, T // 2
  changed = stream[2 * T:].copy()
  changed[p:] = 97 + (changed[p:] - 96) % 6
  advance, n = jax.jit(learner.predictor.advance), jnp.full((1,), T, jnp.int32)
  logits, _ = advance(state.params, state.carry, jnp.asarray(stream[None, 2 * T:]), n)
  logits2, _ = advance(state.params, state.carry, jnp.asarray(changed[None]), n)
  np.testing.assert_array_equal(logits[:, :p + 1], logits2[:, :p + 1])
  assert not np.allclose(logits[:, p + 1:], logits2[:, p + 1:])
  # The mix is not the network's alone: the count orders carry weight from the start.
  assert float(jnp.abs(state.params["mixer"]["weights"][:, 1]).max()) > 0


def learned_by_heart(overrides) -> Learner:
  """A tiny learner fed the sentence until it predicts it (< 0.05 bits/byte)."""
  learner = Learner.from_config(TINY, overrides)
  for _ in range(200):
    if learner.feed(SENTENCE * 10)["bits_per_byte"] < 0.05:
      return learner
  raise AssertionError("the sentence was never learned")


def artifact_of(learner: Learner, path: Path) -> Learner:
  """The learner's parameters as an int8 artifact, loaded back (a fresh stream)."""
  learner.tokenizer.save(path.parent)
  tokenizer = json.loads((path.parent / "tokenizer.json").read_text())
  path.write_bytes(pack(jax.device_get(learner.state.params), config_to_dict(learner.config),
                        tokenizer, {"run_dir": "", "step": 0, "bytes": 0}))
  return load_artifact(path)


@pytest.mark.parametrize("match", ["true", "false"])
def test_memorised_text_comes_back_greedily(match, tmp_path):
  learner = learned_by_heart([f"match.enabled={match}"])
  # After the fed text (it ends mid-sentence or at its end), and after a prompt.
  assert learner.generate("The quick", max_tokens=36, temperature=0) == SENTENCE[9:]
  assert learner.generate("", max_tokens=90, temperature=0, stop=["dog"]).endswith("the lazy ")
  # The artifact starts a fresh stream: its match model knows only the prompt (the sentence
  # once), its network what it learned.
  from_artifact = artifact_of(learner, tmp_path / "model.slm")
  assert from_artifact.generate(SENTENCE + "The quick", max_tokens=36,
                                temperature=0) == SENTENCE[9:]


def test_sampling_draws_from_the_shaped_distribution():
  # A pinned key and many draws: the frequencies follow softmax(logits / T) restricted by
  # top-k and top-p; a sampler that ignores an option, or always returns one token, fails.
  logits = jnp.log(jnp.asarray([0.5, 0.25, 0.15, 0.07, 0.03, 1e-9], jnp.float32))
  never = jnp.zeros(6, bool).at[5].set(True)
  recent = jnp.full(4, -1, jnp.int32)
  n = 20_000

  def frequencies(temperature, top_k, top_p, penalty=1.0, recent=recent):
    shaped = sample_lib.shaped_logits(logits, recent, never, jnp.float32(temperature),
                                      jnp.int32(top_k), jnp.float32(top_p),
                                      jnp.float32(penalty))
    keys = jax.random.split(jax.random.PRNGKey(7), n)
    draws = jax.vmap(lambda k: sample_lib.draw(k, shaped, jnp.float32(temperature)))(keys)
    return np.bincount(np.asarray(draws), minlength=6) / n

  def expect(p):
    return np.asarray(p, np.float64) / np.sum(p)

  def close(freq, p):  # 5 standard deviations of a binomial (the key is pinned anyway)
    assert np.all(np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1e-12), (freq, p)

  base = np.array([0.5, 0.25, 0.15, 0.07, 0.03, 0.0])
  close(frequencies(1.0, 0, 1.0), expect(base))
  close(frequencies(2.0, 0, 1.0), expect(np.sqrt(base)))              # temperature 2
  close(frequencies(1.0, 2, 1.0), expect([0.5, 0.25, 0, 0, 0, 0]))    # top-k 2
  close(frequencies(1.0, 0, 0.8), expect([0.5, 0.25, 0.15, 0, 0, 0]))  # top-p: 0.75 < 0.8
  penalised = frequencies(1.0, 0, 1.0, penalty=2.0, recent=jnp.asarray([-1, -1, 0, 0]))
  close(penalised, expect([0.25, 0.25, 0.15, 0.07, 0.03, 0]))  # seen: log 0.5 x 2 = log 0.25
  assert np.all(frequencies(0.0, 0, 1.0) == [1, 0, 0, 0, 0, 0])       # greedy
  assert frequencies(1.0, 0, 1.0)[5] == 0                             # never drawn


def test_generation_options_and_stops(rng):
  learner = Learner.from_config(TINY)
  learner.feed(words_text(rng, 700))
  a = learner.generate("ab", max_tokens=40, temperature=0.9, top_k=20, seed=3)
  assert a == learner.generate("ab", max_tokens=40, temperature=0.9, top_k=20, seed=3)
  assert len(a) <= 40  # a byte a token: at most one character each
  assert learner.generate("ab", max_tokens=0) == ""
  stopped = learner.generate("ab", max_tokens=40, temperature=0.9, top_k=20, seed=3,
                             stop=[a[5:8]])
  assert stopped == a[:a.find(a[5:8])]
  with pytest.raises(ValueError, match="top_p"):
    learner.generate("ab", top_p=0.0)


@pytest.mark.e2e
def test_a_default_model_on_prose_writes_words_of_its_text():
  # Prose on every machine: the standard library's own documentation (pydoc's topics).
  topics = pytest.importorskip("pydoc_data.topics")
  # 32 KB: the default model writes the text's words from 28 KB on (48 words, all the
  # text's, on 2026-12-03; 5 words at 24 KB); the network alone needed 120 KB.
  prose = "\n\n".join(topics.topics.values())[:32_000]
  learner = Learner.from_config(str(ROOT / "configs" / "default.toml"))
  with xla_optimized():  # 125 steps: optimized code pays back here (28 vs 35 CPU s at 156)
    learner.feed(prose)
  known = set(re.findall(r"[A-Za-z]{3,}", prose))
  sample = learner.generate("The ", max_tokens=400, temperature=0.5, repetition_penalty=1.3,
                            seed=0)
  words = re.findall(r"[A-Za-z]{3,}", sample)
  assert len(words) >= 20, sample
  share = sum(w in known for w in words) / len(words)
  assert share >= 0.6, (share, sample)

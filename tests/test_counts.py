"""The count models against a slow reference, their causality and memory; the mixer's identity."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from streamlearn.config import ConfigError, CountsConfig, MixerConfig, load_config
from streamlearn.learn.build import build
from streamlearn.nn.counts import (CountFeatures, counts_append, counts_next, counts_update,
                                   decode_entries, entry_layout, init_counts)
from streamlearn.nn.counts_reference import reference_counts
from streamlearn.nn.match import MatchFeatures
from streamlearn.nn.mixer import (Mixer, apm, count_map_logprobs, gate_sets, init_online,
                                  online_weights)

from safety_runs import FULL_DELTA, MIXER, TINY

# Small tables, few kept tokens and a low limit: collisions, evictions and halving all happen,
# in the dense tables (order 1) and the others.
CFG = CountsConfig(enabled=True, orders=(1, 2, 4), dense_below=2, dense_log2=4, table_log2=5,
                   keep=3, recent=2, limit=6, word=False, word3=False,
                   column=False)  # WORDS below adds those three
V = 12


@functools.cache
def _jitted_update(cfg: CountsConfig, vocab: int):
  return jax.jit(lambda s, tok, n: counts_update(cfg, vocab, s, tok, n), donate_argnums=0)


def _run(stream: np.ndarray, T: int, cfg: CountsConfig = CFG, vocab: int = V):
  """Counts [n, O, V] over a whole stream fed in chunks of T (the last one padded)."""
  state, update, out = init_counts(cfg, 1, T, vocab), _jitted_update(cfg, vocab), []
  for lo in range(0, len(stream), T):
    piece = stream[lo:lo + T]
    padded = np.full(T, vocab - 1, np.int32)
    padded[:len(piece)] = piece
    features, state = update(state, jnp.asarray(padded[None]), jnp.asarray([len(piece)]))
    out.append(np.asarray(features.counts_BxTxOxV[0, :len(piece)]))
  return np.concatenate(out), state


# survive_from: the default (2), off (0), and at 1 (every held context keeps its slot once)
@pytest.mark.parametrize("T, survive_from", [(1, 2), (16, 0), (57, 1)])
def test_counts_equal_a_slow_reference(rng, T, survive_from):
  cfg = dataclasses.replace(CFG, survive_from=survive_from)
  stream = rng.integers(0, 5, 300).astype(np.int32)
  counts, _ = _run(stream, T, cfg)
  np.testing.assert_array_equal(counts, reference_counts(cfg, V, stream, T))
  assert counts[:, 0].sum(-1).max() > 4  # contexts were seen often enough to count


@pytest.mark.parametrize("vocab", [V, 600])
def test_entries_keep_counts_past_their_layouts_largest_as_the_largest(rng, vocab):
  # A high limit and long runs of one token: counts pass 127, the largest a 16-bit entry
  # (a byte vocabulary's) keeps; a 32-bit entry (larger vocabularies) keeps them whole.
  cfg = dataclasses.replace(CFG, limit=1000)
  runs = rng.integers(0, 3, 60).repeat(rng.integers(1, 90, 60))
  stream = np.where(rng.random(len(runs)) < 0.1, rng.integers(0, 5, len(runs)), runs)
  counts, state = _run(stream.astype(np.int32), 57, cfg, vocab)
  np.testing.assert_array_equal(counts, reference_counts(cfg, vocab, stream, 57))
  kept, _ = decode_entries(state.entry_BxPxSxK, vocab)
  if vocab == V:
    assert entry_layout(vocab).count_max == int(kept.max()) == 127
  else:
    assert entry_layout(vocab).count_max == 32767 and int(kept.max()) > 127


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
  counts, tokens = decode_entries(state.entry_BxPxSxK, V)
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


def test_the_delta_learner_refuses_the_mixer_and_line_positions_in_one_line():
  with pytest.raises(ConfigError, match=r"^mixer\.enabled: not built for the delta learner"):
    build(load_config(TINY, FULL_DELTA + MIXER), 259)
  with pytest.raises(ConfigError, match=r"^model\.line_position: not built for the delta"):
    build(load_config(TINY, FULL_DELTA + ["model.line_position=true"]), 259)


WORDS = dataclasses.replace(CFG, word=True, word3=True, column=True)
BYTES = 259  # the byte tokenizer's vocabulary: the word and column contexts read bytes


def _text(text: str) -> np.ndarray:
  return np.frombuffer(text.encode(), np.uint8).astype(np.int32)


@pytest.mark.parametrize("T", [1, 57])
def test_word_and_column_counts_equal_a_slow_reference(rng, T):
  # Letters of both cases, a UTF-8 byte, spaces, full stops and short lines.
  alphabet = _text("\n .ABabc") .tolist() + [195]
  stream = np.asarray(alphabet)[rng.choice(len(alphabet), 200, p=[.08, .15, .05, .07, .05,
                                                                  .2, .15, .15, .1])]
  # Then words of a small lexicon, so that runs of three words recur too.
  lexicon = [_text(w).tolist() for w in ("ab", "AB", "c", "bA")] + [[98, 195, 169]]
  words = [lexicon[i] + [[32], [46], [10], [32, 32]][j]
           for i, j in zip(rng.integers(0, 5, 100), rng.integers(0, 4, 100))]
  stream = np.concatenate([stream, np.concatenate(words)[:200]])
  counts, _ = _run(stream.astype(np.int32), T, WORDS, BYTES)
  np.testing.assert_array_equal(counts, reference_counts(WORDS, BYTES, stream, T))
  assert all(counts[:, o].sum(-1).max() > 2 for o in (-3, -2, -1))


def test_the_word_context_spans_spaces_case_and_lines():
  # After "Miss Benn" (however separated, either case) the word context has seen "e" once.
  text = "Miss Bennet was here. MISS\n  benNet came"
  counts, _ = _run(_text(text), 8, WORDS, BYTES)
  at = text.index("benN") + 4  # predicting the second "e" of "benNet"
  word = counts[at, -3]
  assert word[ord("e")] == 1 and word.sum() == 1
  assert counts[text.index("Bennet") + 4, -3].sum() == 0  # its first time: nothing seen


def test_the_three_word_context_reads_the_word_before_the_two():
  text = "said Miss Bennet; then said Miss Bennet. And Miss Bennet"
  counts, _ = _run(_text(text), 8, dataclasses.replace(WORDS, table_log2=12), BYTES)  # no evictions
  second, third = text.index("said Miss Benn", 5) + 14, text.index("And Miss Benn") + 13
  assert counts[second, -2][ord("e")] == 1 and counts[second, -2].sum() == 1
  # After another word: the two-word context has seen "e" twice, the three-word one nothing.
  assert counts[third, -3][ord("e")] == 2 and counts[third, -2].sum() == 0


def test_the_column_context_reads_the_token_above():
  # "=" under "=" with "x" on its left, twice: the second time it has been seen once.
  text = "a = 1\nb = 2\nx = 3\ncc\nd = 4\nx = 5\n"
  counts, _ = _run(_text(text), 8, WORDS, BYTES)
  first, second = text.index("x = 3") + 1, text.index("x = 5") + 1
  assert counts[first, -1].sum() == 0
  assert counts[second, -1][ord(" ")] == 1 and counts[second, -1].sum() == 1


def test_word_and_column_counts_never_see_the_token_or_later_ones(rng):
  alphabet = np.sort(_text("\n abAB="))
  stream = alphabet[rng.integers(0, len(alphabet), 300)]
  p = 250  # mid-chunk
  changed = stream.copy()
  changed[p:] = alphabet[(np.searchsorted(alphabet, changed[p:]) + 1) % len(alphabet)]
  counts, _ = _run(stream, 16, WORDS, BYTES)
  counts2, _ = _run(changed, 16, WORDS, BYTES)
  np.testing.assert_array_equal(counts[:p + 1], counts2[:p + 1])
  assert not np.array_equal(counts[p + 1:, -3:], counts2[p + 1:, -3:])


def test_the_apm_token_weights_and_count_map_start_as_the_mixer_without_them(rng):
  logits = jnp.asarray(rng.normal(size=(1, 6, V)) * 2, jnp.float32)
  # The count map starts as the fixed formula, up to a constant per context.
  counts = CountFeatures(jnp.asarray(rng.integers(0, 4, (1, 6, 2, V)), jnp.float32))
  match = MatchFeatures(jnp.full((1, 6, 1), 2, jnp.int32), jnp.asarray([[[0], [5], [0], [9],
                                                                         [1], [0]]]))
  previous = jnp.asarray(rng.integers(0, V, (1, 6)), jnp.int32)
  outs = []
  for extra in (dict(apm=False, gate_token=False, count_map=False),
                dict(apm=True, gate_token=True, count_map=True)):
    mixer = Mixer(MixerConfig(enabled=True, **extra), n_orders=2, match=True)
    params = jax.jit(mixer.init)(jax.random.PRNGKey(0), logits, counts, match, previous)
    outs.append(jax.nn.log_softmax(mixer.apply(params, logits, counts, match, previous)))
  np.testing.assert_allclose(outs[1], outs[0], atol=1e-4)


def test_the_apm_interpolates_its_corrections_at_stretch_p(rng):
  K = 25
  logits = rng.normal(size=(2, 3, V)) * 4
  logits[0, 0, 0] = 40.0  # p rounds to 1: stretch clipped, still finite
  corrections = rng.normal(size=(2, 3, K))
  got = np.asarray(apm(jnp.asarray(logits, jnp.float32), jnp.asarray(corrections, jnp.float32)))
  logp = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1,
                                keepdims=True)) - logits.max(-1, keepdims=True)
  want = np.empty_like(logp)
  for idx in np.ndindex(logp.shape):
    p = np.exp(logp[idx])
    s = np.clip(np.log(p) - np.log(max(1 - p, 1e-30)), -12, 12)
    knot = (s + 12) / 24 * (K - 1)
    lo = min(int(np.floor(knot)), K - 2)
    table = corrections[idx[:2]]
    want[idx] = logp[idx] + table[lo] + (knot - lo) * (table[lo + 1] - table[lo])
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, want, atol=2e-3)


def test_the_count_map_weighs_its_terms_by_order_and_total_count(rng):
  O, N, K, prior = 2, 32, 6, 0.05
  counts = rng.integers(0, 3, (1, 4, O, V)) * rng.integers(1, 30, (1, 4, O, V))
  counts[0, 0, 1] = 0
  counts[0, 1, 0, 3] = 5  # the only token seen in this context
  counts[0, 1, 0, np.arange(V) != 3] = 0
  weights = rng.normal(size=(O, N, K))
  got = np.asarray(count_map_logprobs(CountFeatures(jnp.asarray(counts, jnp.float32)),
                                      jnp.asarray(weights, jnp.float32), prior))

  def bucket(n):  # 0-7 exactly, then two per doubling: 8-11, 12-15, 16-22, 23-31, ...
    return int(n) if n < 8 else min(8 + int(np.floor(2 * np.log2(n / 8))), N - 1)

  for b, t, o, v in np.ndindex(counts.shape):
    c, n = counts[b, t, o, v], counts[b, t, o].sum()
    terms = [np.log(c + prior), c >= 1, c >= 2, c >= 4, c >= 8, c == n]
    want = weights[o, bucket(n)] @ np.asarray(terms, np.float64)
    np.testing.assert_allclose(got[b, t, o, v], want, rtol=1e-5, atol=1e-5,
                               err_msg=str((b, t, o, v)))
  assert [bucket(n) for n in (7, 8, 11, 12, 15, 16, 22, 23)] == [7, 8, 8, 9, 9, 10, 10, 11]


def test_the_online_mixer_steps_each_weight_set_after_its_token(rng):
  B, T, J, R, lr, boost = 2, 9, 3, 6, 0.05, 3.0
  base = rng.normal(size=(B, T, J)).astype(np.float32)
  x = np.log(rng.dirichlet(np.ones(V), size=(B, T, J))).astype(np.float32)
  rows = np.stack([rng.integers(0, 3, (B, T)), rng.integers(3, R, (B, T))], -1).astype(np.int32)
  read = rng.integers(0, V, (B, T)).astype(np.int32)
  n_real = np.asarray([T, 6], np.int32)
  start = init_online(B, R, 2, J, V)
  # Row 1 has a position pending from before: the chunk's first token is its target.
  start = start._replace(inputs_BxJxV=start.inputs_BxJxV.at[1].set(x[1, 0]),
                         probs_BxV=start.probs_BxV.at[1].set(jax.nn.softmax(base[1, 0] @ x[1, 0])),
                         rows_BxS=start.rows_BxS.at[1].set(jnp.asarray([2, 4])),
                         pending_B=start.pending_B.at[1].set(True))
  used, after = jax.jit(online_weights, static_argnums=(0, 7))(lr, start, base, x, rows, read,
                                                               n_real, boost)
  for b in range(B):  # one position at a time
    delta, steps = np.zeros((R, J)), np.zeros(R)
    prev = (np.asarray(start.inputs_BxJxV[b]), np.asarray(start.probs_BxV[b]), [2, 4]) if b else None
    for t in range(n_real[b]):
      if prev is not None:
        x_prev, p_prev, rows_prev = prev
        for r in rows_prev:  # a row's step shrinks from lr (1 + boost) to lr as it takes more
          delta[r] += lr * (1 + boost / (1 + steps[r])) * (x_prev[:, read[b, t]] - x_prev @ p_prev)
          steps[r] += 1
      np.testing.assert_allclose(used[b, t], delta[rows[b, t]].sum(0), atol=1e-4)
      z = (base[b, t] + delta[rows[b, t]].sum(0)) @ x[b, t]
      prev = (x[b, t], np.exp(z - z.max()) / np.exp(z - z.max()).sum(), rows[b, t])
    np.testing.assert_allclose(after.delta_BxRxJ[b], delta, atol=1e-4)
    np.testing.assert_array_equal(after.steps_BxR[b], steps)
    np.testing.assert_allclose(after.inputs_BxJxV[b], prev[0])
    np.testing.assert_array_equal(after.rows_BxS[b], prev[2])
    assert int(after.read_B[b]) == read[b, n_real[b] - 1]
    assert bool(after.pending_B[b])
  assert np.abs(after.delta_BxRxJ).max() > 0.01


def test_the_next_tokens_counts_are_the_steps_counts_there(rng):
  # Generation reads one position (counts_next) after appending tokens one at a time
  # (counts_append); the step reads whole chunks. Two dense orders and every context kind.
  cfg = dataclasses.replace(WORDS, dense_below=3)
  alphabet = np.sort(_text("\n abAB="))
  stream = alphabet[rng.integers(0, len(alphabet), 120)]
  want, _ = _run(stream, 16, cfg, BYTES)
  state = init_counts(cfg, 1, 16, BYTES)
  read = jax.jit(lambda s: counts_next(cfg, BYTES, s))
  append = jax.jit(lambda s, tok: counts_append(cfg, BYTES, s, tok, jnp.ones((1,), jnp.int32)))
  for p, token in enumerate(stream):
    np.testing.assert_array_equal(read(state).counts_BxTxOxV[0, 0], want[p], err_msg=f"at {p}")
    state = append(state, jnp.asarray([[token]], jnp.int32))

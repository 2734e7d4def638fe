"""Which context each position has: the hashes the count models' tables are keyed by.

An n-gram order's context is the `order` tokens before a position. Besides the
orders, two contexts that reach further back (paq's word and column models):
  word:   the letters of the word in progress and of the word before it (case
          folded; any non-letter ends a word), so "Miss Bennet" predicts "et"
          after "Miss Benn" however many spaces or line breaks lie between;
  word3:  the same and the word before those two: recurring phrases;
  column: the token right above in the previous line and the one to the left,
          which for source code predicts indentation and aligned columns.
They read token ids as bytes (the byte tokenizer's ids 0-255); on a BPE
vocabulary they are contexts all the same, only weaker.

A context's hash reads only tokens before its position. `counts_reference`
computes the same hashes one position at a time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from streamlearn.config import CountsConfig

WORD_LOOKBACK = 32     # the word context reads at most this many tokens back...
WORD3_LOOKBACK = 48    # ...and the three-word one this many
COLUMN_LOOKBACK = 160  # the column context finds the previous line only this far back
_NEWLINE = 10
# Folded into a context's final hash so contexts never share a meaning (orders use 1..64).
_WORD_TAG, _COLUMN_TAG, _WORD3_TAG = 65, 66, 67


def context_tags(cfg: CountsConfig) -> tuple[int, ...]:
  """Every context counted, in the tables' (and the mixer's inputs') order: the n-gram
  orders, then the word context, then the column context (their tags)."""
  return (cfg.orders + (_WORD_TAG,) * cfg.word + (_WORD3_TAG,) * cfg.word3
          + (_COLUMN_TAG,) * cfg.column)


def lookback(cfg: CountsConfig) -> int:
  """How many tokens before a chunk the state keeps: what the furthest context reads."""
  return max(max(cfg.orders), WORD_LOOKBACK * cfg.word, WORD3_LOOKBACK * cfg.word3,
             COLUMN_LOOKBACK * cfg.column)


_FNV_START, _FNV_PRIME = 0x811C9DC5, 0x01000193


def _fnv(h, token):
  """One FNV-1a round (uint32): token -1 (before the stream) hashes as 0."""
  return (h ^ (token + 1).astype(jnp.uint32)) * jnp.uint32(_FNV_PRIME)


def _finish(h, tag: int):
  """The final mix of a context's hash, with its tag: contexts never share a meaning."""
  mixed = (h ^ jnp.uint32(tag * 0x27D4EB2F & 0xFFFFFFFF)) * jnp.uint32(0x9E3779B1)
  return mixed ^ (mixed >> 15)


def context_hashes(cfg: CountsConfig, ext_E, T: int) -> jax.Array:
  """uint32 [C, T]: a hash of each context (`context_tags`) of the last T positions of ext_E.

  An order's context is the `order` tokens before the position, nearest token first
  (FNV-1a), so one pass over max(orders) tokens serves every order.
  """
  back = ext_E.shape[0] - T
  h_T = jnp.full((T,), _FNV_START, jnp.uint32)
  out = {}
  for i in range(1, max(cfg.orders) + 1):
    h_T = _fnv(h_T, jax.lax.dynamic_slice_in_dim(ext_E, back - i, T))
    if i in cfg.orders:
      out[i] = _finish(h_T, i)
  rows = [out[order] for order in cfg.orders]
  if cfg.word:
    rows.append(_finish(word_context(_words(ext_E, T, WORD_LOOKBACK, 2)), _WORD_TAG))
  if cfg.word3:
    rows.append(_finish(word_context(_words(ext_E, T, WORD3_LOOKBACK, 3)), _WORD3_TAG))
  if cfg.column:
    rows.append(_finish(_column_hash(ext_E, T), _COLUMN_TAG))
  return jnp.stack(rows)


def _is_letter(token):
  """ASCII letters and the bytes of multi-byte UTF-8 characters (accented letters)."""
  lower = token | 32
  return ((lower >= 97) & (lower <= 122)) | ((token >= 128) & (token < 256))


# A word's hash is sum_j letter_j Q^(j - start) over its letters (mod 2^32): position-free,
# and for every position at once from one running sum over the chunk, S_i = sum_(j<i)
# letter_j Q^j, as (S_end - S_start) Q^-start. Q is odd, so it has an inverse mod 2^32.
_Q = 0x01000193
_Q_INVERSE = pow(_Q, -1, 1 << 32)


def word_context(words_KxT):
  """uint32 [T]: the hashes of the word in progress and the words before it, combined."""
  h_T = jnp.full(words_KxT.shape[1:], _FNV_START, jnp.uint32)
  for word_T in words_KxT:
    h_T = (h_T ^ word_T) * jnp.uint32(0x2545F491)
  return h_T


def _words(ext_E, T: int, reach: int, n_words: int):
  """uint32 [n_words, T]: per position, the hash of the word in progress (the letters right
  before it, case folded; 0 if none) and of the n_words - 1 words before it, reading at most
  `reach` tokens back, as `counts_reference._words` walks them."""
  E = ext_E.shape[0]
  e_E = jnp.arange(E, dtype=jnp.int32)
  letter_E = _is_letter(ext_E)
  folded_E = jnp.where(letter_E & (ext_E < 128), ext_E | 32, ext_E)
  powers = lambda q: jnp.asarray([pow(q, i, 1 << 32) for i in range(E + 1)], jnp.uint32)
  q_E1, q_inverse_E1 = powers(_Q), powers(_Q_INVERSE)
  term_E = jnp.where(letter_E, folded_E.astype(jnp.uint32) * q_E1[:E], jnp.uint32(0))
  sum_E1 = jnp.concatenate([jnp.zeros((1,), jnp.uint32), jnp.cumsum(term_E)])
  # The latest non-letter and the latest letter at or before each index (-1: none).
  non_letter_E = jax.lax.cummax(jnp.where(letter_E, -1, e_E))
  last_letter_E = jax.lax.cummax(jnp.where(letter_E, e_E, -1))
  at = lambda x_E, i_T: x_E[jnp.maximum(i_T, 0)]
  e_T = e_E[E - T:]
  low_T = e_T - reach
  end_T = e_T
  words = []
  for _ in range(n_words):
    # A word runs from the letter after the latest non-letter before its end; the next one
    # ends after the latest letter before its start. Both ends are clipped to the reach:
    # a word out of it is empty (hash 0), one across it keeps the letters within.
    end_T = jnp.maximum(end_T, low_T)
    start_T = jnp.maximum(jnp.where(end_T > low_T, at(non_letter_E, end_T - 1) + 1, end_T),
                          low_T)
    start_T = jnp.minimum(start_T, end_T)
    words.append((sum_E1[end_T] - sum_E1[start_T]) * q_inverse_E1[start_T])
    end_T = at(last_letter_E, start_T - 1) + 1
  return jnp.stack(words)


def _column_hash(ext_E, T: int):
  """uint32 [T]: per position p, the token above it (same column, previous line) and the
  token to its left. Above is -2 where the previous line is shorter, -3 where a line
  start is not within COLUMN_LOOKBACK tokens before p."""
  E = ext_E.shape[0]
  e_E = jnp.arange(E)
  # The latest newline before each index (-1: none): a running max of their places.
  newline_before_E = jnp.concatenate([jnp.full((1,), -1, jnp.int32), jax.lax.cummax(
      jnp.where(ext_E == _NEWLINE, e_E, -1).astype(jnp.int32))[:-1]])
  e_T = e_E[E - T:]
  start_T = newline_before_E[E - T:] + 1          # this line's first index
  prev_start_T = newline_before_E[jnp.maximum(start_T - 1, 0)] + 1
  above_at_T = prev_start_T + (e_T - start_T)
  known_T = (start_T >= 1) & (prev_start_T >= 1) & (prev_start_T - 1 >= e_T - COLUMN_LOOKBACK)
  above_T = jnp.where(above_at_T < start_T - 1, ext_E[jnp.minimum(above_at_T, E - 1)], -2)
  above_T = jnp.where(known_T, above_T, -3)
  # (+ 2: _fnv reads tokens from -1 on)
  return _fnv(_fnv(jnp.full((T,), _FNV_START, jnp.uint32), above_T + 2), ext_E[e_T - 1])

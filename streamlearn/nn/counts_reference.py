"""The count models written plainly: what `streamlearn.nn.counts` computes, one position and
one context at a time, in Python integers. Slow; the tests compare the jitted code to it.

Kept apart from counts.py: that module is the step's code, this one its oracle.
"""

from __future__ import annotations

import numpy as np

from streamlearn.config import CountsConfig
from streamlearn.nn.contexts import (_COLUMN_TAG, _FNV_PRIME, _FNV_START, _NEWLINE, _Q,
                                     _WORD3_TAG, _WORD_TAG, COLUMN_LOOKBACK, WORD3_LOOKBACK,
                                     WORD_LOOKBACK, context_tags, lookback)
from streamlearn.nn.counts import entry_layout


def reference_counts(cfg: CountsConfig, vocab: int, stream: np.ndarray, T: int) -> np.ndarray:
  """float [n, O, V]: the counts `counts_update` gives each position, fed in chunks of T,
  computed one position and one context at a time (tests compare to this).

  The same hash, slots and rules, written plainly: a dict per order from slot to
  (check, {token: count}), read as the previous chunk left it plus the chunk's
  earlier positions with the same context; at the chunk's end the latest context
  in each slot writes the K most frequent (ties: the lower token) of its
  candidates (the tokens it held, its own, and those of its `recent` latest
  earlier positions in the chunk; every token for the orders below `dense_below`),
  halved past the limit, each at most the largest count an entry holds (`entry_layout`).
  With `survive_from`, a slot held by another context whose top count is at least that
  stays that context's, its counts halved.
  """
  N, n = lookback(cfg), len(stream)
  ext = np.concatenate([np.full(N, -1), stream]).astype(np.int64)
  tags = context_tags(cfg)
  count_max = entry_layout(vocab).count_max
  out = np.zeros((n, len(tags), vocab))
  tables = [dict() for _ in tags]
  log2 = [cfg.dense_log2 if tag < cfg.dense_below else cfg.table_log2 for tag in tags]
  context = {_WORD_TAG: lambda ext, e: _word_context(_words(ext, e, WORD_LOOKBACK, 2)),
             _WORD3_TAG: lambda ext, e: _word_context(_words(ext, e, WORD3_LOOKBACK, 3)),
             _COLUMN_TAG: _column}
  keys = [[_slot_of(context[tag](ext, N + p) if tag in context
                    else _order(ext[N + p - tag:N + p]), tag, log2[o])
           for p in range(n)] for o, tag in enumerate(tags)]
  for lo in range(0, n, T):
    hi = min(lo + T, n)
    writes = [dict() for _ in tags]  # slot -> (check, counts, candidates): the latest's
    for o in range(len(tags)):
      for p in range(lo, hi):
        slot, check = keys[o][p]
        held_check, held = tables[o].get(slot, (0, {}))
        counts = dict(held) if held_check == check else {}
        same = [q for q in range(lo, p) if keys[o][q] == (slot, check)]
        for q in same:
          counts[int(stream[q])] = counts.get(int(stream[q]), 0) + 1
        for token, c in counts.items():
          out[p, o, token] = c
        counts[int(stream[p])] = counts.get(int(stream[p]), 0) + 1
        candidates = ({t for t, c in held.items() if c > 0} if held_check == check else set())
        candidates |= {int(stream[p])} | {int(stream[q]) for q in same[-cfg.recent:]}
        writes[o][slot] = (check, counts, candidates)
    for o, tag in enumerate(tags):
      for slot, (check, counts, candidates) in writes[o].items():
        held_check, held = tables[o].get(slot, (0, {}))
        if (cfg.survive_from and held_check not in (0, check)
            and max(held.values(), default=0) >= cfg.survive_from):
          tables[o][slot] = (held_check, {t: c >> 1 for t, c in held.items() if c >> 1})
          continue
        if tag < cfg.dense_below:  # every token kept
          candidates = counts
        top = sorted(((t, counts[t]) for t in candidates), key=lambda kv: (-kv[1], kv[0]))
        top = top[:cfg.keep if tag >= cfg.dense_below else None]
        if top and top[0][1] > cfg.limit:
          top = [(token, (c + 1) >> 1) for token, c in top]
        if tag >= cfg.dense_below:  # an entry keeps at most its layout's count
          top = [(token, min(c, count_max)) for token, c in top]
        tables[o][slot] = (check, dict(top))
  return out


_MASK = 0xFFFFFFFF


def _fnv(h: int, token: int) -> int:
  return ((h ^ ((token + 1) & _MASK)) * _FNV_PRIME) & _MASK


def _order(context: np.ndarray) -> int:
  """An order's hash before its final mix: the tokens, nearest first."""
  h = _FNV_START
  for token in context[::-1]:
    h = _fnv(h, int(token))
  return h


def _words(ext: np.ndarray, e: int, reach: int, n_words: int) -> list[int]:
  """The token at ext[e]'s word in progress and the n_words - 1 words before it, walking back
  over letters, then the non-letters between words; `reach` tokens at most. A word's hash:
  sum_j letter_j Q^j, j counted from its first letter read (0: no letter)."""
  letter = lambda i: i <= reach and ((97 <= (int(ext[e - i]) | 32) <= 122)
                                     or 128 <= int(ext[e - i]) < 256)
  fold = lambda t: t | 32 if t < 128 else t
  words, i = [], 1
  while len(words) < n_words:
    if words:  # the non-letters between two words
      while i <= reach and not letter(i):
        i += 1
    letters = []  # nearest first
    while letter(i):
      letters.append(fold(int(ext[e - i])))
      i += 1
    words.append(sum(c * pow(_Q, k, 1 << 32) for k, c in enumerate(letters[::-1])) & _MASK)
  return words


def _word_context(words: list[int]) -> int:
  h = _FNV_START
  for word in words:
    h = ((h ^ word) * 0x2545F491) & _MASK
  return h


def _column(ext: np.ndarray, e: int) -> int:
  """The column context of the token at ext[e]: the token above it and the one to its left."""
  window = range(e - 1, e - COLUMN_LOOKBACK - 1, -1)
  newlines = [i for i in window if ext[i] == _NEWLINE]
  if len(newlines) < 2:
    above = -3  # this line's start or the previous one's is out of reach
  else:
    start, prev_start = newlines[0] + 1, newlines[1] + 1
    column = e - start
    above = int(ext[prev_start + column]) if prev_start + column < start - 1 else -2
  return _fnv(_fnv(_FNV_START, above + 2), int(ext[e - 1]))


def _slot_of(h: int, tag: int, table_log2: int) -> tuple[int, int]:
  """(slot, check) of a context's hash, after the final mix with its tag."""
  h = ((h ^ (tag * 0x27D4EB2F & _MASK)) * 0x9E3779B1) & _MASK
  h ^= h >> 15
  return h >> (32 - table_log2), (h >> 1) | 1

"""The match model: where did the stream last continue the way it does now?

A recurrent µLM of a million parameters cannot hold a megabyte of text in its
state, but a stream repeats itself far apart — licence headers, boilerplate,
names, whole lines of code. The match model remembers the stream's recent
tokens and, for every position and each context order k, finds the most
recent earlier position whose k preceding tokens hash like the current ones;
the token that followed there is that order's prediction, and the number of
tokens before it that really agree (the verified match length) says how much
to trust it. The µLM reads the predictions as inputs and adds a logit bonus,
learned per order and length, to each predicted token (`streamlearn.nn.model`).

Everything is causal by construction: the features for the token at stream
position p are computed from tokens before p only, so prequential scores stay
honest. Memory is fixed: a ring of the last H tokens and one hash table per
context order; nothing grows with the stream.

Dimension letters: B = streams, T = tokens in a chunk, H = history ring,
O = context orders, S = hash table slots, L = longest verified match.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from streamlearn.config import MatchConfig


@flax.struct.dataclass
class MatchState:
  history_BxH: jax.Array   # int32: the token at stream position p is at p % H
  table_BxOxS: jax.Array   # int32: 1 + the latest position whose context hashed here; 0 = none
  pos_B: jax.Array         # int32: tokens of the stream seen so far


class MatchFeatures(NamedTuple):
  token_BxTxO: jax.Array   # int32: each order's predicted token (meaningless where length is 0)
  length_BxTxO: jax.Array  # int32 in [0, L]: verified match length; 0 = no prediction


def init_match(cfg: MatchConfig, batch: int) -> MatchState:
  """The state before any token: an empty history and empty tables."""
  H, S = 1 << cfg.history_log2, 1 << cfg.table_log2
  return MatchState(history_BxH=jnp.zeros((batch, H), jnp.int32),
                    table_BxOxS=jnp.zeros((batch, len(cfg.orders), S), jnp.int32),
                    pos_B=jnp.zeros((batch,), jnp.int32))


def _hash_slots(ext_E, back: int, T: int, orders: tuple[int, ...],
                table_log2: int) -> list[jax.Array]:
  """Table slot of each position's context, per order: the `order` tokens before it."""
  # Hashing nearest token first makes every order's hash a prefix of the
  # longest one's: one pass over max(orders) tokens serves them all.
  h_T = jnp.full((T,), 0x811C9DC5, jnp.uint32)
  slots = {}
  for i in range(1, max(orders) + 1):
    token_T = jax.lax.dynamic_slice_in_dim(ext_E, back - i, T).astype(jnp.uint32)
    h_T = (h_T ^ (token_T + 1)) * jnp.uint32(0x01000193)  # FNV-1a step over tokens
    if i in orders:
      # Fibonacci hashing (the top bits of a multiplicative hash are well
      # mixed), with the order folded in so orders never share a slot's meaning.
      mixed_T = (h_T ^ jnp.uint32(i * 0x27D4EB2F & 0xFFFFFFFF)) * jnp.uint32(0x9E3779B1)
      slots[i] = (mixed_T >> (32 - table_log2)).astype(jnp.int32)
  return [slots[order] for order in orders]


def _previous_same(key_T, t_T) -> jax.Array:
  """For each t, the largest t' < t with key[t'] == key[t], else -1.

  Sorting (key, t) puts each t right after its latest earlier twin: T log T
  work instead of comparing all T^2 pairs.
  """
  key_sorted_T, t_sorted_T = jax.lax.sort((key_T, t_T), num_keys=2)
  twin_T = jnp.concatenate([jnp.zeros((1,), bool), key_sorted_T[1:] == key_sorted_T[:-1]])
  prev_T = jnp.where(twin_T, jnp.concatenate([jnp.full((1,), -1), t_sorted_T[:-1]]), -1)
  return jnp.zeros_like(t_T).at[t_sorted_T].set(prev_T)


def _update_row(cfg: MatchConfig, history_H, table_OxS, pos, tokens_T, n_real):
  """One stream: features for each of the chunk's tokens, then the state after them."""
  H, T, L = history_H.shape[0], tokens_T.shape[0], cfg.max_len
  back = max(max(cfg.orders), L)
  t_T = jnp.arange(T)
  real_T = t_T < n_real
  abs_T = pos + t_T                      # stream position of each target token
  slot_T = abs_T % H
  history_H = history_H.at[slot_T].set(jnp.where(real_T, tokens_T, history_H[slot_T]))
  # The tokens at positions pos - back .. pos + T - 1; -1 before the stream began.
  ext_pos_E = pos - back + jnp.arange(back + T)
  ext_E = jnp.where(ext_pos_E >= 0, history_H[ext_pos_E % H], -1)
  # Positions older than this were overwritten by the chunk's own tokens.
  oldest = pos + T - H

  # Tokens before each target, nearest first: ctx_TxL[t, i] = token at abs_T[t] - 1 - i.
  ctx_TxL = ext_E[back + t_T[:, None] - 1 - jnp.arange(L)[None, :]]
  tokens, lengths, entries = [], [], []
  slots = _hash_slots(ext_E, back, T, cfg.orders, cfg.table_log2)
  order_OxT = jnp.broadcast_to(jnp.arange(len(cfg.orders))[:, None], (len(cfg.orders), T))
  slot_OxT = jnp.stack(slots)
  seen_OxT = table_OxS[order_OxT, slot_OxT]
  for o, (order, slot_T) in enumerate(zip(cfg.orders, slots)):
    valid_T = real_T & (abs_T >= order)
    # The latest earlier position with this context: in the chunk, else in the table.
    in_chunk_T = _previous_same(jnp.where(valid_T, slot_T, -1 - t_T), t_T)
    cand_T = jnp.where(in_chunk_T >= 0, pos + in_chunk_T, seen_OxT[o] - 1)
    # Verify: how many tokens before the candidate equal those before the target?
    # (Hash collisions verify short; the learned trust per length absorbs them.)
    back_pos_TxL = cand_T[:, None] - 1 - jnp.arange(L)[None, :]
    agree_TxL = ((history_H[back_pos_TxL % H] == ctx_TxL) & (back_pos_TxL >= 0)
                 & (back_pos_TxL >= oldest) & (cand_T[:, None] >= 0))
    len_T = jnp.sum(jnp.cumprod(agree_TxL.astype(jnp.int32), axis=1), axis=1)
    tokens.append(history_H[cand_T % H])
    lengths.append(jnp.where(real_T, len_T, 0))
    entries.append(jnp.where(valid_T, abs_T + 1, 0))

  # Record where each context occurred, all orders in one scatter (max keeps
  # the latest of duplicates).
  # Make the write depend on the reads: table entries are >= 0, so the max
  # with (min read >> 31) = 0 changes nothing, but XLA cannot prove that and
  # must read first, which lets it update the donated tables in place instead
  # of copying them (10 MB with the defaults) twice a step.
  entry_OxT = jnp.maximum(jnp.stack(entries), jnp.min(seen_OxT, keepdims=True) >> 31)
  table_OxS = table_OxS.at[order_OxT, slot_OxT].max(entry_OxT)
  return ((jnp.stack(tokens, axis=-1), jnp.stack(lengths, axis=-1)),
          (history_H, table_OxS, pos + n_real))


def match_update(cfg: MatchConfig, state: MatchState, tokens_BxT: jax.Array,
                 n_real_B: jax.Array) -> tuple[MatchFeatures, MatchState]:
  """Features for the chunk's tokens (each from earlier tokens only), and the state after it.

  Tokens past n_real_B[b] are padding: they get length 0 and are not recorded.
  """
  T, H = tokens_BxT.shape[1], state.history_BxH.shape[1]
  if H < 2 * T + max(max(cfg.orders), cfg.max_len):
    raise ValueError(f"match.history_log2: a history of {H} tokens is too short for "
                     f"chunks of {T}")
  (token_BxTxO, length_BxTxO), (history, tables, pos) = jax.vmap(
      lambda h, tab, p, tok, n: _update_row(cfg, h, tab, p, tok, n))(
          state.history_BxH, state.table_BxOxS, state.pos_B, tokens_BxT, n_real_B)
  return MatchFeatures(token_BxTxO, length_BxTxO), MatchState(history, tables, pos)


def reference_features(cfg: MatchConfig, stream: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Each order's prediction and verified length by brute force (tests compare to this).

  For each position p and order k: the latest earlier q whose k preceding
  tokens equal p's; the prediction is stream[q], the length how many tokens
  before q and p agree (capped at L). An exact-context search with no hashing
  and no ring; `match_update` agrees whenever no hash collision or ring
  overwrite interferes, which tests arrange.
  """
  L, n = cfg.max_len, len(stream)
  token = np.zeros((n, len(cfg.orders)), np.int64)
  length = np.zeros((n, len(cfg.orders)), np.int64)
  for p in range(n):
    for o, order in enumerate(cfg.orders):
      q = next((q for q in range(p - 1, order - 1, -1)
                if p >= order and np.array_equal(stream[q - order:q], stream[p - order:p])), None)
      if q is None:
        continue
      k = 0
      while k < L and q - 1 - k >= 0 and stream[q - 1 - k] == stream[p - 1 - k]:
        k += 1
      token[p, o], length[p, o] = stream[q], k
  return token, length


def with_last_token(state: MatchState, token_B: jax.Array) -> MatchState:
  """The state after a one-token chunk, as if that token had been `token_B`.

  Only the history holds a chunk's own tokens: the tables record where each
  context (the tokens *before* a position) occurred, so they are the same
  whatever the last token was. Generation reads the next prediction with a
  placeholder token, then puts in the one it sampled.
  """
  B, H = state.history_BxH.shape
  slot_B = (state.pos_B - 1) % H
  return state.replace(history_BxH=state.history_BxH.at[jnp.arange(B), slot_B].set(token_B))

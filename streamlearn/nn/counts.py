"""Count models: which tokens followed this context before, and how often.

The µLM learns slowly and forgets; a compressor's strongest statistics are plain
counts. For each context order k (the k tokens before a position) a hash table
keeps, per context, its K most frequent next tokens with their counts; the
mixer (`streamlearn.nn.mixer`) turns each order's counts into a prediction and
weighs it against the network's. This is PPM's and paq's order-k model,
restricted to what a jitted step can update in place. Besides the n-gram
orders, the word and column contexts (`streamlearn.nn.contexts`: which context
each position has), each a table like an order's and read the same way.

Causal by construction, and exact inside a chunk: the counts for the token at
stream position p are those of the tables as the previous chunk left them plus
the chunk's own tokens before p with the same context (never p's own token or
a later one). Memory is fixed: the last N tokens and one table per order.

A table slot holds one context, checked by its full hash: another context that
hashes to the slot reads nothing, and the one written last in a chunk takes the
slot. Counts above `limit` halve the slot's counts (recent statistics weigh
more, as in PPM's rescaling). The low orders (below `dense_below`: few
contexts, each followed by many tokens) keep every token's count, a row over
the vocabulary per slot; the others keep their K most frequent tokens.

The tables change only at the end of a chunk, so what a token is predicted
from depends on where the chunks are cut: generation keeps the chunk in
progress as pending tokens (`counts_append`, `counts_next`) and folds them in
when the chunk is full, exactly where the step would.

Dimension letters: B = streams, T = tokens in a chunk, O = orders, S = slots,
K = tokens kept per slot, R = recent candidates (`counts.recent`), V = vocabulary,
N = the longest order (tokens kept).
"""

from __future__ import annotations

from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp

from streamlearn.config import CountsConfig
from streamlearn.nn.contexts import context_hashes, context_tags, lookback


class EntryLayout(NamedTuple):
  """How a sparse table packs an entry: token | count << token_bits, in `dtype`."""
  dtype: jnp.dtype
  token_bits: int
  count_max: int  # a count kept above this is kept as this


def entry_layout(vocab: int) -> EntryLayout:
  """Byte vocabularies (256 bytes and 3 specials) fit a token in 9 bits, and a count in the 7
  left of 16: half the memory of 32-bit entries, so twice the slots in it. Counts rarely pass
  127 (`counts.limit` halves them first), and only within one chunk."""
  if vocab <= 1 << 9:
    return EntryLayout(jnp.uint16, 9, (1 << 7) - 1)
  if vocab <= 1 << 16:
    return EntryLayout(jnp.int32, 16, (1 << 15) - 1)
  raise ValueError(f"counts: a vocabulary of {vocab} tokens does not fit a count entry")


def decode_entries(entry, vocab: int) -> tuple[jax.Array, jax.Array]:
  """(counts, tokens), int32, of a sparse table's entries."""
  layout = entry_layout(vocab)
  entry = entry.astype(jnp.int32)
  return entry >> layout.token_bits, entry & ((1 << layout.token_bits) - 1)


def _encode_entries(counts, tokens, vocab: int) -> jax.Array:
  """Entries (int32, cast to the table's dtype by the caller) of counts and tokens."""
  layout = entry_layout(vocab)
  return tokens | (jnp.minimum(counts, layout.count_max) << layout.token_bits)

@flax.struct.dataclass
class CountState:
  recent_BxN: jax.Array       # int32: the N tokens before the chunk, oldest first; -1: none
  # The low orders (below counts.dense_below): every token's count, a row per context.
  dense_check_BxDxS: jax.Array  # int32: the hash of the context a slot holds (> 0); 0 = empty
  dense_BxDxSxV: jax.Array    # int16 (counts stay below 2^15): how often each token followed it
  # The other orders: each context's K most frequent next tokens.
  check_BxPxS: jax.Array      # int32: as dense_check
  entry_BxPxSxK: jax.Array    # token | count << token bits (`entry_layout`: uint16 or int32)
  # Generation only (the step's chunks always leave these empty): the tokens of the chunk
  # in progress, not in the tables yet (T = the step's chunk length).
  pending_BxT: jax.Array      # int32
  n_pending_B: jax.Array      # int32: how many of them are real


class CountFeatures(NamedTuple):
  counts_BxTxOxV: jax.Array   # float32: how often each token followed each position's context


def n_dense(cfg: CountsConfig) -> int:
  """How many orders (the first ones: they ascend) keep every token's count."""
  return sum(order < cfg.dense_below for order in cfg.orders)


def n_contexts(cfg: CountsConfig) -> int:
  return len(context_tags(cfg))


def init_counts(cfg: CountsConfig, batch: int, chunk_tokens: int, vocab: int) -> CountState:
  """The state before any token: nothing recent, empty tables."""
  if cfg.limit + chunk_tokens >= 1 << 15:
    # A row's count reaches limit + a chunk's tokens before it halves: int16 dense rows.
    raise ValueError(f"counts.limit = {cfg.limit}: at most {(1 << 15) - 1 - chunk_tokens} "
                     f"with {chunk_tokens}-token chunks")
  D, N = n_dense(cfg), lookback(cfg)
  P, S, S2 = n_contexts(cfg) - D, 1 << cfg.table_log2, 1 << cfg.dense_log2
  return CountState(recent_BxN=jnp.full((batch, N), -1, jnp.int32),
                    dense_check_BxDxS=jnp.zeros((batch, D, S2), jnp.int32),
                    dense_BxDxSxV=jnp.zeros((batch, D, S2, vocab), jnp.int16),
                    check_BxPxS=jnp.zeros((batch, P, S), jnp.int32),
                    entry_BxPxSxK=jnp.zeros((batch, P, S, cfg.keep), entry_layout(vocab).dtype),
                    pending_BxT=jnp.zeros((batch, chunk_tokens), jnp.int32),
                    n_pending_B=jnp.zeros((batch,), jnp.int32))


def _slot_and_check(h_OxT, table_log2: int):
  """(slot: the hash's top bits, check: the hash as a positive int32, never 0)."""
  slot_OxT = (h_OxT >> (32 - table_log2)).astype(jnp.int32)
  check_OxT = ((h_OxT >> 1) | 1).astype(jnp.int32)
  return slot_OxT, check_OxT


def _running_sum(x_TxV, block: int = 16):
  """Inclusive running sum along T, as two small triangular matmuls (within blocks of 16,
  then across blocks): XLA's cumsum on CPU is a quadratic reduce-window, and a log-depth
  scan compiles slowly. Exact for the small integer counts summed here."""
  T, V = x_TxV.shape
  n = -(-T // block)
  x_NxLxV = jnp.pad(x_TxV, ((0, n * block - T), (0, 0))).reshape(n, block, V)
  within_NxLxV = jnp.einsum("ij,njv->niv", jnp.tril(jnp.ones((block, block), x_TxV.dtype)),
                            x_NxLxV, precision="highest")
  before_NxV = jnp.einsum("mn,nv->mv", jnp.tril(jnp.ones((n, n), x_TxV.dtype), -1),
                          within_NxLxV[:, -1], precision="highest")
  return (within_NxLxV + before_NxV[:, None]).reshape(n * block, V)[:T]


def _earlier_in_chunk(key_T, tokens_T, onehot_TxV, recent: int):
  """Per position t, over the earlier t' < t with key[t'] == key[t]: the sum of onehot[t']
  ([T, V]), and the tokens of the latest `recent` of them, nearest first ([T, recent], -1: none).

  Sorting by (key, t) makes each key's positions a run in time order; a running
  sum along the sorted order minus its value where the run began counts only
  that key's earlier positions: T·V work, not T²·V.
  """
  T = key_T.shape[0]
  t_T = jnp.arange(T)
  key_sorted_T, perm_T = jax.lax.sort((key_T, t_T), num_keys=2)
  x_TxV = onehot_TxV[perm_T]
  before_TxV = _running_sum(x_TxV) - x_TxV
  starts_T = jnp.concatenate([jnp.ones((1,), bool), key_sorted_T[1:] != key_sorted_T[:-1]])
  run_start_T = jax.lax.cummax(jnp.where(starts_T, t_T, 0))
  earlier_TxV = before_TxV - before_TxV[run_start_T]
  back_TxR = t_T[:, None] - 1 - jnp.arange(recent)[None, :]
  prev_TxR = jnp.where(back_TxR >= run_start_T[:, None], tokens_T[perm_T][back_TxR % T], -1)
  # Back to time order by a gather through the inverse permutation (a [T, V] scatter
  # costs five times as much on CPU).
  inverse_T = jnp.zeros_like(perm_T).at[perm_T].set(t_T)
  return earlier_TxV[inverse_T], prev_TxR[inverse_T]


def _last_in_slot(slot_T, real_T):
  """Whether each real position is the chunk's latest real one in its slot (it writes the slot)."""
  T = slot_T.shape[0]
  t_T = jnp.arange(T)
  # Slots renumbered 0..T-1 by rank, so the scatter is T-sized, not S-sized.
  key_T = jnp.where(real_T, slot_T, -1)
  key_sorted_T, perm_T = jax.lax.sort((key_T, t_T), num_keys=2)
  rank_sorted_T = jnp.cumsum(jnp.concatenate(
      [jnp.zeros((1,), jnp.int32), (key_sorted_T[1:] != key_sorted_T[:-1]).astype(jnp.int32)]))
  rank_T = jnp.zeros_like(rank_sorted_T).at[perm_T].set(rank_sorted_T)
  latest_T = jnp.full((T,), -1, jnp.int32).at[rank_T].max(jnp.where(real_T, t_T, -1))
  return real_T & (latest_T[rank_T] == t_T)


def _most_frequent(cand_OxTxC, count_OxTxV, keep: int, token_bits: int):
  """(count, token) [O, T, keep]: the most frequent of the candidate tokens (-1: none), by
  count then the lower token; the rest of the vocabulary is not searched (a top-k over
  every token costs more than the rest of the update)."""
  C = cand_OxTxC.shape[-1]
  count_OxTxC = jnp.take_along_axis(count_OxTxV, jnp.maximum(cand_OxTxC, 0), axis=-1)
  # One int32 key per candidate orders it: more counts first, then the lower token
  # (counts stay below 2^15, tokens below 2^token_bits). -1: none.
  mask = (1 << token_bits) - 1
  key_OxTxC = jnp.where(cand_OxTxC < 0, -1,
                        (count_OxTxC.astype(jnp.int32) << token_bits) | (mask - cand_OxTxC))
  earlier_1x1xCxC = (jnp.arange(C)[None, :] < jnp.arange(C)[:, None])[None, None]  # j before i
  dup_OxTxC = jnp.any((cand_OxTxC[..., :, None] == cand_OxTxC[..., None, :]) & earlier_1x1xCxC,
                      axis=-1)  # a token already among the candidates before it
  key_OxTxC = jnp.where(dup_OxTxC, -1, key_OxTxC)
  # Each candidate's rank: how many keys are larger (the keys left are unique, but for the
  # -1s, which add nothing whatever their rank); C² comparisons beat a sort (or
  # lax.top_k) of many short rows on CPU.
  rank_OxTxC = jnp.sum(key_OxTxC[..., None, :] > key_OxTxC[..., :, None], axis=-1)
  at_OxTxCxK = rank_OxTxC[..., None] == jnp.arange(keep)[None, None, None]
  top_OxTxK = jnp.sum(jnp.where(at_OxTxCxK, (key_OxTxC + 1)[..., None], 0), axis=-2) - 1
  held_OxTxK = top_OxTxK >= 0  # (key + 1 above: 0 where no candidate has the rank)
  return (jnp.where(held_OxTxK, top_OxTxK >> token_bits, 0),
          jnp.where(held_OxTxK, mask - (top_OxTxK & mask), 0))


def _table_reads(check_OxS, slot_OxT, check_OxT):
  """(the order index of each read, what the slots hold, whether it is each context's)."""
  O, T = slot_OxT.shape
  order_OxT = jnp.broadcast_to(jnp.arange(O)[:, None], (O, T))
  held_OxT = check_OxS[order_OxT, slot_OxT]
  return order_OxT, held_OxT, held_OxT == check_OxT


def _survives(cfg: CountsConfig, hit_OxT, held_OxT, held_top_OxT):
  """Whether the context a slot holds keeps it against the one written now: with
  counts.survive_from > 0, when its most frequent token's count is at least that. It then
  writes back its own counts halved, so a run of newcomers still takes the slot in the
  end. 0: the newest context always takes the slot."""
  if not cfg.survive_from:
    return jnp.zeros_like(hit_OxT)
  return ~hit_OxT & (held_OxT != 0) & (held_top_OxT >= cfg.survive_from)


def _dense_part(cfg: CountsConfig, check_DxS, table_DxSxV, h_DxT, earlier_DxTxV, onehot_TxV,
                real_T):
  """Orders that keep every token's count (a vocabulary-wide row per context): the counts,
  and the tables after the chunk."""
  S = check_DxS.shape[1]
  slot_DxT, check_DxT = _slot_and_check(h_DxT, cfg.dense_log2)
  order_DxT, held_DxT, hit_DxT = _table_reads(check_DxS, slot_DxT, check_DxT)
  row_DxTxV = table_DxSxV[order_DxT, slot_DxT]
  counts_DxTxV = jnp.where(hit_DxT[..., None], row_DxTxV, 0).astype(jnp.float32) + earlier_DxTxV
  # The latest context in each slot writes its row, this chunk's counts added.
  new_DxTxV = (counts_DxTxV + onehot_TxV[None]).astype(jnp.int32)
  over_DxT = jnp.max(new_DxTxV, axis=-1) > cfg.limit
  new_DxTxV = jnp.where(over_DxT[..., None], (new_DxTxV + 1) >> 1, new_DxTxV)
  # A frequent context keeps its slot against a newcomer, its counts halved (`_survives`).
  keeps_DxT = _survives(cfg, hit_DxT, held_DxT, jnp.max(row_DxTxV, axis=-1))
  new_DxTxV = jnp.where(keeps_DxT[..., None], row_DxTxV >> 1, new_DxTxV)
  check_DxT = jnp.where(keeps_DxT, held_DxT, check_DxT)
  # The writes depend on the reads (counts and checks are >= 0, so the max with
  # (min read >> 31) = 0 changes nothing): XLA must read first, and can then
  # update the donated tables in place instead of copying them every step.
  floor = jnp.minimum(jnp.min(held_DxT), jnp.min(row_DxTxV).astype(jnp.int32)) >> 31
  writes_DxT = jax.vmap(_last_in_slot, in_axes=(0, None))(slot_DxT, real_T)
  slot_DxT = jnp.where(writes_DxT, slot_DxT, S)
  check_DxS = check_DxS.at[order_DxT, slot_DxT].set(jnp.maximum(check_DxT, floor), mode="drop")
  table_DxSxV = table_DxSxV.at[order_DxT, slot_DxT].set(
      jnp.maximum(new_DxTxV, floor).astype(table_DxSxV.dtype), mode="drop")
  return counts_DxTxV, (check_DxS, table_DxSxV)


def _sparse_part(cfg: CountsConfig, vocab: int, check_PxS, entry_PxSxK, h_PxT, earlier_PxTxV,
                 prev_PxTxR, tokens_T, onehot_TxV, real_T):
  """Orders that keep each context's `keep` most frequent tokens: the counts, and the tables
  after the chunk."""
  P, T, S = h_PxT.shape[0], h_PxT.shape[1], check_PxS.shape[1]
  slot_PxT, check_PxT = _slot_and_check(h_PxT, cfg.table_log2)
  order_PxT, held_PxT, hit_PxT = _table_reads(check_PxS, slot_PxT, check_PxT)
  held_count_PxTxK, token_PxTxK = decode_entries(entry_PxSxK[order_PxT, slot_PxT], vocab)
  count_PxTxK = jnp.where(hit_PxT[..., None], held_count_PxTxK, 0)
  p_i, t_i = jnp.meshgrid(jnp.arange(P), jnp.arange(T), indexing="ij")
  base_PxTxV = jnp.zeros((P, T, vocab), jnp.float32).at[
      p_i[..., None], t_i[..., None], token_PxTxK].add(count_PxTxK.astype(jnp.float32))
  counts_PxTxV = base_PxTxV + earlier_PxTxV

  # Each slot's new entries, written by the latest context in it: the most frequent of the
  # tokens it kept, this token and those of the `recent` latest earlier ones in the chunk
  # with the same context, counts halved past the limit. Others write out of bounds.
  writes_PxT = jax.vmap(_last_in_slot, in_axes=(0, None))(slot_PxT, real_T)
  cand_PxTxC = jnp.concatenate([jnp.where(count_PxTxK > 0, token_PxTxK, -1),
                                jnp.broadcast_to(tokens_T[None, :, None], (P, T, 1)),
                                prev_PxTxR], axis=-1)
  top_PxTxK, new_token_PxTxK = _most_frequent(cand_PxTxC, counts_PxTxV + onehot_TxV[None],
                                              cfg.keep, entry_layout(vocab).token_bits)
  over_PxT = top_PxTxK[..., 0] > cfg.limit
  top_PxTxK = jnp.where(over_PxT[..., None], (top_PxTxK + 1) >> 1, top_PxTxK)
  new_entry_PxTxK = _encode_entries(top_PxTxK, new_token_PxTxK, vocab)
  keeps_PxT = _survives(cfg, hit_PxT, held_PxT, held_count_PxTxK[..., 0])
  halved_PxTxK = held_count_PxTxK >> 1
  new_entry_PxTxK = jnp.where(keeps_PxT[..., None],
                              jnp.where(halved_PxTxK > 0,
                                        _encode_entries(halved_PxTxK, token_PxTxK, vocab), 0),
                              new_entry_PxTxK)
  check_PxT = jnp.where(keeps_PxT, held_PxT, check_PxT)
  floor = jnp.minimum(jnp.min(held_PxT), jnp.min(held_count_PxTxK)) >> 31  # as in _dense_part
  slot_PxT = jnp.where(writes_PxT, slot_PxT, S)
  check_PxS = check_PxS.at[order_PxT, slot_PxT].set(jnp.maximum(check_PxT, floor), mode="drop")
  entry_PxSxK = entry_PxSxK.at[order_PxT, slot_PxT].set(
      jnp.maximum(new_entry_PxTxK, floor).astype(entry_PxSxK.dtype), mode="drop")
  return counts_PxTxV, (check_PxS, entry_PxSxK)


def _row(cfg: CountsConfig, vocab: int, tables: tuple, recent_N, tokens_T, n_real):
  """One stream: the counts each of the chunk's tokens is predicted from, and the state after.

  tables: (dense checks, dense rows, sparse checks, sparse entries) of this stream.
  """
  T, N, D = tokens_T.shape[0], recent_N.shape[0], n_dense(cfg)
  real_T = jnp.arange(T) < n_real
  ext_E = jnp.concatenate([recent_N, tokens_T])
  h_OxT = context_hashes(cfg, ext_E, T)
  # The chunk's own earlier tokens with the same context (padding counts for nothing).
  onehot_TxV = jax.nn.one_hot(tokens_T, vocab, dtype=jnp.float32) * real_T[:, None]
  _, check_OxT = _slot_and_check(h_OxT, 32)
  earlier_OxTxV, prev_OxTxR = jax.vmap(_earlier_in_chunk, in_axes=(0, None, None, None))(
      jnp.where(real_T[None], check_OxT, 0), tokens_T, onehot_TxV, cfg.recent)
  dense_check, dense, check, entry = tables
  parts = []
  if D:
    counts_DxTxV, (dense_check, dense) = _dense_part(
        cfg, dense_check, dense, h_OxT[:D], earlier_OxTxV[:D], onehot_TxV, real_T)
    parts.append(counts_DxTxV)
  if D < n_contexts(cfg):
    counts_PxTxV, (check, entry) = _sparse_part(
        cfg, vocab, check, entry, h_OxT[D:], earlier_OxTxV[D:], prev_OxTxR[D:], tokens_T,
        onehot_TxV, real_T)
    parts.append(counts_PxTxV)
  recent_N = jax.lax.dynamic_slice_in_dim(ext_E, n_real, N)
  counts_TxOxV = jnp.moveaxis(jnp.concatenate(parts), 0, 1)
  return counts_TxOxV, ((dense_check, dense, check, entry), recent_N)


def _rows(cfg: CountsConfig, vocab: int, state: CountState, tokens_BxT, n_real_B):
  """(counts [B, T, O, V], the state's tables and recent tokens after the chunk)."""
  entry_layout(vocab)  # a vocabulary too large for an entry: a clear error
  counts, (tables, recent) = jax.vmap(lambda tab, r, tok, n: _row(cfg, vocab, tab, r, tok, n))(
      _tables(state), state.recent_BxN, tokens_BxT, n_real_B)
  return counts, state.replace(recent_BxN=recent, dense_check_BxDxS=tables[0],
                               dense_BxDxSxV=tables[1], check_BxPxS=tables[2],
                               entry_BxPxSxK=tables[3])


def _tables(state: CountState) -> tuple:
  return (state.dense_check_BxDxS, state.dense_BxDxSxV, state.check_BxPxS, state.entry_BxPxSxK)


def counts_update(cfg: CountsConfig, vocab: int, state: CountState, tokens_BxT: jax.Array,
                  n_real_B: jax.Array) -> tuple[CountFeatures, CountState]:
  """Counts for the chunk's tokens (each from earlier tokens only), and the state after it.

  The step's path: a chunk starts with no pending tokens. Tokens past n_real_B[b]
  are padding: they are neither counted nor recorded.
  """
  counts_BxTxOxV, state = _rows(cfg, vocab, state, tokens_BxT, n_real_B)
  return CountFeatures(counts_BxTxOxV), state


def counts_next(cfg: CountsConfig, vocab: int, state: CountState) -> CountFeatures:
  """Counts [B, 1, O, V] for the token after the pending ones: what the step would read
  for it at that place in its chunk (`counts_update`'s counts there; tested). The state
  does not move.

  One position's reads, not a chunk's: generation calls this for every token, and
  `_rows` (sorts, running sums, the tables' next contents) would cost a whole chunk.
  """
  B, T = state.pending_BxT.shape
  D = n_dense(cfg)

  def one(tables, recent_N, pending_T, n):
    dense_check, dense, check, entry = tables
    # A placeholder where the next token goes: a position's hash reads only tokens before it.
    ext_E = jnp.concatenate([recent_N, jnp.where(jnp.arange(T) < n, pending_T, 0)])
    h_OxT = context_hashes(cfg, ext_E, T)
    _, check_OxT = _slot_and_check(h_OxT, 32)
    at_Ox1 = jax.lax.dynamic_slice_in_dim(check_OxT, n, 1, axis=1)
    earlier_OxT = (check_OxT == at_Ox1) & (jnp.arange(T) < n)[None]
    counts_OxV = earlier_OxT.astype(jnp.float32) @ jax.nn.one_hot(pending_T, vocab,
                                                                   dtype=jnp.float32)
    h_O1 = jax.lax.dynamic_slice_in_dim(h_OxT, n, 1, axis=1)
    parts = []
    if D:
      slot_Dx1, want_Dx1 = _slot_and_check(h_O1[:D], cfg.dense_log2)
      order_Dx1, _, hit_Dx1 = _table_reads(dense_check, slot_Dx1, want_Dx1)
      row_DxV = dense[order_Dx1, slot_Dx1][:, 0]
      parts.append(jnp.where(hit_Dx1, row_DxV, 0).astype(jnp.float32))
    if D < n_contexts(cfg):
      slot_Px1, want_Px1 = _slot_and_check(h_O1[D:], cfg.table_log2)
      order_Px1, _, hit_Px1 = _table_reads(check, slot_Px1, want_Px1)
      count_PxK, token_PxK = decode_entries(entry[order_Px1, slot_Px1][:, 0], vocab)
      count_PxK = jnp.where(hit_Px1, count_PxK, 0).astype(jnp.float32)
      P = token_PxK.shape[0]
      parts.append(jnp.zeros((P, vocab), jnp.float32).at[
          jnp.arange(P)[:, None], token_PxK].add(count_PxK))
    return counts_OxV + jnp.concatenate(parts)

  counts_BxOxV = jax.vmap(one)(_tables(state), state.recent_BxN, state.pending_BxT,
                               state.n_pending_B)
  return CountFeatures(counts_BxOxV[:, None])


def counts_append(cfg: CountsConfig, vocab: int, state: CountState, tokens_BxU: jax.Array,
                  n_B: jax.Array) -> CountState:
  """The state once n_B[b] more tokens (U <= T) join the chunk in progress: pending until it
  is full, then folded into the tables exactly as `counts_update` folds a chunk."""
  B, T = state.pending_BxT.shape
  U = tokens_BxU.shape[1]
  if U > T:
    raise ValueError(f"counts_append: {U} tokens at once is more than a chunk of {T}")
  j_W = jnp.arange(T + T)
  from_new_BxW = j_W[None, :] - state.n_pending_B[:, None]
  window_BxW = jnp.where(from_new_BxW < 0,
                         jnp.take_along_axis(state.pending_BxT, jnp.clip(j_W, 0, T - 1)[None]
                                             .repeat(B, 0), axis=1),
                         jnp.take_along_axis(tokens_BxU, jnp.clip(from_new_BxW, 0, U - 1),
                                             axis=1))
  total_B = state.n_pending_B + n_B
  full_B = total_B >= T

  def fold(state: CountState) -> CountState:
    _, folded = _rows(cfg, vocab, state, window_BxW[:, :T], jnp.full((B,), T, jnp.int32))
    keep = lambda new, old: jnp.where(full_B.reshape((B,) + (1,) * (new.ndim - 1)), new, old)
    return jax.tree.map(keep, folded, state)

  # Once a chunk in many tokens: the branch skips the fold (and its copy) otherwise.
  state = jax.lax.cond(jnp.any(full_B), fold, lambda s: s, state)
  pending_BxT = jnp.where(full_B[:, None], window_BxW[:, T:], window_BxW[:, :T])
  return state.replace(pending_BxT=pending_BxT,
                       n_pending_B=jnp.where(full_B, total_B - T, total_B))

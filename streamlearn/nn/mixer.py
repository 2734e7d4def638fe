"""The mixer: the final prediction as a learned, context-gated sum of predictions in logit space.

Each input is a log-probability vector over the vocabulary: the network's
(its logits already carry the match model's bonus), one per count order
(`streamlearn.nn.counts`; with `mixer.count_map` a learned function of a token's
count c and its context's total n, `count_map_logprobs`, else log((c + a) / (n + a V))
with a learned pseudo-count a per order), and the match model's longest match as a
one-hot vote. The output logits are sum_j w[g, j] * input_j: a geometric
mixture, the multi-class form of paq's logistic mixer (the gated linear
networks' view of it). The weight set g is chosen per token by a small context: which is the longest count
context seen before, how often (1, 2-3, 4-15, 16+), whether it always saw the
same token, and how long the match is (none, < 16, >= 16). The weights are
parameters with their own learning rate (`mixer.lr_mult`), trained by the same
score-first step on the mixed loss.

With only the network as input and its starting weight 1, the mixer gives back
the network's distribution exactly (softmax is blind to the log-softmax shift).

An APM stage (`mixer.apm`; paq's adaptive probability map, or SSE) can follow:
each token's mixed probability p, as stretch(p) = ln(p / (1 - p)), moves by a
learned piecewise-linear correction r(stretch(p)), interpolated between
`_APM_KNOTS` knots, from two tables summed (paq averages an order-0 and an
order-1 map): one row per gate set, one per previous token. The output logit
of a token is its mixed log-probability plus r; the corrections start at zero,
so the stage starts as the identity, and learn with the mixer's weights. It
recalibrates what the mixture is over- or under-confident about, per context.

Dimension letters: B = streams, T = tokens in a chunk, O = count orders,
V = vocabulary, J = inputs, G = weight sets, M = match orders.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from streamlearn.config import MixerConfig
from streamlearn.nn.counts import CountFeatures
from streamlearn.nn.match import MatchFeatures

_COUNT_BUCKETS = (2, 4, 16)  # seen 1, 2-3, 4-15, 16+ times
_MATCH_BUCKETS = (1, 16)     # no match, shorter than 16, 16 or longer
_APM_KNOTS = 25              # the APM's corrections are set at stretch(p) = -12, -11, ..., 12
_APM_RANGE = 12.0
_PAIR_ROWS = 4096            # the online rows by the two tokens before: their pair, hashed


def gate_sets(n_orders: int, match: bool) -> int:
  """How many weight sets the gating context selects among."""
  counts = (n_orders + 1) * (len(_COUNT_BUCKETS) + 1) * 2 if n_orders else 1
  return counts * ((len(_MATCH_BUCKETS) + 1) if match else 1)


def gate_index(counts: CountFeatures | None, match: MatchFeatures | None) -> jax.Array:
  """int32 [B, T]: each token's weight set, from what the counts and the match model saw."""
  g_BxT = None
  if counts is not None:
    c_BxTxOxV = counts.counts_BxTxOxV
    O = c_BxTxOxV.shape[2]
    n_BxTxO = jnp.sum(c_BxTxOxV, axis=-1)
    seen_BxTxO = n_BxTxO > 0
    # The longest context seen before: 1 + its order's index (orders ascend); 0: none.
    top_BxT = jnp.max(jnp.where(seen_BxTxO, jnp.arange(1, O + 1)[None, None], 0), axis=-1)
    at_BxTx1 = jnp.maximum(top_BxT - 1, 0)[..., None]
    n_BxT = jnp.take_along_axis(n_BxTxO, at_BxTx1, axis=-1)[..., 0]
    most_BxT = jnp.take_along_axis(jnp.max(c_BxTxOxV, axis=-1), at_BxTx1, axis=-1)[..., 0]
    often_BxT = jnp.sum(n_BxT[..., None] >= jnp.asarray([[_COUNT_BUCKETS]], jnp.float32),
                        axis=-1)
    one_token_BxT = (most_BxT == n_BxT) & (top_BxT > 0)
    g_BxT = (top_BxT * (len(_COUNT_BUCKETS) + 1) + often_BxT) * 2 + one_token_BxT
  if match is not None:
    length_BxT = jnp.max(match.length_BxTxO, axis=-1)
    long_BxT = jnp.sum(length_BxT[..., None] >= jnp.asarray([[_MATCH_BUCKETS]]), axis=-1)
    g_BxT = long_BxT if g_BxT is None else g_BxT * (len(_MATCH_BUCKETS) + 1) + long_BxT
  return jnp.zeros((), jnp.int32) if g_BxT is None else g_BxT.astype(jnp.int32)


def count_logprobs(counts: CountFeatures, prior_O) -> jax.Array:
  """float32 [B, T, O, V]: each order's prediction, log((c + a) / (n + a V)).

  An unseen context gives the uniform distribution: a constant the softmax ignores.
  """
  c_BxTxOxV = counts.counts_BxTxOxV
  V = c_BxTxOxV.shape[-1]
  a_O = prior_O[None, None, :, None]
  n_BxTxOx1 = jnp.sum(c_BxTxOxV, axis=-1, keepdims=True)
  return jnp.log(c_BxTxOxV + a_O) - jnp.log(n_BxTxOx1 + a_O * V)


_MAP_BUCKETS = 32  # totals 0-7 exactly, then two buckets per doubling (8, 11, 16, ...)
_MAP_TERMS = 6     # the count map's terms: log(c + a), c >= 1, 2, 4, 8, and c = n


def count_bucket(c):
  """int32: a context's total count's bucket in the count map: exact below 8, then
  logarithmic."""
  log_part = 8 + jnp.floor(2 * jnp.log2(jnp.maximum(c, 8.0) / 8)).astype(jnp.int32)
  return jnp.minimum(jnp.where(c < 8, c.astype(jnp.int32), log_part), _MAP_BUCKETS - 1)


def count_map_start(n_orders: int) -> jax.Array:
  """float32 [O, N, K]: the count map where it starts: log(c + a) alone, the fixed
  formula up to a constant per context (which the softmax ignores)."""
  start_K = np.eye(_MAP_TERMS)[0]
  return jnp.asarray(np.broadcast_to(start_K, (n_orders, _MAP_BUCKETS, _MAP_TERMS)),
                     jnp.float32)


def count_map_logprobs(counts: CountFeatures, weights_OxNxK, prior: float) -> jax.Array:
  """float32 [B, T, O, V]: each order's prediction through the learned count map, a
  log-probability up to a constant per context: a weighted sum of a token's count's
  terms, log(c + a), whether c >= 1, 2, 4 and 8, and whether c = n (the only token seen),
  weighted by the context's order and its total count n (bucketed).

  Its shape in c is learned per order and confidence (how sure a context seen twice,
  always with the same token, is), as a table by count would be; but its V-wide work is
  elementwise: a [B, T, O, V] gather from a table costs as much as the rest of the mix,
  forward and (a scatter) backward."""
  c_BxTxOxV = counts.counts_BxTxOxV
  O = c_BxTxOxV.shape[2]
  n_BxTxO = jnp.sum(c_BxTxOxV, axis=-1)
  w_BxTxOxK = weights_OxNxK[jnp.arange(O)[None, None, :], count_bucket(n_BxTxO)]
  w = lambda k: w_BxTxOxK[..., k, None]
  return (w(0) * jnp.log(c_BxTxOxV + prior) + w(1) * (c_BxTxOxV >= 1)
          + w(2) * (c_BxTxOxV >= 2) + w(3) * (c_BxTxOxV >= 4) + w(4) * (c_BxTxOxV >= 8)
          + w(5) * (c_BxTxOxV == n_BxTxO[..., None]))


def match_vote(match: MatchFeatures, vocab: int) -> jax.Array:
  """float32 [B, T, V]: one on the token the longest match predicts (none without a match)."""
  longest_BxT = jnp.argmax(match.length_BxTxO, axis=-1)
  token_BxT = jnp.take_along_axis(match.token_BxTxO, longest_BxT[..., None], axis=-1)[..., 0]
  found_BxT = jnp.max(match.length_BxTxO, axis=-1) > 0
  return jax.nn.one_hot(token_BxT, vocab, dtype=jnp.float32) * found_BxT[..., None]


class OnlineMix(NamedTuple):
  """The mixer's online part (`mixer.online_lr` > 0), carried with the recurrent state.

  Corrections to the weight sets that move after every token, as paq's mixer
  does, not once a chunk: the mix adapts within a chunk, and from the first
  tokens of a stream on. Each position reads S rows of a table of corrections
  and adds them up: its gate set's, with `mixer.gate_token` its previous
  token's, and with `mixer.online_pairs` that of the two tokens before it
  (hashed to `_PAIR_ROWS` rows, which are online only). A position's own token
  is only known when the next position reads it, so the last position's inputs
  and mix wait here, pending, until the next chunk's first token (the same
  token) arrives.
  """

  delta_BxRxJ: jax.Array   # float32: corrections, a row per weight set (G, then V, then pairs)
  inputs_BxJxV: jax.Array  # the pending position's inputs
  probs_BxV: jax.Array     # its mixed distribution
  rows_BxS: jax.Array      # int32: the rows it read
  pending_B: jax.Array     # bool: whether a position is waiting for its token
  steps_BxR: jax.Array     # float32: how many steps each row has taken
  read_B: jax.Array        # int32: the token the pending position read (0: none yet)


def init_online(batch: int, rows: int, reads: int, inputs: int, vocab: int) -> OnlineMix:
  return OnlineMix(jnp.zeros((batch, rows, inputs), jnp.float32),
                   jnp.zeros((batch, inputs, vocab), jnp.float32),
                   jnp.zeros((batch, vocab), jnp.float32), jnp.zeros((batch, reads), jnp.int32),
                   jnp.zeros((batch,), bool), jnp.zeros((batch, rows), jnp.float32),
                   jnp.zeros((batch,), jnp.int32))


def online_weights(lr: float, online: OnlineMix, base_BxTxJ, x_BxTxJxV, rows_BxTxS, read_BxT,
                   n_real_B, boost: float = 0.0) -> tuple[jax.Array, OnlineMix]:
  """(the online corrections each position is mixed with [B, T, J], the state after).

  Before position t mixes, the token it read (the previous position's target) moves each
  row the previous position read one gradient step up its log-likelihood:
  d log p(y) / d w_j = x_j[y] - sum_v p_v x_j[v]. Positions from n_real_B on change nothing.
  A row's n-th step is lr (1 + boost / n): a weight set seen rarely (a long context, an
  unusual token before) learns fast, one seen often settles, as paq's adaptive rates do.
  """

  def row(online: OnlineMix, base_TxJ, x_TxJxV, rows_TxS, read_T, n_real):
    def position(carry, at):
      delta_RxJ, x_prev_JxV, p_prev_V, rows_prev_S, pending, steps_R, read_prev = carry
      t, base_J, x_JxV, rows_S, y = at
      real = t < n_real
      grad_J = x_prev_JxV[:, y] - x_prev_JxV @ p_prev_V
      lr_S = lr * (1 + boost / (1 + steps_R[rows_prev_S]))
      moves = pending & real
      delta_RxJ = delta_RxJ.at[rows_prev_S].add(jnp.where(moves, lr_S[:, None] * grad_J[None],
                                                          0.0))
      steps_R = steps_R.at[rows_prev_S].add(jnp.where(moves, 1.0, 0.0))
      used_J = jnp.sum(delta_RxJ[rows_S], axis=0)
      p_V = jax.nn.softmax((base_J + used_J) @ x_JxV)
      keep = lambda new, old: jnp.where(real, new, old)
      carry = (delta_RxJ, keep(x_JxV, x_prev_JxV), keep(p_V, p_prev_V),
               keep(rows_S, rows_prev_S), pending | real, steps_R, keep(y, read_prev))
      return carry, used_J

    T = base_TxJ.shape[0]
    carry, used_TxJ = jax.lax.scan(position, tuple(online),
                                   (jnp.arange(T), base_TxJ, x_TxJxV, rows_TxS, read_T))
    return used_TxJ, OnlineMix(*carry)

  args = jax.lax.stop_gradient((base_BxTxJ, x_BxTxJxV))
  used_BxTxJ, online = jax.vmap(row)(online, *args, rows_BxTxS, read_BxT, n_real_B)
  return used_BxTxJ, online


class Mixer(nn.Module):
  """Mixes the network's logits with the count models' and the match model's predictions."""

  cfg: MixerConfig
  n_orders: int      # count contexts read (0: counts off)
  match: bool        # the match model's vote is an input (and its length part of the gate)
  gate_orders: int = 0  # the first ones are n-gram orders, ascending, that the gate reads
                        # (0: all; the word and column contexts come after them)

  @property
  def n_inputs(self) -> int:
    return 1 + self.n_orders + int(self.match)

  @property
  def n_sets(self) -> int:
    return gate_sets(self.gate_orders or self.n_orders, self.match) if self.cfg.gate else 1

  def online_shape(self, vocab: int) -> tuple[int, int]:
    """(rows of the online corrections, rows each position reads)."""
    pairs = self.cfg.online_pairs
    return (self.n_sets + vocab * self.cfg.gate_token + _PAIR_ROWS * pairs,
            1 + int(self.cfg.gate_token) + int(pairs))

  @nn.compact
  def __call__(self, logits_BxTxV, counts: CountFeatures | None,
               match: MatchFeatures | None, previous_BxT: jax.Array | None = None,
               online: OnlineMix | None = None, n_real_B: jax.Array | None = None):
    """The mixed logits; previous_BxT (the token before each position) is a context of the
    token weight sets and the APM. With `online` (`mixer.online_lr` > 0): (the mixed
    logits, the online part after the first n_real_B positions)."""
    O, V = self.n_orders, logits_BxTxV.shape[-1]
    B, T = logits_BxTxV.shape[:2]
    J, G = self.n_inputs, self.n_sets
    start_J = jnp.asarray([1.0] + [self.cfg.count_weight] * O + [0.0] * int(self.match))
    weights_GxJ = self.param("weights", lambda key, shape: jnp.broadcast_to(start_J, shape),
                             (G, J))
    gate_counts = None if not O else CountFeatures(
        counts.counts_BxTxOxV[:, :, :self.gate_orders or O])
    g_BxT = jnp.broadcast_to(gate_index(gate_counts, match if self.match else None)
                             if self.cfg.gate else 0, (B, T))
    w_BxTxJ = weights_GxJ[g_BxT]
    if previous_BxT is None:
      previous_BxT = jnp.zeros((B, T), jnp.int32)
    if self.cfg.gate_token:
      # A second weight set by the previous token, added: paq selects mixer weights by
      # the order-0/1 context too. It starts at zero, so the mix starts as without it.
      w_BxTxJ = w_BxTxJ + self.param("weights_token", nn.initializers.zeros_init(),
                                     (V, J))[previous_BxT]
    inputs = [jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32))[:, :, None]]
    if O and self.cfg.count_map:
      weights_OxNxK = self.param("count_map", lambda key: count_map_start(O))
      inputs.append(count_map_logprobs(counts, weights_OxNxK, self.cfg.prior))
    elif O:
      # The pseudo-count per order, learned in log space (it must stay positive).
      log_prior_O = self.param("log_prior", nn.initializers.constant(math.log(self.cfg.prior)),
                               (O,))
      inputs.append(count_logprobs(counts, jnp.exp(log_prior_O)))
    if self.match:
      inputs.append(match_vote(match, V)[:, :, None])
    x_BxTxJxV = jnp.concatenate(inputs, axis=2)
    if online is not None:
      if n_real_B is None:
        n_real_B = jnp.full((B,), T, jnp.int32)
      rows_BxTxS = g_BxT[..., None]
      if self.cfg.gate_token:  # the token sets' rows follow the gate sets'
        rows_BxTxS = jnp.stack([g_BxT, G + previous_BxT], axis=-1)
      if self.cfg.online_pairs:
        # And a row per pair of tokens before, after those: the first position's token
        # two back is the one the pending position read.
        before_B = jnp.where(online.pending_B, online.read_B, 0)
        two_back_BxT = jnp.concatenate([before_B[:, None], previous_BxT[:, :-1]], axis=1)
        pair_BxT = (G + V * self.cfg.gate_token
                    + (two_back_BxT * V + previous_BxT) % _PAIR_ROWS)
        rows_BxTxS = jnp.concatenate([rows_BxTxS, pair_BxT[..., None]], axis=-1)
      used_BxTxJ, online = online_weights(self.cfg.online_lr, online, w_BxTxJ, x_BxTxJxV,
                                          rows_BxTxS, previous_BxT, n_real_B,
                                          self.cfg.online_boost)
      w_BxTxJ = w_BxTxJ + used_BxTxJ
    out_BxTxV = jnp.einsum("btj,btjv->btv", w_BxTxJ, x_BxTxJxV)
    if self.cfg.apm:
      by_gate_GxK = self.param("apm_gate", nn.initializers.zeros_init(), (G, _APM_KNOTS))
      by_token_VxK = self.param("apm_token", nn.initializers.zeros_init(), (V, _APM_KNOTS))
      out_BxTxV = apm(out_BxTxV, by_gate_GxK[g_BxT] + by_token_VxK[previous_BxT])
    return out_BxTxV if online is None else (out_BxTxV, online)


def apm(logits_BxTxV, corrections_BxTxK) -> jax.Array:
  """Each token's log-probability plus the correction interpolated at its stretch(p)."""
  logp_BxTxV = jax.nn.log_softmax(logits_BxTxV)
  # stretch(p) = ln p - ln(1 - p); the clip keeps it finite where p rounds to 1.
  stretch_BxTxV = logp_BxTxV - jnp.log(jnp.maximum(-jnp.expm1(logp_BxTxV), 1e-30))
  K = corrections_BxTxK.shape[-1]
  at_BxTxV = (jnp.clip(stretch_BxTxV, -_APM_RANGE, _APM_RANGE) + _APM_RANGE) * (
      (K - 1) / (2 * _APM_RANGE))
  lo_BxTxV = jnp.minimum(jnp.floor(at_BxTxV), K - 2).astype(jnp.int32)
  frac_BxTxV = at_BxTxV - lo_BxTxV
  r_lo = jnp.take_along_axis(corrections_BxTxK, lo_BxTxV, axis=-1)
  r_hi = jnp.take_along_axis(corrections_BxTxK, lo_BxTxV + 1, axis=-1)
  return logp_BxTxV + (1 - frac_BxTxV) * r_lo + frac_BxTxV * r_hi

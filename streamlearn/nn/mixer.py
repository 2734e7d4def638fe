"""The mixer: the final prediction as a learned, context-gated sum of predictions in logit space.

Each input is a log-probability vector over the vocabulary: the network's
(its logits already carry the match model's bonus), one per count order
(`streamlearn.nn.counts`: log((c + a) / (n + a V)), a learned pseudo-count a
per order), and the match model's longest match as a one-hot vote. The output
logits are sum_j w[g, j] * input_j: a geometric mixture, the multi-class form
of paq's logistic mixer (the gated linear networks' view of it). The weight
set g is chosen per token by a small context: which is the longest count
context seen before, how often (1, 2-3, 4-15, 16+), whether it always saw the
same token, and how long the match is (none, < 16, >= 16). The weights are
parameters with their own learning rate (`mixer.lr_mult`), trained by the same
score-first step on the mixed loss.

With only the network as input and its starting weight 1, the mixer gives back
the network's distribution exactly (softmax is blind to the log-softmax shift).

Dimension letters: B = streams, T = tokens in a chunk, O = count orders,
V = vocabulary, J = inputs, G = weight sets, M = match orders.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from streamlearn.config import MixerConfig
from streamlearn.nn.counts import CountFeatures
from streamlearn.nn.match import MatchFeatures

_COUNT_BUCKETS = (2, 4, 16)  # seen 1, 2-3, 4-15, 16+ times
_MATCH_BUCKETS = (1, 16)     # no match, shorter than 16, 16 or longer


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


def match_vote(match: MatchFeatures, vocab: int) -> jax.Array:
  """float32 [B, T, V]: one on the token the longest match predicts (none without a match)."""
  longest_BxT = jnp.argmax(match.length_BxTxO, axis=-1)
  token_BxT = jnp.take_along_axis(match.token_BxTxO, longest_BxT[..., None], axis=-1)[..., 0]
  found_BxT = jnp.max(match.length_BxTxO, axis=-1) > 0
  return jax.nn.one_hot(token_BxT, vocab, dtype=jnp.float32) * found_BxT[..., None]


class Mixer(nn.Module):
  """Mixes the network's logits with the count models' and the match model's predictions."""

  cfg: MixerConfig
  n_orders: int      # count orders read (0: counts off)
  match: bool        # the match model's vote is an input (and its length part of the gate)

  @nn.compact
  def __call__(self, logits_BxTxV, counts: CountFeatures | None,
               match: MatchFeatures | None) -> jax.Array:
    O, V = self.n_orders, logits_BxTxV.shape[-1]
    J = 1 + O + int(self.match)
    start_J = jnp.asarray([1.0] + [self.cfg.count_weight] * O + [0.0] * int(self.match))
    G = gate_sets(O, self.match) if self.cfg.gate else 1
    weights_GxJ = self.param("weights", lambda key, shape: jnp.broadcast_to(start_J, shape),
                             (G, J))
    g_BxT = gate_index(counts if O else None, match if self.match else None)
    w_BxTxJ = weights_GxJ[g_BxT if self.cfg.gate else 0]
    if w_BxTxJ.ndim == 1:
      w_BxTxJ = jnp.broadcast_to(w_BxTxJ, logits_BxTxV.shape[:2] + (J,))
    out_BxTxV = w_BxTxJ[..., :1] * jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32))
    if O:
      # The pseudo-count per order, learned in log space (it must stay positive).
      log_prior_O = self.param("log_prior", nn.initializers.constant(math.log(self.cfg.prior)),
                               (O,))
      out_BxTxV = out_BxTxV + jnp.einsum("bto,btov->btv", w_BxTxJ[..., 1:1 + O],
                                         count_logprobs(counts, jnp.exp(log_prior_O)))
    if self.match:
      out_BxTxV = out_BxTxV + w_BxTxJ[..., -1:] * match_vote(match, V)
    return out_BxTxV

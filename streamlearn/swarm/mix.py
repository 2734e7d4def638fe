"""The swarm's own prediction: a fixed-share mixture of its members', token by token.

Member m gives the token at t the probability p_m,t = exp(-nll_m,t), so the
mixture's is sum_m w_m,t p_m,t: only the members' per-token NLLs are needed,
which every step returns. The weights come from the tokens before t alone, so
the mixture's score is prequential like every member's:

    posterior    v_m   ∝ w_m,t p_m,t^η         η = swarm.mix_eta (1: Bayes' rule)
    fixed share  w_m,t+1 = (1 - α) v_m + α / N  α = swarm.mix_share: a member that
                                                 fell behind can lead again

(Herbster & Warmuth's fixed share: the mixture is never much worse than the best
sequence of members with few switches.) In log space, one `lax.scan` over the
chunk's tokens with N numbers in the carry; the weights after a chunk start the
next (swarm.py keeps them, every version records them). A token's NLL that is
not finite counts as probability 0; padding moves nothing.

Dimension letters: N = members, T = tokens per chunk.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Mixing(NamedTuple):
  """What the swarm step mixes with: the weights before the chunk and the two rates
  (arrays, so a change recompiles nothing)."""

  logw_N: jax.Array   # float32 log-weights (normalised by the step)
  eta: jax.Array      # float32: how hard a loss lowers a weight
  share: jax.Array    # float32 in [0, 1): the weight spread back over all members per token


def uniform_logw(n: int) -> np.ndarray:
  return np.full(n, -np.log(n), np.float32)


def mix_chunk(logw_N, nll_NxT, mask_T, eta, share) -> tuple[jax.Array, jax.Array]:
  """(log-weights after the chunk, the mixture's NLL of each token in nats [T], 0 on padding).

  Args:
    logw_N: log-weights before the chunk (any scale: normalised here).
    nll_NxT: each member's NLL of each token (nats).
    mask_T: 1 on real tokens, 0 on padding.
    eta: the learning rate of the weights (> 0).
    share: the fixed-share rate, in [0, 1).
  """
  N = logw_N.shape[0]
  logw_N = logw_N - jax.nn.logsumexp(logw_N)
  logp_TxN = jnp.where(jnp.isfinite(nll_NxT), -nll_NxT, -jnp.inf).T.astype(jnp.float32)
  keep, spread = jnp.log1p(-share), jnp.log(share / N)

  def token(logw_N, x):
    logp_N, real = x
    mix_logp = jax.nn.logsumexp(logw_N + logp_N)  # before this token's loss is known
    tempered_N = logw_N + eta * logp_N
    z = jax.nn.logsumexp(tempered_N)
    after_N = jnp.logaddexp(keep + tempered_N - z, spread)
    # Padding, or no member gave the token any probability: the weights stay.
    return (jnp.where(real & jnp.isfinite(z), after_N, logw_N),
            jnp.where(real, -mix_logp, 0.0))

  logw_N, mix_nll_T = jax.lax.scan(token, logw_N, (logp_TxN, mask_T > 0))
  return logw_N, mix_nll_T

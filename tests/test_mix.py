"""The swarm's mixture (swarm/mix.py) against a slow NumPy reference: values, causality, limits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from streamlearn.swarm.mix import mix_chunk, uniform_logw

mix = jax.jit(mix_chunk)


def reference(logw_N, nll_NxT, mask_T, eta, share):
  """Fixed share as written, in float64 probabilities, one token at a time."""
  w_N = np.exp(np.asarray(logw_N, np.float64))
  w_N /= w_N.sum()
  N, T = nll_NxT.shape
  out_T = np.zeros(T)
  for t in range(T):
    if not mask_T[t]:
      continue
    p_N = np.exp(-np.asarray(nll_NxT[:, t], np.float64))
    out_T[t] = -np.log(np.dot(w_N, p_N))
    v_N = w_N * p_N ** eta
    w_N = (1 - share) * v_N / v_N.sum() + share / N
  return np.log(w_N), out_T


def random_losses(rng, N, T):
  # Members that are each good on a stretch of their own, as PBT's members are.
  nll_NxT = rng.gamma(2.0, 1.0, (N, T))
  for m in range(N):
    nll_NxT[m, m * T // N:(m + 1) * T // N] *= 0.2
  return nll_NxT.astype(np.float32)


@pytest.mark.parametrize("eta, share", [(1.0, 0.0), (0.5, 0.02), (2.0, 0.3)])
def test_mixture_matches_the_reference(rng, eta, share):
  N, T = 4, 97
  nll_NxT = random_losses(rng, N, T)
  mask_T = (np.arange(T) < 90).astype(np.float32)  # the end of a stream: padding
  logw_N = np.log(rng.dirichlet(np.ones(N))).astype(np.float32)
  got_logw, got_T = mix(logw_N, nll_NxT, mask_T, eta, share)
  want_logw, want_T = reference(logw_N, nll_NxT, mask_T, eta, share)
  np.testing.assert_allclose(got_T, want_T, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got_logw, want_logw, rtol=1e-4, atol=1e-4)
  assert np.all(got_T[90:] == 0)
  if eta == 1.0 and share == 0.0:  # Bayes: never more than log N behind the best member
    assert got_T.sum() <= (nll_NxT * mask_T).sum(1).min() - logw_N.min() + 1e-3
  # Two chunks in a row are one chunk: the weights carry it all.
  mid_logw, first_T = mix(logw_N, nll_NxT[:, :40], mask_T[:40], eta, share)
  end_logw, second_T = mix(mid_logw, nll_NxT[:, 40:], mask_T[40:], eta, share)
  np.testing.assert_allclose(np.concatenate([first_T, second_T]), got_T, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(end_logw, got_logw, rtol=1e-5, atol=1e-5)


def test_a_tokens_score_never_sees_later_losses(rng):
  N, T, t = 3, 64, 30
  nll_NxT = random_losses(rng, N, T)
  changed = nll_NxT.copy()
  changed[:, t:] = rng.gamma(2.0, 3.0, (N, T - t))
  args = (uniform_logw(N), np.ones(T, np.float32), 1.0, 0.05)
  _, before_T = mix(args[0], nll_NxT, *args[1:])
  _, after_T = mix(args[0], changed, *args[1:])
  np.testing.assert_array_equal(before_T[:t], after_T[:t])
  assert not np.array_equal(before_T[t:], after_T[t:])
  # And by gradient: the score at t has exactly zero gradient wrt every later token's losses;
  # wrt its own, minus the weights it was predicted with (sum 1: they came from before t).
  grad = np.asarray(jax.grad(lambda x: mix_chunk(args[0], x, *args[1:])[1][t])(
      jnp.asarray(nll_NxT)))
  assert np.all(grad[:, t + 1:] == 0) and np.any(grad[:, :t] != 0)
  np.testing.assert_allclose(grad[:, t].sum(), 1.0, rtol=1e-5)


def test_one_member_or_one_dominating_weight_is_that_member(rng):
  nll_NxT = random_losses(rng, 4, 50)
  mask_T = np.ones(50, np.float32)
  _, alone_T = mix(uniform_logw(1), nll_NxT[2:3], mask_T, 1.0, 0.1)
  # (float32: the log-weight renormalised to 0 leaves rounding of ~1e-7 nats)
  np.testing.assert_allclose(alone_T, nll_NxT[2], rtol=1e-6, atol=1e-6)
  # Share 0 and every other weight e^-200: the mixture is member 2 (its losses are finite).
  logw_N = np.array([-200.0, -200.0, 0.0, -200.0], np.float32)
  _, ruled_T = mix(logw_N, nll_NxT, mask_T, 1.0, 0.0)
  np.testing.assert_allclose(ruled_T, nll_NxT[2], rtol=1e-5, atol=1e-6)


def test_a_member_with_non_finite_losses_drops_out(rng):
  nll_NxT = random_losses(rng, 3, 20)
  nll_NxT[1, 5:] = np.nan
  logw_N, out_T = mix(uniform_logw(3), nll_NxT, np.ones(20, np.float32), 1.0, 0.0)
  assert np.all(np.isfinite(out_T)) and np.isneginf(logw_N[1])

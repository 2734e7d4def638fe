"""linear_scan: every implementation against a float64 NumPy reference and each other."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from streamlearn.nn.scan import ScanImpl, auto_impl, linear_scan

IMPLS = (ScanImpl.LAX, ScanImpl.ASSOCIATIVE, ScanImpl.BLOCKED, ScanImpl.PALLAS)
TOL = {"float32": 1e-5, "bfloat16": 1e-2}


# --- references and helpers -------------------------------------------------

def numpy_scan(a, b, h0, reverse=False):
  """float64 h_t = a_t * h_{t-1} + b_t, the ground truth for every test."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  h = np.asarray(h0, np.float64).copy()
  h_all = np.empty_like(a)
  steps = range(a.shape[1] - 1, -1, -1) if reverse else range(a.shape[1])
  for t in steps:
    h = a[:, t] * h + b[:, t]
    h_all[:, t] = h
  return h_all, h


def numpy_scan_vjp(a, h0, h_all, g_all, g_last, reverse=False):
  """float64 adjoint of `numpy_scan`: (da, db, dh0) for cotangents (g_all, g_last)."""
  a = np.asarray(a, np.float64)
  g_all = np.asarray(g_all, np.float64)
  T = a.shape[1]
  lam = np.empty_like(a)
  carry = np.asarray(g_last, np.float64).copy()
  steps = range(T) if reverse else range(T - 1, -1, -1)
  for t in steps:
    lam[:, t] = g_all[:, t] + carry
    carry = a[:, t] * lam[:, t]
  h0 = np.asarray(h0, np.float64)[:, None]
  h_prev = (np.concatenate([h_all[:, 1:], h0], 1) if reverse
            else np.concatenate([h0, h_all[:, :-1]], 1))
  return lam * h_prev, lam, carry


def rel_err(x, ref) -> float:
  """max |x - ref| / max |ref|; NaN or Inf anywhere in x gives inf."""
  x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  if not np.all(np.isfinite(x)):
    return float("inf")
  scale = max(float(np.max(np.abs(ref), initial=0.0)), 1e-30)
  return float(np.max(np.abs(x - ref), initial=0.0)) / scale


def random_inputs(rng, B, T, D, dtype):
  """a in [0, 1] with exact 0s and 1s sprinkled in; b, h0 standard normal."""
  a = rng.uniform(0.0, 1.0, (B, T, D))
  a[rng.random(a.shape) < 0.05] = 0.0
  a[rng.random(a.shape) < 0.05] = 1.0
  cast = lambda x: jnp.asarray(x, jnp.float32).astype(dtype)
  return cast(a), cast(rng.standard_normal((B, T, D))), cast(rng.standard_normal((B, D)))


@functools.cache
def jitted_scan(impl, reverse):
  return jax.jit(functools.partial(linear_scan, impl=impl, reverse=reverse))


@functools.cache
def jitted_all_impls(reverse):
  """Every implementation in one jit: one compilation per shape instead of three."""
  return jax.jit(lambda a, b, h0: {impl.value: linear_scan(a, b, h0, impl=impl, reverse=reverse)
                                   for impl in IMPLS})


@functools.cache
def jitted_vjp(impl, reverse):
  def vjp(a, b, h0, g_all, g_last):
    _, pullback = jax.vjp(functools.partial(linear_scan, impl=impl, reverse=reverse), a, b, h0)
    return pullback((g_all, g_last))
  return jax.jit(vjp)


# --- values -------------------------------------------------------------------

# LONG_T stands in for a long chunk. Every implementation's structure is
# exercised at this length: the interpreted Pallas kernel walks 16 full tiles of
# 4 steps plus a 3-step remainder, BLOCKED cuts time into 9 blocks of 8 steps
# with a short last block (5 padding steps), and ASSOCIATIVE meets an odd length
# at the top level. (T = 301 and 1000, used before, reach no path this length
# does not, and cost ~2x and ~3x as much per compilation: BLOCKED unrolls
# ~2 sqrt(T) steps, the kernel's interpreter pays per tile.)
LONG_T = 67

# Every T, every D, both dtypes and both directions appear, in 8 of the 48
# combinations of the full grid (each compiles anew: the whole grid took ~4 min):
# each T with both dtypes and both directions, each D with both dtypes and both
# directions, and each dtype with each direction twice.
VALUE_CASES = [
    (1, 1, "float32", False),
    (1, 512, "bfloat16", True),
    (7, 130, "float32", True),
    (7, 1, "bfloat16", False),
    (128, 512, "float32", False),
    (128, 1, "bfloat16", True),
    (LONG_T, 512, "float32", True),
    (LONG_T, 130, "bfloat16", False),
]


@pytest.mark.parametrize("T,D,dtype,reverse", VALUE_CASES)
def test_values_match_float64_reference(rng, T, D, dtype, reverse):
  a, b, h0 = random_inputs(rng, 2, T, D, dtype)
  ref_all, ref_last = numpy_scan(a.astype(jnp.float32), b.astype(jnp.float32),
                                 h0.astype(jnp.float32), reverse)
  for impl, (h_all, h_last) in jitted_all_impls(reverse)(a, b, h0).items():
    assert h_all.shape == (2, T, D) and h_last.shape == (2, D)
    assert h_all.dtype == dtype and h_last.dtype == dtype
    for name, got, ref in (("h_all", h_all, ref_all), ("h_last", h_last, ref_last)):
      err = rel_err(got, ref)
      assert err <= TOL[dtype], f"{impl} {name}: relative error {err:.3g}"


def test_nan_never_passes():
  ref = np.ones((1, 3, 2))
  assert rel_err(np.full((1, 3, 2), np.nan), ref) == float("inf")
  poisoned = np.ones((1, 3, 2))
  poisoned[0, 1, 1] = np.nan
  assert not rel_err(poisoned, ref) <= 1.0


def test_bf16_inputs_accumulate_in_f32_and_keep_an_f32_state(rng):
  a, b, _ = random_inputs(rng, 2, 100, 64, "bfloat16")
  h0 = jnp.asarray(rng.standard_normal((2, 64)), jnp.float32)
  _, ref_last = numpy_scan(a.astype(jnp.float32), b.astype(jnp.float32), h0)
  for impl in IMPLS:
    h_all, h_last = jitted_scan(impl, False)(a, b, h0)
    assert h_all.dtype == jnp.bfloat16 and h_last.dtype == jnp.float32
    # A bf16 carry is off by ~3e-3 after 100 steps (measured); an f32 one by ~1e-7.
    assert rel_err(h_last, ref_last) <= 1e-5, impl


# --- gradients ----------------------------------------------------------------

# Every T, D, dtype and direction of the value grid appears, in fewer
# combinations: a gradient compile costs several times a forward one.
@pytest.mark.parametrize("T,D,dtype,reverse", [
    (1, 130, "float32", False),
    (7, 1, "bfloat16", True),
    (128, 512, "bfloat16", False),
    (LONG_T, 130, "float32", True),
])
def test_gradients_match_lax(rng, T, D, dtype, reverse):
  a, b, h0 = random_inputs(rng, 2, T, D, dtype)
  g_all = jnp.asarray(rng.standard_normal((2, T, D)), jnp.float32).astype(dtype)
  g_last = jnp.asarray(rng.standard_normal((2, D)), jnp.float32).astype(dtype)
  want = jitted_vjp(ScanImpl.LAX, reverse)(a, b, h0, g_all, g_last)
  for impl in (ScanImpl.PALLAS, ScanImpl.ASSOCIATIVE, ScanImpl.BLOCKED):
    got = jitted_vjp(impl, reverse)(a, b, h0, g_all, g_last)
    for name, x, ref in zip(("da", "db", "dh0"), got, want):
      assert x.dtype == ref.dtype == dtype
      err = rel_err(x, np.asarray(ref.astype(jnp.float32), np.float64))
      assert err <= TOL[dtype], f"{impl.value} {name}: relative error {err:.3g}"


@pytest.mark.parametrize("reverse", [False, True])
def test_lax_gradients_match_float64_adjoint(rng, reverse):
  a, b, h0 = random_inputs(rng, 3, 50, 17, "float32")
  g_all = jnp.asarray(rng.standard_normal((3, 50, 17)), jnp.float32)
  g_last = jnp.asarray(rng.standard_normal((3, 17)), jnp.float32)
  h_all, _ = numpy_scan(a, b, h0, reverse)
  want = numpy_scan_vjp(a, h0, h_all, g_all, g_last, reverse)
  got = jitted_vjp(ScanImpl.LAX, reverse)(a, b, h0, g_all, g_last)
  for name, x, ref in zip(("da", "db", "dh0"), got, want):
    assert rel_err(x, ref) <= 1e-5, name


# --- streaming, vmap, causality ---------------------------------------------

@pytest.mark.parametrize("impl", IMPLS, ids=lambda i: i.value)
@pytest.mark.parametrize("reverse", [False, True])
def test_chunks_with_carried_state_equal_one_call(rng, impl, reverse):
  a, b, h0 = random_inputs(rng, 2, 99, 33, "float32")
  scan = jitted_scan(impl, reverse)
  whole_all, whole_last = scan(a, b, h0)
  # A one-step chunk, then two of 49: one shape twice, so one compilation fewer.
  bounds = [0, 1, 50, 99]
  pieces = list(zip(bounds[:-1], bounds[1:]))
  if reverse:  # a reversed stream is consumed from its end
    pieces = pieces[::-1]
  h = h0
  outs = {}
  for lo, hi in pieces:
    outs[lo], h = scan(a[:, lo:hi], b[:, lo:hi], h)
  chunked_all = jnp.concatenate([outs[lo] for lo, _ in zip(bounds[:-1], bounds[1:])], axis=1)
  np.testing.assert_allclose(chunked_all, whole_all, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(h, whole_last, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS, ids=lambda i: i.value)
def test_vmap_over_swarm_axis_equals_loop(rng, impl):
  S = 3
  a, b, h0 = random_inputs(rng, S * 2, 20, 9, "float32")
  a, b, h0 = a.reshape(S, 2, 20, 9), b.reshape(S, 2, 20, 9), h0.reshape(S, 2, 9)

  def loss(a, b, h0):
    h_all, h_last = linear_scan(a, b, h0, impl=impl)
    return jnp.sum(jnp.sin(h_all)) + jnp.sum(h_last ** 2)

  value_and_grads = jax.value_and_grad(loss, argnums=(0, 1, 2))
  batched = jax.jit(jax.vmap(value_and_grads))(a, b, h0)
  single_fn = jax.jit(value_and_grads)
  for s in range(S):
    single = single_fn(a[s], b[s], h0[s])
    for got, want in zip(jax.tree.leaves(batched), jax.tree.leaves(single)):
      np.testing.assert_allclose(got[s], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS, ids=lambda i: i.value)
def test_nested_vmap_with_a_shared_state_equals_loop(rng, impl):
  a, b, _ = random_inputs(rng, 2 * 3 * 2, 11, 5, "float32")
  a, b = a.reshape(2, 3, 2, 11, 5), b.reshape(2, 3, 2, 11, 5)
  h0 = jnp.asarray(rng.standard_normal((2, 5)), jnp.float32)  # one h0 for every member
  scan = functools.partial(linear_scan, impl=impl)
  nested = jax.jit(jax.vmap(jax.vmap(scan, in_axes=(0, 0, None)), in_axes=(0, 0, None)))
  h_all, h_last = nested(a, b, h0)
  for i in range(2):
    for j in range(3):
      want_all, want_last = numpy_scan(a[i, j], b[i, j], h0)
      assert rel_err(h_all[i, j], want_all) <= 1e-5
      assert rel_err(h_last[i, j], want_last) <= 1e-5


@pytest.mark.parametrize("impl", IMPLS, ids=lambda i: i.value)
@pytest.mark.parametrize("reverse", [False, True])
def test_causality_by_gradient(rng, impl, reverse):
  T = 6
  a, b, h0 = random_inputs(rng, 1, T, 3, "float32")
  a = jnp.clip(a, 0.1, 1.0)  # no zero gate, so every allowed path is visible
  scan = lambda a, b: linear_scan(a, b, h0, impl=impl, reverse=reverse)[0]
  jac_a, jac_b = jax.jit(jax.jacrev(scan, argnums=(0, 1)))(a, b)
  for jac in (jac_b, jac_a):
    dh_db = np.asarray(jac)[0, :, :, 0, :, :]  # [t, d, s, d']
    for t in range(T):
      for s in range(T):
        future = s < t if reverse else s > t
        block = dh_db[t, :, s, :]
        if future:
          assert np.all(block == 0.0), f"h_{t} depends on step {s}"
        else:
          # Diagonal recurrence: channel d sees only channel d of the past.
          assert np.all(block[~np.eye(3, dtype=bool)] == 0.0)
          assert np.all(np.diag(block) != 0.0)


# --- API edges ----------------------------------------------------------------

def test_impl_by_name_and_auto_resolution(rng):
  a, b, h0 = random_inputs(rng, 1, 5, 4, "float32")
  ref, _ = numpy_scan(a, b, h0)
  for name in ("auto", "lax", "associative", "pallas"):
    assert rel_err(linear_scan(a, b, h0, impl=name)[0], ref) <= 1e-5, name
  # The table in docs/benchmarks.md ("Scan core"): change both together.
  assert auto_impl("cpu") is ScanImpl.PALLAS and auto_impl() is auto_impl(jax.default_backend())
  assert auto_impl("gpu") is ScanImpl.ASSOCIATIVE and auto_impl("tpu") is ScanImpl.ASSOCIATIVE
  assert auto_impl("metal") is ScanImpl.LAX  # an unmeasured backend: the reference


def test_empty_time_axis_passes_the_state_through():
  h0 = jnp.ones((2, 3))
  h_all, h_last = linear_scan(jnp.zeros((2, 0, 3)), jnp.zeros((2, 0, 3)), h0)
  assert h_all.shape == (2, 0, 3)
  np.testing.assert_array_equal(h_last, h0)


@pytest.mark.parametrize("shapes,match", [
    (((2, 5, 3), (2, 5, 4), (2, 3)), "a and b must both be"),
    (((2, 5, 3), (2, 5, 3), (2, 4)), "h0 must be"),
    (((5, 3), (5, 3), (3,)), "a and b must both be"),
])
def test_bad_shapes_get_one_clear_error(shapes, match):
  a, b, h0 = (jnp.zeros(s) for s in shapes)
  with pytest.raises(ValueError, match=match):
    linear_scan(a, b, h0)


def test_integer_inputs_are_rejected():
  with pytest.raises(TypeError, match="floating point"):
    linear_scan(jnp.zeros((1, 2, 3), jnp.int32), jnp.zeros((1, 2, 3)), jnp.zeros((1, 3)))

"""The GPU path of the Pallas kernel: it lowers to Triton for CUDA, and its tiling computes
what the lax reference does (run by the interpreter), with no GPU present.

Lowering runs the whole Pallas→Triton translation (tile shapes, pointer
arithmetic, loop structure); only PTX compilation and execution need the device.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from streamlearn.kernels.linear_scan import default_config, pallas_linear_scan
from streamlearn.nn.scan import lax_linear_scan

TRITON_CALL = "__gpu$xla.gpu.triton"


@pytest.mark.parametrize("B,T,D,dtype", [
    (2, 7, 130, jnp.float32),     # width padded to the block
    (1, 1, 1, jnp.float32),       # the smallest tile
    (3, 37, 256, jnp.bfloat16),   # time not a multiple of the tile
])
def test_forward_and_backward_lower_to_triton_for_cuda(B, T, D, dtype):
  config = default_config(B, D, backend="gpu")
  assert not config.interpret

  def loss(a, b, h0):
    h_all, h_last = pallas_linear_scan(a, b, h0, reverse=True, config=config)
    return jnp.sum(h_all.astype(jnp.float32)) + jnp.sum(h_last)

  args = (jax.ShapeDtypeStruct((B, T, D), dtype), jax.ShapeDtypeStruct((B, T, D), dtype),
          jax.ShapeDtypeStruct((B, D), jnp.float32))
  lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*args).lower(
      lowering_platforms=("cuda",))
  # One Triton call forward, one for the transposed backward recurrence.
  assert lowered.as_text().count(TRITON_CALL) == 2


def test_the_gpu_tiling_runs_interpreted_like_the_lax_reference():
  # The GPU's KernelConfig run by the Pallas interpreter on this CPU, values and gradients:
  # a grid over rows and 64-lane blocks (130 lanes padded to 192), 16-step tiles with a
  # remainder (19 steps), narrow bf16 stores.
  B, T, D, dtype = 2, 19, 130, jnp.bfloat16
  config = dataclasses.replace(default_config(B, D, backend="gpu"), interpret=True,
                               wide_stores=False)
  assert config.block_d == 64 and config.block_b == 1
  keys = jax.random.split(jax.random.PRNGKey(T), 5)
  a = jax.random.uniform(keys[0], (B, T, D)).astype(dtype)
  b = jax.random.normal(keys[1], (B, T, D)).astype(dtype)
  h0 = jax.random.normal(keys[2], (B, D), jnp.float32)
  g_all = jax.random.normal(keys[3], (B, T, D)).astype(dtype)
  g_last = jax.random.normal(keys[4], (B, D), jnp.float32)
  tol = 2e-2  # bf16 outputs
  for reverse in (False, True):
    def vjp(scan):
      out, pullback = jax.vjp(functools.partial(scan, reverse=reverse), a, b, h0)
      return out, pullback((g_all, g_last))
    got = jax.jit(lambda: vjp(functools.partial(pallas_linear_scan, config=config)))()
    want = jax.jit(lambda: vjp(lax_linear_scan))()
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      assert x.dtype == y.dtype
      np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32),
                                 rtol=tol, atol=tol)

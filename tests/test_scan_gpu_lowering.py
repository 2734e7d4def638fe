"""The GPU path of the Pallas kernel lowers to a Triton kernel for CUDA, with no GPU present.

Lowering runs the whole Pallas→Triton translation (tile shapes, pointer
arithmetic, loop structure); only PTX compilation and execution need the device.
"""

import jax
import jax.numpy as jnp
import pytest

from streamlearn.kernels.linear_scan import default_config, pallas_linear_scan

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

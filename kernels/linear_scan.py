"""Pallas kernel for the gated diagonal recurrence h_t = a_t * h_{t-1} + b_t.

Dimension letters: B = batch rows, T = time steps, D = width (channels).

The kernel is written for the GPU (Triton lowering): the grid blocks over batch
and width, and each program walks the whole time axis with its carry held in
registers. Time is walked in tiles of `block_t` steps whose loads are issued
together, so a program keeps many independent loads in flight while the
dependent multiply-add chain runs; the carry crosses tile boundaries in the
loop state. Where there is no GPU the same kernel runs under Pallas'
interpreter, with one block covering the whole array (the interpreter pays per
program and per step, not per lane).

The backward pass is the same kernel run in the opposite time direction in its
"transposed" form (y_t = x_t + c; c = a_t * y_t), which is exactly the adjoint
of the forward recurrence; see `_scan_bwd`.

The plain `lax.scan` specification lives in `streamlearn.scan.lax_linear_scan`;
tests hold this kernel to it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Lanes per GPU program. 64 f32 lanes with one warp is two elements per thread:
# 256-byte coalesced rows, and enough programs to fill the SMs at D >= 512.
_GPU_BLOCK_D = 64
# Time steps whose loads are issued together. 16 rows x 2 inputs x 256 B keeps
# ~8 KiB in flight per warp, enough to cover DRAM latency at a few warps per SM.
_GPU_BLOCK_T = 16
# The interpreter runs one program over the whole array; a small unroll trims
# its per-iteration loop overhead without bloating compile time.
_INTERPRET_BLOCK_T = 4


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Static tiling of the scan kernel (hashable: it is part of the jit key).

  Attributes:
    block_b: batch rows per program.
    block_d: width lanes per program (a power of two when compiled for GPU).
    block_t: time steps unrolled per loop iteration.
    num_warps: Triton warps per program (GPU only; None lets Triton choose).
    interpret: run under the Pallas interpreter instead of compiling.
  """

  block_b: int
  block_d: int
  block_t: int
  num_warps: int | None = None
  interpret: bool = False


def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def default_config(batch: int, width: int, backend: str | None = None) -> KernelConfig:
  """Tiling for a [batch, T, width] scan on `backend` (default: JAX's default backend)."""
  backend = backend or jax.default_backend()
  if backend == "gpu":
    block_d = min(_GPU_BLOCK_D, _next_pow2(width))
    return KernelConfig(block_b=1, block_d=block_d, block_t=_GPU_BLOCK_T,
                        num_warps=1, interpret=False)
  # CPU (and TPU, whose memory model this kernel does not target): interpret
  # with a single program covering the whole array, so nothing is padded.
  return KernelConfig(block_b=max(batch, 1), block_d=max(width, 1),
                      block_t=_INTERPRET_BLOCK_T, interpret=True)


def _acc_dtype(*dtypes) -> jnp.dtype:
  """f32 accumulation for f32/bf16/f16 inputs; f64 stays f64 under x64."""
  return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


def _scan_kernel(a_ref, x_ref, c0_ref, y_ref, c_ref, *, reverse: bool,
                 transpose: bool, block_t: int):
  """One program: walk time over a [bb, T, bd] block, carry in registers.

  Forward form:    c = a_t * c + x_t;  y_t = c
  Transposed form: y_t = x_t + c;      c = a_t * y_t
  """
  num_t = a_ref.shape[1]
  acc = c0_ref.dtype if jnp.issubdtype(c0_ref.dtype, jnp.float64) else jnp.float32

  def time_index(i):
    return num_t - 1 - i if reverse else i

  def run_steps(ts, carry):
    # Issue every load of the tile before the dependent chain starts.
    a_rows = [a_ref[:, t, :].astype(acc) for t in ts]
    x_rows = [x_ref[:, t, :].astype(acc) for t in ts]
    for t, a_t, x_t in zip(ts, a_rows, x_rows):
      if transpose:
        y_t = x_t + carry
        carry = a_t * y_t
      else:
        carry = a_t * carry + x_t
        y_t = carry
      y_ref[:, t, :] = y_t.astype(y_ref.dtype)
    return carry

  def tile(k, carry):
    start = k * block_t
    return run_steps([time_index(start + i) for i in range(block_t)], carry)

  carry = c0_ref[...].astype(acc)
  num_tiles = num_t // block_t
  if num_tiles:
    carry = lax.fori_loop(0, num_tiles, tile, carry)
  # The last T % block_t steps have static indices: no padding of the time axis.
  carry = run_steps([time_index(i) for i in range(num_tiles * block_t, num_t)], carry)
  c_ref[...] = carry.astype(c_ref.dtype)


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _pad_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  if x.shape == shape:
    return x
  return jnp.pad(x, [(0, s - d) for s, d in zip(shape, x.shape)])


def _scan_call(a_BxTxD, x_BxTxD, c0_BxD, *, reverse: bool, transpose: bool,
               y_dtype, c_dtype, config: KernelConfig):
  """Runs the kernel once; pads batch and width to the block grid and back."""
  B, T, D = a_BxTxD.shape
  bb, bd = config.block_b, config.block_d
  Bp, Dp = _round_up(B, bb), _round_up(D, bd)
  # Padded lanes see a = x = c0 = 0, so they stay finite and are sliced away.
  a_p = _pad_to(a_BxTxD, (Bp, T, Dp))
  x_p = _pad_to(x_BxTxD, (Bp, T, Dp))
  c0_p = _pad_to(c0_BxD, (Bp, Dp))

  # Under the interpreter a narrow (bf16) output store defeats XLA:CPU's in-place
  # update of the loop buffer (~300x slower, measured); store at accumulator
  # width there and narrow once afterwards.
  kernel_y_dtype = _acc_dtype(y_dtype) if config.interpret else y_dtype

  seq_spec = pl.BlockSpec((bb, T, bd), lambda i, j: (i, 0, j))
  state_spec = pl.BlockSpec((bb, bd), lambda i, j: (i, j))
  compiler_params = None
  if not config.interpret:
    # Name the Triton backend explicitly: Pallas may otherwise pick Mosaic GPU,
    # whose programming model (whole blocks staged in shared memory) this
    # kernel does not follow.
    compiler_params = plgpu.CompilerParams(num_warps=config.num_warps, num_stages=1)
  kernel = functools.partial(_scan_kernel, reverse=reverse, transpose=transpose,
                             block_t=min(config.block_t, T))
  y_p, c_p = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((Bp, T, Dp), kernel_y_dtype),
                 jax.ShapeDtypeStruct((Bp, Dp), c_dtype)),
      grid=(Bp // bb, Dp // bd),
      in_specs=[seq_spec, seq_spec, state_spec],
      out_specs=(seq_spec, state_spec),
      interpret=config.interpret,
      compiler_params=compiler_params,
      name="linear_scan_transposed" if transpose else "linear_scan",
  )(a_p, x_p, c0_p)
  return y_p[:B, :, :D].astype(y_dtype), c_p[:B, :D]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _scan(a_BxTxD, b_BxTxD, h0_BxD, reverse: bool, config: KernelConfig):
  h_BxTxD, h_last_BxD = _scan_call(
      a_BxTxD, b_BxTxD, h0_BxD, reverse=reverse, transpose=False,
      y_dtype=jnp.result_type(a_BxTxD, b_BxTxD), c_dtype=h0_BxD.dtype, config=config)
  return h_BxTxD, h_last_BxD


def _scan_fwd(a_BxTxD, b_BxTxD, h0_BxD, reverse, config):
  h_BxTxD, h_last_BxD = _scan(a_BxTxD, b_BxTxD, h0_BxD, reverse, config)
  # An empty array carries b's dtype: residuals must be arrays.
  b_dtype_tag = jnp.zeros((0,), b_BxTxD.dtype)
  return (h_BxTxD, h_last_BxD), (a_BxTxD, b_dtype_tag, h0_BxD, h_BxTxD)


def _scan_bwd(reverse, config, residuals, cotangents):
  """Adjoint: lam_t = g_t + a_{t+1} lam_{t+1} (forward direction), run reversed.

  With lam_t = dL/dh_t: db_t = lam_t, da_t = lam_t * h_{t-1}, dh0 = a_0 lam_0
  (indices mirrored when the forward pass ran in reverse).
  """
  a_BxTxD, b_dtype_tag, h0_BxD, h_BxTxD = residuals
  b_dtype = b_dtype_tag.dtype
  g_BxTxD, g_last_BxD = cotangents
  acc = _acc_dtype(a_BxTxD.dtype, b_dtype, h0_BxD.dtype)
  lam_BxTxD, dh0_BxD = _scan_call(
      a_BxTxD, g_BxTxD, g_last_BxD.astype(acc), reverse=not reverse, transpose=True,
      y_dtype=acc, c_dtype=acc, config=config)
  h0_Bx1xD = h0_BxD.astype(h_BxTxD.dtype)[:, None, :]
  if reverse:  # h_t = a_t * h_{t+1} + b_t, with h_T = h0
    h_prev_BxTxD = jnp.concatenate([h_BxTxD[:, 1:], h0_Bx1xD], axis=1)
  else:
    h_prev_BxTxD = jnp.concatenate([h0_Bx1xD, h_BxTxD[:, :-1]], axis=1)
  da_BxTxD = lam_BxTxD * h_prev_BxTxD.astype(acc)
  return (da_BxTxD.astype(a_BxTxD.dtype), lam_BxTxD.astype(b_dtype),
          dh0_BxD.astype(h0_BxD.dtype))


_scan.defvjp(_scan_fwd, _scan_bwd)


def pallas_linear_scan(a_BxTxD: jax.Array, b_BxTxD: jax.Array, h0_BxD: jax.Array, *,
                       reverse: bool = False,
                       config: KernelConfig | None = None) -> tuple[jax.Array, jax.Array]:
  """Diagonal linear recurrence with the Pallas kernel, differentiable.

  Args:
    a_BxTxD: decay gates, [B, T, D].
    b_BxTxD: inputs, [B, T, D].
    h0_BxD: state before the first step (after the last one when `reverse`).
    reverse: run time backwards: h_t = a_t * h_{t+1} + b_t.
    config: tiling; `default_config` for the current backend when None.

  Returns:
    (h_BxTxD in the promoted dtype of a and b, h_last_BxD in h0's dtype),
    accumulated in at least float32.
  """
  if config is None:
    B, _, D = a_BxTxD.shape
    config = default_config(B, D)
  return _scan(a_BxTxD, b_BxTxD, h0_BxD, reverse, config)

"""Pallas kernels for the gated diagonal recurrence h_t = a_t * h_{t-1} + b_t.

Dimension letters: B = batch rows, T = time steps, D = width (channels),
S = a vmapped (swarm) axis, N = S * B.

The kernels are written for the GPU (Triton lowering): the grid blocks over
batch and width, and each program walks the whole time axis with its carry in
registers. Time is walked in tiles of `block_t` steps whose loads are issued
together, so a program keeps many independent loads in flight while the
dependent multiply-add chain runs; the carry crosses tile boundaries in the
loop state. Where there is no GPU the same kernels run under Pallas'
interpreter, with one block covering the whole array (the interpreter pays per
program and per step, not per lane).

The backward pass walks the same recurrence the other way: with
lam_t = dL/dh_t, lam_t = g_t + a_{t+1} lam_{t+1}, and then db_t = lam_t,
da_t = lam_t * h_{t-1}, dh0 = a_0 lam_0. One adjoint kernel produces lam and da
in a single pass over (a, g, h).

The plain `lax.scan` specification lives in `streamlearn.nn.scan.lax_linear_scan`;
tests hold these kernels to it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Lanes per GPU program. 64 f32 lanes on one warp is two elements per thread:
# 256-byte coalesced rows, and enough programs to fill the SMs at B*D >= 16K.
_GPU_BLOCK_D = 64
# Time steps whose loads are issued together. In-flight bytes over the whole
# GPU are B * D * block_t * 8 (two f32 inputs), whatever block_d is; 16 steps
# put ~2 MiB in flight at [16, T, 1024], about what covers DRAM latency.
_GPU_BLOCK_T = 16
# The interpreter runs one program over the whole array; a small unroll trims
# its per-iteration loop overhead without bloating compile time.
_INTERPRET_BLOCK_T = 4


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Static tiling of the scan kernels (hashable: it is part of the jit key).

  Attributes:
    block_b: batch rows per program.
    block_d: width lanes per program (a power of two when compiled for GPU).
    block_t: time steps unrolled per loop iteration.
    num_warps: Triton warps per program (GPU only; None lets Triton choose).
    interpret: run under the Pallas interpreter instead of compiling.
    wide_stores: under the interpreter, store outputs at accumulator width and
      narrow once afterwards (fast on XLA:CPU); False stores them as the GPU
      does, which the tests use to run the GPU tiling on a CPU.
  """

  block_b: int
  block_d: int
  block_t: int
  num_warps: int | None = None
  interpret: bool = False
  wide_stores: bool = True


def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def default_config(batch: int, width: int, backend: str | None = None) -> KernelConfig:
  """Tiling for a [batch, T, width] scan on `backend` (default: JAX's default backend)."""
  backend = backend or jax.default_backend()
  if backend == "gpu":
    block_d = min(_GPU_BLOCK_D, _next_pow2(width))
    return KernelConfig(block_b=1, block_d=block_d, block_t=_GPU_BLOCK_T,
                        num_warps=1, interpret=False)
  # CPU (and TPU, whose memory model these kernels do not target): interpret
  # with a single program covering the whole array, so nothing is padded.
  return KernelConfig(block_b=max(batch, 1), block_d=max(width, 1),
                      block_t=_INTERPRET_BLOCK_T, interpret=True)


def _acc_dtype(*dtypes) -> jnp.dtype:
  """f32 accumulation for f32/bf16/f16 inputs; f64 stays f64 under x64."""
  return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


# --- kernel bodies ------------------------------------------------------------

def _walk_time(num_t: int, block_t: int, reverse: bool, run_tile, carry):
  """Calls run_tile(time_indices, carry) over all of [0, num_t), in order.

  Full tiles run in a fori_loop with traced indices; the last num_t % block_t
  steps run with static indices, so the time axis is never padded.
  """
  def time_index(i):
    return num_t - 1 - i if reverse else i

  def tile(k, carry):
    start = k * block_t
    return run_tile([time_index(start + i) for i in range(block_t)], carry)

  num_tiles = num_t // block_t
  if num_tiles:
    carry = lax.fori_loop(0, num_tiles, tile, carry)
  return run_tile([time_index(i) for i in range(num_tiles * block_t, num_t)], carry)


def _forward_kernel(a_ref, b_ref, h0_ref, h_ref, h_last_ref, *, reverse: bool,
                    block_t: int, acc):
  """h_t = a_t * h_{t-1} + b_t over one [bb, T, bd] block."""

  def run_tile(ts, h):
    # Issue every load of the tile before the dependent chain starts.
    a_rows = [a_ref[:, t, :].astype(acc) for t in ts]
    b_rows = [b_ref[:, t, :].astype(acc) for t in ts]
    for t, a_t, b_t in zip(ts, a_rows, b_rows):
      h = a_t * h + b_t
      h_ref[:, t, :] = h.astype(h_ref.dtype)
    return h

  h = _walk_time(a_ref.shape[1], block_t, reverse, run_tile, h0_ref[...].astype(acc))
  h_last_ref[...] = h.astype(h_last_ref.dtype)


def _adjoint_kernel(a_ref, g_ref, h_ref, h0_ref, g_last_ref, db_ref, da_ref, dh0_ref, *,
                    reverse: bool, block_t: int, acc):
  """lam_t = g_t + a_{t+1} lam_{t+1}, walked against the forward direction.

  `reverse` is the forward pass's direction. The carry c holds a_{t+1} lam_{t+1}
  (starting at the cotangent of h_last); each step stores db_t = lam_t and
  da_t = lam_t * h_prev_t, where h_prev_t is the state the forward step read.
  """
  num_t = a_ref.shape[1]
  first = num_t - 1 if reverse else 0        # the step that read h0
  step_back = 1 if reverse else -1           # h_prev_t = h[t + step_back]
  h0 = h0_ref[...].astype(acc)

  def h_prev_row(t):
    if isinstance(t, int):  # static tail step
      return h0 if t == first else h_ref[:, t + step_back, :].astype(acc)
    clamped = jnp.clip(t + step_back, 0, num_t - 1)
    return jnp.where(t == first, h0, h_ref[:, clamped, :].astype(acc))

  def run_tile(ts, c):
    a_rows = [a_ref[:, t, :].astype(acc) for t in ts]
    g_rows = [g_ref[:, t, :].astype(acc) for t in ts]
    h_prev_rows = [h_prev_row(t) for t in ts]
    for t, a_t, g_t, h_prev in zip(ts, a_rows, g_rows, h_prev_rows):
      lam = g_t + c
      c = a_t * lam
      db_ref[:, t, :] = lam.astype(db_ref.dtype)
      da_ref[:, t, :] = (lam * h_prev).astype(da_ref.dtype)
    return c

  c = _walk_time(num_t, block_t, not reverse, run_tile, g_last_ref[...].astype(acc))
  dh0_ref[...] = c.astype(dh0_ref.dtype)


# --- launching ------------------------------------------------------------------

def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _pad_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  if x.shape == shape:
    return x
  return jnp.pad(x, [(0, s - d) for s, d in zip(shape, x.shape)])


def _launch(kernel, inputs, out_dtypes, *, name: str, config: KernelConfig | None):
  """Runs `kernel` over inputs of shape [B, T, D] or [B, D]; outputs likewise.

  Pads batch and width to the block grid (padded lanes are all zeros, stay
  finite, and are sliced away) and builds one BlockSpec per rank.
  """
  B, T, D = next(x.shape for x in inputs if x.ndim == 3)
  config = config or default_config(B, D)
  bb, bd = config.block_b, config.block_d
  Bp, Dp = _round_up(B, bb), _round_up(D, bd)
  seq_spec = pl.BlockSpec((bb, T, bd), lambda i, j: (i, 0, j))
  state_spec = pl.BlockSpec((bb, bd), lambda i, j: (i, j))
  spec = lambda ndim: seq_spec if ndim == 3 else state_spec
  padded_shape = lambda ndim: (Bp, T, Dp) if ndim == 3 else (Bp, Dp)

  # Under the interpreter a narrow (bf16) store defeats XLA:CPU's in-place
  # update of the loop buffer (~300x slower, measured); store at accumulator
  # width there and narrow once afterwards.
  store_dtypes = [(_acc_dtype(dt) if config.interpret and config.wide_stores else dt, ndim)
                  for dt, ndim in out_dtypes]
  compiler_params = None
  if not config.interpret:
    # Name the Triton backend explicitly: Pallas may otherwise pick Mosaic GPU,
    # whose programming model (whole blocks staged in shared memory) these
    # kernels do not follow.
    compiler_params = plgpu.CompilerParams(num_warps=config.num_warps, num_stages=1)

  outputs = pl.pallas_call(
      functools.partial(kernel, block_t=min(config.block_t, T)),
      out_shape=[jax.ShapeDtypeStruct(padded_shape(ndim), dt) for dt, ndim in store_dtypes],
      grid=(Bp // bb, Dp // bd),
      in_specs=[spec(x.ndim) for x in inputs],
      out_specs=[spec(ndim) for _, ndim in out_dtypes],
      interpret=config.interpret,
      compiler_params=compiler_params,
      name=name,
  )(*[_pad_to(x, padded_shape(x.ndim)) for x in inputs])
  return [y[:B, :, :D].astype(dt) if ndim == 3 else y[:B, :D].astype(dt)
          for y, (dt, ndim) in zip(outputs, out_dtypes)]


def _fold_vmap_into_batch(fn):
  """Wraps fn(*arrays with a leading batch axis) so vmap folds S into B.

  Pallas' own batching rule would add a grid axis, which the interpreter walks
  one member at a time (measured 2-3x slower than lax.scan for a swarm of 8 on
  CPU); folding hands one launch S times the rows instead, on every backend.
  """

  @jax.custom_batching.custom_vmap
  def folded(*args):
    return fn(*args)

  @folded.def_vmap
  def folded_vmapped(axis_size, in_batched, *args):
    args = [x if batched else jnp.broadcast_to(x, (axis_size, *x.shape))
            for x, batched in zip(args, in_batched)]
    merged = [x.reshape(axis_size * x.shape[1], *x.shape[2:]) for x in args]
    outs = folded(*merged)
    outs = [y.reshape(axis_size, y.shape[0] // axis_size, *y.shape[1:]) for y in outs]
    return outs, [True] * len(outs)

  return folded


@functools.cache
def _forward_fn(reverse: bool, h_dtype, h_last_dtype, config: KernelConfig | None):
  acc = _acc_dtype(h_dtype, h_last_dtype)

  def forward(a_BxTxD, b_BxTxD, h0_BxD):
    return _launch(
        functools.partial(_forward_kernel, reverse=reverse, acc=acc),
        [a_BxTxD, b_BxTxD, h0_BxD], [(h_dtype, 3), (h_last_dtype, 2)],
        name="linear_scan", config=config)

  return _fold_vmap_into_batch(forward)


@functools.cache
def _adjoint_fn(reverse: bool, da_dtype, db_dtype, dh0_dtype, config: KernelConfig | None):
  acc = _acc_dtype(da_dtype, db_dtype, dh0_dtype)

  def adjoint(a_BxTxD, g_BxTxD, h_BxTxD, h0_BxD, g_last_BxD):
    return _launch(
        functools.partial(_adjoint_kernel, reverse=reverse, acc=acc),
        [a_BxTxD, g_BxTxD, h_BxTxD, h0_BxD, g_last_BxD],
        [(db_dtype, 3), (da_dtype, 3), (dh0_dtype, 2)],
        name="linear_scan_adjoint", config=config)

  return _fold_vmap_into_batch(adjoint)


# --- differentiable entry point -----------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _scan(a_BxTxD, b_BxTxD, h0_BxD, reverse: bool, config: KernelConfig | None):
  h_dtype = jnp.result_type(a_BxTxD, b_BxTxD)
  forward = _forward_fn(reverse, h_dtype, h0_BxD.dtype, config)
  h_BxTxD, h_last_BxD = forward(a_BxTxD, b_BxTxD, h0_BxD)
  return h_BxTxD, h_last_BxD


def _scan_fwd(a_BxTxD, b_BxTxD, h0_BxD, reverse, config):
  h_BxTxD, h_last_BxD = _scan(a_BxTxD, b_BxTxD, h0_BxD, reverse, config)
  # An empty array carries b's dtype: residuals must be arrays.
  b_dtype_tag = jnp.zeros((0,), b_BxTxD.dtype)
  return (h_BxTxD, h_last_BxD), (a_BxTxD, b_dtype_tag, h0_BxD, h_BxTxD)


def _scan_bwd(reverse, config, residuals, cotangents):
  a_BxTxD, b_dtype_tag, h0_BxD, h_BxTxD = residuals
  g_BxTxD, g_last_BxD = cotangents
  adjoint = _adjoint_fn(reverse, a_BxTxD.dtype, b_dtype_tag.dtype, h0_BxD.dtype, config)
  db_BxTxD, da_BxTxD, dh0_BxD = adjoint(a_BxTxD, g_BxTxD, h_BxTxD, h0_BxD, g_last_BxD)
  return da_BxTxD, db_BxTxD, dh0_BxD


_scan.defvjp(_scan_fwd, _scan_bwd)


def pallas_linear_scan(a_BxTxD: jax.Array, b_BxTxD: jax.Array, h0_BxD: jax.Array, *,
                       reverse: bool = False,
                       config: KernelConfig | None = None) -> tuple[jax.Array, jax.Array]:
  """Diagonal linear recurrence with the Pallas kernels, differentiable.

  Args:
    a_BxTxD: decay gates, [B, T, D].
    b_BxTxD: inputs, [B, T, D].
    h0_BxD: state before the first step (after the last one when `reverse`).
    reverse: run time backwards: h_t = a_t * h_{t+1} + b_t.
    config: tiling; None picks `default_config` for the shapes a kernel
      finally sees (under vmap, the mapped axis is folded into B first).

  Returns:
    (h_BxTxD in the promoted dtype of a and b, h_last_BxD in h0's dtype),
    accumulated in at least float32. Reverse-mode differentiable (custom VJP);
    forward-mode (jvp) is not defined.
  """
  return _scan(a_BxTxD, b_BxTxD, h0_BxD, reverse, config)

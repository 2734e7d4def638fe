"""The scan core: the diagonal linear recurrence every µLM backbone runs.

    h_t = a_t * h_{t-1} + b_t        (h_{-1} = h0)

over a: [B, T, D], b: [B, T, D], h0: [B, D], with B = batch rows, T = time
steps, D = width. `reverse=True` runs time backwards: h_t = a_t * h_{t+1} + b_t
with h_T = h0. The state after the last step, h_last, is what a stream carries
into its next chunk.

Three implementations compute the same function:
  LAX          `lax.scan` over time: the reference and specification.
  ASSOCIATIVE  `lax.associative_scan`: log-depth, parallel over time.
  BLOCKED      two short loops instead of one long one: time cut into blocks of
               about sqrt(T) steps, every block scanned at once from zero, then
               the carries passed from block to block and added back. About
               2 sqrt(T) sequential steps (each over a whole [B, blocks, D]
               slab) instead of T, exact (no division, no logarithm: a = 0 is
               fine), and plain autodiff for the gradient.
  PALLAS       the Pallas kernel in `streamlearn.kernels.linear_scan`
               (compiled on GPU, interpreted elsewhere), custom VJP.
AUTO picks, per backend, the one measured fastest (docs/benchmarks.md).

Every implementation accumulates in at least float32: h_all comes back in the
promoted dtype of a and b, h_last in h0's dtype (keep h0 in float32 to carry
the state at full precision across chunks even when activations are bf16).
"""

from __future__ import annotations

import enum

import jax
import jax.numpy as jnp
from jax import lax

from streamlearn.kernels.linear_scan import pallas_linear_scan

__all__ = ["ScanImpl", "linear_scan", "lax_linear_scan", "associative_linear_scan",
           "blocked_linear_scan", "auto_impl"]


class ScanImpl(enum.Enum):
  """Which implementation `linear_scan` runs."""

  AUTO = "auto"
  LAX = "lax"
  ASSOCIATIVE = "associative"
  BLOCKED = "blocked"
  PALLAS = "pallas"


# Fastest measured implementation per backend; the numbers behind each entry
# are in docs/benchmarks.md ("Scan core"). Change them together.
# cpu: the interpreted kernel beat lax.scan forward and forward+backward at
#      every benchmark size, and under vmap. gpu/tpu: not yet measured on a
#      device; ASSOCIATIVE (log-depth, no custom lowering) until a compiled
#      PALLAS run is benchmarked there.
_AUTO_BY_BACKEND = {
    "cpu": ScanImpl.PALLAS,
    "gpu": ScanImpl.ASSOCIATIVE,
    "tpu": ScanImpl.ASSOCIATIVE,
}


def auto_impl(backend: str | None = None) -> ScanImpl:
  """The implementation AUTO resolves to on `backend` (default: JAX's default)."""
  return _AUTO_BY_BACKEND.get(backend or jax.default_backend(), ScanImpl.LAX)


def _acc_dtype(*dtypes) -> jnp.dtype:
  return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


def lax_linear_scan(a_BxTxD: jax.Array, b_BxTxD: jax.Array, h0_BxD: jax.Array, *,
                    reverse: bool = False) -> tuple[jax.Array, jax.Array]:
  """The specification: one `lax.scan` step per time step, carry in f32."""
  acc = _acc_dtype(a_BxTxD.dtype, b_BxTxD.dtype, h0_BxD.dtype)
  out_dtype = jnp.result_type(a_BxTxD, b_BxTxD)

  def step(h_BxD, ab_t):
    a_BxD, b_BxD = ab_t
    h_BxD = a_BxD.astype(acc) * h_BxD + b_BxD.astype(acc)
    return h_BxD, h_BxD

  h_last_BxD, h_TxBxD = lax.scan(
      step, h0_BxD.astype(acc),
      (jnp.swapaxes(a_BxTxD, 0, 1), jnp.swapaxes(b_BxTxD, 0, 1)), reverse=reverse)
  # Narrow after the loop: a bf16 per-step output is ~10x slower on XLA:CPU.
  return (jnp.swapaxes(h_TxBxD, 0, 1).astype(out_dtype),
          h_last_BxD.astype(h0_BxD.dtype))


def associative_linear_scan(a_BxTxD: jax.Array, b_BxTxD: jax.Array, h0_BxD: jax.Array,
                            *, reverse: bool = False) -> tuple[jax.Array, jax.Array]:
  """Parallel prefix over the affine maps h -> a*h + b, h0 folded into step 0."""
  acc = _acc_dtype(a_BxTxD.dtype, b_BxTxD.dtype, h0_BxD.dtype)
  out_dtype = jnp.result_type(a_BxTxD, b_BxTxD)
  a_BxTxD = a_BxTxD.astype(acc)
  b_BxTxD = b_BxTxD.astype(acc)
  first = -1 if reverse else 0
  b_BxTxD = b_BxTxD.at[:, first].add(a_BxTxD[:, first] * h0_BxD.astype(acc))

  def compose(earlier, later):
    a_e, b_e = earlier
    a_l, b_l = later
    return a_e * a_l, a_l * b_e + b_l

  _, h_BxTxD = lax.associative_scan(compose, (a_BxTxD, b_BxTxD), reverse=reverse, axis=1)
  last = 0 if reverse else -1
  return h_BxTxD.astype(out_dtype), h_BxTxD[:, last].astype(h0_BxD.dtype)


def blocked_linear_scan(a_BxTxD: jax.Array, b_BxTxD: jax.Array, h0_BxD: jax.Array, *,
                        reverse: bool = False, block: int | None = None
                        ) -> tuple[jax.Array, jax.Array]:
  """Two-level scan: within blocks of `block` steps (default ~sqrt(T)), then across them."""
  if reverse:
    h_BxTxD, h_last_BxD = blocked_linear_scan(a_BxTxD[:, ::-1], b_BxTxD[:, ::-1], h0_BxD,
                                              block=block)
    return h_BxTxD[:, ::-1], h_last_BxD
  acc = _acc_dtype(a_BxTxD.dtype, b_BxTxD.dtype, h0_BxD.dtype)
  out_dtype = jnp.result_type(a_BxTxD, b_BxTxD)
  B, T, D = a_BxTxD.shape
  L = block or max(1, round(T ** 0.5))
  N = -(-T // L)
  # Padding steps (a = 1, b = 0) hold the state, so the last block may be short.
  pad = ((0, 0), (0, N * L - T), (0, 0))
  a_BxTxD = jnp.pad(a_BxTxD.astype(acc), pad, constant_values=1.0)
  b_BxTxD = jnp.pad(b_BxTxD.astype(acc), pad)
  # Step i of every block at once: [L, B, N, D].
  a_LxBxNxD = jnp.moveaxis(a_BxTxD.reshape(B, N, L, D), 2, 0)
  b_LxBxNxD = jnp.moveaxis(b_BxTxD.reshape(B, N, L, D), 2, 0)

  def within(carry, ab):
    decay_BxNxD, h_BxNxD = carry
    a_i, b_i = ab
    carry = (decay_BxNxD * a_i, a_i * h_BxNxD + b_i)
    return carry, carry

  start = (jnp.ones((B, N, D), acc), jnp.zeros((B, N, D), acc))
  # decay_L...[i]: product of a over the block's steps up to i; h_from_zero_L...[i]:
  # the block's state at step i had it started from zero.
  (decay_BxNxD, h_end_BxNxD), (decay_LxBxNxD, h_from_zero_LxBxNxD) = lax.scan(
      within, start, (a_LxBxNxD, b_LxBxNxD), unroll=True)

  def across(h_BxD, block_k):
    decay_k_BxD, h_end_k_BxD = block_k
    return decay_k_BxD * h_BxD + h_end_k_BxD, h_BxD

  h_last_BxD, h_before_NxBxD = lax.scan(
      across, h0_BxD.astype(acc),
      (jnp.moveaxis(decay_BxNxD, 1, 0), jnp.moveaxis(h_end_BxNxD, 1, 0)), unroll=True)
  h_LxBxNxD = h_from_zero_LxBxNxD + decay_LxBxNxD * jnp.moveaxis(h_before_NxBxD, 0, 1)[None]
  h_BxTxD = jnp.moveaxis(h_LxBxNxD, 0, 2).reshape(B, N * L, D)[:, :T]
  return h_BxTxD.astype(out_dtype), h_last_BxD.astype(h0_BxD.dtype)


def _check_args(a, b, h0) -> None:
  if a.ndim != 3 or b.shape != a.shape:
    raise ValueError(f"linear_scan: a and b must both be [B, T, D]; got a{tuple(a.shape)}, "
                     f"b{tuple(b.shape)}")
  if h0.shape != (a.shape[0], a.shape[2]):
    raise ValueError(f"linear_scan: h0 must be [B, D] = {(a.shape[0], a.shape[2])}; "
                     f"got {tuple(h0.shape)}")
  for name, x in (("a", a), ("b", b), ("h0", h0)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"linear_scan: {name} must be floating point; got {x.dtype}")


def linear_scan(a: jax.Array, b: jax.Array, h0: jax.Array, *,
                impl: ScanImpl | str = ScanImpl.AUTO,
                reverse: bool = False) -> tuple[jax.Array, jax.Array]:
  """Runs h_t = a_t * h_{t-1} + b_t over time.

  Args:
    a: decay gates [B, T, D]; the recurrence is stable for a in [0, 1].
    b: inputs [B, T, D].
    h0: the state before the first step, [B, D] (after the last when `reverse`).
    impl: a `ScanImpl` or its name ("auto", "lax", "associative", "blocked",
        "pallas").
    reverse: run time backwards, h_t = a_t * h_{t+1} + b_t.

  Returns:
    (h_all [B, T, D] in the promoted dtype of a and b, h_last [B, D] in h0's
    dtype). Any T, D >= 1; accumulation is in at least float32. Works under
    jit, vmap and grad.
  """
  a, b, h0 = jnp.asarray(a), jnp.asarray(b), jnp.asarray(h0)
  _check_args(a, b, h0)
  impl = ScanImpl(impl)
  if impl is ScanImpl.AUTO:
    impl = auto_impl()
  if 0 in a.shape:  # nothing to scan: h_all is empty, the state passes through
    return jnp.zeros(a.shape, jnp.result_type(a, b)), h0
  if a.shape[1] == 1:  # one step (token-by-token generation): no loop to pay for
    acc = _acc_dtype(a.dtype, b.dtype, h0.dtype)
    h_BxD = a[:, 0].astype(acc) * h0.astype(acc) + b[:, 0].astype(acc)
    return h_BxD[:, None].astype(jnp.result_type(a, b)), h_BxD.astype(h0.dtype)
  if impl is ScanImpl.LAX:
    return lax_linear_scan(a, b, h0, reverse=reverse)
  if impl is ScanImpl.ASSOCIATIVE:
    return associative_linear_scan(a, b, h0, reverse=reverse)
  if impl is ScanImpl.BLOCKED:
    return blocked_linear_scan(a, b, h0, reverse=reverse)
  return pallas_linear_scan(a, b, h0, reverse=reverse)

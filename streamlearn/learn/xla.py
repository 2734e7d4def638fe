"""`jax.jit` for the learner's compiled functions, with the XLA options they run fastest under.

On CPU, XLA hands some fusions to YNNPACK (reductions, elementwise, dots: its
`xla_cpu_experimental_ynn_fusion_type`). For the mixer's many small reductions over
[T, O, V] arrays that is the slow path: the default step takes 1.3-1.4x as long with
them as with XLA's own loops, and `vanilla` 1.2x (docs/benchmarks.md, "Speed"). The
option is a compile option of each function, not a process-wide flag, so nothing else
in the process changes; an XLA without it compiles the function as it is.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

_NO_YNN = {"xla_cpu_experimental_ynn_fusion_type": ""}


def jit(fn, **kwargs):
  """`jax.jit(fn, **kwargs)` with `compiler_options()` added."""
  return jax.jit(fn, compiler_options=compiler_options(), **kwargs)


def traced(jitted):
  """The function a `jit` wraps, to call inside another jitted function: JAX refuses compile
  options on a nested jit (the outer one's apply to the whole)."""
  return jitted.__wrapped__


@functools.cache
def compiler_options() -> dict[str, str]:
  """The options: none off CPU, or where this XLA does not know the one we set."""
  if jax.default_backend() != "cpu":
    return {}
  try:
    jax.jit(jnp.negative, compiler_options=_NO_YNN).lower(jnp.zeros(())).compile()
  except Exception as err:  # an XLA without the option: say so once, compile as it is
    log.info("XLA does not take %s (%s): compiling with its defaults", _NO_YNN, err)
    return {}
  return dict(_NO_YNN)

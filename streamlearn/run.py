"""The main job: `python -m streamlearn.run --config configs/<name>.toml`.

The streaming learner is not built yet (it lands with the learner issue); until
then this command prints its usage and the installed version, and checks that
the scan core runs on this machine's default JAX backend.
"""

from __future__ import annotations

import argparse
import sys

import streamlearn


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m streamlearn.run",
      description="Tiny recurrent language models that learn while they predict on a stream.")
  parser.add_argument("--config", metavar="FILE", help="run configuration (TOML)")
  parser.add_argument("--version", action="version", version=f"streamlearn {streamlearn.__version__}")
  return parser


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  import jax
  import jax.numpy as jnp

  from streamlearn.scan import auto_impl, linear_scan

  # One tiny scan proves the install works end to end on this backend.
  h_all, _ = linear_scan(jnp.full((1, 4, 2), 0.5), jnp.ones((1, 4, 2)), jnp.zeros((1, 2)))
  ok = bool(jnp.allclose(h_all[0, :, 0], jnp.array([1.0, 1.5, 1.75, 1.875])))
  print(f"streamlearn {streamlearn.__version__} | jax {jax.__version__} on {jax.default_backend()} "
        f"| scan core: {auto_impl().value} ({'ok' if ok else 'WRONG RESULT'})")
  build_parser().print_usage()
  if args.config:
    print(f"{args.config}: the streaming learner is not built yet; nothing to run.",
          file=sys.stderr)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())

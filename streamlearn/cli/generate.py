"""Text from an exported artifact.

    python -m streamlearn.generate model.slm --prompt "The " [--tokens 200] [--temperature 0.8]
"""

from __future__ import annotations

import argparse
import sys

from streamlearn.api import load_artifact
from streamlearn.store.artifact import ArtifactError


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m streamlearn.generate",
                                   description="Generate text from an exported artifact.")
  parser.add_argument("artifact")
  parser.add_argument("--prompt", default="")
  parser.add_argument("--tokens", type=int, default=200)
  parser.add_argument("--temperature", type=float, default=0.8)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  try:
    learner = load_artifact(args.artifact)
  except ArtifactError as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  print(args.prompt + learner.generate(args.prompt, max_tokens=args.tokens,
                                       temperature=args.temperature, seed=args.seed))
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Text from a run's version or an exported artifact, learning nothing.

    streamlearn generate model.slm --prompt "The " [--tokens 200] [--temperature 0.8]
        [--top-k K] [--top-p P] [--repetition-penalty R] [--stop TEXT ...] [--seed N]
    streamlearn generate checkpoints/default[@STEP] --prompt "def " [--member best|ID]

TARGET is an artifact file (`streamlearn export`) or a run directory, at its
latest version or @STEP. Prints the prompt and its continuation.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from streamlearn.cli.common import error, standalone


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("target", metavar="ARTIFACT|RUN_DIR[@STEP]")
  parser.add_argument("--prompt", default="")
  parser.add_argument("--tokens", type=int, default=200, help="tokens to generate")
  parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
  parser.add_argument("--top-k", type=int, default=0, help="only the K likeliest tokens (0: all)")
  parser.add_argument("--top-p", type=float, default=1.0,
                      help="only the likeliest tokens that together hold P (1: all)")
  parser.add_argument("--repetition-penalty", type=float, default=1.0,
                      help="> 1 makes the last 64 tokens less likely again (1: off)")
  parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                      help="end the text before this string (may be given several times)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--member", default="best", metavar="best|ID",
                      help="a run's swarm member (default: the leader)")


def command(args: argparse.Namespace) -> int:
  from streamlearn.api import Learner, load_artifact
  from streamlearn.store.artifact import ArtifactError
  from streamlearn.store.checkpoint import VersionError

  path, _, step = args.target.partition("@")
  try:
    if Path(path).is_dir():
      if step and not step.isdigit():
        return error(f"{args.target}: expected RUN_DIR or RUN_DIR@STEP")
      learner = Learner.load(path, int(step) if step else None, args.member)
    else:
      learner = load_artifact(args.target)
  except (ArtifactError, VersionError, FileNotFoundError) as err:
    return error(str(err))
  try:
    text = learner.generate(args.prompt, max_tokens=args.tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p,
                            repetition_penalty=args.repetition_penalty, stop=args.stop,
                            seed=args.seed)
  except ValueError as err:
    return error(str(err))
  print(args.prompt + text)
  return 0


main = standalone(add_arguments, command, "streamlearn generate", __doc__.splitlines()[0])

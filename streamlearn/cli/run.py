"""The main job: a µLM reads a stream and learns from it while it predicts.

    python -m streamlearn.run --config configs/default.toml [--data PATH|-]
        [--max-bytes N] [--run-dir DIR] [--resume] [--set key=value ...]
        [--coordinator HOST:PORT --num-processes N --process-id I]

With no --data the stream is this interpreter's standard library (.py files):
real text on every machine. The run directory (checkpoints/<name>/ unless
--run-dir) gets TensorBoard events in tb/, rotating Orbax versions in
versions/, the config and the frozen tokenizer. Ctrl-C (or SIGTERM) writes a
final version and exits cleanly; --resume continues from the latest version at
the exact stream position. The --coordinator trio runs one swarm over several
processes or hosts (streamlearn/distributed.py).
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib import metadata

from streamlearn.config import ConfigError, load_config
from streamlearn.data.sources import SourceError


def _version() -> str:
  try:
    return metadata.version("streamlearn")
  except metadata.PackageNotFoundError:  # a source tree that is not installed
    return "0.0.0+unknown"


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m streamlearn.run",
      description="A tiny recurrent language model that learns while it predicts on a stream.")
  parser.add_argument("--config", metavar="FILE",
                      help="run configuration (TOML); built-in defaults when omitted")
  parser.add_argument("--data", metavar="PATH|-",
                      help="a text file, a directory, or - for stdin (default: the Python stdlib)")
  parser.add_argument("--max-bytes", type=int, metavar="N",
                      help="stop after streaming N bytes in this invocation")
  parser.add_argument("--run-dir", metavar="DIR", help="run directory (default checkpoints/<name>)")
  parser.add_argument("--resume", action="store_true",
                      help="continue from the run directory's latest version")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config value, e.g. --set optim.learning_rate=1e-3")
  parser.add_argument("--coordinator", metavar="HOST:PORT",
                      help="several processes: process 0's address (jax.distributed)")
  parser.add_argument("--num-processes", type=int, metavar="N",
                      help="several processes: how many in all")
  parser.add_argument("--process-id", type=int, metavar="I",
                      help="several processes: this one's index, 0 .. N-1")
  parser.add_argument("--version", action="version",
                      version=f"streamlearn {_version()}")
  return parser


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  # Our own messages at INFO; libraries (Orbax, absl) only when something is wrong.
  logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
  logging.getLogger("streamlearn").setLevel(logging.INFO)
  if args.max_bytes is not None and args.max_bytes <= 0:
    print("error: --max-bytes must be > 0", file=sys.stderr)
    return 2
  try:
    config = load_config(args.config, args.set)
  except ConfigError as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  distributed = (args.coordinator, args.num_processes, args.process_id)
  if any(x is not None for x in distributed):
    if any(x is None for x in distributed):
      print("error: --coordinator, --num-processes and --process-id go together",
            file=sys.stderr)
      return 2
    if not 0 <= args.process_id < args.num_processes:
      print(f"error: --process-id must be in 0 .. {args.num_processes - 1}", file=sys.stderr)
      return 2
    if args.data == "-":
      print("error: several processes each read the stream: give --data a file or directory",
            file=sys.stderr)
      return 2
    from streamlearn import distributed as dist

    dist.initialize(*distributed)
  from streamlearn.run.session import RunError, Session

  try:
    session = Session.open(config, run_dir=args.run_dir, data=args.data, resume=args.resume)
  except (SourceError, RunError) as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  return session.run(max_bytes=args.max_bytes)


if __name__ == "__main__":
  sys.exit(main())

"""The main job: a µLM reads a stream and learns from it while it predicts.

    streamlearn run --config configs/default.toml [--data PATH|-]      (or python -m streamlearn.run)
        [--follow] [--max-bytes N] [--run-dir DIR] [--resume] [--set key=value ...]
        [--coordinator HOST:PORT --num-processes N --process-id I]

With no --data the stream is this interpreter's standard library (.py files):
real text on every machine. A capture spool (`streamlearn capture`) streams its
items; with --follow it then waits for capture to seal the next segment. The run directory (checkpoints/<name>/ unless
--run-dir) gets TensorBoard events in tb/, rotating Orbax versions in
versions/, the config and the frozen tokenizer. Ctrl-C (or SIGTERM) writes a
final version and exits cleanly; --resume continues from the latest version at
the exact stream position. The --coordinator trio runs one swarm over several
processes or hosts (streamlearn/distributed.py).
"""

from __future__ import annotations

import argparse

from streamlearn.cli.common import error, standalone, version
from streamlearn.config import ConfigError, load_config



def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--config", metavar="FILE",
                      help="run configuration (TOML); built-in defaults when omitted")
  parser.add_argument("--data", metavar="PATH|-",
                      help="a text file, a directory, or - for stdin (default: the Python stdlib)")
  parser.add_argument("--follow", action="store_true",
                      help="--data is a capture spool or a growing file: at its end, wait for "
                           "more (until Ctrl-C, SIGTERM or --max-bytes)")
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
  parser.add_argument("--peer-timeout", type=float, default=None, metavar="S",
                      help="several processes: stop when another gives no sign of life for "
                           "S seconds (default 30)")


def command(args: argparse.Namespace) -> int:
  if args.max_bytes is not None and args.max_bytes <= 0:
    return error("--max-bytes must be > 0")
  try:
    config = load_config(args.config, args.set)
  except ConfigError as err:
    return error(str(err))
  distributed = (args.coordinator, args.num_processes, args.process_id)
  if any(x is not None for x in distributed):
    if any(x is None for x in distributed):
      return error("--coordinator, --num-processes and --process-id go together")
    if not 0 <= args.process_id < args.num_processes:
      return error(f"--process-id must be in 0 .. {args.num_processes - 1}")
    if args.data == "-":
      return error("several processes each read the stream: give --data a file or directory")
    from streamlearn import distributed as dist

    dist.initialize(*distributed)
  # JAX loads only once the arguments are good.
  from streamlearn import distributed as dist
  from streamlearn.data.sources import SourceError
  from streamlearn.run.loop import run
  from streamlearn.run.session import open_session
  from streamlearn.store.rundir import RunError

  try:
    if args.follow and args.data in (None, "-"):
      return error("--follow needs --data: a capture spool or a growing file")
    if args.peer_timeout is not None:
      if args.peer_timeout <= 0:
        return error("--peer-timeout must be > 0")
      dist.PEER_TIMEOUT_S = args.peer_timeout
    session, progress = open_session(config, run_dir=args.run_dir, data=args.data,
                                     resume=args.resume, follow=args.follow)
  except (SourceError, RunError) as err:
    return error(str(err))
  return run(session, progress, max_bytes=args.max_bytes)


def _add_arguments_and_version(parser: argparse.ArgumentParser) -> None:
  add_arguments(parser)
  parser.add_argument("--version", action="version", version=f"streamlearn {version()}")


main = standalone(_add_arguments_and_version, command, "python -m streamlearn.run", __doc__.splitlines()[0])

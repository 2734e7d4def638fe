"""What every subcommand shares: its logging, a standalone entry point, a quiet broken pipe."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from importlib import metadata
from typing import Callable


def version() -> str:
  try:
    return metadata.version("streamlearn")
  except metadata.PackageNotFoundError:  # a source tree that is not installed
    return "0.0.0+unknown"


def log_to_stderr() -> None:
  """Our messages as plain lines on stderr; libraries' only when something is wrong."""
  logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
  # A library imported before us may have called basicConfig first, with its own format.
  for handler in logging.root.handlers:
    if type(handler) is logging.StreamHandler and handler.stream is sys.stderr:
      handler.setFormatter(logging.Formatter("%(message)s"))
  logging.getLogger("streamlearn").setLevel(logging.INFO)
  # A skipped update's NaN score is logged by us, once; tensorboardX would repeat it per tag.
  logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)
  # A failed save (a full disk) is one line of ours; Orbax and asyncio would print pages of
  # tracebacks from its background threads.
  for noisy in ("absl", "asyncio"):
    logging.getLogger(noisy).setLevel(logging.CRITICAL)


def error(message: str) -> int:
  """One line on stderr; the exit code of a run that could not do what it was asked."""
  print(f"error: {message}", file=sys.stderr)
  return 2


def execute(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
  """Runs a subcommand; output cut short by its reader (`| head`) ends it quietly, and so does
  Ctrl-C before the command has its own handling in place (a run's loop saves and stops)."""
  log_to_stderr()
  try:
    code = command(args)
    sys.stdout.flush()
    return code
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130
  except BrokenPipeError:
    # Python would complain again when it flushes stdout on the way out.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def standalone(add_arguments: Callable[[argparse.ArgumentParser], None],
               command: Callable[[argparse.Namespace], int], prog: str, description: str):
  """A `main(argv)` for a subcommand run on its own (python -m ..., scripts/)."""

  def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(parser)
    return execute(command, parser.parse_args(argv))

  return main

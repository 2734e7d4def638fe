"""`streamlearn COMMAND ...`: the installed command.

    streamlearn run       the main job: a µLM learns while it predicts on a stream
    streamlearn versions  a run's versions, rollbacks and restores
    streamlearn restore   a run back to one of its versions
    streamlearn export    a version as an int8 artifact
    streamlearn evaluate  runs scored on held-out data, frozen and adapting
    streamlearn generate  text from a run or an artifact
    streamlearn capture   text from folders and pushes, redacted, into a spool
    streamlearn serve     the best models behind Ollama- and OpenAI-style APIs and a page
    streamlearn daemon    capture, learn and serve around the clock, with backups
    streamlearn status    what the daemon is doing

Each command's own module says more (`streamlearn COMMAND --help`). Only the
chosen command's module is imported, so `streamlearn --help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from streamlearn.cli.common import execute, version

# name: (module, summary). A command's module is imported only when it is the one run.
COMMANDS = {
    "run": ("streamlearn.cli.run", "a µLM learns while it predicts on a stream (the main job)"),
    "versions": ("streamlearn.cli.versions", "list a run's versions, rollbacks and restores"),
    "restore": ("streamlearn.cli.restore", "roll a run back to a version, or to its original"),
    "export": ("streamlearn.cli.export", "a version as an int8 artifact, and what int8 costs"),
    "evaluate": ("streamlearn.cli.evaluate", "score runs on held-out data, frozen and adapting"),
    "generate": ("streamlearn.cli.generate", "text from a run or an artifact"),
    "capture": ("streamlearn.cli.capture", "text from folders and pushes, redacted, into a spool"),
    "serve": ("streamlearn.cli.serve", "the best models behind Ollama/OpenAI-style APIs and a page"),
    "daemon": ("streamlearn.cli.daemon", "capture, learn and serve around the clock, with backups"),
    "status": ("streamlearn.cli.status", "what the daemon is doing (--json: as JSON)"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="streamlearn",
      description="Tiny recurrent language models that learn while they predict on a stream.")
  parser.add_argument("--version", action="version", version=f"streamlearn {version()}")
  commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
  chosen = next((a for a in argv if not a.startswith("-")), None)
  for name, (module_name, summary) in COMMANDS.items():
    sub = commands.add_parser(name, help=summary, description=summary)
    if name == chosen:
      module = importlib.import_module(module_name)
      module.add_arguments(sub)
      sub.set_defaults(command_fn=module.command)
  return parser


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  args = build_parser(argv).parse_args(argv)
  return execute(args.command_fn, args)


if __name__ == "__main__":
  sys.exit(main())

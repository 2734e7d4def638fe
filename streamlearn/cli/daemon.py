"""Capture, learn and serve around the clock, supervised by one process.

    streamlearn daemon --config configs/daemon.toml [--set key=value ...]

Runs `streamlearn capture`, a learner following capture's spool (`streamlearn
run --follow --resume`) and `streamlearn serve` as child processes under
`daemon.dir` (spool/, run/, backups/, logs/daemon.log, status.json), restarts
any that dies, backs up the newest version every `daemon.backup_every`, and
pauses learning on battery or under load. SIGTERM or Ctrl-C stops capture,
then the learner (it saves a version), then the server, and exits 0.
`streamlearn status` says what it is doing; streamlearn/daemon/ says how.
"""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import os

from streamlearn.cli.common import error, standalone


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--config", default=None, help="a config file ([daemon], [capture], "
                      "[serve] and the learner's sections); configs/daemon.toml is one")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a setting, for the daemon and every child")


def log_to_file(daemon_cfg, logs_dir) -> None:
  """The daemon's log, and every child's lines, in logs/daemon.log, rotated by size."""
  logs_dir.mkdir(parents=True, exist_ok=True)
  handler = logging.handlers.RotatingFileHandler(
      logs_dir / "daemon.log", maxBytes=daemon_cfg.log_bytes, backupCount=daemon_cfg.log_files,
      encoding="utf-8")
  handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
  logging.getLogger("streamlearn").addHandler(handler)


def command(args: argparse.Namespace) -> int:
  from streamlearn.config import ConfigError, load_config
  from streamlearn.daemon.status import Layout
  from streamlearn.daemon.supervisor import Daemon, DaemonError

  try:
    config = load_config(args.config, args.set)
  except (ConfigError, OSError) as err:
    return error(str(err))
  layout = Layout(config)
  try:
    log_to_file(config.daemon, layout.logs)
  except OSError as err:
    return error(f"{layout.logs}: cannot write the log ({err.strerror})")
  config_path = os.path.abspath(args.config) if args.config else None
  try:
    return Daemon(config, config_path, list(args.set)).run()
  except DaemonError as err:
    return error(str(err))


main = standalone(add_arguments, command, "streamlearn daemon", __doc__.splitlines()[0])

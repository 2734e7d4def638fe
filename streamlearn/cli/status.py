"""What the daemon is doing: children, bytes captured / learned / waiting, versions, backups.

    streamlearn status [--config FILE] [--set key=value ...] [--json]

Reads `daemon.dir` (the daemon's status.json, the spool, the run's registry and
the backups), so it also works while the daemon is down. With --json the same
as one JSON object (keys: daemon, children, captured_bytes, learned_bytes,
waiting_bytes, latest_version, pool, backups, last_backup, failures, ...).
"""

from __future__ import annotations

import argparse
import json

from streamlearn.cli.common import error, standalone


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--config", default=None, help="the daemon's config file")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  parser.add_argument("--json", action="store_true", help="one JSON object")


def command(args: argparse.Namespace) -> int:
  from streamlearn.config import ConfigError, load_config
  from streamlearn.daemon.status import Layout, gather, text

  try:
    config = load_config(args.config, args.set)
  except (ConfigError, OSError) as err:
    return error(str(err))
  layout = Layout(config)
  if not layout.root.is_dir():
    return error(f"{layout.root}: no daemon directory (daemon.dir); start `streamlearn daemon`")
  status = gather(layout)
  print(json.dumps(status, indent=1) if args.json else text(status))
  return 0


main = standalone(add_arguments, command, "streamlearn status", __doc__.splitlines()[0])

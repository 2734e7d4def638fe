"""The pool of best models behind Ollama- and OpenAI-style APIs and a page, on loopback.

    streamlearn serve --run-dir DIR [--run-dir DIR2 ...] [--config FILE] [--set serve.KEY=V ...]
        [--host 127.0.0.1] [--port 8765] [--pool K] [--allow-remote]

Serves the best versions (and swarm members) of the runs, routes each request to
a model by a bandit that learns from thumbs up/down, and picks up the versions
a learner saves meanwhile. Stops on Ctrl-C or SIGTERM (the bandit's state is
kept in serve.state). See streamlearn/serve/server.py for the endpoints.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import signal
import threading
from pathlib import Path

from streamlearn.cli.common import error, standalone

log = logging.getLogger("streamlearn.serve")


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--run-dir", action="append", required=True, metavar="DIR",
                      help="a run directory whose models to serve (may be given several times)")
  parser.add_argument("--config", default=None, help="a config file with a [serve] section")
  parser.add_argument("--set", action="append", default=[], metavar="serve.KEY=VALUE",
                      help="override a setting (may be given several times)")
  parser.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
  parser.add_argument("--port", type=int, default=None, help="port (default 8765; 0: any free)")
  parser.add_argument("--pool", type=int, default=None, help="models in the pool (default 5)")
  parser.add_argument("--allow-remote", action="store_true",
                      help="allow an address other than loopback (needs serve.token)")


def _loopback(host: str) -> bool:
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


def command(args: argparse.Namespace) -> int:
  from streamlearn.config import ConfigError, load_config
  from streamlearn.serve.bandit import Bandit
  from streamlearn.serve.pool import Pool
  from streamlearn.serve.server import make_server
  from streamlearn.serve.service import Service

  overrides = list(args.set)
  for key, value in (("host", args.host), ("port", args.port), ("pool", args.pool)):
    if value is not None:
      overrides.append(f"serve.{key}={value}" if key != "host" else f'serve.host="{value}"')
  try:
    config = load_config(args.config, overrides)
    cfg = config.serve
  except (ConfigError, OSError) as err:
    return error(str(err))
  if not _loopback(cfg.host):
    if not args.allow_remote:
      return error(f"--host {cfg.host} is not loopback: add --allow-remote (and set serve.token)")
    if not cfg.token:
      return error(f"--host {cfg.host}: serving beyond loopback needs a token (serve.token)")
    log.warning(f"warning: serving on {cfg.host}: anyone who can reach it and holds the token "
                f"can use the models")
  run_dirs = [Path(d) for d in args.run_dir]
  missing = [str(d) for d in run_dirs if not d.is_dir()]
  if missing:
    return error(f"no such run directory: {', '.join(missing)}")
  state = Path(cfg.state) if cfg.state else run_dirs[0] / "serve.json"
  bandit = Bandit(cfg.policy, cfg.explore, cfg.discount)
  if bandit.load(state):
    log.info(f"bandit state from {state}")
  use = _use_spool(config) if cfg.learn_from_use else None
  pool = Pool(run_dirs, cfg.pool, bandit, cfg.keep_best)
  pool.refresh()
  try:
    server = make_server(Service(pool, bandit, cfg, state, use), cfg.host, cfg.port)
  except OSError as err:
    return error(f"cannot listen on {cfg.host}:{cfg.port} ({err.strerror})")
  host, port = server.server_address[:2]
  stop = threading.Event()
  watcher = pool.watch(cfg.reload_seconds, stop)
  # SIGTERM stops it as Ctrl-C does: the serving thread ends, requests in flight are dropped.
  signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
  log.info(f"serving {len(pool.ids())} model(s) on http://{host}:{port}/ "
           f"(policy {cfg.policy}); Ctrl-C stops")
  try:
    server.serve_forever(poll_interval=0.2)
  except KeyboardInterrupt:
    pass
  finally:
    stop.set()
    watcher.join(timeout=30.0)  # a refresh under way ends before the interpreter does
    server.server_close()
    if use is not None:
      with use.lock:
        use.spool.close()
  log.info("stopped")
  return 0


def _use_spool(config):
  """Where prompts and liked answers go (serve.learn_from_use): the capture spool, through
  capture's redaction and dedup."""
  from streamlearn.capture.collect import Capture
  from streamlearn.capture.spool import Spool
  spool_dir = Path(config.capture.spool or Path("checkpoints") / config.name / "captures")
  log.info(f"learning from use: prompts and liked answers go to {spool_dir}")
  return Capture(config.capture, Spool(spool_dir, config.capture.segment_bytes))


main = standalone(add_arguments, command, "streamlearn serve", __doc__.splitlines()[0])

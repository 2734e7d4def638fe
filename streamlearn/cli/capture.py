"""Capture text from the user's environment into a spool a learner reads: redacted first.

    streamlearn capture --config configs/capture.toml [--spool DIR] [--once] [--stdin]
        [--set capture.KEY=VALUE ...]
    streamlearn capture --config configs/capture.toml --pause | --resume

Watches `capture.folders` for small text files, images (OCR) and WAV recordings
(speech), reads the screen every `capture.screen_seconds` (OCR; 0: off) and, when
`capture.push` is set, takes text on `POST /ingest` (loopback). Everything is redacted and deduplicated
in memory before it is written (streamlearn/capture/). `--once` takes what is
there now and exits; otherwise it runs until Ctrl-C or SIGTERM (exit code 0,
everything received so far on disk). `--pause` / `--resume` ask a running
capture (through its push endpoint) to stop or restart its collectors.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import signal
import sys
import threading
import urllib.request
from pathlib import Path

from streamlearn.cli.common import error, standalone

log = logging.getLogger("streamlearn.capture")


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--config", default=None, help="a config file with a [capture] section")
  parser.add_argument("--spool", default=None, help="the spool directory (capture.spool)")
  parser.add_argument("--once", action="store_true", help="take what is there now, then exit")
  parser.add_argument("--stdin", action="store_true", help="capture standard input too")
  parser.add_argument("--set", action="append", default=[], metavar="capture.KEY=VALUE")
  switch = parser.add_mutually_exclusive_group()
  switch.add_argument("--pause", action="store_true", help="pause a running capture")
  switch.add_argument("--resume", action="store_true", help="resume a paused capture")


def _address(push: str) -> tuple[str, int]:
  host, _, port = push.rpartition(":")
  if not host or not port.isdigit():
    raise ValueError(f"capture.push {push!r}: expected HOST:PORT, e.g. 127.0.0.1:8766")
  return host, int(port)


def _loopback(host: str) -> bool:
  try:
    return host == "localhost" or ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


def command(args: argparse.Namespace) -> int:
  from streamlearn.capture.collect import Capture, Folders
  from streamlearn.capture.runner import Running
  from streamlearn.capture.spool import Item, Spool
  from streamlearn.config import ConfigError, load_config

  try:
    config = load_config(args.config, args.set)
  except (ConfigError, OSError) as err:
    return error(str(err))
  cfg = config.capture
  if args.pause or args.resume:
    return _switch(cfg.push, "pause" if args.pause else "resume")
  spool_dir = Path(args.spool or cfg.spool or Path("checkpoints") / config.name / "captures")
  try:
    spool = Spool(spool_dir, cfg.segment_bytes)
  except OSError as err:
    return error(f"{spool_dir}: cannot use it as the spool ({err.strerror})")
  capture = Capture(cfg, spool)
  server = None
  if cfg.push and not args.once:
    server = _push_server(capture, cfg)
    if isinstance(server, int):
      return server
  running = Running(capture, Folders(capture, list(cfg.folders)), _screen(capture), server)
  if args.stdin:
    text = sys.stdin.buffer.read().decode("utf-8", errors="replace")
    if text.strip():
      capture.offer(Item(text, "stdin", "stdin"))
  try:
    if args.once:
      running.once()
    else:
      stop = threading.Event()
      signal.signal(signal.SIGTERM, lambda *_: stop.set())
      log.info(f"capturing into {spool_dir} ({len(cfg.folders)} folder(s)"
               f"{', push on ' + cfg.push if server else ''}); Ctrl-C stops")
      running.until(stop)
  except KeyboardInterrupt:
    pass
  finally:
    running.close()
  log.info(running.summary())
  return 0


def _switch(push: str, what: str) -> int:
  """--pause / --resume: asks the running capture through its push endpoint."""
  if not push:
    return error("--pause/--resume talk to a running capture's push endpoint: set capture.push")
  try:
    host, port = _address(push)
    request = urllib.request.Request(f"http://{host}:{port}/{what}", data=b"", method="POST")
    print(json.loads(urllib.request.urlopen(request, timeout=10).read()))
  except ValueError as err:
    return error(str(err))
  except OSError as err:
    return error(f"no capture answers on {push} ({err})")
  return 0


def _push_server(capture, cfg):
  """The push endpoint, serving from its threads; or the exit code of a one-line error."""
  from streamlearn.capture.push import make_push_server
  try:
    host, port = _address(cfg.push)
  except ValueError as err:
    return error(str(err))
  if not _loopback(host) and not cfg.allow_remote_push:
    return error(f"capture.push {cfg.push} is not loopback: set capture.allow_remote_push")
  try:
    server = make_push_server(capture, host, port)
  except OSError as err:
    return error(f"cannot listen on {cfg.push} ({err.strerror})")
  threading.Thread(target=server.serve_forever, daemon=True).start()
  log.info(f"push: POST http://{host}:{server.server_address[1]}/ingest")
  return server


def _screen(capture):
  """The screen collector where it can run (capture.screen_seconds > 0), else None."""
  if capture.cfg.screen_seconds <= 0:
    return None
  from streamlearn.capture.screen import Screen
  screen = Screen(capture)
  if (why := screen.unavailable()) is not None:
    log.warning(f"screen: not captured: {why}; the other collectors go on")
    return None
  return screen


main = standalone(add_arguments, command, "streamlearn capture", __doc__.splitlines()[0])

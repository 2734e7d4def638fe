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
import time
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
  from streamlearn.capture.spool import Item, Spool
  from streamlearn.config import ConfigError, load_config

  try:
    config = load_config(args.config, args.set)
  except (ConfigError, OSError) as err:
    return error(str(err))
  cfg = config.capture
  if args.pause or args.resume:
    if not cfg.push:
      return error("--pause/--resume talk to a running capture's push endpoint: set capture.push")
    host, port = _address(cfg.push)
    try:
      request = urllib.request.Request(f"http://{host}:{port}/{'pause' if args.pause else 'resume'}",
                                       data=b"", method="POST")
      print(json.loads(urllib.request.urlopen(request, timeout=10).read()))
    except OSError as err:
      return error(f"no capture answers on {cfg.push} ({err})")
    return 0
  spool_dir = Path(args.spool or cfg.spool or Path("checkpoints") / config.name / "captures")
  try:
    spool = Spool(spool_dir, cfg.segment_bytes)
  except OSError as err:
    return error(f"{spool_dir}: cannot use it as the spool ({err.strerror})")
  capture = Capture(cfg, spool)
  folders = Folders(capture, list(cfg.folders))
  server = None
  if cfg.push and not args.once:
    try:
      host, port = _address(cfg.push)
    except ValueError as err:
      return error(str(err))
    if not _loopback(host) and not cfg.allow_remote_push:
      return error(f"capture.push {cfg.push} is not loopback: set capture.allow_remote_push")
    from streamlearn.capture.push import make_push_server
    try:
      server = make_push_server(capture, host, port)
    except OSError as err:
      return error(f"cannot listen on {cfg.push} ({err.strerror})")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    log.info(f"push: POST http://{host}:{server.server_address[1]}/ingest")
  if args.stdin:
    text = sys.stdin.buffer.read().decode("utf-8", errors="replace")
    if text.strip():
      capture.offer(Item(text, "stdin", "stdin"))
  screen = None
  if cfg.screen_seconds > 0:
    from streamlearn.capture.screen import Screen
    screen = Screen(capture)
    if (why := screen.unavailable()) is not None:
      log.warning(f"screen: not captured: {why}; the other collectors go on")
      screen = None
  stop = threading.Event()
  try:
    if args.once:
      folders.scan(settled=False)
      if screen is not None:
        screen.grab()
    else:
      signal.signal(signal.SIGTERM, lambda *_: stop.set())
      folders.watch()
      log.info(f"capturing into {spool_dir} ({len(cfg.folders)} folder(s)"
               f"{', push on ' + cfg.push if server else ''}); Ctrl-C stops")
      was_paused, next_look, paused_at = False, 0.0, 0.0
      while not stop.is_set():
        if capture.paused.is_set() != was_paused:
          was_paused = capture.paused.is_set()
          if was_paused:
            paused_at = time.monotonic()
            log.info("paused: nothing is captured")
          else:
            with capture.lock:  # the paused time goes into the open segment's manifest
              spool.manifest.paused_seconds += time.monotonic() - paused_at
              spool.write_manifest()
            log.info(f"resumed after {time.monotonic() - paused_at:.0f} s paused")
        with capture.lock:
          capture.prune()  # the age cap applies between seals too
        if not was_paused:
          folders.scan(settled=True)
          if screen is not None and time.monotonic() >= next_look:
            screen.grab()
            next_look = time.monotonic() + cfg.screen_seconds
        wait = cfg.poll_seconds if screen is None else min(cfg.poll_seconds, cfg.screen_seconds)
        folders.wake.wait(wait)
        folders.wake.clear()
  except KeyboardInterrupt:
    pass
  finally:
    folders.stop()
    if server is not None:
      server.shutdown()
    with capture.lock:
      spool.close()
  t = capture.totals
  log.info(f"captured {t['captured']} item(s), {t['bytes']:,} bytes; {t['duplicates']} "
           f"duplicate(s), {t['skipped']} skipped; spool {spool_dir} "
           f"(segment {spool.manifest.segment}, {spool.sealed_events} sealed now)")
  return 0


main = standalone(add_arguments, command, "streamlearn capture", __doc__.splitlines()[0])

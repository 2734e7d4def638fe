"""One capture process: its collectors, and the loop that drives them until it is stopped.

The loop scans the folders (woken by watchdog, else every `poll_seconds`), looks
at the screen every `screen_seconds`, applies the spool's caps between seals,
and keeps account of pauses (`POST /pause`): paused time goes into the open
segment's manifest and the log. The push endpoint serves from its own threads.
"""

from __future__ import annotations

import logging
import threading
import time

from streamlearn.capture.collect import Capture, Folders

log = logging.getLogger("streamlearn.capture")


class Running:
  def __init__(self, capture: Capture, folders: Folders, screen=None, server=None):
    self.capture, self.folders, self.screen, self.server = capture, folders, screen, server
    self._paused_at: float | None = None
    self._next_look = 0.0

  def once(self) -> None:
    """What is there now (--once)."""
    self.folders.scan(settled=False)
    if self.screen is not None:
      self.screen.grab()

  def until(self, stop: threading.Event) -> None:
    """Captures until `stop` is set (SIGTERM) or Ctrl-C."""
    self.folders.watch()
    cfg = self.capture.cfg
    wait = cfg.poll_seconds if self.screen is None else min(cfg.poll_seconds,
                                                             cfg.screen_seconds)
    while not stop.is_set():
      self._account_pauses()
      with self.capture.lock:
        self.capture.spool.seal_if_older(cfg.seal_seconds)
        self.capture.prune()  # the age cap applies between seals too
      if self._paused_at is None and not self.capture.disk_low():
        self._look()
      self.folders.wake.wait(wait)
      self.folders.wake.clear()

  def _look(self) -> None:
    self.folders.scan(settled=True)
    if self.screen is not None and time.monotonic() >= self._next_look:
      self.screen.grab()
      self._next_look = time.monotonic() + self.capture.cfg.screen_seconds

  def _account_pauses(self) -> None:
    paused = self.capture.paused.is_set()
    if paused and self._paused_at is None:
      self._paused_at = time.monotonic()
      log.info("paused: nothing is captured")
    elif not paused and self._paused_at is not None:
      seconds, self._paused_at = time.monotonic() - self._paused_at, None
      spool = self.capture.spool
      with self.capture.lock:  # the paused time goes into the open segment's manifest
        spool.manifest.paused_seconds += seconds
        spool.write_manifest()
      log.info(f"resumed after {seconds:.0f} s paused")

  def close(self) -> None:
    self.folders.stop()
    if self.server is not None:
      self.server.shutdown()
    with self.capture.lock:
      self.capture.spool.close()

  def summary(self) -> str:
    t, spool = self.capture.totals, self.capture.spool
    return (f"captured {t['captured']} item(s), {t['bytes']:,} bytes; {t['duplicates']} "
            f"duplicate(s), {t['skipped']} skipped; spool {spool.directory} "
            f"(segment {spool.manifest.segment}, {spool.sealed_events} sealed now)")

"""The daemon's loop: three children supervised, backups on a schedule, learning paused when
the machine needs it, status written, systemd kept informed.

    capture   streamlearn capture --spool DIR/spool          (first: it never waits)
    learner   streamlearn run --data DIR/spool --follow --run-dir DIR/run [--resume]
              (once the spool has a segment; at a lower priority)
    server    streamlearn serve --run-dir DIR/run           (once the run has a version)

Every child gets the daemon's own `--config` and `--set`s, so one file says
everything. A learner that restarts resumes from its newest version, at the
spool position that version records: what it learned after that version is
learned again from the same bytes, so every captured byte ends up learned
exactly once in the versions it keeps. Stopping (SIGTERM, Ctrl-C) goes in
order: capture first (nothing new arrives), then the learner (it saves a
version), then the server.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
import urllib.request

from streamlearn.config import Config, parse_duration
from streamlearn.daemon import backup as backups
from streamlearn.daemon.children import Child, Spec, cpu_seconds, start_ticks, stop_leftover
from streamlearn.daemon.guard import Guard, load_average, on_battery
from streamlearn.daemon.notify import Notifier
from streamlearn.daemon.status import Layout, gather
from streamlearn.data import spoolfile
from streamlearn.disk import why, write_atomic

log = logging.getLogger("streamlearn.daemon")

TICK_S = 0.5          # the loop's period: children polled, pauses applied
STATUS_EVERY_S = 2.0  # status.json rewritten this often
MAX_FAILURES_KEPT = 20


class DaemonError(RuntimeError):
  """The daemon cannot start; one line."""


class Daemon:
  def __init__(self, config: Config, config_path: str | None, overrides: list[str]):
    self.config, self.cfg = config, config.daemon
    self.layout = Layout(config)
    self.every_s = parse_duration(self.cfg.backup_every)
    self.guard = Guard(self.cfg)
    self.notifier = Notifier()
    self.stop_requested = threading.Event()
    self.failures: list[str] = []
    self.started = time.time()
    self._pool: list | None = None
    self._lock_file = None
    base = [sys.executable, "-m", "streamlearn"]
    shared = (["--config", config_path] if config_path else []) + \
        [a for o in overrides for a in ("--set", o)]
    spool, run = str(self.layout.spool), str(self.layout.run)
    self.capture = Child(Spec("capture", lambda: base + ["capture", "--spool", spool] + shared))
    # A learner that restarts resumes its run (once the run directory holds one).
    self.learner = Child(Spec("learner", lambda: (
        base + ["run", "--data", spool, "--follow", "--run-dir", run] + shared
        + (["--resume"] if (self.layout.run / "config.json").exists() else [])),
                              nice=self.cfg.nice))
    status_file = f'serve.status_file="{self.layout.status}"'
    self.server = Child(Spec("server", lambda: (
        base + ["serve", "--run-dir", run] + shared + ["--set", status_file])))
    # In the order they start; they stop in this order too.
    self.children = [c for c, on in ((self.capture, self.cfg.capture), (self.learner, True),
                                     (self.server, self.cfg.serve)) if on]

  # --- starting -------------------------------------------------------------------------

  def open(self) -> None:
    """Takes the directory (one daemon per directory) and cleans up after a crash."""
    for path in (self.layout.root, self.layout.spool, self.layout.backups):
      try:
        path.mkdir(parents=True, exist_ok=True)
      except OSError as err:
        raise DaemonError(f"{path}: cannot use it ({why(err)})") from None
    self._lock_file = open(self.layout.lock, "a+")
    try:
      fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      self._lock_file.seek(0)
      raise DaemonError(f"{self.layout.root} is in use by another daemon "
                        f"({self._lock_file.read().strip() or 'pid unknown'}); stop it first")
    self._lock_file.seek(0)
    self._lock_file.truncate()
    self._lock_file.write(f"pid {os.getpid()}")
    self._lock_file.flush()
    self._after_the_last_daemon()
    for name in backups.remove_partial(self.layout.backups):
      log.warning(f"warning: removed the partial backup {name} (left by a crash)")

  def _after_the_last_daemon(self) -> None:
    """Stops the children a killed daemon left (if any) and keeps the failures it had seen."""
    try:
      last = json.loads(self.layout.status.read_text())
    except (OSError, ValueError):
      return
    self.failures = list(last.get("failures") or [])[-MAX_FAILURES_KEPT:]  # still worth saying
    for name, child in (last.get("children") or {}).items():
      if child.get("pid"):
        stop_leftover(name, child["pid"], child.get("start_ticks"), self.cfg.stop_seconds)

  def _ready(self, child: Child) -> str | None:
    """Why `child` cannot start yet (None: it can)."""
    if child is self.learner and not spoolfile.is_spool(self.layout.spool):
      return "waiting for the first captured text"
    if child is self.server and backups.newest_version(self.layout.run) is None:
      return "waiting for the learner's first version"
    return None

  def _start_waiting(self) -> None:
    for child in self.children:
      if child.state == "waiting" and self._ready(child) is None:
        child.start()

  # --- the loop ---------------------------------------------------------------------------

  def run(self) -> int:
    self.open()
    # SIGTERM and Ctrl-C ask the loop to stop; the way out is the same orderly one either way.
    for sig in (signal.SIGTERM, signal.SIGINT):
      signal.signal(sig, lambda *_: self.stop_requested.set())
    log.info(f"daemon: {self.layout.root} (pid {os.getpid()}); backups every "
             f"{self.cfg.backup_every}, {self.cfg.keep_backups} kept; Ctrl-C stops")
    self.notifier.send("READY=1")
    next_status = next_backup = 0.0
    while not self.stop_requested.is_set():
      now = time.monotonic()
      self._start_waiting()
      for child in self.children:
        child.poll()
      self._apply_guard(now)
      if now >= next_backup:
        self._backup_if_due()
        next_backup = now + min(self.every_s / 4, 60.0)
      if now >= next_status:
        self.write_status()
        next_status = now + STATUS_EVERY_S
      self.notifier.watchdog(now)
      self.stop_requested.wait(TICK_S)
    return self.shutdown()

  def _apply_guard(self, now: float) -> None:
    self.guard.observe_own(now, sum(cpu_seconds(c.pid) for c in self.children if c.alive()))
    reason = self.guard.check(now, on_battery(self.cfg.power_supply),
                              load_average(self.cfg.loadavg))
    if reason and self.learner.paused_for != reason:
      self.learner.pause(reason)
    elif not reason and self.learner.paused_for:
      self.learner.resume()

  def _backup_if_due(self) -> None:
    last = backups.last_backup_time(self.layout.backups)
    if last is not None and time.time() - last < self.every_s:
      return
    try:
      made = backups.make_backup(self.layout.run, self.layout.backups, self.cfg.keep_backups)
    except backups.BackupError as err:
      log.warning(f"warning: {err}")
      self.failures = (self.failures + [f"{time.strftime('%Y-%m-%d %H:%M:%S')} {err}"])[
          -MAX_FAILURES_KEPT:]
      return
    if made is not None:
      log.info(f"backup: {made}")

  # --- status ---------------------------------------------------------------------------

  def own_status(self, stopped: bool = False) -> dict:
    return {"daemon": {"pid": os.getpid(), "start_ticks": start_ticks(os.getpid()),
                       "since": self.started, "updated": time.time(), "stopped": stopped},
            "children": {c.name: c.to_json() for c in self.children},
            "paused": self.learner.paused_for, "capture_paused": self._capture_paused(),
            "pool": self._fetch_pool(),
            "failures": sorted(set(self.failures + [d for c in self.children for d in c.deaths]))[
                -MAX_FAILURES_KEPT:]}

  def write_status(self, stopped: bool = False) -> dict:
    status = gather(self.layout, self.own_status(stopped))
    try:
      write_atomic(self.layout.status, json.dumps(status, indent=1))
    except OSError as err:
      log.warning(f"warning: {self.layout.status} not written ({why(err)})")
    self.notifier.send(f"STATUS={status['captured_bytes']:,} bytes captured, "
                       f"{status['learned_bytes']:,} learned"
                       + (f"; learning paused: {status['paused']}" if status["paused"] else ""))
    return status

  def _capture_paused(self) -> str | None:
    """Capture pauses itself below capture.min_free_mb (capture/collect.py); say so too."""
    floor = self.config.capture.min_free_mb
    try:
      free = shutil.disk_usage(self.layout.spool).free / 2**20
    except OSError:
      return None
    return (f"{free:,.0f} MB free on {self.layout.spool}, below capture.min_free_mb ({floor:g})"
            if self.cfg.capture and free < floor else None)

  def _fetch_pool(self) -> list | None:
    if not self.server.alive() or not self.server.address:
      return None
    try:
      with urllib.request.urlopen(f"http://{self.server.address}/api/pool", timeout=1.0) as r:
        models = json.loads(r.read()).get("models", [])
      self._pool = [{k: m.get(k) for k in ("id", "bits_per_byte", "pulls", "ratings",
                                           "posterior")} for m in models]
    except (OSError, ValueError, AttributeError):
      pass  # busy or restarting: the last pool read stands
    return self._pool

  # --- stopping -------------------------------------------------------------------------

  def shutdown(self) -> int:
    """Capture, then the learner (it saves a version), then the server."""
    self.notifier.send("STOPPING=1")
    log.info("daemon: stopping (capture, then the learner, then the server)")
    for child in self.children:
      child.stop(self.cfg.stop_seconds)
    self.write_status(stopped=True)
    log.info("daemon: stopped")
    return 0

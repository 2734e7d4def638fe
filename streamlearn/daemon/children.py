"""The daemon's child processes: started, watched, restarted with back-off, paused, stopped.

Each child is a `streamlearn` command in its own process group (a Ctrl-C in the
terminal reaches the daemon, which stops the children in order), asked by the
kernel to get SIGTERM if the daemon dies (`PR_SET_PDEATHSIG`: a `kill -9` of
the daemon never leaves a learner behind holding the run directory). Its
output goes line by line into the daemon's log, prefixed with its name; the
address it announces (`http://HOST:PORT/`) is noted for `status`.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import logging
import os
import re
import signal
import subprocess
import threading
import time
from typing import Callable

log = logging.getLogger("streamlearn.daemon")

BACKOFF_MAX_S = 60.0    # restarts wait 1, 2, 4, ... seconds (Child.backoff_s doubled), at most this
HEALTHY_S = 60.0        # a child that ran this long before it died starts a fresh count
FAILURES_TO_SAY = 5     # after this many failures in a row, one clear error line
_ADDRESS = re.compile(r"http://([\w.\-\[\]:]+:\d+)/")
_PR_SET_PDEATHSIG = 1


@dataclasses.dataclass
class Spec:
  name: str
  argv: Callable[[], list[str]]  # the command, made at each start (a restart may resume)
  nice: int = 0   # added to the child's niceness (the learner runs at a lower priority)


def _child_setup(nice: int, parent: int):
  """Runs in the child between fork and exec."""

  def setup() -> None:
    try:
      ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the daemon's start-up check cleans up
      pass
    if os.getppid() != parent:  # the daemon died before prctl took effect
      os._exit(1)
    if nice:
      os.nice(nice)

  return setup


class Child:
  """One supervised process. `poll()` from the daemon's loop restarts it when it died."""

  def __init__(self, spec: Spec, env: dict | None = None, backoff_s: float = 1.0):
    self.spec, self.env, self.backoff_s = spec, env, backoff_s
    self.process: subprocess.Popen | None = None
    self.state = "waiting"      # waiting, running, paused, backing off, failing, stopped
    self.since = time.time()
    self.started_at = 0.0
    self.restarts = 0           # restarts after a death (not the first start)
    self.failures = 0           # deaths in a row, each within HEALTHY_S of its start
    self.deaths: list[str] = []  # one line per death, for status
    self.next_start = 0.0
    self.paused_for: str | None = None
    self.address: str | None = None
    self.last_exit: int | None = None
    self.tail: collections.deque[str] = collections.deque(maxlen=5)
    self._pump: threading.Thread | None = None

  @property
  def name(self) -> str:
    return self.spec.name

  @property
  def pid(self) -> int | None:
    return self.process.pid if self.process is not None else None

  def alive(self) -> bool:
    return self.process is not None and self.process.poll() is None

  def _set(self, state: str) -> None:
    if state != self.state:
      self.state, self.since = state, time.time()

  def start(self) -> None:
    self.process = subprocess.Popen(
        self.spec.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
        preexec_fn=_child_setup(self.spec.nice, os.getpid()))
    self.started_at = time.monotonic()
    self._set("running")
    self._pump = threading.Thread(target=self._read_output, args=(self.process,), daemon=True,
                                  name=f"{self.name}-output")
    self._pump.start()
    log.info(f"{self.name}: started (pid {self.process.pid})")
    if self.paused_for:  # paused before it (re)started: it starts paused
      self.process.send_signal(signal.SIGSTOP)
      self._set("paused")

  def _read_output(self, process: subprocess.Popen) -> None:
    child_log = logging.getLogger(f"streamlearn.daemon.{self.name}")
    for raw in process.stdout:
      line = raw.decode("utf-8", "replace").rstrip()
      if not line:
        continue
      self.tail.append(line)
      if self.address is None and (m := _ADDRESS.search(line)):
        self.address = m.group(1)
      child_log.info(f"[{self.name}] {line}")

  def poll(self) -> None:
    """Notices a death and starts the child again once its back-off has passed."""
    now = time.monotonic()
    if self.process is not None and self.state in ("running", "paused"):
      code = self.process.poll()
      if code is None:
        return
      self._died(code, now)
    if self.state in ("backing off", "failing") and now >= self.next_start:
      self.restarts += 1
      self.address = None
      self.start()

  def _died(self, code: int, now: float) -> None:
    if self._pump is not None:
      self._pump.join(timeout=2.0)  # its last lines say why
    self.last_exit = code
    ran = now - self.started_at
    self.failures = self.failures + 1 if ran < HEALTHY_S else 1
    wait = min(BACKOFF_MAX_S, self.backoff_s * 2.0 ** (self.failures - 1))
    self.next_start = now + wait
    why = f"exit code {code}" if code >= 0 else f"killed by {signal.Signals(-code).name}"
    last = f"; last words: {self.tail[-1]}" if self.tail else ""
    self.deaths.append(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {self.name}: {why}{last}")
    del self.deaths[:-20]
    if self.failures >= FAILURES_TO_SAY:
      self._set("failing")
      log.error(f"error: {self.name} failed {self.failures} times in a row ({why}{last}); "
                f"trying again in {wait:.0f} s, and so on")
    else:
      self._set("backing off")
      log.warning(f"warning: {self.name} stopped ({why}{last}); starting it again in "
                  f"{wait:.2g} s")

  def pause(self, why: str) -> None:
    """Stops the child where it is (SIGSTOP): nothing is lost, it goes on at `resume`."""
    self.paused_for = why
    if self.alive() and self.state == "running":
      self.process.send_signal(signal.SIGSTOP)
      self._set("paused")
      log.info(f"{self.name}: paused ({why})")

  def resume(self) -> None:
    if self.paused_for is None:
      return
    was, self.paused_for = self.paused_for, None
    if self.alive() and self.state == "paused":
      self.process.send_signal(signal.SIGCONT)
      self._set("running")
      log.info(f"{self.name}: resumed (no longer {was})")

  def stop(self, timeout_s: float) -> int | None:
    """SIGTERM (the learner saves a version), then SIGKILL after `timeout_s`; the exit code."""
    self._set("stopped")
    if not self.alive():
      return None if self.process is None else self.process.returncode
    self.process.send_signal(signal.SIGCONT)  # a paused child must run to stop
    self.process.send_signal(signal.SIGTERM)
    try:
      code = self.process.wait(timeout_s)
    except subprocess.TimeoutExpired:
      log.warning(f"warning: {self.name} did not stop within {timeout_s:.0f} s; killed")
      self.process.kill()
      code = self.process.wait()
    if self._pump is not None:
      self._pump.join(timeout=2.0)
    log.info(f"{self.name}: stopped (exit code {code})")
    return code

  def to_json(self) -> dict:
    return {"state": self.state, "pid": self.pid if self.alive() else None,
            "since": self.since, "restarts": self.restarts, "failures": self.failures,
            "address": self.address, "last_exit": self.last_exit,
            "paused_for": self.paused_for,
            "last_line": self.tail[-1] if self.tail else None,
            "start_ticks": start_ticks(self.pid) if self.alive() else None}


def start_ticks(pid: int | None) -> int | None:
  """A process's start time in clock ticks since boot (with its pid, who it is: a pid can be
  reused, the pair cannot)."""
  if pid is None:
    return None
  try:
    with open(f"/proc/{pid}/stat") as f:
      return int(f.read().rsplit(")", 1)[1].split()[19])
  except (OSError, IndexError, ValueError):
    return None


def cpu_seconds(pid: int | None) -> float:
  """User + system CPU time of a process so far (0 when it is gone)."""
  if pid is None:
    return 0.0
  try:
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
  except (OSError, IndexError, ValueError):
    return 0.0


def stop_leftover(name: str, pid: int, ticks: int | None, timeout_s: float) -> bool:
  """Stops a child a killed daemon left running (the same pid *and* start time): SIGCONT,
  SIGTERM, then SIGKILL. Returns whether there was one."""
  if ticks is None or start_ticks(pid) != ticks:
    return False
  log.warning(f"warning: {name} (pid {pid}) outlived the last daemon; stopping it")
  for sig in (signal.SIGCONT, signal.SIGTERM):
    try:
      os.kill(pid, sig)
    except ProcessLookupError:
      return True
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    if start_ticks(pid) != ticks:
      return True
    time.sleep(0.2)
  try:
    os.kill(pid, signal.SIGKILL)
  except ProcessLookupError:
    pass
  return True

"""The terminal side of a run: the live progress line, and Ctrl-C / SIGTERM as a polite stop."""

from __future__ import annotations

import contextlib
import signal
import sys
import time


class StatusLine:
  """One live line on a terminal; a plain line every few seconds otherwise."""

  def __init__(self, every_s: float):
    self.tty = sys.stderr.isatty()
    self.every_s = every_s if self.tty else max(every_s, 10.0)
    self.last = 0.0

  def update(self, text: str, force: bool = False) -> None:
    now = time.monotonic()
    if not force and now - self.last < self.every_s:
      return
    self.last = now
    if self.tty:
      sys.stderr.write("\r" + text[:200].ljust(100))
    else:
      sys.stderr.write(text + "\n")
    sys.stderr.flush()

  def close(self) -> None:
    if self.tty:
      sys.stderr.write("\n")


def human_bytes(n: float) -> str:
  for unit in ("B", "KB", "MB", "GB"):
    if n < 1000 or unit == "GB":
      return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
    n /= 1000
  return f"{n:.1f} GB"


class Interrupts:
  """Ctrl-C and SIGTERM ask the loop to stop after the current step.

  While the loop waits for data (a quiet stdin, say) they raise instead, so a
  stop never waits on input; never inside a step, whose state is being donated.
  """

  def __init__(self):
    self.requested = False
    self._raising = False

  def _handle(self, signum, frame):
    self.requested = True
    if self._raising:
      raise KeyboardInterrupt

  @contextlib.contextmanager
  def installed(self):
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
      signal.signal(sig, self._handle)
    try:
      yield self
    finally:
      for sig, handler in previous.items():
        signal.signal(sig, handler)

  @contextlib.contextmanager
  def held(self):
    """Inside a wait for data, a stretch a signal must not cut (a save): it raises after."""
    raising, self._raising = self._raising, False
    try:
      yield
    finally:
      self._raising = raising
    if raising and self.requested:
      raise KeyboardInterrupt

  @contextlib.contextmanager
  def raising(self):
    self._raising = True
    try:
      if self.requested:
        raise KeyboardInterrupt
      yield
    finally:
      self._raising = False

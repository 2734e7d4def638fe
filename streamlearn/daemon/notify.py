"""systemd's notify protocol, from the standard library: READY, WATCHDOG, STATUS, STOPPING.

Under a `Type=notify` unit systemd sets $NOTIFY_SOCKET (a Unix datagram socket;
a leading '@' is the abstract namespace) and, with `WatchdogSec=`, $WATCHDOG_USEC:
the daemon must say WATCHDOG=1 within that or be restarted. The loop says it
every half interval, and only the loop does: a hung loop is a dead daemon.
Without $NOTIFY_SOCKET every call does nothing.
"""

from __future__ import annotations

import os
import socket


class Notifier:
  def __init__(self):
    address = os.environ.get("NOTIFY_SOCKET", "")
    self.address = "\0" + address[1:] if address.startswith("@") else address
    try:
      usec = int(os.environ.get("WATCHDOG_USEC", "0"))
    except ValueError:
      usec = 0
    # systemd sets WATCHDOG_PID when the watchdog is meant for one process only.
    pid = os.environ.get("WATCHDOG_PID")
    self.watchdog_s = usec / 2e6 if usec > 0 and pid in (None, str(os.getpid())) else 0.0
    self._next = 0.0

  def send(self, message: str) -> bool:
    if not self.address:
      return False
    try:
      with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(self.address)
        # Never wait: a listener that does not read (its queue full) must not stop the loop.
        sock.send(message.encode(), socket.MSG_DONTWAIT)
      return True
    except OSError:  # BlockingIOError included: the message is dropped
      return False

  def watchdog(self, now: float) -> None:
    """WATCHDOG=1 every half interval (`now`: time.monotonic())."""
    if self.watchdog_s and now >= self._next:
      self.send("WATCHDOG=1")
      self._next = now + self.watchdog_s

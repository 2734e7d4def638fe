"""When learning should pause: the machine on battery, or other programs keeping it busy.

The readings come from files (`daemon.power_supply`, `daemon.loadavg`), so a
test can write them. The load that counts is the *others'*: the 1-minute load
average less the CPUs our own children use, averaged the same way (the
learner alone keeps two cores busy, and must not pause itself). A reading
must hold for `daemon.load_seconds` before learning pauses, and the opposite
as long before it resumes, so a short burst never flips it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from streamlearn.config import DaemonConfig


def on_battery(root: str | Path) -> bool:
  """True when a battery discharges and no mains (or USB) supply is online."""
  root = Path(root)
  try:
    supplies = list(root.iterdir())
  except OSError:
    return False  # no power-supply class (a server, a container): never on battery
  discharging = False
  for supply in supplies:
    kind = _read(supply / "type")
    if kind in ("Mains", "USB", "USB_C", "USB_PD") and _read(supply / "online") == "1":
      return False
    if kind == "Battery" and _read(supply / "status") == "Discharging":
      discharging = True
  return discharging


def load_average(path: str | Path) -> float | None:
  text = _read(Path(path))
  try:
    return float(text.split()[0]) if text else None
  except ValueError:
    return None


def _read(path: Path) -> str:
  try:
    return path.read_text().strip()
  except OSError:
    return ""


class Guard:
  """Decides, from readings, whether learning pauses and why (None: it runs)."""

  def __init__(self, cfg: DaemonConfig, cpus: int | None = None):
    self.cfg = cfg
    self.cpus = cpus or os.cpu_count() or 1
    self.own_cpus = 0.0       # our children's CPU use, damped as the load average is
    self.others = 0.0         # the others' load per CPU, last reading
    self.reason: str | None = None
    self._high_since: float | None = None
    self._low_since: float | None = None
    self._last: tuple[float, float] | None = None   # (time, our CPU seconds)

  def observe_own(self, now: float, cpu_seconds: float) -> None:
    """Our children's total CPU seconds so far (they may restart: a drop resets)."""
    if self._last is not None and now > self._last[0] and cpu_seconds >= self._last[1]:
      dt = now - self._last[0]
      rate = (cpu_seconds - self._last[1]) / dt
      decay = math.exp(-dt / 60.0)  # the kernel's 1-minute load average decays so
      self.own_cpus = self.own_cpus * decay + rate * (1 - decay)
    self._last = (now, cpu_seconds)

  def check(self, now: float, battery: bool, load: float | None) -> str | None:
    """The reason learning is paused now, after these readings; None when it runs."""
    high = False
    if load is not None and self.cfg.max_load > 0:
      self.others = max(load - self.own_cpus, 0.0) / self.cpus
      high = self.others > self.cfg.max_load
    if high:
      self._low_since = None
      self._high_since = self._high_since if self._high_since is not None else now
    else:
      self._high_since = None
      self._low_since = self._low_since if self._low_since is not None else now
    busy = self.reason is not None and self.reason.startswith("load")
    if high and now - self._high_since >= self.cfg.load_seconds:
      busy = True
    elif not high and now - self._low_since >= self.cfg.load_seconds:
      busy = False
    if battery and self.cfg.pause_on_battery:
      self.reason = "on battery"
    elif busy:
      self.reason = (f"load: other programs keep {self.others:.1f} per CPU busy, above "
                     f"daemon.max_load {self.cfg.max_load:g}")
    else:
      self.reason = None
    return self.reason

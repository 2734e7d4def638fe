"""What the daemon is doing, from its directory alone: `streamlearn status`, the page, the log.

The daemon writes `status.json` (its children, pauses, failures) every few
seconds; the rest is read from the files themselves — the spool's segments
(bytes captured), the run's registry (bytes learned, the latest version and
its score), the backups — so `status` tells the truth even when the daemon is
not running.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from streamlearn.config import Config
from streamlearn.daemon.backup import backups
from streamlearn.data import spoolfile

STATUS_FILE = "status.json"


class Layout:
  """Where the daemon keeps things under `daemon.dir`."""

  def __init__(self, config: Config):
    self.root = Path(os.path.expanduser(config.daemon.dir))
    self.spool = Path(os.path.expanduser(config.capture.spool)) if config.capture.spool \
        else self.root / "spool"
    self.run = self.root / "run"
    self.backups = self.root / "backups"
    self.logs = self.root / "logs"
    self.status = self.root / STATUS_FILE
    self.lock = self.root / "daemon.lock"


def latest_version(run_dir: Path) -> dict | None:
  try:
    registry = json.loads((run_dir / "registry.json").read_text())
  except (OSError, ValueError):
    return None
  kept = [v for v in registry.get("versions", []) if v.get("status") == "kept"]
  if not kept:
    return None
  v = kept[-1]
  scores = v.get("scores") or {}
  return {"step": v["step"], "bytes": v.get("bytes") or 0, "time": v.get("time"),
          "score": scores.get("score"), "running_bpb": scores.get("running_bpb")}


def daemon_alive(daemon: dict) -> bool:
  """Whether the daemon that wrote `daemon` (its pid and start time) still runs."""
  pid = daemon.get("pid")
  if not pid or daemon.get("stopped"):
    return False
  from streamlearn.daemon.children import start_ticks
  return start_ticks(pid) == daemon.get("start_ticks")


def gather(layout: Layout, written: dict | None = None) -> dict:
  """Everything `status` shows, as JSON types. `written`: the daemon's own part ({daemon,
  children, paused, capture_paused, pool, failures}; status.json when not given)."""
  if written is None:
    try:
      written = json.loads(layout.status.read_text())
    except (OSError, ValueError):
      written = {}
  spool = spoolfile.text_bytes(layout.spool) if layout.spool.is_dir() else \
      {"captured": 0, "sealed": 0, "open": 0}
  latest = latest_version(layout.run)
  learned = latest["bytes"] if latest else 0
  found = backups(layout.backups)
  daemon = written.get("daemon", {})
  return {
      "daemon": {**daemon, "running": daemon_alive(daemon), "dir": str(layout.root)},
      "children": written.get("children", {}),
      "paused": written.get("paused"),
      "capture_paused": written.get("capture_paused"),
      "captured_bytes": spool["captured"],
      "ready_bytes": spool["sealed"],        # sealed: training ready
      "learned_bytes": learned,              # in the newest saved version
      "waiting_bytes": max(spool["captured"] - learned, 0),
      "latest_version": latest,
      "pool": written.get("pool"),
      "backups": [{"path": str(p), "time": m.get("time"), "step": m.get("step")}
                  for p, m in found],
      "last_backup": found[-1][1].get("time") if found else None,
      "failures": written.get("failures", []),
  }


def _ago(t: float | None) -> str:
  if not t:
    return "never"
  s = max(time.time() - t, 0)
  for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
    if s >= size:
      return f"{s / size:.1f} {unit} ago"
  return f"{s:.0f} s ago"


def _bytes(n: int) -> str:
  for unit in ("B", "KB", "MB", "GB"):
    if n < 1000 or unit == "GB":
      return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
    n /= 1000
  return f"{n} B"


def text(status: dict) -> str:
  """A few lines for a person."""
  d = status["daemon"]
  lines = [f"daemon: {'running (pid %s) since %s' % (d['pid'], _ago(d['since'])) if d['running'] else 'not running'}"
           f" — {d['dir']}"]
  for name, c in status["children"].items():
    extra = "".join([f" on {c['address']}" if c.get("address") else "",
                     f", {c['restarts']} restart(s)" if c.get("restarts") else "",
                     f" ({c['paused_for']})" if c.get("paused_for") else ""])
    lines.append(f"  {name}: {c['state']} since {_ago(c['since'])}{extra}")
  if status["paused"]:
    lines.append(f"learning paused: {status['paused']}")
  if status["capture_paused"]:
    lines.append(f"capture paused: {status['capture_paused']}")
  lines.append(f"bytes: {_bytes(status['captured_bytes'])} captured, "
               f"{_bytes(status['learned_bytes'])} learned, "
               f"{_bytes(status['waiting_bytes'])} waiting")
  v = status["latest_version"]
  if v:
    score = f"{v['score']:.3f} bits/byte" if v.get("score") is not None else "no score yet"
    lines.append(f"latest version: {v['step']} ({score}, saved {_ago(v['time'])})")
  else:
    lines.append("latest version: none yet")
  if status["pool"]:
    lines.append("pool: " + ", ".join(f"{m['id']}" for m in status["pool"]))
  lines.append(f"backups: {len(status['backups'])}, last {_ago(status['last_backup'])}")
  for failure in status["failures"][-3:]:
    lines.append(f"failed: {failure}")
  return "\n".join(lines)

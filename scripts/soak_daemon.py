"""A soak of `streamlearn daemon`: files and pushes arriving for N minutes, a kill -9 of each
part in turn, and what it did over time.

    python scripts/soak_daemon.py --minutes 30 --dir /tmp/soak --text corpus.txt [--out soak.json]

The daemon runs configs/daemon.toml (the default model) on --dir, with capture watching
--dir/notes and pushing on a free port. Every `--file-every` seconds a file of text from
--text (default: this Python's standard library) is written into the notes; every
`--push-every` seconds a paragraph is pushed. Every `--kill-every` seconds one part gets
kill -9, in turn: capture, the learner, the server, the daemon itself (then started again).
Every 10 s it samples `status`: bytes captured and learned, the lag (bytes, and seconds since
the capture reached what is learned now), restarts, and each process's memory (RSS). At the
end it stops the daemon (SIGTERM) and checks that every spooled byte before the newest
version's position was learned exactly once. A table goes to stdout, everything to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from streamlearn.config import load_config  # noqa: E402
from streamlearn.daemon.status import Layout, gather  # noqa: E402
from streamlearn.data import spoolfile  # noqa: E402


def corpus(path: str | None, limit: int = 20_000_000) -> str:
  if path:
    return Path(path).read_text(encoding="utf-8", errors="replace")[:limit]
  parts, size = [], 0
  for p in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
    if "test" in p.parts:
      continue
    text = p.read_text(encoding="utf-8", errors="replace")
    parts.append(text)
    size += len(text)
    if size > limit:
      break
  return "".join(parts)


def rss_mb(pid: int | None) -> float | None:
  if not pid:
    return None
  try:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  except OSError:
    return None
  return None


def learned_exactly_once(layout: Layout) -> tuple[bool, str]:
  """The newest version's bytes + its pending bytes = the spool's bytes before its position."""
  from streamlearn.config import CheckpointConfig
  from streamlearn.data.stream import decode_tokens
  from streamlearn.data.tokenizer import load_tokenizer
  from streamlearn.store.checkpoint import Checkpointer

  latest = gather(layout)["latest_version"]
  checkpointer = Checkpointer(layout.run, CheckpointConfig())
  try:
    record = checkpointer.read_record(latest["step"])[0]
  finally:
    checkpointer.close()
  position = record["position"]
  pending = int(load_tokenizer(layout.run).token_bytes[decode_tokens(position["pending"])].sum())
  segment, offset = position["source"]["segment"], position["source"]["offset"]
  before = spoolfile.pruned(layout.spool)["text_bytes"]
  first = spoolfile.pruned(layout.spool).get("segments", 0) + 1
  for n in range(first, segment + 1):
    data = spoolfile.segment_path(layout.spool, n).read_bytes()
    for _, start, end in spoolfile.items(data):
      before += end - start if n < segment else max(0, min(end, offset) - start)
  ok = latest["bytes"] + pending == before
  return ok, (f"version {latest['step']}: {latest['bytes']:,} bytes learned + {pending} pending "
              f"{'==' if ok else '!='} {before:,} spooled before its position")


class Soak:
  def __init__(self, args):
    self.args = args
    self.dir = Path(args.dir)
    self.notes = self.dir / "notes"
    self.notes.mkdir(parents=True, exist_ok=True)
    self.sets = [f'daemon.dir="{self.dir / "home"}"', f'capture.folders=["{self.notes}"]',
                 'capture.push="127.0.0.1:0"', "serve.port=0", "capture.seal_seconds=20",
                 f'daemon.backup_every="{args.backup_every}"', "daemon.keep_backups=3",
                 "checkpoint.idle_seconds=10"] + args.set
    self.layout = Layout(load_config(args.config, self.sets))
    self.text = corpus(args.text)
    self.rng = random.Random(0)
    self.process: subprocess.Popen | None = None
    self.samples: list[dict] = []
    self.kills: list[dict] = []
    self.curve: list[tuple[float, int]] = []  # (time, captured bytes)
    self.pushed = self.files = self.push_errors = 0

  def start_daemon(self) -> None:
    argv = [sys.executable, "-m", "streamlearn", "daemon", "--config", self.args.config]
    for s in self.sets:
      argv += ["--set", s]
    self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

  def piece(self, n: int) -> str:
    at = self.rng.randrange(max(len(self.text) - n, 1))
    return self.text[at:at + n]

  def write_file(self) -> None:
    path = self.notes / f"note-{self.files:05d}.txt"
    path.write_text(self.piece(self.rng.randrange(1000, 6000)))
    self.files += 1

  def push(self, status: dict) -> None:
    address = status["children"].get("capture", {}).get("address")
    if not address:
      return
    request = urllib.request.Request(f"http://{address}/ingest",
                                     data=self.piece(self.rng.randrange(200, 1500)).encode())
    try:
      urllib.request.urlopen(request, timeout=10).read()
      self.pushed += 1
    except OSError:
      self.push_errors += 1  # capture being restarted: counted, the soak goes on

  def kill(self, n: int, status: dict) -> None:
    name = ("capture", "learner", "server", "daemon")[n % 4]
    pid = status["daemon"]["pid"] if name == "daemon" else status["children"].get(name, {}).get("pid")
    if not pid:
      return
    os.kill(pid, signal.SIGKILL)
    self.kills.append({"t": time.monotonic() - self.t0, "part": name, "pid": pid})
    print(f"[{time.monotonic() - self.t0:6.0f} s] kill -9 {name} (pid {pid})", flush=True)
    if name == "daemon":
      self.process.wait()
      time.sleep(3.0)  # its children follow it (PR_SET_PDEATHSIG)
      self.start_daemon()

  def sample(self, status: dict) -> None:
    now = time.monotonic() - self.t0
    captured, learned = status["captured_bytes"], status["learned_bytes"]
    self.curve.append((now, captured))
    reached = next((t for t, c in self.curve if c >= learned), now)
    children = status["children"]
    self.samples.append({
        "t": now, "captured": captured, "learned": learned, "lag_bytes": captured - learned,
        "lag_s": now - reached if learned < captured else 0.0,
        "restarts": {n: c.get("restarts", 0) for n, c in children.items()},
        "rss_mb": {**{n: rss_mb(c.get("pid")) for n, c in children.items()},
                   "daemon": rss_mb(status["daemon"].get("pid"))},
        "version": (status["latest_version"] or {}).get("step"),
        "backups": len(status["backups"]), "paused": status["paused"]})

  def run(self) -> dict:
    self.t0 = time.monotonic()
    self.start_daemon()
    end = self.t0 + self.args.minutes * 60
    next_file = next_push = next_sample = self.t0
    next_kill = self.t0 + self.args.kill_every
    kills = 0
    while time.monotonic() < end:
      now = time.monotonic()
      status = gather(self.layout)
      if now >= next_file:
        self.write_file()
        next_file = now + self.args.file_every
      if now >= next_push:
        self.push(status)
        next_push = now + self.args.push_every
      if now >= next_sample:
        self.sample(status)
        next_sample = now + 10.0
      if now >= next_kill:
        self.kill(kills, status)
        kills += 1
        next_kill = now + self.args.kill_every
      time.sleep(0.2)
    # Quiet: let the learner catch up (seal_seconds, idle save), then stop it.
    time.sleep(60.0)
    self.sample(gather(self.layout))
    self.process.send_signal(signal.SIGTERM)
    code = self.process.wait(timeout=600)
    ok, why = learned_exactly_once(self.layout)
    final = gather(self.layout)
    return {"minutes": self.args.minutes, "exit_code": code, "exactly_once": ok, "check": why,
            "files": self.files, "pushes": self.pushed, "push_errors": self.push_errors,
            "kills": self.kills, "samples": self.samples,
            "captured_bytes": final["captured_bytes"], "learned_bytes": final["learned_bytes"],
            "backups": len(final["backups"]), "failures": final["failures"],
            "config": self.args.config, "sets": self.sets}


def table(report: dict, every_s: float = 300.0) -> str:
  rows = ["| t (min) | captured | learned | lag (bytes) | lag (s) | restarts c/l/s | RSS MB capture/learner/server/daemon | version | backups |",
          "|---|---|---|---|---|---|---|---|---|"]
  last = -every_s
  for s in report["samples"]:
    if s["t"] - last < every_s and s is not report["samples"][-1]:
      continue
    last = s["t"]
    r, m = s["restarts"], s["rss_mb"]
    mem = "/".join(f"{m.get(n):.0f}" if m.get(n) else "–"
                   for n in ("capture", "learner", "server", "daemon"))
    rows.append(f"| {s['t'] / 60:.1f} | {s['captured']:,} | {s['learned']:,} | {s['lag_bytes']:,} "
                f"| {s['lag_s']:.0f} | {r.get('capture', 0)}/{r.get('learner', 0)}/"
                f"{r.get('server', 0)} | {mem} | {s['version']} | {s['backups']} |")
  return "\n".join(rows)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--minutes", type=float, default=30.0)
  parser.add_argument("--dir", default="/tmp/streamlearn-soak")
  parser.add_argument("--config", default=str(ROOT / "configs" / "daemon.toml"))
  parser.add_argument("--text", default=None, help="text the files and pushes are cut from")
  parser.add_argument("--file-every", type=float, default=3.0)
  parser.add_argument("--push-every", type=float, default=1.0)
  parser.add_argument("--kill-every", type=float, default=240.0)
  parser.add_argument("--backup-every", default="5m")
  parser.add_argument("--set", action="append", default=[])
  parser.add_argument("--out", default=None, help="the whole report as JSON")
  args = parser.parse_args()
  report = Soak(args).run()
  if args.out:
    Path(args.out).write_text(json.dumps(report, indent=1))
  print(table(report))
  print(f"{report['files']} files, {report['pushes']} pushes ({report['push_errors']} refused "
        f"while capture restarted), {len(report['kills'])} kill -9; {report['captured_bytes']:,} "
        f"bytes captured, {report['learned_bytes']:,} learned; {report['backups']} backups; "
        f"daemon exit code {report['exit_code']}; {report['check']}")
  return 0 if report["exactly_once"] and report["exit_code"] == 0 else 1


if __name__ == "__main__":
  sys.exit(main())

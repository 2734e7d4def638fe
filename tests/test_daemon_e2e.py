"""The whole daemon as a user runs it: capture, learn and serve in child processes; kill -9 of
each part and of the daemon; battery and load pauses; backups rotated and restored."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streamlearn.config import load_config
from streamlearn.daemon import backup as backups
from streamlearn.daemon.status import Layout, gather
from streamlearn.data import spoolfile

from daemon_runs import heard, http, listen, power, wait_until
from safety_runs import SAFE

pytestmark = pytest.mark.e2e


class Daemon:
  """`streamlearn daemon` in a child process, on a temporary directory, as a user runs it."""

  def __init__(self, root: Path, notify: Path):
    self.root, self.notify = root, notify
    self.config = load_config(None, self.sets())
    self.layout = Layout(self.config)
    self.process = None

  def sets(self) -> list[str]:
    sets = [SAFE[i + 1] for i, a in enumerate(SAFE) if a == "--set"]
    return sets + [
        f'daemon.dir="{self.root / "home"}"', 'daemon.backup_every="2s"', "daemon.keep_backups=2",
        "daemon.max_load=1", "daemon.load_seconds=0", f'daemon.loadavg="{self.root / "load"}"',
        f'daemon.power_supply="{self.root / "power"}"',
        "daemon.stop_seconds=60", f'capture.folders=["{self.root / "notes"}"]',
        'capture.push="127.0.0.1:0"', "capture.seal_seconds=1", "capture.poll_seconds=0.5",
        "capture.settle_seconds=0.2", "capture.min_free_mb=1", "serve.port=0",
        "serve.reload_seconds=1", "checkpoint.idle_seconds=1"]

  def start(self):
    argv = [sys.executable, "-m", "streamlearn", "daemon", "--config", SAFE[1]]
    for s in self.sets():
      argv += ["--set", s]
    env = {**os.environ, "NOTIFY_SOCKET": str(self.notify), "WATCHDOG_USEC": "1000000"}
    self.process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
    return self

  def status(self) -> dict:
    return gather(self.layout)

  def child(self, name: str) -> dict:
    return self.status()["children"].get(name, {})

  def running(self, *names, restarts: int | None = None) -> bool:
    status = self.status()
    return status["daemon"]["running"] and all(
        status["children"].get(n, {}).get("state") == "running"
        and status["children"][n].get("address" if n != "learner" else "pid")
        and (restarts is None or status["children"][n]["restarts"] == restarts) for n in names)

  def log(self) -> str:
    return (self.layout.logs / "daemon.log").read_text()


def version_record(run_dir: Path, step: int) -> dict:
  from streamlearn.config import CheckpointConfig
  from streamlearn.store.checkpoint import Checkpointer

  checkpointer = Checkpointer(run_dir, CheckpointConfig())
  try:
    return checkpointer.read_record(step)[0]
  finally:
    checkpointer.close()


def spool_bytes_before(spool: Path, segment: int, offset: int) -> int:
  """The items' text bytes in the spool before a learner's position (segment, offset)."""
  total = 0
  for n in range(1, segment + 1):
    path = spoolfile.segment_path(spool, n)
    if not path.exists():  # past the last segment
      break
    data = path.read_bytes()
    for _, start, end in spoolfile.items(data):
      total += end - start if n < segment else max(0, min(end, offset) - start)
  return total


def learned_exactly_once(daemon: Daemon) -> bool:
  """The newest version learned every spooled byte before its position exactly once (its
  bytes plus those it holds pending add up to them), and everything captured is sealed and
  learned but for less than one chunk (the tokens that wait for the next)."""
  from streamlearn.data.stream import decode_tokens
  from streamlearn.data.tokenizer import load_tokenizer

  status = daemon.status()
  latest = status["latest_version"]
  if not latest or status["ready_bytes"] != status["captured_bytes"]:
    return False
  position = version_record(daemon.layout.run, latest["step"])["position"]
  pending = decode_tokens(position["pending"])
  pending_bytes = int(load_tokenizer(daemon.layout.run).token_bytes[pending].sum())
  source = position["source"]
  before = spool_bytes_before(daemon.layout.spool, source["segment"], source["offset"])
  assert latest["bytes"] + pending_bytes == before, "a byte learned twice, or lost"
  return status["captured_bytes"] - latest["bytes"] < daemon.config.data.chunk_tokens


def push(daemon: Daemon, text: str) -> dict:
  return http(daemon.child("capture")["address"], "/ingest", text.encode())


def kill9(daemon: Daemon, name: str) -> int:
  pid = daemon.child(name)["pid"]
  os.kill(pid, signal.SIGKILL)
  return pid


def test_the_daemon_captures_learns_serves_and_survives_kill_9(tmp_path, capsys):
  from streamlearn.api import Learner
  from streamlearn.cli.main import main

  notes = tmp_path / "notes"
  notes.mkdir()
  sock = listen(tmp_path)
  daemon = Daemon(tmp_path, tmp_path / "notify").start()
  try:
    # --- up: capture first; the learner once there is text; the server once it has a version
    wait_until("capture", lambda: daemon.running("capture"))
    assert daemon.child("learner")["state"] == "waiting"
    (notes / "a.txt").write_text("The river bends twice before the mill. " * 30)
    (notes / "b.md").write_text("Mill wheels turn slowly in the autumn. " * 30)
    assert push(daemon, "A pushed note about the river and the mill.") == \
        {"captured": 1, "duplicate": False}
    wait_until("the server", lambda: daemon.running("capture", "learner", "server"))
    wait_until("every byte learned", lambda: learned_exactly_once(daemon))
    server = daemon.child("server")["address"]
    answer = http(server, "/api/generate", json.dumps(
        {"prompt": "The river", "stream": False, "options": {"num_predict": 8}}).encode(),
        "application/json")
    assert answer["done"] and answer["model"].startswith("run:")
    assert http(server, "/api/status")["captured_bytes"] > 0
    messages = heard(sock)
    assert messages[0] == "READY=1" and "WATCHDOG=1" in messages
    assert any(m.startswith("STATUS=") for m in messages)

    # --- kill -9 of each child in turn: it comes back, nothing is lost or learned twice
    for n, name in enumerate(("capture", "learner", "server")):
      before = daemon.status()["latest_version"]["step"]
      old = kill9(daemon, name)
      wait_until(f"{name} restarted", lambda: daemon.running(name, restarts=1)
                 and daemon.child(name)["pid"] != old)
      (notes / f"after-{name}.txt").write_text(f"Written after {name} was killed. " * (20 + n))
      push(daemon, f"Pushed after {name} was killed, item {n}.")
      wait_until("every byte learned", lambda: learned_exactly_once(daemon))
      assert daemon.status()["latest_version"]["step"] >= before
    registry = json.loads((daemon.layout.run / "registry.json").read_text())
    assert all(v["status"] in ("kept", "rotated") for v in registry["versions"])

    # --- on battery: learning pauses (the learner is stopped), capture goes on
    bat = {"type": "Battery", "status": "Discharging"}
    power(tmp_path / "power", BAT0=bat, AC={"type": "Mains", "online": "0"})
    wait_until("paused", lambda: daemon.status()["paused"] == "on battery")
    learner = daemon.child("learner")["pid"]
    stat = Path(f"/proc/{learner}/stat").read_text().rsplit(")", 1)[1].split()
    assert stat[0] == "T"                                # stopped where it was
    assert int(stat[16]) == min(os.nice(0) + 10, 19)     # at a lower priority (daemon.nice)
    push(daemon, "Captured while the learner is paused on battery. " * 10)
    time.sleep(2.0)
    assert not learned_exactly_once(daemon)   # captured, not learned
    power(tmp_path / "power", BAT0=bat, AC={"type": "Mains", "online": "1"})
    wait_until("resumed", lambda: daemon.child("learner")["state"] == "running")
    # ...and while other programs keep the machine busy (daemon.max_load per CPU)
    (tmp_path / "load").write_text(f"{50.0 * os.cpu_count():.2f} 1.0 1.0 1/100 1\n")
    wait_until("paused", lambda: (daemon.status()["paused"] or "").startswith("load: other"))
    (tmp_path / "load").write_text("0.00 0.00 0.00 1/100 1\n")
    wait_until("resumed", lambda: daemon.child("learner")["state"] == "running")
    wait_until("every byte learned", lambda: learned_exactly_once(daemon))
    assert main(["status", "--set", f'daemon.dir="{daemon.layout.root}"', "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["captured_bytes"] == spool_bytes_before(daemon.layout.spool, 10**6, 0) \
        == daemon.status()["captured_bytes"]
    assert shown["latest_version"]["step"] == daemon.status()["latest_version"]["step"]

    # --- kill -9 of the daemon: its children follow it (SIGTERM: the learner saves)
    children = [daemon.child(n)["pid"] for n in ("capture", "learner", "server")]
    os.kill(daemon.process.pid, signal.SIGKILL)
    daemon.process.wait()
    wait_until("the children gone", lambda: not any(Path(f"/proc/{p}").exists()
                                                    for p in children), timeout_s=60)
    saved = daemon.status()["latest_version"]["step"]
    daemon.start()
    wait_until("up again", lambda: daemon.running("capture", "learner", "server", restarts=0))
    assert daemon.status()["latest_version"]["step"] >= saved
    push(daemon, "Pushed after the daemon itself was killed.")
    wait_until("every byte learned", lambda: learned_exactly_once(daemon))

    # --- backups every 2 s: exactly keep_backups (2) of them, whole
    wait_until("a third backup", lambda: daemon.log().count("backup: ") >= 3)
    assert len(daemon.status()["backups"]) == 2

    # --- SIGTERM: capture, then the learner, then the server; exit code 0
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(timeout=120) == 0
    log = daemon.log()
    stops = [log.index(f"{n}: stopped (exit code 0)") for n in ("capture", "learner", "server")]
    assert stops == sorted(stops)
    assert not daemon.status()["daemon"]["running"]
    assert "Traceback" not in log
  finally:
    if daemon.process.poll() is None:
      daemon.process.kill()
    for child in daemon.status()["children"].values():
      if child.get("pid"):
        try:
          os.kill(child["pid"], signal.SIGKILL)
        except ProcessLookupError:
          pass

  # --- a backup brings the run back to its version
  newest = backups.backups(daemon.layout.backups)[-1]
  message = backups.restore_backup(newest[0])
  assert f"back at version {newest[1]['step']}" in message
  assert backups.newest_version(daemon.layout.run)[0] == newest[1]["step"]
  record = version_record(daemon.layout.run, newest[1]["step"])
  assert record["totals"]["bytes"] == newest[1]["bytes"]
  learner = Learner.load(daemon.layout.run)   # it loads: the backup is a whole version
  assert int(learner.state.step) == record["learner_step"]

"""The daemon's parts alone: the guard, backups, status, notify, children, the disk floor, the
log, the systemd unit (the whole daemon as a user runs it: test_daemon_e2e.py)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from streamlearn.config import ConfigError, DaemonConfig, load_config, parse_duration
from streamlearn.daemon import backup as backups
from streamlearn.daemon.guard import Guard, load_average, on_battery
from streamlearn.daemon.notify import Notifier
from streamlearn.daemon.status import Layout, gather, text
from streamlearn.data import spoolfile

from daemon_runs import heard, http, listen, power, wait_until
from safety_runs import ROOT

def test_durations():
  assert [parse_duration(t) for t in ("90s", "10m", "6h", "7d", "2w", "45", "1.5h")] == \
      [90, 600, 21600, 604800, 1209600, 45, 5400]
  for bad in ("", "7x", "-1d", "0s", "d"):
    with pytest.raises(ValueError):
      parse_duration(bad)
  with pytest.raises(ConfigError, match="daemon.backup_every: must be a duration"):
    load_config(None, ["daemon.backup_every=soon"])


def test_battery_is_read_from_the_power_supply_class(tmp_path):
  bat = {"type": "Battery", "status": "Discharging"}
  assert on_battery(power(tmp_path / "p", BAT0=bat, AC={"type": "Mains", "online": "0"}))
  assert not on_battery(power(tmp_path / "p", BAT0=bat, AC={"type": "Mains", "online": "1"}))
  assert not on_battery(power(tmp_path / "p", BAT0={"type": "Battery", "status": "Charging"}))
  assert not on_battery(tmp_path / "no-such-class")  # a server: never on battery
  (tmp_path / "loadavg").write_text("3.25 1.00 0.50 2/345 6789\n")
  assert load_average(tmp_path / "loadavg") == 3.25
  assert load_average(tmp_path / "missing") is None


def test_the_guard_pauses_for_battery_at_once_and_for_load_only_when_it_lasts():
  guard = Guard(DaemonConfig(max_load=1.0, load_seconds=10.0), cpus=2)
  assert guard.check(0.0, battery=True, load=0.0) == "on battery"
  assert guard.check(1.0, battery=False, load=0.0) is None
  # Others' load: 4.0 on 2 CPUs is 2.0 per CPU, above 1.0; it must last 10 s.
  assert guard.check(2.0, False, 4.0) is None
  assert guard.check(11.9, False, 4.0) is None
  assert guard.check(12.0, False, 4.0).startswith("load: other programs keep 2.0 per CPU")
  assert guard.check(15.0, False, 0.5).startswith("load")   # below, but not for 10 s yet
  assert guard.check(25.0, False, 0.5) is None
  assert guard.check(26.0, True, 0.5) == "on battery"


def test_the_guard_does_not_count_our_own_children_as_load():
  guard = Guard(DaemonConfig(max_load=1.0, load_seconds=0.0), cpus=2)
  # Our learner uses 2 CPUs for 10 minutes: the damped average reaches ~2.
  for t in range(0, 601, 5):
    guard.observe_own(float(t), 2.0 * t)
  assert guard.own_cpus == pytest.approx(2.0, abs=1e-3)
  assert guard.check(600.0, False, 3.5) is None   # others: 1.5 / 2 CPUs = 0.75
  assert guard.check(601.0, False, 5.0) is not None  # others: 3 / 2 = 1.5
  guard = Guard(DaemonConfig(max_load=0.0, load_seconds=0.0), cpus=1)
  assert guard.check(0.0, False, 100.0) is None     # max_load 0: load never pauses
  assert Guard(DaemonConfig(pause_on_battery=False)).check(0.0, True, None) is None


def fake_run(run_dir: Path, steps: list[int], bytes_per_step: int = 100) -> None:
  """A run directory as the learner leaves it, with versions that are plain files."""
  versions = run_dir / "versions"
  for step in steps:
    (versions / str(step)).mkdir(parents=True, exist_ok=True)
    (versions / str(step) / "state").write_text(f"state of {step}")
  registry = {"versions": [{"step": s, "bytes": s * bytes_per_step, "status": "kept",
                            "scores": {"score": 1.0 / (1 + s)}} for s in steps],
              "events": []}
  (run_dir / "registry.json").write_text(json.dumps(registry))
  (run_dir / "tokenizer.json").write_text('{"kind": "bytes"}')
  (run_dir / "config.json").write_text('{"name": "fake"}')


def test_backups_keep_the_last_n_and_skip_what_they_hold_already(tmp_path):
  run, root = tmp_path / "run", tmp_path / "backups"
  made = []
  for step in (10, 20, 30, 40, 50):
    fake_run(run, [0, step])
    made.append(backups.make_backup(run, root, keep=3))
    assert backups.make_backup(run, root, keep=3) is None  # nothing new: no second copy
    time.sleep(0.01)
  kept = backups.backups(root)
  assert [p for p, _ in kept] == made[-3:]
  assert [m["step"] for _, m in kept] == [30, 40, 50]
  newest = made[-1]
  assert sorted(p.name for p in (newest / "versions").iterdir()) == ["0", "50"]
  assert (newest / "versions" / "50" / "state").read_text() == "state of 50"
  assert json.loads((newest / "backup.json").read_text())["bytes"] == 5000
  # A crash while writing one leaves a partial backup: never listed, removed on start.
  (root / ".partial-20990101T000000Z-v60").mkdir()
  assert len(backups.backups(root)) == 3
  assert backups.remove_partial(root) == [".partial-20990101T000000Z-v60"]
  assert backups.rotate(root, 1) == [p for p, _ in kept[:2]]
  assert backups.backups(tmp_path / "none") == []


def test_a_backup_comes_back_with_the_run_set_aside(tmp_path):
  from streamlearn.cli.main import main

  run, root = tmp_path / "run", tmp_path / "backups"
  fake_run(run, [0, 20])
  made = backups.make_backup(run, root, keep=4)
  fake_run(run, [0, 20, 40, 60])   # the run went on
  assert main(["restore", "--backup", str(made)]) == 0  # into the run it was taken of
  assert sorted(p.name for p in (run / "versions").iterdir()) == ["0", "20"]
  aside = next((run / "aside").iterdir())
  assert sorted(p.name for p in aside.iterdir()) == ["0", "20", "40", "60", "registry.json"]
  registry = json.loads((run / "registry.json").read_text())
  assert [v["step"] for v in registry["versions"]] == [0, 20]
  assert registry["events"][-1]["kind"] == "restore_backup"
  assert registry["events"][-1]["to"] == 20
  # Not a backup, or a run in use: one line, nothing changed.
  assert main(["restore", "--backup", str(tmp_path)]) == 2
  from streamlearn.store.rundir import RunLock
  lock = RunLock(run)
  try:
    with pytest.raises(backups.BackupError, match="in use.*nothing changed"):
      backups.restore_backup(made, run)
  finally:
    lock.release()
  assert sorted(p.name for p in (run / "versions").iterdir()) == ["0", "20"]


def test_status_reads_the_directory_even_with_no_daemon(tmp_path, capsys):
  from streamlearn.cli.main import main

  config = load_config(None, [f'daemon.dir="{tmp_path}"'])
  layout = Layout(config)
  fake_run(layout.run, [0, 30], bytes_per_step=10)
  layout.spool.mkdir()
  item = b"\x1e2026-12-02T00:00:00Z push 12 client\nhello world\n"
  spoolfile.segment_path(layout.spool, 1).write_bytes(item * 25)
  spoolfile.manifest_path(layout.spool, 1).write_text(json.dumps(
      {"sealed": True, "text_bytes": 300}))
  spoolfile.segment_path(layout.spool, 2).write_bytes(item + item[:20])  # torn tail
  backups.make_backup(layout.run, layout.backups, keep=2)
  status = gather(layout)
  assert status["captured_bytes"] == 312 and status["ready_bytes"] == 300
  assert status["learned_bytes"] == 300 and status["waiting_bytes"] == 12
  assert status["latest_version"]["step"] == 30
  assert len(status["backups"]) == 1 and not status["daemon"]["running"]
  assert main(["status", "--set", f'daemon.dir="{tmp_path}"', "--json"]) == 0
  assert json.loads(capsys.readouterr().out)["captured_bytes"] == 312
  assert "312 B captured, 300 B learned, 12 B waiting" in text(status)
  assert main(["status", "--set", f'daemon.dir="{tmp_path / "nowhere"}"']) == 2


def test_notify_speaks_systemds_protocol(tmp_path, monkeypatch):
  sock = listen(tmp_path)
  monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
  monkeypatch.setenv("WATCHDOG_USEC", "2000000")
  notifier = Notifier()
  assert notifier.watchdog_s == 1.0 and notifier.send("READY=1")
  notifier.watchdog(10.0)
  notifier.watchdog(10.5)   # within half the interval: not again
  notifier.watchdog(11.0)
  assert heard(sock) == ["READY=1", "WATCHDOG=1", "WATCHDOG=1"]
  for _ in range(1000):  # nobody reads: the sender must not block
    notifier.send("STATUS=busy")
  monkeypatch.delenv("NOTIFY_SOCKET")
  assert not Notifier().send("READY=1")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_the_systemd_unit_verifies(tmp_path):
  home = tmp_path / "home"
  (home / ".local" / "bin").mkdir(parents=True)
  (home / ".local" / "bin" / "streamlearn").symlink_to(Path(sys.executable).parent / "streamlearn")
  unit = tmp_path / "streamlearn.service"
  shutil.copy(ROOT / "configs" / "streamlearn.service", unit)
  runtime = tmp_path / "runtime"
  runtime.mkdir(mode=0o700)
  env = {**os.environ, "HOME": str(home), "XDG_RUNTIME_DIR": str(runtime)}
  done = subprocess.run(["systemd-analyze", "verify", "--user", str(unit)], capture_output=True,
                        text=True, env=env, timeout=60)
  problems = [line for line in done.stderr.splitlines() if str(unit) in line or "streamlearn" in line]
  assert done.returncode == 0 and not problems, done.stderr
  text_ = unit.read_text()
  for line in ("Type=notify", "Restart=on-failure", "WatchdogSec=", "WantedBy=default.target"):
    assert line in text_


# The children are started with a preexec_fn (fork, then exec): harmless here, where the fork
# execs at once; the daemon itself never imports JAX.
@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
def test_a_child_that_keeps_dying_is_restarted_with_back_off_then_said_once(caplog):
  from streamlearn.daemon.children import FAILURES_TO_SAY, Child, Spec

  child = Child(Spec("flaky", lambda: [sys.executable, "-c", "print('no config'); exit(3)"]),
                backoff_s=0.01)
  child.start()
  with caplog.at_level("INFO", logger="streamlearn.daemon"):
    while child.failures < FAILURES_TO_SAY:
      child.process.wait()
      child.poll()   # noticed: the back-off doubles, 0.01 s, 0.02 s, ...
      assert child.next_start - time.monotonic() <= 0.01 * 2 ** (child.failures - 1)
      time.sleep(max(child.next_start - time.monotonic(), 0) + 0.01)
      child.poll()   # started again
  errors = [r.message for r in caplog.records if r.levelname == "ERROR"]
  assert errors == [f"error: flaky failed {FAILURES_TO_SAY} times in a row (exit code 3; last "
                    f"words: no config); trying again in 0 s, and so on"]
  assert child.restarts == FAILURES_TO_SAY and child.last_exit == 3
  assert len(child.deaths) == FAILURES_TO_SAY and "exit code 3" in child.deaths[-1]
  child.stop(5.0)


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
def test_a_child_pauses_resumes_and_is_killed_when_it_will_not_stop():
  from streamlearn.daemon.children import Child, Spec

  stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
  child = Child(Spec("stubborn", lambda: [sys.executable, "-c", stubborn], nice=5))
  child.start()
  wait_until("it runs", lambda: child.tail)
  state = lambda: Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()
  assert int(state()[16]) == min(os.nice(0) + 5, 19)   # niceness: lowered by 5
  child.pause("on battery")
  wait_until("stopped", lambda: state()[0] == "T")
  assert child.to_json()["state"] == "paused" and child.to_json()["paused_for"] == "on battery"
  child.resume()
  wait_until("running", lambda: state()[0] != "T")
  started = time.monotonic()
  assert child.stop(1.0) == -signal.SIGKILL   # it ignores SIGTERM: killed after 1 s
  assert 1.0 <= time.monotonic() - started < 10.0


def test_capture_pauses_below_the_disk_floor(tmp_path):
  from streamlearn.capture.collect import Capture
  from streamlearn.capture.push import make_push_server
  from streamlearn.capture.spool import Spool
  import threading

  cfg = load_config(None, ["capture.settle_seconds=0", "capture.min_free_mb=1e12"]).capture
  capture = Capture(cfg, Spool(tmp_path / "spool", cfg.segment_bytes))
  server = make_push_server(capture, "127.0.0.1", 0)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  try:
    address = f"127.0.0.1:{server.server_address[1]}"
    with pytest.raises(urllib.error.HTTPError) as refused:
      http(address, "/ingest", b"text that must wait for room")
    assert refused.value.code == 507
    assert "capture.min_free_mb" in json.loads(refused.value.read())["error"]
  finally:
    server.shutdown()
  assert capture.disk_low()
  capture.cfg = load_config(None, ["capture.min_free_mb=0"]).capture
  assert not capture.disk_low()
  assert not list((tmp_path / "spool").glob("segment-*.txt"))   # nothing reached the disk


def test_one_daemon_per_directory(tmp_path):
  from streamlearn.daemon.supervisor import Daemon as Supervisor, DaemonError

  config = load_config(None, [f'daemon.dir="{tmp_path}"'])
  first = Supervisor(config, None, [])
  first.open()
  with pytest.raises(DaemonError, match=f"{tmp_path} is in use by another daemon"):
    Supervisor(config, None, []).open()
  assert {p.name for p in tmp_path.iterdir()} >= {"spool", "backups", "daemon.lock"}


def test_the_log_rotates_by_size(tmp_path):
  import logging

  from streamlearn.cli.daemon import log_to_file

  log_to_file(DaemonConfig(log_bytes=2000, log_files=2), tmp_path)
  logger = logging.getLogger("streamlearn.daemon")
  try:
    for i in range(200):
      logger.warning(f"line {i:04d} " + "x" * 40)
  finally:
    for handler in list(logging.getLogger("streamlearn").handlers):
      if getattr(handler, "baseFilename", "").startswith(str(tmp_path)):
        logging.getLogger("streamlearn").removeHandler(handler)
        handler.close()
  files = sorted(p.name for p in tmp_path.iterdir())
  assert files == ["daemon.log", "daemon.log.1", "daemon.log.2"]
  assert all(p.stat().st_size <= 2000 for p in tmp_path.iterdir())
  assert "line 0199" in (tmp_path / "daemon.log").read_text()

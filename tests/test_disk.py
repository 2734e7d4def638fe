"""A full disk is a message, not a traceback: failed saves are reported, the run goes on,
and a resume ends bitwise like a run that never met a full disk."""

import errno
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from streamlearn import disk
from streamlearn.cli.run import main as run_main
from streamlearn.store import checkpoint

from safety_runs import SAFE, assert_same_state, final

ENOSPC = OSError(errno.ENOSPC, "No space left on device")


def test_an_atomic_write_that_fails_leaves_the_old_file(tmp_path, monkeypatch):
  path = tmp_path / "registry.json"
  disk.write_atomic(path, "old")
  monkeypatch.setattr(disk.os, "fsync", lambda fd: (_ for _ in ()).throw(ENOSPC))
  with pytest.raises(OSError):
    disk.write_atomic(path, "new and longer")
  assert path.read_text() == "old" and list(tmp_path.iterdir()) == [path]
  assert disk.why(ENOSPC) == "no space left on device" and disk.out_of_space(ENOSPC)
  wrapped = ValueError("RESOURCE_EXHAUSTED: Failed writing ...: No space left on device")
  assert disk.out_of_space(wrapped) and disk.why(wrapped) == "no space left on device"


def read_events(path: Path) -> list:
  """The events in a TensorBoard file, each record's checksums checked."""
  import struct
  from tensorboardX.proto import event_pb2
  from tensorboardX.record_writer import masked_crc32c
  data, events, at = path.read_bytes(), [], 0
  while at < len(data):
    header = data[at:at + 8]
    (n,) = struct.unpack("<Q", header)
    assert struct.unpack("<I", data[at + 8:at + 12])[0] == masked_crc32c(header)
    body = data[at + 12:at + 12 + n]
    assert struct.unpack("<I", data[at + 12 + n:at + 16 + n])[0] == masked_crc32c(body)
    events.append(event_pb2.Event.FromString(body))
    at += 16 + n
  return events


def test_tensorboard_events_on_a_full_disk_are_dropped_whole_and_counted(tmp_path, monkeypatch,
                                                                         caplog):
  from streamlearn.store.events import EventWriter
  writer = EventWriter(tmp_path / "tb", flush_every_s=1e9)
  writer.add_scalar("a", 1.0, 0)   # the first batch goes out at once
  writer.add_text("b", "two", 1)
  real_write = disk.os.write

  def half_then_full(fd, data):    # room for part of the batch only
    real_write(fd, bytes(data[:len(data) // 2]))
    raise ENOSPC

  monkeypatch.setattr(disk.os, "write", half_then_full)
  writer.flush()
  writer.add_scalar("c", 3.0, 2)
  writer.flush()
  monkeypatch.undo()
  writer.add_scalar("d", 4.0, 3)
  writer.close()
  said = warnings(caplog)
  assert len(said) == 2 and "no space left on device" in said[0] and "2 dropped" in said[1]
  assert writer.dropped == 2
  events = read_events(writer.path)
  assert events[0].file_version == "brain.Event:2"
  assert [(e.step, e.summary.value[0].tag) for e in events[1:]] == [(0, "a"), (3, "d")]
  assert events[-1].summary.value[0].simple_value == 4.0
  assert EventWriter(tmp_path / "tb").path != writer.path  # a second writer, its own file


class FullDisk:
  """A run's Orbax manager on a disk that is full for chosen saves (1 = version 0): the save
  writes part of its files, then fails with ENOSPC at once or, as Orbax's background
  writers do, when the run next waits for it."""

  def __init__(self, manager, directory: Path, failing: set[int], when: str):
    self._manager, self._directory = manager, Path(directory)
    self._failing, self._when, self._saves, self._pending = failing, when, 0, None

  def save(self, step, *args, **kwargs):
    self._saves += 1
    if self._saves not in self._failing:
      return self._manager.save(step, *args, **kwargs)
    partial = self._directory / f"{step}.orbax-checkpoint-tmp-1795000000"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "half").write_bytes(b"\0" * 1000)
    if self._when == "now":
      raise ENOSPC
    self._pending = ValueError(f"RESOURCE_EXHAUSTED: writing {partial}: No space left on device")
    return True

  def wait_until_finished(self):
    self._manager.wait_until_finished()
    if self._pending is not None:
      err, self._pending = self._pending, None
      raise err

  def __getattr__(self, name):
    return getattr(self._manager, name)


@pytest.fixture
def full_disk(monkeypatch):
  """full_disk(failing, when): the next run's saves number `failing` fail."""
  real = checkpoint.ocp.CheckpointManager

  def arm(failing: set[int], when: str = "later"):
    def manager(directory, options):
      made = real(directory, options=options)
      return FullDisk(made, directory, failing, when) if not options.read_only else made
    monkeypatch.setattr(checkpoint.ocp, "CheckpointManager", manager)

  return arm


def partial_versions(run_dir: Path) -> list[str]:
  return sorted(p.name for p in (run_dir / "versions").glob("*.orbax-checkpoint-tmp*"))


def warnings(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records if r.levelname in ("WARNING", "ERROR")]


# Saves of the finished run (a version every 10 chunks of 47): 1 = version 0, 2 = 10, ...,
# 5 = 40, 6 = 47 (the final one, at the end of the stream).
@pytest.mark.e2e
@pytest.mark.parametrize("failing,when,code", [
    ({2}, "later", 0),      # version 10, found failed when version 20 starts
    ({4, 5}, "now", 0),     # versions 30 and 40, two in a row, at once
    ({6}, "later", 2),      # the final version: one line, exit code 2
    ({2, 3, 4}, "now", 2),  # three in a row: the run stops
])
def test_failed_saves_are_one_line_and_a_resume_ends_like_no_failure(
    failing, when, code, finished_run, full_disk, tmp_path, caplog):
  caplog.set_level("INFO", logger="streamlearn")
  run_dir = tmp_path / "run"
  full_disk(failing, when)
  args = SAFE + ["--data", str(finished_run.data), "--run-dir", str(run_dir)]
  assert run_main(args) == code
  lost = [f"version {v} not saved: no space left on device"
          for v in ([0, 10, 20, 30, 40, 47][i - 1] for i in sorted(failing))]
  if failing == {2, 3, 4}:
    lost = lost[:3]
  said = warnings(caplog)
  for line in lost:
    assert sum(line in w for w in said) == 1, (line, said)
  assert all("\n" not in w for w in said) and "Traceback" not in caplog.text
  assert not partial_versions(run_dir)
  events = json.loads((run_dir / "registry.json").read_text())["events"]
  assert [e["step"] for e in events if e["kind"] == "save_failed"] == [
      [0, 10, 20, 30, 40, 47][i - 1] for i in sorted(failing)][:3]
  if failing == {2, 3, 4}:
    assert any(w.startswith("error: 3 saves in a row failed") for w in said)
  # The disk has room again: the resume goes on from the newest good version, and ends
  # exactly where the run that never met a full disk ended.
  full_disk(set())
  assert run_main(args + ["--resume"]) == 0
  state, record = final(run_dir)
  want_state, want_record = final(finished_run.run_dir)
  assert record["totals"] == want_record["totals"]
  assert_same_state(state, want_state)


@pytest.mark.e2e
def test_a_registry_that_cannot_be_written_is_a_warning(finished_run, tmp_path, monkeypatch,
                                                        caplog):
  real_open = open

  def no_room_for_the_registry(path, *args, **kwargs):
    if Path(path).name.startswith("registry.json"):
      raise ENOSPC
    return real_open(path, *args, **kwargs)

  monkeypatch.setattr(disk, "open", no_room_for_the_registry, raising=False)
  run_dir = tmp_path / "run"
  assert run_main(SAFE + ["--data", str(finished_run.data), "--run-dir", str(run_dir)]) == 0
  said = [w for w in warnings(caplog) if "registry.json not written" in w]
  assert len(said) == 1 and "no space left on device" in said[0]
  assert not (run_dir / "registry.json").exists()
  monkeypatch.undo()
  # The versions hold what it would have said: the next reader rebuilds it.
  from streamlearn.store.rundir import open_run
  run = open_run(run_dir)
  run.checkpointer.close()
  on_disk = {int(p.name) for p in (run_dir / "versions").iterdir() if p.name.isdigit()}
  assert {v["step"] for v in run.registry.kept()} == on_disk and 47 in on_disk


@pytest.mark.e2e
def test_a_real_full_disk(finished_run, tmp_path, caplog):
  # An 1.5 MB tmpfs: room for the original and about one learned version of the tiny run.
  mount = tmp_path / "small"
  mount.mkdir()
  made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1500k", "tmpfs", str(mount)],
                        capture_output=True, text=True)
  if made.returncode != 0:
    pytest.skip(f"cannot mount a small filesystem here: {made.stderr.strip()[:100]}")
  try:
    caplog.set_level("INFO", logger="streamlearn")
    run_dir = mount / "run"
    args = SAFE + ["--data", str(finished_run.data), "--run-dir", str(run_dir)]
    code = run_main(args)
    said = warnings(caplog)
    assert code in (0, 2) and any("no space left on device" in w for w in said), said
    assert all("\n" not in w for w in said) and "Traceback" not in caplog.text
    assert not partial_versions(run_dir)
    moved = tmp_path / "moved"  # a disk with room: the resume ends as no full disk would
    shutil.copytree(run_dir, moved, ignore=shutil.ignore_patterns(".lock"))
  finally:
    subprocess.run(["umount", str(mount)], check=False)
  assert run_main(SAFE + ["--data", str(finished_run.data), "--run-dir", str(moved),
                          "--resume"]) == 0
  state, record = final(moved)
  want_state, want_record = final(finished_run.run_dir)
  assert record["totals"] == want_record["totals"]
  assert_same_state(state, want_state)

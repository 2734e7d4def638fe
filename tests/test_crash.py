"""Crash-exact resume: a real SIGKILL, and crashes injected at chosen moments, then --resume
ends bitwise like no crash."""

import shutil
import signal
import subprocess
import sys
import time

import pytest

from streamlearn.cli.run import main as run_main

from safety_runs import SAFE, assert_same_state, final

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def reference(finished_run):
  """The uninterrupted run: the final state every resumed run must end with."""
  return final(finished_run.run_dir)


def assert_same(got, want):
  """Same final state and totals."""
  assert got[1]["totals"] == want[1]["totals"]
  assert_same_state(got[0], want[0])


def partial_steps(run_dir) -> list[int]:
  tmp = (run_dir / "versions").glob("*.orbax-checkpoint-tmp*")
  return sorted(int(p.name.split(".")[0]) for p in tmp)


def resume(run_dir, data, caplog) -> str:
  """Resumes the run to its end; returns the line saying where it resumed."""
  caplog.clear()
  assert run_main(SAFE + ["--data", str(data), "--run-dir", str(run_dir), "--resume"]) == 0
  resumed = [r.message for r in caplog.records
             if "resuming" in r.message or "no complete" in r.message]
  assert resumed, caplog.text
  return resumed[0]


def test_sigkill_while_it_learns_then_resume_ends_bitwise_like_no_crash(
    tmp_path, finished_run, reference, caplog):
  caplog.set_level("INFO", logger="streamlearn")
  run_dir = tmp_path / "run"
  proc = subprocess.Popen(
      [sys.executable, "-m", "streamlearn.run", *SAFE, "--data", str(finished_run.data),
       "--run-dir", str(run_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  # Killed the moment a learned version is being written (Orbax writes it under a temporary
  # name, then renames it), or failing that once one is complete: no fixed sleep.
  deadline = time.monotonic() + 240
  while proc.poll() is None and time.monotonic() < deadline:
    if any(s > 0 for s in partial_steps(run_dir)) or (run_dir / "versions" / "20").exists():
      break
    time.sleep(0.002)
  proc.send_signal(signal.SIGKILL)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL, f"it ended before the kill: {err[-500:]}"
  partial = partial_steps(run_dir)
  resumed = resume(run_dir, finished_run.data, caplog)
  # Never a half-written version: those are neither loaded nor left behind.
  assert not any(f"at chunk {s:,} " in resumed for s in partial), (partial, resumed)
  assert not partial_steps(run_dir)
  assert_same(final(run_dir), reference)
  print(f"{resumed}; half-written at the kill: {partial or 'none'}")


def test_a_half_written_version_is_never_loaded(tmp_path, finished_run, reference, caplog):
  # The state a crash mid-save leaves: a newer version under Orbax's temporary name, part-written.
  caplog.set_level("INFO", logger="streamlearn")
  run_dir = tmp_path / "run"
  shutil.copytree(finished_run.run_dir, run_dir, ignore=shutil.ignore_patterns(".lock"))
  for step in (47, 40):  # back at version 30, as if the run had been killed while saving 40
    shutil.rmtree(run_dir / "versions" / str(step))
  half = run_dir / "versions" / "40.orbax-checkpoint-tmp-1795000000000000"
  shutil.copytree(run_dir / "versions" / "30", half)
  for f in (half / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
  assert "at chunk 30 " in resume(run_dir, finished_run.data, caplog)
  assert not half.exists()
  assert_same(final(run_dir), reference)


def test_killed_before_the_original_was_saved_starts_again_identically(
    tmp_path, finished_run, reference, caplog):
  # A run killed while version 0 was being written (or the step compiled) leaves its config
  # and tokenizer and no complete version: the resume makes the original again.
  caplog.set_level("INFO", logger="streamlearn")
  run_dir = tmp_path / "run"
  shutil.copytree(finished_run.run_dir, run_dir, ignore=shutil.ignore_patterns(".lock"))
  shutil.rmtree(run_dir / "versions")
  (run_dir / "versions").mkdir()
  shutil.copytree(finished_run.run_dir / "versions" / "0",
                  run_dir / "versions" / "0.orbax-checkpoint-tmp-1795000000000000")
  assert "no complete version yet" in resume(run_dir, finished_run.data, caplog)
  assert not partial_steps(run_dir)
  assert_same(final(run_dir), reference)

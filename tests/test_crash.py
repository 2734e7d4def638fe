"""Crash-exact resume: SIGKILL at random moments, then --resume, ends bitwise like no crash."""

import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from streamlearn.cli.run import main as run_main

from safety_runs import SAFE, assert_same_state, final, stdlib_text

TRIALS = 3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  path = tmp_path_factory.mktemp("data") / "text.txt"
  path.write_bytes(stdlib_text(12_000))
  return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
  """The uninterrupted run: the final state every resumed run must end with."""
  run_dir = tmp_path_factory.mktemp("runs") / "reference"
  assert run_main(SAFE + ["--data", str(data), "--run-dir", str(run_dir)]) == 0
  return final(run_dir)


def assert_same(got, want):
  """Same final state and totals."""
  assert got[1]["totals"] == want[1]["totals"]
  assert_same_state(got[0], want[0])


def partial_steps(run_dir) -> list[int]:
  tmp = (run_dir / "versions").glob("*.orbax-checkpoint-tmp*")
  return sorted(int(p.name.split(".")[0]) for p in tmp)


def test_sigkill_at_random_moments_then_resume_ends_bitwise_like_no_crash(
    tmp_path, data, reference, caplog):
  caplog.set_level("INFO", logger="streamlearn")
  rng = random.Random(6)  # fixed seed: the same moments every run
  for trial in range(TRIALS):
    run_dir = tmp_path / f"trial{trial}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlearn.run", *SAFE, "--data", str(data),
         "--run-dir", str(run_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # Trial 0 dies while the base is being written or the step compiled; the others while
    # learning and saving (versions every ~0.3 s here), timed from the first learned version.
    anchor = run_dir / "versions" / ("" if trial == 0 else "10")
    deadline = time.monotonic() + 120
    while not anchor.exists() and time.monotonic() < deadline and proc.poll() is None:
      time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 1.0) if trial == 0 else rng.uniform(0.0, 2.0))
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"trial {trial} ended before the kill: {err[-500:]}"
    partial = partial_steps(run_dir)
    caplog.clear()
    assert run_main(SAFE + ["--data", str(data), "--run-dir", str(run_dir), "--resume"]) == 0
    resumed = [r.message for r in caplog.records
               if "resuming" in r.message or "no complete" in r.message]
    assert resumed, caplog.text
    # Never a half-written version: those are neither loaded nor left behind.
    assert not any(f"at chunk {s:,} " in resumed[0] for s in partial), (partial, resumed)
    assert not partial_steps(run_dir)
    assert_same(final(run_dir), reference)
    print(f"trial {trial}: {resumed[0]}; half-written at the kill: {partial or 'none'}")


def test_a_half_written_version_is_never_loaded(tmp_path, data, reference):
  # The state a crash mid-save leaves: a newer version under Orbax's temporary name, part-written.
  run_dir = tmp_path / "run"
  assert run_main(SAFE + ["--data", str(data), "--run-dir", str(run_dir),
                          "--max-bytes", "2560"]) == 0
  half = run_dir / "versions" / "50.orbax-checkpoint-tmp-1795000000000000"
  shutil.copytree(run_dir / "versions" / "40", half)
  for f in (half / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
  assert run_main(SAFE + ["--data", str(data), "--run-dir", str(run_dir), "--resume"]) == 0
  assert not half.exists()
  assert_same(final(run_dir), reference)

"""The swarm over several devices and processes, and from the command line: sharded over 4
devices, one swarm in two processes (a resume and a rollback over both), a process that
dies."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from streamlearn import Learner
from streamlearn.cli.run import main
from streamlearn.store.checkpoint import Checkpointer, VersionError, abstract_like
from streamlearn.swarm.swarm import initial_state, member_state
from swarm_runs import BOS, ROOT, TINY, VOCAB, close, swarm_config
from safety_runs import assert_same_state, stdlib_text

# One worker runs them all (here and in test_swarm.py): the swarm functions
# compile once, and the one-device trajectory (`swarm_one_device`, in conftest) once.
pytestmark = [pytest.mark.filterwarnings("ignore:Some donated buffers were not usable"),
              pytest.mark.xdist_group("swarm")]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
  """The same trajectory over 4 forced CPU devices, in a child process (XLA flags must be
  set before JAX starts); it runs while this process computes its own."""
  out = tmp_path_factory.mktemp("sharded") / "sharded.npz"
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
  child = subprocess.Popen([sys.executable, str(ROOT / "tests" / "swarm_runs.py"), str(out)],
                           env=env, stderr=subprocess.PIPE, text=True)

  def result():
    _, err = child.communicate(timeout=300)
    assert child.returncode == 0, err[-3000:]
    return np.load(out)

  yield result
  if child.poll() is None:
    child.kill()
    child.wait()


@pytest.mark.e2e
def test_sharded_over_four_devices_equals_one_device(sharded, swarm_one_device):
  state, bits_KxN, _, plans, devices = swarm_one_device
  sharded = sharded()
  assert devices == 1 and int(sharded["devices"]) == 4
  assert int(sharded["fresh"]) == sum(int(p.fresh_N.sum()) for p in plans) > 0
  assert int(sharded["copied"]) == sum(int(p.copied_N.sum()) for p in plans) > 0
  np.testing.assert_allclose(sharded["bits"], bits_KxN, rtol=1e-5)
  for i, leaf in enumerate(jax.tree.leaves(state)):
    np.testing.assert_allclose(sharded[f"leaf{i}"], np.asarray(leaf), rtol=1e-5, atol=1e-6)


CLI_SWARM = ["--config", TINY, "--set", "swarm.size=4", "--set", "swarm.interval_bytes=640",
             "--set", "swarm.grace_bytes=0", "--set", "swarm.fresh_prob=0.3"]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


# The two-process resume's fault: NaN parameters fed to its second step (chunk 22), so three
# skipped updates (22-24) roll both processes back to version 20 and stream again from it,
# the learning rate kept: the run goes on exactly as the uninterrupted one.
ROLLBACK = ["--set", "safety.restream=true", "--set", "safety.lr_factor=1"]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
  """The first part of the CLI test's split run (1,280 bytes, then resumed to 1,920 through
  a rollback) as one swarm over two processes of 2 CPU devices each, sharing one run
  directory; it runs in the background while the test runs its own in this process.
  Returns (run directory, each process's stderr lines of the resume)."""
  where = tmp_path_factory.mktemp("two-processes")
  data = where / "text.txt"
  data.write_bytes(stdlib_text(2600))
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
  errors, logs = [], []

  def launch(program, extra, port):
    children = [subprocess.Popen(
        [sys.executable, *program, *CLI_SWARM, "--data", str(data),
         "--run-dir", str(where / "split"), "--coordinator", f"localhost:{port}",
         "--num-processes", "2", "--process-id", str(i), *extra],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    failed, errs = [], []
    for i, child in enumerate(children):
      try:
        _, err = child.communicate(timeout=300)
      except subprocess.TimeoutExpired:
        for c in children:
          c.kill()
        err = "timed out"
      errs.append(err)
      if child.returncode != 0:
        failed.append(f"process {i} {' '.join(extra)}: {err[-2000:]}")
    return failed, errs

  def run(program, *extra):
    # free_port() lets the port go before process 0 binds it: should another program take
    # it meanwhile, the coordinator cannot bind, and the launch is tried again on another.
    for _ in range(3):
      failed, errs = launch(program, extra, free_port())
      if not any("already in use" in f.lower() for f in failed):
        break
    errors.extend(failed)
    return errs

  def both_parts():
    run(["-m", "streamlearn.run"], "--max-bytes", "1280")
    if not errors:  # a resume over two processes too, through a rollback, up to 1,920 bytes
      errs = run([str(ROOT / "tests" / "swarm_runs.py"), "--poisoned", "2"], *ROLLBACK,
                 "--resume", "--max-bytes", "960")
      logs.extend([line for line in err.splitlines() if line.strip() and "B/s" not in line]
                  for err in errs)

  thread = threading.Thread(target=both_parts)
  thread.start()

  def result():
    thread.join()
    assert not errors, "\n".join(errors)
    return where / "split", logs

  yield result
  thread.join()


@pytest.mark.parametrize("extra, why", [
    (["--coordinator", "localhost:1"], "go together"),
    (["--coordinator", "localhost:1", "--num-processes", "2", "--process-id", "2"], "0 .. 1"),
    (["--coordinator", "localhost:1", "--num-processes", "2", "--process-id", "0",
      "--data", "-"], "give --data a file")])
def test_bad_several_process_flags_are_one_line_errors(extra, why, capsys):
  assert main(["--config", TINY, *extra]) == 2
  err = capsys.readouterr().err
  assert why in err and err.count("\n") == 1


@pytest.mark.e2e
def test_cli_swarm_replaces_resumes_and_serves_its_leader(tmp_path, two_processes):
  data = tmp_path / "text.txt"
  data.write_bytes(stdlib_text(2600))
  args = CLI_SWARM + ["--data", str(data)]
  straight, split = tmp_path / "straight", tmp_path / "split"
  assert main(args + ["--run-dir", str(straight)]) == 0
  assert main(args + ["--run-dir", str(split), "--max-bytes", "1280"]) == 0
  assert main(args + ["--run-dir", str(split), "--resume"]) == 0
  registry = json.loads((straight / "registry.json").read_text())
  members = registry["members"]
  kinds = [e["kind"] for e in members["lineage"]]
  assert kinds.count("copy") >= 2 and len(members["lineage"]) > 4
  # A resumed swarm is the uninterrupted one: same members, same state.
  split_members = json.loads((split / "registry.json").read_text())["members"]
  assert split_members == members
  config = swarm_config()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          initial_state(config, VOCAB, BOS))
  states, mixes = [], []
  for run_dir in (straight, split):
    checkpointer = Checkpointer(run_dir, config.checkpoint)
    states.append(checkpointer.restore(None, abstract)[0])
    mixes.append(checkpointer.read_record(checkpointer.latest_step())[0]["swarm"]["mix"])
    checkpointer.close()
  assert_same_state(*states)
  # The mixture's weights and its and the leader's running scores: resumed exactly too.
  assert mixes[0] == mixes[1] and mixes[0]["scores"]["mixture"]["bits"] > 0
  tb = b"".join(p.read_bytes() for p in (straight / "tb").glob("events.out.tfevents.*"))
  assert b"swarm/leader" in tb and f"swarm/member_{members['leader']}/".encode() in tb
  # The API, evaluate and export take the leader by default, any living member by id.
  leader = members["slots"].index(members["leader"])
  assert_same_state(Learner.load(straight).state, member_state(states[0], leader))
  other = members["slots"][(leader + 1) % 4]
  assert_same_state(Learner.load(straight, member=other).state,
                    member_state(states[0], members["slots"].index(other)))
  with pytest.raises(VersionError, match="not in this version"):
    Learner.load(straight, member=0 if 0 not in members["slots"] else 10_000)
  # Two processes (2 devices each) sharing one run directory made the same first part,
  # resumed it over two processes (through a rollback to version 20 that streamed again:
  # both processes must restore it alike), and it resumes in one process (its versions
  # read whole) into the same run.
  shared, _ = two_processes()  # its own copy of the text: a resume goes on in the same file
  assert main(CLI_SWARM + ["--data", str(shared.parent / "text.txt"), "--run-dir", str(shared),
                           "--resume"]) == 0
  theirs = json.loads((shared / "registry.json").read_text())["members"]
  # The same members, born alike; their scores equal to float rounding (1 device vs 4).
  scores = lambda m: [np.asarray(e.pop("scores")) for e in m["lineage"]]
  for a, b in zip(scores(theirs), scores(members), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  assert theirs == members
  checkpointer = Checkpointer(shared, config.checkpoint)
  assert checkpointer.latest_step() == Checkpointer(split, config.checkpoint).latest_step()
  # Saved in shards by two processes, read whole by one (as the scripts and the API do).
  swarm = checkpointer.restore(None, abstract_like(initial_state(config, VOCAB, BOS)))[0]
  close(swarm, states[1], rtol=1e-4, atol=1e-5)  # 41 steps of rounding apart
  checkpointer.close()
  assert len(list((shared / "tb").glob("events.out.tfevents.*"))) == 3  # process 0's twice, ours


@pytest.mark.e2e
def test_a_rollback_over_two_processes_is_the_same_in_both(two_processes):
  # (After the CLI test, whose own work runs while the two processes do.)
  shared, logs = two_processes()
  rollbacks = [[line for line in log if line.startswith("rollback")] for log in logs]
  assert rollbacks[0] == rollbacks[1] == [
      "rollback at chunk 24: 3 updates in a row skipped for NaN/Inf (chunks 22-24); restored "
      "version 20, learning rate x1"], logs
  # Both went on from it: 960 bytes streamed after the resume, 320 of them twice.
  assert logs[0][-1] == logs[1][-1] and logs[0][-1].startswith("done: 1,920 bytes"), logs
  events = json.loads((shared / "registry.json").read_text())["events"]
  rollbacks = [e for e in events if e["kind"] == "rollback"]
  assert len(rollbacks) == 1 and len(events) == 1, events   # process 0 recorded it, once
  assert rollbacks[0]["to"] == 20 and rollbacks[0]["chunk"] == 24 and rollbacks[0]["restream"]


@pytest.mark.e2e
def test_a_process_that_dies_stops_the_other_with_one_line(tmp_path):
  # JAX alone would wait for its heartbeat timeout (100 s), then abort with a C++ trace.
  data = tmp_path / "text.txt"
  data.write_bytes(stdlib_text(400_000))
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "PYTHONPATH": str(ROOT)}
  port = free_port()
  children = [subprocess.Popen(
      [sys.executable, "-m", "streamlearn.run", *CLI_SWARM, "--data", str(data), "--run-dir",
       str(tmp_path / "run"), "--coordinator", f"localhost:{port}", "--num-processes", "2",
       "--process-id", str(i), "--peer-timeout", "5"],
      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
  try:
    deadline = time.monotonic() + 180
    while not (tmp_path / "run" / "registry.json").exists():  # both are learning
      assert time.monotonic() < deadline and all(c.poll() is None for c in children)
      time.sleep(0.2)
    children[1].kill()
    killed = time.monotonic()
    _, err = children[0].communicate(timeout=60)
    took = time.monotonic() - killed
  finally:
    for c in children:
      if c.poll() is None:
        c.kill()
  lines = [line for line in err.splitlines() if line.strip() and "B/s" not in line]
  assert children[0].returncode == 3 and took < 30, (took, err[-2000:])
  assert lines[-1].startswith("error: process 1 stopped answering"), err[-2000:]

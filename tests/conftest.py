"""Test-wide JAX settings and a fresh, reported random seed per test."""

import getpass
import os
import secrets
import tempfile
from pathlib import Path
from typing import NamedTuple

# The tests' programs are tiny and run a few steps: XLA's backend optimizations cost more CPU
# than they save (on the 2-vCPU VM the compile-bound tests take 20-40% less CPU without).
# Set before JAX is imported, so that the CLI subprocesses the tests start inherit it too;
# a test whose steps run long enough to pay for optimized code turns them on for those.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Silent broadcasting between mismatched ranks hides shape bugs; make it loud.
jax.config.update("jax_numpy_rank_promotion", "raise")

# One persistent compilation cache for the whole session, test workers and the CLI
# subprocesses they start alike (through the environment): the tiny configs' steps
# compile once, not once per process. Keys cover everything that shapes a program.
_CACHE = os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), f"streamlearn-test-jax-cache-{getpass.getuser()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
jax.config.update("jax_disable_most_optimizations",
                  os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] not in ("0", "false"))


@pytest.fixture
def rng(request):
  """A NumPy Generator with a fresh seed each run (STREAMLEARN_TEST_SEED pins it).

  The seed is attached to the test report so a failure can be replayed.
  """
  seed = int(os.environ.get("STREAMLEARN_TEST_SEED", secrets.randbits(32)))
  request.node.user_properties.append(("seed", seed))
  request.node.streamlearn_seed = seed
  return np.random.default_rng(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  outcome = yield
  report = outcome.get_result()
  seed = getattr(item, "streamlearn_seed", None)
  if report.failed and seed is not None:
    report.sections.append(("random seed", f"STREAMLEARN_TEST_SEED={seed} replays this test"))


class FinishedRun(NamedTuple):
  run_dir: Path   # read-only: copy it (shutil.copytree, without .lock) to change it
  data: Path      # the file it streamed: resume with this very path


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> FinishedRun:
  """One finished tiny run, built once per test process: 3,000 bytes of stdlib text with a
  version every 10 chunks (versions 0, 10, ..., 40, 47)."""
  from streamlearn.cli.run import main as run_main

  from safety_runs import SAFE, stdlib_text

  root = tmp_path_factory.mktemp("finished")
  data = root / "text.txt"
  data.write_bytes(stdlib_text(3000))
  run_dir = root / "run"
  assert run_main(SAFE + ["--data", str(data), "--run-dir", str(run_dir)]) == 0
  return FinishedRun(run_dir, data)


@pytest.fixture(scope="session")
def swarm_one_device():
  """The swarm's 6-chunk trajectory on this process's one device (compiles every swarm
  function): test_swarm.py and test_swarm_processes.py share it, one xdist group, one worker."""
  from swarm_runs import trajectory

  return trajectory(6)


# The slowest tests outside an xdist group, slowest first (seconds on the 2-vCPU VM with an
# empty cache). xdist's loadgroup hands out its groups first (the most tests first), then the
# other tests in collection order: starting these early keeps a long test from being the
# last one running while the other worker sits idle. Order only; any test may be missing.
# (None that shares a module-scoped fixture: moved apart, it would be set up twice.)
SLOW_FIRST = [
    "test_daemon_e2e.py::test_the_daemon_captures_learns_serves_and_survives_kill_9",  # 70
    "test_generate.py::test_a_default_model_on_prose_writes_words_of_its_text",  # 50
    "test_serve.py::test_the_command_serves_and_picks_up_versions_a_learner_saves",  # 50
    "test_generate.py::test_the_sampler_reads_the_logits_the_step_scores[mixer]",  # 45
    "test_spool.py::test_a_learner_follows_the_spool_is_killed_and_a_resume",  # 25
    "test_scan.py::test_gradients_match_lax[128-512-bfloat16-False]",  # 25
    "test_generate.py::test_the_sampler_reads_the_logits_the_step_scores[bpe]",  # 20
    "test_scan_gpu_lowering.py::test_the_gpu_tiling_runs_interpreted_like_the_lax",  # 20
    "test_scan.py::test_gradients_match_lax[67-130-float32-True]",  # 18
    "test_scan.py::test_bf16_inputs_accumulate_in_f32_and_keep_an_f32_state",  # 15
]


def pytest_collection_modifyitems(config, items):
  def rank(item):
    return next((i for i, name in enumerate(SLOW_FIRST) if name in item.nodeid),
                len(SLOW_FIRST))
  items.sort(key=rank)  # stable: the rest keep their order

"""What the safety-net tests share: one config for their runs, real text, reading a run back."""

import importlib.util
import json as json_module
from pathlib import Path

import jax
import numpy as np

from streamlearn import Learner
from streamlearn.store.checkpoint import Checkpointer

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.toml")
# One set of overrides for every run in these tests: one compiled step per test process.
# A version every 10 chunks, so a kill often lands in the middle of a save.
SAFE = ["--config", TINY, "--set", "checkpoint.every_chunks=10",
        "--set", "checkpoint.max_to_keep=5", "--set", "safety.signal_chunks=4",
        "--set", "safety.median_chunks=20"]


# The delta learner with every part on, small: one config for the tests that compile it,
# so they share one compiled step (in a process, and through the compilation cache).
DELTA_T, DELTA_K, DELTA_LAG = 16, 8, 2
FULL_DELTA = [f"data.chunk_tokens={DELTA_T}", "optim.warmup_steps=1", f"delta.lag={DELTA_LAG}",
              f"delta.forecast_tokens={DELTA_K}", "delta.consistency=0.1", "delta.kl=0.01",
              "delta.residual=0.1", "delta.gate=true", "replay.capacity=8", "replay.tokens=8",
              "replay.batch=2"]
# ...and its network without the parts that change it, learning on arrival.
ARRIVAL_DELTA = FULL_DELTA + ["delta.forecast_channel=false", "delta.residual=0",
                              "delta.arrival=true"]


# Count models and the mixer on the tiny learner, small tables, every optional part on (the
# word and column contexts, the token weight sets, the count map, the online weights, the
# APM): one config for every test that compiles them (one compiled step per process,
# shared through the cache).
MIXER = ["counts.enabled=true", "mixer.enabled=true", "counts.table_log2=8", "counts.word=true",
         "counts.column=true", "mixer.gate_token=true", "mixer.count_map=true",
         "mixer.online_lr=0.01", "mixer.online_pairs=true", "mixer.apm=true",
         "model.line_position=true"]


def load_script(name):
  spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def stdlib_text(n: int) -> bytes:
  """n bytes of real text from this machine's stdlib, never from a benchmark corpus."""
  folder = Path(json_module.__file__).parent
  text = b"".join(p.read_bytes() for p in sorted(folder.glob("*.py")))
  return (text * (n // len(text) + 1))[:n]


def final(run_dir):
  """(host state, record) of a run's latest version."""
  learner = Learner.load(run_dir)
  checkpointer = Checkpointer(run_dir, learner.config.checkpoint)
  record, _ = checkpointer.read_record(checkpointer.latest_step())
  checkpointer.close()
  return jax.device_get(learner.state), record


def assert_same_state(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

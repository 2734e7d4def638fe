"""The pool: the best models of some run directories, loaded and ready to answer.

A model is one member of one version of one run, named `RUN:VERSION:MEMBER`
(a single learner's member is 0). The candidates of a run are the newest
version and the `keep_best` best by score (a swarm: every member of its newest
version, by its rolling bits/byte). Of all candidates the pool holds `size`;
when there are more, one leaves at a time: the one users like least (a
posterior mean below the prior's), else the one that predicts worst
(bits/byte), else the least liked. A learner may save versions in another
process meanwhile: `refresh` re-reads the runs when their registry changes,
only complete versions are ever listed (Orbax renames a version into place
when it is whole), and a request keeps the model it started with.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import threading
import time
from pathlib import Path

import numpy as np

from streamlearn.api import Learner
from streamlearn.serve.bandit import Bandit
from streamlearn.store.checkpoint import ORIGINAL_STEP, Checkpointer, VersionError
from streamlearn.store.registry import REGISTRY_FILE
from streamlearn.store.rundir import read_config

log = logging.getLogger("streamlearn.serve")


@dataclasses.dataclass(frozen=True)
class Candidate:
  id: str                      # RUN:VERSION:MEMBER
  run_dir: Path
  step: int
  member: str
  bits_per_byte: float | None  # its score when saved (lower is better); None: not scored yet


@dataclasses.dataclass
class Model:
  candidate: Candidate
  learner: Learner
  loaded_at: float
  n_params: int

  @property
  def id(self) -> str:
    return self.candidate.id


def _score(entry: dict | None) -> float | None:
  scores = (entry or {}).get("scores") or {}
  value = scores.get("score", scores.get("running_bpb"))
  return float(value) if value is not None and math.isfinite(value) else None


def run_candidates(run_dir: Path, name: str, keep_best: int) -> list[Candidate]:
  """The versions (and members) of one run that may enter the pool."""
  config = read_config(run_dir)
  try:
    registry = json.loads((run_dir / REGISTRY_FILE).read_text())
  except (OSError, ValueError):
    registry = {}
  entries = {e["step"]: e for e in registry.get("versions", [])
             if e.get("status") == "kept" and not e.get("rolled_back")}
  checkpointer = Checkpointer(run_dir, config.checkpoint)
  try:
    steps = checkpointer.all_steps()
    learned = [s for s in steps if s != ORIGINAL_STEP] or steps
    if not learned:
      return []
    latest = learned[-1]
    if config.swarm.size > 1:
      population = checkpointer.read_record(latest)[0]["swarm"]
      n = config.swarm.size
      bits = np.asarray(population["bits"], np.float64).reshape(-1, n).sum(0)
      seen = np.asarray(population["bytes"], np.float64).reshape(-1, n).sum(0)
      return [Candidate(f"{name}:{latest}:{member}", run_dir, latest, str(member),
                        float(bits[slot] / seen[slot]) if seen[slot] > 0 else None)
              for slot, member in enumerate(population["slots"])]
    scored = sorted((s for s in learned if _score(entries.get(s)) is not None),
                    key=lambda s: _score(entries[s]))[:keep_best]
    return [Candidate(f"{name}:{s}:0", run_dir, s, "0", _score(entries.get(s)))
            for s in sorted(set(scored) | {latest})]
  finally:
    checkpointer.close()


class Pool:
  """The models that answer requests; `refresh` brings it in line with the runs."""

  def __init__(self, run_dirs: list[str | Path], size: int, bandit: Bandit,
               keep_best: int = 2):
    if size < 1:
      raise ValueError("serve.pool must be at least 1")
    self.run_dirs = [Path(d) for d in run_dirs]
    names = [d.name for d in self.run_dirs]
    # Runs of the same name (two folders called 'default') are told apart by their order.
    self.names = [n if names.count(n) == 1 else f"{n}-{i + 1}" for i, n in enumerate(names)]
    self.size, self.bandit, self.keep_best = size, bandit, keep_best
    self.models: dict[str, Model] = {}
    self._stamps: dict[Path, float | None] = {}
    self._lock = threading.Lock()   # one refresh at a time
    self._failing: set[Path] = set()

  def get(self, model_id: str) -> Model | None:
    return self.models.get(model_id)

  def ids(self) -> list[str]:
    return sorted(self.models)

  def changed(self) -> bool:
    """Whether any run saved (or lost) a version since the last refresh."""
    return any(self._stamp(d) != self._stamps.get(d) for d in self.run_dirs)

  @staticmethod
  def _stamp(run_dir: Path) -> float | None:
    try:  # registry.json is renamed into place after every version a run completes
      return (run_dir / REGISTRY_FILE).stat().st_mtime_ns
    except OSError:
      return None

  def refresh(self) -> list[str]:
    """Re-reads the runs; loads the models that enter, drops those that leave. Returns the
    ids that changed."""
    with self._lock:
      candidates: dict[str, Candidate] = {}
      for run_dir, name in zip(self.run_dirs, self.names):
        self._stamps[run_dir] = self._stamp(run_dir)
        try:
          found = run_candidates(run_dir, name, self.keep_best)
        except (VersionError, OSError, KeyError, ValueError) as err:
          if run_dir not in self._failing:
            log.warning(f"warning: {run_dir}: no models from it ({err})")
          self._failing.add(run_dir)
          continue
        self._failing.discard(run_dir)
        candidates.update((c.id, c) for c in found)
      chosen = self._choose(candidates)
      models = {i: m for i, m in self.models.items() if i in chosen}
      for model_id in sorted(chosen - set(models)):
        try:
          models[model_id] = load_model(candidates[model_id])
        except (VersionError, OSError) as err:  # rotated away while we looked
          log.warning(f"warning: model {model_id} not loaded ({err})")
      changed = sorted(set(models) ^ set(self.models))
      for model_id in set(self.models) - set(models):
        self.bandit.remove(model_id)
      for model_id in models:
        self.bandit.add(model_id)
      self.models = models  # one assignment: a request sees the old pool or the new one
      if changed:
        log.info(f"pool: {', '.join(sorted(models)) or 'empty'}")
      return changed

  def _choose(self, candidates: dict[str, Candidate]) -> set[str]:
    """The `size` candidates to keep: drop the worst until they fit."""
    kept = dict(candidates)
    while len(kept) > self.size:
      kept.pop(self._worst(kept))
    return set(kept)

  def _worst(self, kept: dict[str, Candidate]) -> str:
    arms = self.bandit.arms
    disliked = [i for i in kept if i in arms and arms[i].ratings and arms[i].mean < 0.5]
    if disliked:
      return self.bandit.worst(disliked)
    unrated = [i for i in kept if not (i in arms and arms[i].ratings)]
    if unrated:  # the worst predictor; unscored ones count as worst, the oldest first
      return max(unrated, key=lambda i: (math.inf if kept[i].bits_per_byte is None
                                         else kept[i].bits_per_byte, -kept[i].step, i))
    return self.bandit.worst(list(kept))

  def watch(self, every_s: float, stop: threading.Event) -> threading.Thread:
    """A thread that refreshes the pool when a run saves, until `stop` is set."""
    def loop():
      while not stop.wait(every_s):
        try:
          if self.changed():
            self.refresh()
        except Exception as err:  # one line; the pool as it was serves on, and it is tried again
          log.warning(f"warning: the pool was not refreshed ({type(err).__name__}: {err})")

    thread = threading.Thread(target=loop, name="pool-watch", daemon=True)
    thread.start()
    return thread


def load_model(candidate: Candidate) -> Model:
  learner = Learner.load(candidate.run_dir, candidate.step, candidate.member)
  n_params = sum(int(np.prod(x.shape)) for x in _leaves(learner.state.params))
  return Model(candidate, learner, time.time(), n_params)


def _leaves(tree):
  import jax
  return jax.tree.leaves(tree)

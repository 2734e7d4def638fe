"""registry.json: a run's family tree — every version, every rollback and restore.

    {"format": "streamlearn.registry", "version": 1, "original": 0,
     "versions": [{step, time, bytes, tokens, chunks, learner_step, scores, parent,
                   lr_scale, status, path}],
     "events": [{kind, time, ...}],
     "members": {leader, slots, lineage: [{id, parent, kind, seed, born_chunk,
                 born_bytes, died_chunk, hp, scores}]}}   (swarms only)

A version's status: "kept" (in versions/; `rolled_back` when a rollback went
back past it), "rotated" (deleted by the keep policy), or "aside" (moved to
aside/ by a restore or as unreadable; `path` says where). A step number may
recur in a later line after a restore, so the entries are a list.
`original` is version 0, the state before any learning, kept forever.
`members` is a swarm's family tree (pbt.py): which member holds each slot,
the leader, and every member that ever lived — its parent (None: new from
the start), birth, hyperparameters and score at each event.

The checkpoints are the truth: every field of a version entry is also in the
version's own record, so the registry is brought in line with versions/ each
time it is opened and rebuilt from them, with a one-line warning, if it is
missing or unreadable. It is written whole to a temporary file and renamed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

from streamlearn.disk import why, write_atomic
from streamlearn.distributed import is_primary
from streamlearn.store.checkpoint import ORIGINAL_STEP, VersionError

log = logging.getLogger(__name__)

REGISTRY_FILE = "registry.json"
_FORMAT, _VERSION = "streamlearn.registry", 1


def entry_from_record(step: int, record: dict) -> dict:
  """A registry entry from a version's record (what the checkpoint itself knows)."""
  totals = record.get("totals", {})
  return {"step": step, "time": record.get("time"), "bytes": totals.get("bytes"),
          "tokens": totals.get("tokens"), "chunks": totals.get("chunks"),
          "learner_step": record.get("learner_step"), "scores": record.get("scores", {}),
          "parent": record.get("parent"), "lr_scale": record.get("lr_scale"), "status": "kept"}


class Registry:
  """The run's registry.json, in memory; `write` puts it on disk."""

  def __init__(self, run_dir: Path, data: dict):
    self.path = Path(run_dir) / REGISTRY_FILE
    self.data = data
    self.failed_writes, self._failing = 0, False

  @classmethod
  def open(cls, run_dir: Path, steps: list[int],
           read_record: Callable[[int], dict]) -> "Registry":
    """Loads registry.json and brings it in line with the complete versions `steps`."""
    path = Path(run_dir) / REGISTRY_FILE
    data, problem = None, None
    if not path.exists():
      problem = "missing"
    else:
      try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != _FORMAT or not isinstance(data.get("versions"), list):
          data, problem = None, "not a streamlearn registry"
        elif "original_base" in data:  # written before version 0 was called the original
          data["original"] = data.pop("original_base")
          data.pop("current_base", None)
      except (OSError, ValueError, AttributeError) as err:
        problem = f"unreadable: {type(err).__name__}"
    if data is None:
      data = {"format": _FORMAT, "version": _VERSION, "original": ORIGINAL_STEP,
              "versions": [], "events": []}
      if steps:
        log.warning(f"warning: {path} is {problem}; rebuilding it from {len(steps)} versions")
    registry = cls(run_dir, data)
    registry.sync(steps, read_record, rebuilt=problem is not None)
    return registry

  def sync(self, steps: list[int], read_record: Callable[[int], dict],
           rebuilt: bool = False) -> None:
    """Adds versions it lacks (from their records) and marks the ones gone from disk."""
    on_disk = set(steps)
    for entry in self.data["versions"]:
      if entry.get("status") == "kept" and entry["step"] not in on_disk:
        entry["status"] = "rotated"
    known = {e["step"] for e in self.kept()}
    for step in sorted(on_disk - known):
      try:
        record = read_record(step)
      except VersionError as err:
        log.warning(f"warning: registry: {err}")
        continue
      self.add_version(step, record)
      if rebuilt:  # each version's record carries every event before it
        self.data["events"] = _merge_events(self.data["events"], record.get("events", []))
        self.mark_rolled_back(record.get("discarded", []))
        if "swarm" in record:  # oldest first: the newest version's lineage stays
          self.set_members(registry_view(record["swarm"]))

  # --- updates -----------------------------------------------------------------------------

  def add_version(self, step: int, record: dict) -> None:
    for entry in self.data["versions"]:  # a re-save of the same step replaces it
      if entry["step"] == step and entry.get("status") == "kept":
        entry["status"] = "replaced"
    self.data["versions"].append(entry_from_record(step, record))
    self.data["versions"].sort(key=lambda e: e["step"])

  def set_members(self, members: dict) -> None:
    """A swarm's lineage (registry_view), replacing the previous one."""
    self.data["members"] = members

  def add_event(self, event: dict) -> None:
    self.data["events"].append(event)

  def mark_aside(self, steps: list[int], where: Path | None) -> None:
    # Also "rotated": a registry synced after the move no longer sees them in versions/.
    for entry in self.data["versions"]:
      if entry["step"] in steps and entry.get("status") in ("kept", "rotated"):
        entry.update(status="aside", path=str(where / str(entry["step"])) if where else None)

  def mark_rolled_back(self, steps: list[int]) -> None:
    """Versions a rollback went back past: kept on disk, never again a rollback target or best."""
    for entry in self.kept():
      if entry["step"] in steps:
        entry["rolled_back"] = True

  def write(self) -> bool:
    """Atomically: a crash leaves either the old file or the new one.

    A write that fails (a full disk) is a warning when a run of them starts, and
    counted (`failed_writes`); the run goes on: the versions hold everything the
    registry says, and a later write, or the next open, brings it back in line.
    """
    if not is_primary():  # over several processes, process 0 keeps the file
      return True
    try:
      write_atomic(self.path, json.dumps(self.data, indent=1) + "\n")
    except OSError as err:
      if not self._failing:
        log.warning(f"warning: {self.path} not written: {why(err)} (rebuilt from the versions "
                    f"when it can be)")
      self._failing = True
      self.failed_writes += 1
      return False
    self._failing = False
    return True

  # --- reading ---------------------------------------------------------------------------

  def kept(self) -> list[dict]:
    """Entries of the versions in versions/, oldest first."""
    return [e for e in self.data["versions"] if e.get("status") == "kept"]

  def best_step(self) -> int | None:
    """The kept version with the lowest score (bits/byte), if any has one."""
    scored = [e for e in self.kept() if _score(e) is not None and not e.get("rolled_back")]
    return min(scored, key=_score)["step"] if scored else None


def _score(entry: dict) -> float | None:
  return (entry.get("scores") or {}).get("score")


def _merge_events(mine: list[dict], theirs: list[dict]) -> list[dict]:
  seen = {json.dumps(e, sort_keys=True) for e in mine}
  return mine + [e for e in theirs if json.dumps(e, sort_keys=True) not in seen]


def registry_view(saved: dict) -> dict:
  """The `members` section of registry.json, from a population's saved state."""
  return {"leader": saved["leader"], "slots": list(saved["slots"]),
          "lineage": list(saved["members"])}

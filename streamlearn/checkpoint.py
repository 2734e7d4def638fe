"""Orbax checkpoints of a run: the whole learner state plus where the stream stood.

A version (one Orbax step, numbered by learner step) holds three items:
  state      the LearnerState pytree (params, optimizer, recurrent state, ...)
  stream     JSON: stream position, tokens cut but not yet learned, totals
  tokenizer  JSON: the run's frozen tokenizer, so a version restores alone

Orbax writes each version to a temporary directory and renames it when
complete, so a crash mid-save never leaves a version that looks whole.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from streamlearn.config import CheckpointConfig

log = logging.getLogger(__name__)

VERSIONS_DIR = "versions"


class Checkpointer:
  """Rotating, versioned checkpoints under <run_dir>/versions/."""

  def __init__(self, run_dir: Path, cfg: CheckpointConfig):
    self.directory = (Path(run_dir) / VERSIONS_DIR).absolute()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.max_to_keep,
        keep_period=cfg.keep_period or None,
        create=True,
        enable_async_checkpointing=True,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, stream: dict, tokenizer: dict) -> None:
    """Starts writing a version; returns once the arrays are copied off the device."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        stream=ocp.args.JsonSave(stream),
        tokenizer=ocp.args.JsonSave(tokenizer)), force=True)

  def restore(self, step: int | None, abstract_state: Any) -> tuple[Any, dict, dict]:
    """(state, stream, tokenizer) of a version (the latest when step is None)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{self.directory}: no checkpoint to resume from")
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        stream=ocp.args.JsonRestore(),
        tokenizer=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["stream"]), dict(restored["tokenizer"])

  def wait(self) -> None:
    """Blocks until every started save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(state: Any) -> Any:
  """ShapeDtypeStructs of a state, for restoring into the same structure."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def read_json(path: Path) -> Any:
  return json.loads(Path(path).read_text(encoding="utf-8"))

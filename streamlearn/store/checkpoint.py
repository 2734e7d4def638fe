"""Orbax checkpoints of a run: the whole learner state plus where the stream stood.

A version (one Orbax step, numbered by chunks of the stream seen) holds three items:
  state      the LearnerState pytree (params, optimizer, recurrent state, ...)
  stream     JSON, the version's record: stream position, tokens cut but not yet
             learned, totals, time, parent version, scores, the safety net's
             host state, a CRC32 of the state
  tokenizer  JSON: the run's frozen tokenizer, so a version restores alone

Orbax writes each version to `<step>.orbax-checkpoint-tmp-*` and renames it
when complete; only complete versions are ever listed or restored, and a run
removes the half-written ones it finds. A version whose files are damaged (a
power cut before the disk flushed, a bad sector) fails to restore or fails its
CRC; `restore(None, ...)` then warns in one line and takes the one before.

Kept: the newest `max_to_keep`, one per `keep_period` chunks for the long term,
the `keep_best` best by score, and version 0 — the original — always.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
import time
import zlib
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from streamlearn.config import CheckpointConfig
from streamlearn.disk import out_of_space, why
from streamlearn.distributed import everywhere, host_copy, is_primary, several

log = logging.getLogger(__name__)

VERSIONS_DIR = "versions"
ORIGINAL_STEP = 0  # the original: saved before any learning, never rotated away


class VersionError(FileNotFoundError):
  """A version that is missing or unreadable; the message is one line.

  A FileNotFoundError, as Orbax's own "no such step" is: callers that report
  that one in a line (scripts/evaluate.py) report this one the same way.
  """



class LayoutError(VersionError):
  """A version whose state has other arrays than the config builds: another config or an
  older streamlearn saved it, and no version of the run will restore under this one."""


def _leaf_name(path) -> str:
  """A state leaf's name as Orbax records it: its path's keys, dotted."""
  return ".".join(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in path)


def layout_difference(saved_metadata: Any, abstract_state: Any) -> str | None:
  """The first array a version holds in another shape or dtype than the state the config
  builds ("NAME is SHAPE DTYPE there, SHAPE DTYPE here"), or None."""
  saved = {leaf.name: (tuple(leaf.shape), np.dtype(leaf.dtype))
           for leaf in jax.tree.leaves(saved_metadata) if hasattr(leaf, "name")}
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
    name = _leaf_name(path)
    here = (tuple(leaf.shape), np.dtype(leaf.dtype))
    if name in saved and saved[name] != here:
      show = lambda shape_dtype: f"{shape_dtype[1]}{list(shape_dtype[0])}"
      return f"{name} is {show(saved[name])} there, {show(here)} here"
  return None


class SaveError(RuntimeError):
  """A version that could not be written (its partial files are removed); one line."""

  def __init__(self, step: int, why: str, out_of_space: bool):
    super().__init__(f"version {step} not saved: {why}")
    self.step, self.why, self.out_of_space = step, why, out_of_space


class Restored(NamedTuple):
  step: int
  state: Any
  record: dict       # the version's "stream" item
  tokenizer: dict
  unreadable: list   # [(step, why)] of newer versions that failed before this one


def _first_line(err: BaseException) -> str:
  text = str(err).strip().splitlines()
  return f"{type(err).__name__}: {text[0][:160] if text else ''}".rstrip(": ")


@contextlib.contextmanager
def _quiet(logger: str):
  target = logging.getLogger(logger)
  level = target.level
  target.setLevel(logging.ERROR)
  try:
    yield
  finally:
    target.setLevel(level)


def _silence_closed_loop_noise() -> None:
  """Keeps a failed restore to the one line it deserves.

  When one read of a version fails, Orbax closes its event loop while the
  other reads are still in flight; each of them, finishing later, prints a
  traceback ("Event loop is closed") through sys.unraisablehook. They add
  nothing to the VersionError, so only those are dropped; anything else still
  reaches the previous hook.
  """
  previous = sys.unraisablehook
  if getattr(previous, "_streamlearn", False):
    return

  def hook(unraisable):
    exc = unraisable.exc_value
    if not (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"):
      previous(unraisable)

  hook._streamlearn = True
  sys.unraisablehook = hook


def state_crc32(state: Any) -> int:
  """CRC32 over every leaf's bytes, in tree order: a version's state, fingerprinted."""
  crc = 0
  for leaf in jax.tree.leaves(state):
    crc = zlib.crc32(np.ascontiguousarray(np.asarray(leaf)).tobytes(), crc)
  return crc


def _policy(cfg: CheckpointConfig):
  keep = [policies.LatestN(cfg.max_to_keep), policies.CustomSteps([ORIGINAL_STEP])]
  if cfg.keep_period:
    # Not exact multiples: versions after a rollback or a resume fall off the grid.
    keep.append(policies.EveryNSteps(cfg.keep_period, exact_interval=False))
  if cfg.keep_best:
    keep.append(policies.BestN(get_metric_fn=lambda m: m["score"], reverse=True,
                               n=cfg.keep_best, keep_checkpoints_without_metrics=False))
  return policies.AnyPreservationPolicy(keep)


class Checkpointer:
  """Versioned checkpoints under <run_dir>/versions/; read-only unless `writable`.

  Only the run itself opens it writable: a writer removes half-written
  versions, which a reader beside a live run must never do.
  """

  def __init__(self, run_dir: Path, cfg: CheckpointConfig, *, writable: bool = False):
    self.run_dir = Path(run_dir).absolute()
    self.directory = self.run_dir / VERSIONS_DIR
    if not writable and not self.directory.is_dir():
      raise VersionError(f"{self.run_dir}: no versions/ directory (not a run directory?)")
    with _quiet("absl"):  # a reader's "directory is read only" notices are no news
      options = ocp.CheckpointManagerOptions(
          preservation_policy=_policy(cfg),
          create=writable,
          read_only=not writable,
          cleanup_tmp_directories=writable,
          enable_async_checkpointing=True,
      )
      if writable:
        self._remove_partial_versions()
        _silence_closed_loop_noise()  # a failed background save leaves such noise too
      # Over several processes (distributed.py) the manager spans them all, as Orbax
      # expects: each writes its own shards, process 0 the rest, with barriers between.
      self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._writing: int | None = None  # the version whose save is under way

  def _remove_partial_versions(self, step: int | None = None, quiet: bool = False) -> list[int]:
    """Removes half-written versions (of `step`, or all): never loaded, they only fill the disk."""
    if not is_primary() or not self.directory.is_dir():
      return []
    found = sorted(p for p in self.directory.glob("*.orbax-checkpoint-tmp*")
                   if step is None or p.name.split(".")[0] == str(step))
    for path in found:
      shutil.rmtree(path, ignore_errors=True)
    steps = sorted({int(p.name.split(".")[0]) for p in found if p.name.split(".")[0].isdigit()})
    if found and step is None and not quiet:
      log.warning(f"warning: removed half-written version(s) {', '.join(map(str, steps))} "
                  f"from {self.directory} (left by a crash or a failed save; never loaded)")
    return steps

  def reload(self) -> None:
    """Re-reads versions/ after versions were moved out of it."""
    self._manager.reload()

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Complete versions, oldest first."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, record: dict, tokenizer: dict,
           score: float | None = None) -> None:
    """Starts writing a version; returns once the save is under way.

    `state` is a host copy, or over several processes a device copy split as the
    swarm is (each process writes its own members); the caller never touches it again.
    A save that fails raises SaveError: here when it fails at once, from `wait`
    (or `close`) when it fails while writing in the background.
    """
    record = {**record, "state_crc32": state_crc32(host_copy(state))}
    metrics = {"score": score} if score is not None and np.isfinite(score) else None
    self._writing = step
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          stream=ocp.args.JsonSave(record),
          tokenizer=ocp.args.JsonSave(tokenizer)), metrics=metrics, force=True)
    except Exception as err:  # orbax and tensorstore raise many kinds; OSError among them
      self._failed(err)

  def read_record(self, step: int) -> tuple[dict, dict]:
    """(record, tokenizer) of a version, without reading its arrays."""
    self._require(step)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          stream=ocp.args.JsonRestore(), tokenizer=ocp.args.JsonRestore()))
      return dict(restored["stream"]), dict(restored["tokenizer"])
    except Exception as err:  # orbax and tensorstore raise many kinds; all mean "unreadable"
      raise VersionError(f"version {step} is unreadable ({_first_line(err)})") from None

  def restore(self, step: int | None, abstract_state: Any) -> tuple[Any, dict, dict]:
    """(state, record, tokenizer) of version `step`; None: the newest readable one."""
    if step is None:
      got = self.restore_newest(abstract_state)
      return got.state, got.record, got.tokenizer
    got = self._restore_exact(step, abstract_state)
    return got.state, got.record, got.tokenizer

  def restore_newest(self, abstract_state: Any, steps: list[int] | None = None) -> Restored:
    """The newest of `steps` (default: all) that restores; warns once per one that does not."""
    steps = self.all_steps() if steps is None else sorted(steps)
    if not steps:
      raise VersionError(f"{self.directory}: no complete version to restore")
    unreadable = []
    for step in reversed(steps):
      try:
        got = self._restore_exact(step, abstract_state)
      except LayoutError as err:  # the run's, not this version's: older ones would not do
        raise LayoutError(f"{self.run_dir}: {err}") from None
      except VersionError as err:
        unreadable.append((step, str(err)))
        older = [s for s in steps if s < step]
        log.warning(f"warning: {err}; "
                    + (f"falling back to version {older[-1]}" if older else "no older version"))
        continue
      return got._replace(unreadable=unreadable)
    raise VersionError(f"{self.directory}: no readable version ({unreadable[0][1]})")

  def _require(self, step: int) -> None:
    if step not in self._manager.all_steps():
      known = ", ".join(map(str, self.all_steps())) or "none"
      raise VersionError(f"{self.run_dir}: no complete version {step} (versions: {known})")

  def _restore_exact(self, step: int, abstract_state: Any) -> Restored:
    self._require(step)
    self._check_layout(step, abstract_state)
    _silence_closed_loop_noise()  # before: the noise may come while the failure unwinds
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          stream=ocp.args.JsonRestore(),
          tokenizer=ocp.args.JsonRestore()))
      state, record = restored["state"], dict(restored["stream"])
    except Exception as err:  # orbax and tensorstore raise many kinds; all mean "unreadable"
      raise VersionError(f"version {step} is unreadable ({_first_line(err)})") from None
    state = host_copy(state)  # over several processes: whole on each (see abstract_like)
    expected = record.get("state_crc32")
    if expected is not None and state_crc32(state) != expected:
      raise VersionError(f"version {step} is corrupt (its state fails its CRC32)")
    # Uncommitted, like a fresh state's arrays: a restored state then reuses the compiled
    # step instead of compiling it again for arrays pinned to a device.
    state = jax.tree.map(jnp.asarray, state)
    return Restored(step, state, record, dict(restored["tokenizer"]), [])

  def _check_layout(self, step: int, abstract_state: Any) -> None:
    """LayoutError before any array is read (a restore that fails halfway leaves the
    storage library's readers to print their tracebacks at exit)."""
    try:
      saved = ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "state")
    except Exception:  # no metadata to read: the restore itself says what is wrong
      return
    difference = layout_difference(saved, abstract_state)
    if difference is not None:
      raise LayoutError(f"version {step} holds a state of another layout ({difference}): "
                        "another config or an older streamlearn saved it; resume it with "
                        "those, or start a new --run-dir")

  def saving(self) -> bool:
    """Whether a version is still being written in the background."""
    return self._writing is not None and self._manager.is_saving_in_progress()

  def wait(self) -> None:
    """Blocks until every started save is on disk; SaveError if the last one failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as err:
      self._failed(err)
    if self._writing is not None:
      # Nothing is being written now: a half-written version left (a failed save whose
      # background writers outlived its error) can only take space.
      self._remove_partial_versions(quiet=True)
    self._writing = None

  def _failed(self, err: Exception) -> None:
    step, self._writing = self._writing, None
    self._remove_partial_versions(step)
    time.sleep(0.05)  # the storage library's writers may still be finishing: sweep again
    self._remove_partial_versions(step)
    try:
      self._manager.reload()  # what is on disk, not what the failed save meant to add
    except Exception:  # the listing itself may fail on a broken disk; the next call retries
      pass
    raise SaveError(step, why(err), out_of_space(err)) from None

  def free_space(self, keep: set[int]) -> list[int]:
    """Deletes the complete versions not in `keep`, oldest first; returns their steps."""
    gone = [s for s in self.all_steps() if s not in keep]
    for step in gone:
      shutil.rmtree(self.directory / str(step), ignore_errors=True)
    self._manager.reload()
    return gone

  def close(self) -> None:
    """Waits for the last save (SaveError if it failed) and lets the versions go."""
    try:
      self.wait()
    finally:
      self._manager.close()


def abstract_like(state: Any) -> Any:
  """ShapeDtypeStructs of a state, for restoring into the same structure.

  Over several processes every process reads the whole version (µLM swarms
  are megabytes), replicated on every device: each then has it all on the host
  to check and to place as its step expects.
  """
  if several():
    sharding = everywhere()
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding),
                        state)
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def read_json(path: Path) -> Any:
  return json.loads(Path(path).read_text(encoding="utf-8"))

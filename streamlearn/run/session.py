"""Opening a run of the main job: a new run directory, or one resumed where it stopped.

`open_session` returns two things:
  Session   what stays fixed while the run streams: config, run directory, source,
            tokenizer, compiled step, checkpoints, registry, swarm, canaries;
  Progress  where the run stands: the learner state, the stream position, the
            totals, the version it descends from, the safety net's watch. Every
            version records it, so a resume (and a rollback) picks it up exactly.
loop.py streams with them; rollback.py hands back a new Progress.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from streamlearn.config import Config, config_to_dict
from streamlearn.data.sources import Source, open_source, read_warmup
from streamlearn.data.spoolfile import write_consumed
from streamlearn.data.stream import TokenStream
from streamlearn.data.tokenizer import Tokenizer, make_tokenizer, trained_on
from streamlearn.disk import why, write_atomic
from streamlearn.distributed import barrier, host_copy, is_primary, several, watch_peers
from streamlearn.learn.build import build
from streamlearn.learn.prequential import Totals
from streamlearn.learn.state import LearnerState, Predictor
from streamlearn.learn.step import make_score
from streamlearn.run.canary import Canaries, CanaryError
from streamlearn.run.retune import check_resumable, guard_anchor, retuned, same_source
from streamlearn.run.safety import Guard
from streamlearn.store.checkpoint import (ORIGINAL_STEP, Checkpointer, SaveError, VersionError,
                                         abstract_like)
from streamlearn.store.registry import Registry
from streamlearn.store.rundir import CONFIG_FILE, RunError, lock_run, move_aside, run_tokenizer
from streamlearn.swarm.swarm import Swarm, initial_state

log = logging.getLogger("streamlearn.run")


@dataclasses.dataclass
class Progress:
  """Where a run stands after the last chunk it booked; what each version records."""

  state: LearnerState
  position: dict | None     # the stream position after that chunk; None: a new run, before any
  totals: Totals
  parent: int | None        # the version this state descends from
  guard: Guard              # the safety net's watch over the last chunks
  events: list[dict]        # rollbacks so far (every version carries them)
  discarded: set[int]       # versions a rollback went back past: never restored again
  anchor: str               # the frozen model the KL guard holds to ("": the run's start)


@dataclasses.dataclass
class Session:
  """An opened run: what stays fixed while it streams."""

  config: Config
  run_dir: Path
  source: Source
  tokenizer: Tokenizer
  lock: Any                 # released when the run ends
  checkpointer: Checkpointer
  registry: Registry
  predictor: Predictor
  step_fn: Any              # jitted (state, chunk) -> (state, metrics), the state donated
  swarm: Swarm | None       # swarm.size > 1: the stacked state's host side (population)
  canaries: Canaries
  first_anchor: str         # the run's first config's delta.anchor (versions that predate
                            # their own record of it hold to this one)
  _unregistered: tuple[int, dict] | None = None  # the version being written
  # Saves that failed (a full disk): those not yet reported to TensorBoard, how many in a row.
  save_failures: list[SaveError] = dataclasses.field(default_factory=list)
  failed_in_a_row: int = 0
  newest_saved: int | None = None  # once closed: the newest version on disk

  @functools.cached_property
  def score_fn(self):
    """Frozen scoring, compiled when first needed (a spike alarm, a canary)."""
    return make_score(self.predictor)

  @property
  def unscored_until(self) -> int:
    """Chunks that begin before this byte of the stream are learned from, not scored: the
    BPE vocabulary was trained on them (0 for bytes)."""
    return trained_on(self.config.tokenizer.kind, self.config.tokenizer.warmup_bytes)

  def version_score(self, progress: Progress) -> float | None:
    """A version's score: bits/byte over the last chunks, none while one is from the warm-up."""
    if any(entry[0] <= progress.totals.vocab_last_chunk for entry in progress.guard.recent):
      return None
    return progress.guard.score()

  def token_stream(self, start: dict | None, max_bytes: int | None) -> TokenStream:
    return TokenStream(self.source, self.tokenizer, self.config.data.chunk_tokens,
                       start=start, max_bytes=max_bytes)

  def place(self, state: LearnerState) -> LearnerState:
    """A state from a checkpoint, placed as the step expects (a swarm's: split by member)."""
    return state if self.swarm is None else self.swarm.place(state)

  def leader_params(self, state: LearnerState, swarm_record: dict | None = None):
    """The parameters the run is judged by: the learner's, or the swarm leader's."""
    if self.swarm is None:
      return state.params
    return self.swarm.leader_params(state, swarm_record)

  # --- versions ----------------------------------------------------------------------------

  def save(self, progress: Progress) -> int | None:
    """Starts writing version `progress.totals.chunks` (if not on disk yet); returns its step.

    A save that fails (a full disk) is reported and the run goes on: see `_save_failed`.
    """
    step = progress.totals.chunks
    if progress.position is None or step in self.checkpointer.all_steps():
      return step
    self.finish_saving()
    if self.gave_up_saving:  # the run stops: nothing more is started
      return None
    # A host copy: the step donates the device buffers the moment it runs next.
    host_state = host_copy(progress.state)
    record = self._record(progress, host_state)
    tokenizer_json = json.loads((self.run_dir / "tokenizer.json").read_text())
    # Several processes: each writes its own members, from a copy on its devices.
    to_write = self.swarm.snapshot(progress.state) if several() else host_state
    try:
      self.checkpointer.save(step, to_write, record, tokenizer_json, self.version_score(progress))
    except SaveError as err:
      self._save_failed(err)
      return None
    self._unregistered = (step, record)
    progress.parent = step
    return step

  def finish_saving(self) -> None:
    """Waits for the version being written, and registers it (or reports its failure)."""
    try:
      self.checkpointer.wait()
    except SaveError as err:
      self._save_failed(err)
    else:
      if self._unregistered is not None:
        self.failed_in_a_row = 0
    self.register()

  def register_if_saved(self) -> None:
    """Registers the version being written once it is on disk, without waiting for it (so
    registry.json is current while a run waits for data)."""
    if self._unregistered is not None and not self.checkpointer.saving():
      self.finish_saving()

  @property
  def gave_up_saving(self) -> bool:
    return self.failed_in_a_row >= self.config.checkpoint.max_failed_saves

  def _save_failed(self, err: SaveError) -> None:
    """One line, an event in registry.json, and on a full disk the space this run can spare."""
    if self._unregistered is not None and self._unregistered[0] == err.step:
      self._unregistered = None
    self.failed_in_a_row += 1
    self.save_failures.append(err)
    latest = self.checkpointer.latest_step()
    log.warning(f"warning: {err} ({self.checkpointer.directory}); the newest saved version "
                f"is {latest}")
    self.registry.add_event({"kind": "save_failed", "time": time.time(), "step": err.step,
                             "why": err.why, "newest": latest})
    if err.out_of_space:
      self._free_space(latest)
    self.registry.write()

  def _free_space(self, latest: int | None) -> None:
    """Deletes this run's versions that nothing needs: never the original, the best, the
    newest, or anything set aside (aside/ is not versions/)."""
    keep = {ORIGINAL_STEP, latest, self.registry.best_step()}
    freed = self.checkpointer.free_space({s for s in keep if s is not None})
    if freed:
      self.registry.sync(self.checkpointer.all_steps(), self.read_record)
      log.warning(f"warning: deleted version(s) {', '.join(map(str, freed))} to free space "
                  f"(kept: the original, the best and the newest)")

  def _record(self, progress: Progress, host_state: LearnerState) -> dict:
    """What a version records beside its state: enough to resume exactly."""
    score, running = self.version_score(progress), progress.totals.bits_per_byte
    record = {"position": progress.position, "totals": dataclasses.asdict(progress.totals),
              "source": self.source.name, "time": time.time(), "parent": progress.parent,
              # A swarm's members each have theirs: the most advanced, the highest.
              "learner_step": int(np.max(host_state.step)),
              "lr_scale": float(np.max(host_state.lr_scale)),
              "scores": {"score": score,
                         "running_bpb": running if math.isfinite(running) else None},
              "safety": progress.guard.to_json(), "events": progress.events,
              "discarded": sorted(progress.discarded), "anchor": progress.anchor}
    if self.swarm is not None:
      record["swarm"] = self.swarm.to_json()
    return record

  def register(self) -> None:
    """Puts the last version, once complete on disk, into the registry."""
    if self._unregistered is not None:
      self.registry.add_version(*self._unregistered)
      self._unregistered = None
    self.registry.sync(self.checkpointer.all_steps(), self.read_record)
    self.set_members()
    self.registry.write()
    if self.source.kind == "spool" and is_primary():
      self._mark_consumed()

  def _mark_consumed(self) -> None:
    """Tells capture which spool segments this run no longer needs: those before the
    segment of every learned version it keeps (a rollback or a restore may go back to any of
    them). Capture deletes only those, and only past its byte or age cap."""
    segments = []
    for entry in self.registry.kept():
      if entry["step"] == ORIGINAL_STEP:
        continue
      try:
        position = (self.read_record(entry["step"]).get("position") or {}).get("source") or {}
      except VersionError:
        continue
      if position.get("kind") == "spool" and same_source(position.get("root"), self.source):
        segments.append(int(position["segment"]))
    if segments:
      try:
        write_consumed(self.source.name, min(segments), self.run_dir)
      except OSError as err:
        log.warning(f"warning: {self.source.name}: consumed.json not written ({why(err)})")

  def read_record(self, step: int) -> dict:
    return self.checkpointer.read_record(step)[0]

  def set_members(self) -> None:
    if self.swarm is not None:
      self.registry.set_members(self.swarm.population.registry_view())

  def close(self) -> None:
    """Waits for the last save, brings the registry in line, releases the run directory."""
    try:
      self.finish_saving()
      self.newest_saved = self.checkpointer.latest_step()
    finally:
      self.checkpointer.close()
      self.lock.release()


# --- opening ----------------------------------------------------------------------------------


def open_session(config: Config, *, run_dir: str | None, data: str | None,
                 resume: bool, follow: bool = False) -> tuple[Session, Progress]:
  """Opens a run directory (checkpoints/<name> by default) for a new run or a resumed one.

  Raises RunError or SourceError, with a one-line message, when it cannot.
  """
  path = Path(run_dir) if run_dir else Path("checkpoints") / config.name
  if several() and config.swarm.size % jax.device_count():
    raise RunError(f"swarm.size: {config.swarm.size} members cannot be split evenly over "
                   f"{jax.device_count()} devices in {jax.process_count()} processes; "
                   f"make it a multiple of {jax.device_count()}")
  source = open_source(data, max_file_bytes=config.data.max_file_bytes,
                       block_bytes=config.data.block_bytes, follow=follow)
  if resume and not (path / CONFIG_FILE).exists():
    raise RunError(f"{path}: no run to resume (no {CONFIG_FILE})")
  if not resume and ((path / CONFIG_FILE).exists() or (path / "versions").exists()):
    raise RunError(f"{path} already holds a run; add --resume to continue it, "
                   f"or pick another --run-dir / --set name=...")
  barrier("run-dir-checked")  # several processes: all looked before process 0 writes
  path.mkdir(parents=True, exist_ok=True)
  watch_peers(path)  # several processes: one that dies stops the others within seconds
  lock = lock_run(path)
  try:
    opened = (_resume if resume else _fresh)(config, path, source, lock)
  except BaseException:
    lock.release()
    raise
  barrier("run-dir-ready")  # and all find what process 0 wrote
  return opened


def _fresh(config: Config, run_dir: Path, source: Source, lock) -> tuple[Session, Progress]:
  warmup_text = b""
  if config.tokenizer.kind == "bpe":
    warmup_text, source = read_warmup(source, config.tokenizer.warmup_bytes)
    log.info(f"training a {config.tokenizer.vocab_size}-token BPE on the first "
             f"{len(warmup_text):,} bytes of the stream")
  tokenizer = make_tokenizer(config.tokenizer.kind, vocab_size=config.tokenizer.vocab_size,
                             warmup=warmup_text)
  if is_primary():  # several processes: one run directory, process 0's to write
    try:
      tokenizer.save(run_dir)
      # Written last, and whole (renamed into place): its presence means a run to resume.
      write_atomic(run_dir / CONFIG_FILE, json.dumps(config_to_dict(config), indent=2))
    except OSError as err:
      raise RunError(f"{run_dir}: cannot write the run's files: {why(err)}") from None
  return _from_original(config, run_dir, source, tokenizer, lock)


def _from_original(config: Config, run_dir: Path, source: Source, tokenizer: Tokenizer,
                   lock) -> tuple[Session, Progress]:
  """A run from its original state (version 0), made afresh from the config."""
  state = initial_state(config, tokenizer.vocab_size, tokenizer.bos_id)
  if config.delta.anchor and state.delta is not None and state.delta.anchor is not None:
    state = state.replace(delta=state.delta.replace(
        anchor=guard_anchor(config, config.delta.anchor, state.params)))
  session = _session(config, run_dir, source, tokenizer, lock, None, config.delta.anchor)
  progress = Progress(session.place(state), None, Totals(), None,
                      Guard.from_json(config.safety, None), [], set(), config.delta.anchor)
  return session, progress


def _resume(config: Config, run_dir: Path, source: Source, lock) -> tuple[Session, Progress]:
  """The run as its newest readable version left it, with this config's changes applied."""
  saved = json.loads((run_dir / CONFIG_FILE).read_text())
  check_resumable(saved, config_to_dict(config))
  checkpointer = Checkpointer(run_dir, config.checkpoint, writable=True)
  steps = checkpointer.all_steps()
  tokenizer = run_tokenizer(run_dir, checkpointer, steps)
  if not steps:  # killed before the original was on disk: it is made again, identically
    checkpointer.close()
    log.warning(f"warning: {run_dir} has no complete version yet; starting from the original")
    return _from_original(config, run_dir, source, tokenizer, lock)
  fresh = initial_state(config, tokenizer.vocab_size, tokenizer.bos_id)
  try:
    got = checkpointer.restore_newest(abstract_like(fresh))
  except VersionError as err:
    raise RunError(str(err)) from None
  finally:
    checkpointer.close()
  # --- versions that failed to restore: out of the way of the versions this run will write
  set_aside = None
  if got.unreadable:
    steps_aside = [s for s, _ in got.unreadable]
    set_aside = (steps_aside, move_aside(run_dir, steps_aside, "unreadable"))
    log.warning(f"warning: moved unreadable version(s) {', '.join(map(str, steps_aside))} "
                f"to {set_aside[1]}")
  # --- where the stream goes on
  totals = Totals(**got.record["totals"])
  log.info(f"resuming {run_dir} at chunk {totals.chunks:,} ({totals.bytes:,} bytes seen)")
  position = got.record["position"]
  if not same_source(got.record.get("source"), source):
    # New data (another file, or more of a pipe): from its start, after the tokens
    # the last source left unlearned; a saved offset means nothing in it.
    log.info(f"resuming onto new data: {source.name} streams from its start (the run last "
             f"read {got.record.get('source')})")
    position = {**position, "source": None, "skip": 0}
  # --- the session, and the version's state under this config
  first_anchor = saved["delta"]["anchor"]
  session = _session(config, run_dir, source, tokenizer, lock, got.record.get("swarm"),
                     first_anchor, set_aside, parent=got.step)
  record = got.record
  state, anchor = retuned(config, got.state, record, first_anchor,
                          session.swarm.population if session.swarm is not None else None)
  progress = Progress(session.place(state), position, totals, got.step,
                      Guard.from_json(config.safety, record.get("safety")),
                      list(record.get("events", [])), set(record.get("discarded", [])), anchor)
  session.set_members()
  session.registry.write()
  return session, progress


def _session(config: Config, run_dir: Path, source: Source, tokenizer: Tokenizer, lock,
             swarm_record: dict | None, first_anchor: str, set_aside=None,
             parent: int | None = None) -> Session:
  predictor, _, step_fn = build(config, tokenizer.vocab_size)
  swarm = None
  if config.swarm.size > 1:  # the state is stacked, the step vmapped (swarm/swarm.py)
    swarm = Swarm(config, tokenizer.vocab_size, tokenizer.bos_id, swarm_record)
    step_fn = swarm.step
  try:
    canaries = Canaries(config.canary, tokenizer, config.data.chunk_tokens)
  except CanaryError as err:
    raise RunError(str(err)) from None
  checkpointer = Checkpointer(run_dir, config.checkpoint, writable=True)
  registry = Registry.open(run_dir, checkpointer.all_steps(),
                           lambda step: checkpointer.read_record(step)[0])
  session = Session(config, run_dir, source, tokenizer, lock, checkpointer, registry,
                    predictor, step_fn, swarm, canaries, first_anchor)
  session.set_members()
  if set_aside is not None:  # unreadable versions the resume moved out of the way
    registry.mark_aside(*set_aside)
    registry.add_event({"kind": "set_aside_unreadable", "time": time.time(), "to": parent,
                        "aside": set_aside[0], "path": str(set_aside[1])})
  registry.write()
  return session

"""A run of the main job: run directory, tokenizer, learner, checkpoints, the loop.

Reads top to bottom as the run does: open (run directory, source, tokenizer,
learner state — fresh or resumed), then `run` (stream chunks through the
jitted step, log, checkpoint), then a final version on the way out, whether
the stream ended, --max-bytes was reached, or the user pressed Ctrl-C.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from streamlearn.config import Config, config_to_dict
from streamlearn.data.sources import Source, SourceError, open_source, read_prefix
from streamlearn.data.stream import HostChunk, TokenStream
from streamlearn.data.tokenizer import Tokenizer, make_tokenizer
from streamlearn.distributed import barrier, host_copy, is_primary, several
from streamlearn.learn.build import build
from streamlearn.learn.prequential import Totals, device_chunk, score_through
from streamlearn.learn.step import LearnerState, make_score
from streamlearn.run.canary import Canaries, CanaryError
from streamlearn.run.console import Interrupts, Progress, human_bytes
from streamlearn.run.retune import check_resumable, guard_base, retuned, same_source
from streamlearn.run.safety import Alarm, Guard, lowered_lr_scale, rollback_candidates
from streamlearn.store.checkpoint import Checkpointer, VersionError, abstract_like
from streamlearn.store.registry import Registry
from streamlearn.store.rundir import (CONFIG_FILE, RunError, RunLock, lock_run, move_aside,
                                      run_tokenizer, write_atomic)
from streamlearn.swarm.swarm import Swarm, initial_state

log = logging.getLogger("streamlearn.run")

# TensorBoard tags of the step's metrics beyond the prequential score (delta learner).
_TAGS = {"forecast_bits": "delta/forecast_bits_per_token", "forecast_agreement": "delta/agreement",
         "delta_rms_bits": "delta/surprise_rms_bits", "forecast_entropy": "delta/forecast_entropy",
         "gate": "delta/gate", "loss_ce": "loss/cross_entropy",
         "arrival_grad_norm": "train/arrival_grad_norm",
         "loss_consistency": "loss/consistency", "loss_residual": "loss/residual",
         "loss_kl": "guard/kl_to_base", "teacher_distance": "guard/ema_student_distance",
         "replay_bits": "replay/sampled_bits_per_token", "replay_fill": "replay/fill",
         "replay_priority_mean": "replay/priority_mean",
         "replay_priority_max": "replay/priority_max"}


class _NoWriter:
  """TensorBoard for processes other than 0: process 0 writes the run's events."""

  def __getattr__(self, name):
    return lambda *args, **kwargs: None


class Session:
  """An opened run: everything `run` needs, fresh or resumed."""

  def __init__(self, config: Config, run_dir: Path, source: Source, tokenizer: Tokenizer,
               state: LearnerState, stream_start: dict | None, totals: Totals,
               lock: RunLock, record: dict | None = None, parent: int | None = None,
               set_aside: tuple[list[int], Path] | None = None):
    self.config, self.run_dir, self.source = config, run_dir, source
    self.tokenizer, self.state, self.stream_start, self.totals = (
        tokenizer, state, stream_start, totals)
    self.predictor, self.optimizer, self.step_fn = build(config, tokenizer.vocab_size)
    self.lock = lock
    self.checkpointer = Checkpointer(run_dir, config.checkpoint, writable=True)
    # The safety net's host side, carried in every version's record (see safety.py).
    record = record or {}
    self.guard = Guard.from_json(config.safety, record.get("safety"))
    self.events: list[dict] = list(record.get("events", []))
    self.discarded: set[int] = set(record.get("discarded", []))
    self.parent = parent
    # The frozen base the state's guard holds to ("": the run's start), as each version
    # records it; versions from before that record was kept had the run's first config's.
    self.first_base = config.delta.base
    self.base_spec = record.get("base", config.delta.base)
    # swarm.size > 1: the state is stacked, the step vmapped, and the population
    # (scores, lineage, the next replacement) is carried in every version's record.
    self.swarm = None
    if config.swarm.size > 1:
      self.swarm = Swarm(config, tokenizer.vocab_size, tokenizer.bos_id, record.get("swarm"))
      self.step_fn = self.swarm.step
      self.state = self.swarm.place(state)
    self.registry = Registry.open(run_dir, self.checkpointer.all_steps(), self._read_record)
    self._set_members()
    if set_aside is not None:  # unreadable versions the resume moved out of the way
      self.registry.mark_aside(*set_aside)
      self.registry.add_event({"kind": "set_aside_unreadable", "time": time.time(),
                               "to": parent, "aside": set_aside[0], "path": str(set_aside[1])})
    self.registry.write()
    self._unregistered: tuple[int, dict] | None = None
    self._score_fn = None  # frozen scoring, compiled at the first spike alarm or canary
    try:
      self.canaries = Canaries(config.canary, tokenizer, config.data.chunk_tokens)
    except CanaryError as err:
      raise RunError(str(err)) from None

  # --- opening ------------------------------------------------------------------------------

  @classmethod
  def open(cls, config: Config, *, run_dir: str | None, data: str | None,
           resume: bool) -> "Session":
    run_dir_path = Path(run_dir) if run_dir else Path("checkpoints") / config.name
    if several() and config.swarm.size % jax.device_count():
      raise RunError(f"swarm.size: {config.swarm.size} members cannot be split evenly over "
                     f"{jax.device_count()} devices in {jax.process_count()} processes; "
                     f"make it a multiple of {jax.device_count()}")
    source = open_source(data, max_file_bytes=config.data.max_file_bytes,
                         block_bytes=config.data.block_bytes)
    config_path = run_dir_path / CONFIG_FILE
    if resume and not config_path.exists():
      raise RunError(f"{run_dir_path}: no run to resume (no {CONFIG_FILE})")
    if not resume and (config_path.exists() or (run_dir_path / "versions").exists()):
      raise RunError(f"{run_dir_path} already holds a run; add --resume to continue it, "
                     f"or pick another --run-dir / --set name=...")
    barrier("run-dir-checked")  # several processes: all looked before process 0 writes
    run_dir_path.mkdir(parents=True, exist_ok=True)
    lock = lock_run(run_dir_path)
    try:
      session = (cls._resume if resume else cls._fresh)(config, run_dir_path, source, lock)
    except BaseException:
      lock.release()
      raise
    barrier("run-dir-ready")  # and all find what process 0 wrote
    return session

  @classmethod
  def _fresh(cls, config: Config, run_dir: Path, source: Source, lock: RunLock) -> "Session":
    if config.tokenizer.kind == "bpe":
      warmup, source = read_prefix(source, config.tokenizer.warmup_bytes)
      log.info(f"training a {config.tokenizer.vocab_size}-token BPE on the first "
               f"{len(warmup):,} bytes of the stream")
    else:
      warmup = b""
    tokenizer = make_tokenizer(config.tokenizer.kind, vocab_size=config.tokenizer.vocab_size,
                               warmup=warmup)
    if is_primary():  # several processes: one run directory, process 0's to write
      tokenizer.save(run_dir)
      # Written last, and whole (renamed into place): its presence means a run to resume.
      write_atomic(run_dir / CONFIG_FILE, json.dumps(config_to_dict(config), indent=2))
    return cls._from_base(config, run_dir, source, tokenizer, lock)

  @classmethod
  def _from_base(cls, config: Config, run_dir: Path, source: Source, tokenizer: Tokenizer,
                 lock: RunLock) -> "Session":
    state = initial_state(config, tokenizer.vocab_size, tokenizer.bos_id)
    if config.delta.base and state.delta is not None and state.delta.base is not None:
      state = state.replace(delta=state.delta.replace(
          base=guard_base(config, config.delta.base, state.params)))
    return cls(config, run_dir, source, tokenizer, state, None, Totals(), lock)

  @classmethod
  def _resume(cls, config: Config, run_dir: Path, source: Source, lock: RunLock) -> "Session":
    saved = json.loads((run_dir / CONFIG_FILE).read_text())
    check_resumable(saved, config_to_dict(config))
    checkpointer = Checkpointer(run_dir, config.checkpoint, writable=True)
    steps = checkpointer.all_steps()
    tokenizer = run_tokenizer(run_dir, checkpointer, steps)
    if not steps:  # killed before the base was on disk: the base is made again, identically
      checkpointer.close()
      log.warning(f"warning: {run_dir} has no complete version yet; starting from the base")
      return cls._from_base(config, run_dir, source, tokenizer, lock)
    fresh = initial_state(config, tokenizer.vocab_size, tokenizer.bos_id)
    try:
      got = checkpointer.restore_newest(abstract_like(fresh))
    except VersionError as err:
      raise RunError(str(err)) from None
    finally:
      checkpointer.close()
    set_aside = None
    if got.unreadable:  # out of the way of the versions this run will write
      steps_aside = [s for s, _ in got.unreadable]
      set_aside = (steps_aside, move_aside(run_dir, steps_aside, "unreadable"))
      log.warning(f"warning: moved unreadable version(s) {', '.join(map(str, steps_aside))} "
                  f"to {set_aside[1]}")
    totals = Totals(**got.record["totals"])
    log.info(f"resuming {run_dir} at chunk {totals.chunks:,} ({totals.bytes:,} bytes seen)")
    position = got.record["position"]
    if not same_source(got.record.get("source"), source):
      # New data (another file, or more of a pipe): from its start, after the tokens
      # the last source left unlearned; a saved offset means nothing in it.
      log.info(f"resuming onto new data: {source.name} streams from its start (the run last "
               f"read {got.record.get('source')})")
      position = {**position, "source": None, "skip": 0}
    first_base = saved["delta"]["base"]
    record = {"base": first_base, **got.record}
    session = cls(config, run_dir, source, tokenizer, got.state, position, totals,
                  lock, record, parent=got.step, set_aside=set_aside)
    session.first_base = first_base
    session.state = session._retune(session.state, record)
    if session.swarm is not None:
      session.state = session.swarm.place(session.state)
      session._set_members()
      session.registry.write()
    return session

  def _retune(self, state: LearnerState, record: dict) -> LearnerState:
    """A restored version's state with the weights and base this config asks for."""
    state, self.base_spec = retuned(self.config, state, record, self.first_base,
                                    self.swarm.population if self.swarm is not None else None)
    return state

  # --- the loop -------------------------------------------------------------------------

  def _read_record(self, step: int) -> dict:
    return self.checkpointer.read_record(step)[0]

  def _save(self, position: dict | None) -> int:
    step = self.totals.chunks
    if position is None or step in self.checkpointer.all_steps():
      return step
    self.checkpointer.wait()
    self._register()
    # A host copy: the step donates the device buffers the moment it runs next.
    host_state = host_copy(self.state)
    score = self.guard.score()
    running = self.totals.bits_per_byte
    running = running if math.isfinite(running) else None  # JSON has no NaN
    record = {"position": position, "totals": dataclasses.asdict(self.totals),
              "source": self.source.name, "time": time.time(), "parent": self.parent,
              # A swarm's members each have theirs: the most advanced, the highest.
              "learner_step": int(np.max(host_state.step)),
              "lr_scale": float(np.max(host_state.lr_scale)),
              "scores": {"score": score, "running_bpb": running},
              "safety": self.guard.to_json(), "events": self.events,
              "discarded": sorted(self.discarded), "base": self.base_spec}
    if self.swarm is not None:
      record["swarm"] = self.swarm.to_json()
    tokenizer_json = json.loads((self.run_dir / "tokenizer.json").read_text())
    # Several processes: each writes its own members, from a copy on its devices.
    to_write = self.swarm.snapshot(self.state) if several() else host_state
    self.checkpointer.save(step, to_write, record, tokenizer_json, score)
    self._unregistered = (step, record)
    self.parent = step
    return step

  def _register(self) -> None:
    """Puts the last version, now complete on disk, into the registry."""
    if self._unregistered is not None:
      self.registry.add_version(*self._unregistered)
      self._unregistered = None
    self.registry.sync(self.checkpointer.all_steps(), self._read_record)
    self._set_members()
    self.registry.write()

  def _set_members(self) -> None:
    if self.swarm is not None:
      self.registry.set_members(self.swarm.population.registry_view())

  def _stream(self, start: dict | None, max_bytes: int | None) -> TokenStream:
    return TokenStream(self.source, self.tokenizer, self.config.data.chunk_tokens,
                       start=start, max_bytes=max_bytes)

  def run(self, max_bytes: int | None = None) -> int:
    """Streams until the source ends, max_bytes, or Ctrl-C; returns the exit code."""
    from tensorboardX import SummaryWriter

    config = self.config
    token_stream = self._stream(self.stream_start, max_bytes)
    self._chunks = iter(token_stream)
    self._writer = SummaryWriter(str(self.run_dir / "tb")) if is_primary() else _NoWriter()
    progress = Progress(config.log.progress_seconds)
    clock = (time.monotonic(), self.totals.bytes)
    position = self.stream_start
    self.last_saved = self.totals.chunks if self.stream_start is not None else None
    if self.stream_start is None:  # a new run: the original base, before any learning
      position = token_stream.start_position
      self.last_saved = self._save(position)
    in_flight = None  # (metrics on device, chunk) of the step dispatched last
    self.failed = self.stopped = False
    interrupts = Interrupts()
    try:
      with interrupts.installed():
        while not (interrupts.requested or self.stopped):
          try:
            with interrupts.raising():  # Ctrl-C may cut only the wait for data
              chunk = next(self._chunks, None)
          except SourceError as err:  # e.g. the file became unreadable mid-stream
            log.error(f"error: {err}")
            self.failed = True
            break
          if chunk is None:
            break
          self.state, metrics = self.step_fn(self.state, device_chunk(chunk))
          # That step is in flight; only now read the one dispatched before it.
          alarm = self._record(*in_flight, progress, clock) if in_flight is not None else None
          in_flight, position = (metrics, chunk), chunk.position
          due = self.totals.chunks + 1 - (self.last_saved or 0) >= config.checkpoint.every_chunks
          # A swarm's replacements come after the step of the chunk that crosses the
          # interval, with every score up to it booked: the same point on a resume.
          evolve = self.swarm is not None and self.swarm.due(self.totals.bytes + chunk.n_bytes)
          if alarm is not None or due or evolve:
            last = self._record(*in_flight, progress, clock)
            alarm = alarm or last
            in_flight = None
            restored = self._rollback(alarm, position, token_stream) if alarm else None
            if evolve and restored is None and not self.stopped:
              self._evolve()
            if restored is not None or due:  # a rollback is saved at once
              position = restored or position
              self.last_saved = self._save(position)
    except KeyboardInterrupt:
      interrupts.requested = True
    finally:
      alarm = self._record(*in_flight, progress, clock) if in_flight is not None else None
      if alarm is not None:
        position = self._rollback(alarm, position, token_stream) or position
      self.last_saved = self._save(position)
      self.checkpointer.close()
      self._register()
      self._writer.close()
      self.lock.release()
      progress.update(self._progress_text(clock), force=True)
      progress.close()
    skipped = ", ".join(f"{n} {why}" for why, n in sorted(self.source.skipped.items()))
    if self.totals.bytes == 0:
      log.info("the stream was empty: nothing learned")
    log.info(f"{'interrupted' if interrupts.requested else 'done'}: {self.totals.bytes:,} "
             f"bytes, {self.totals.bits_per_byte:.4f} bits/byte prequential, version "
             f"{self.last_saved} in {self.run_dir}" + self._safety_text()
             + (f" (files skipped: {skipped})" if skipped else ""))
    return 1 if self.failed else 0

  def _record(self, metrics, chunk: HostChunk, progress, clock) -> Alarm | None:
    """Books one chunk's metrics; returns the alarm they raise, if any."""
    m = jax.device_get(metrics)
    if self.swarm is not None:  # every member booked; the run goes by the leader's numbers
      m = self.swarm.observe(m, chunk.n_bytes)
    skipped = bool(m["skipped"])
    self.totals.bytes += chunk.n_bytes
    self.totals.tokens += chunk.n_tokens
    self.totals.chunks += 1
    if skipped:
      self.totals.skipped += 1
      self.totals.skipped_bytes += chunk.n_bytes
    else:
      self.totals.bits += float(m["bits"])
    step = self.totals.chunks
    alarm = self.guard.observe(step, float(m["bits"]), chunk, skipped)
    if step % self.config.log.tensorboard_every == 0:
      writer = self._writer
      rate = self._rate(clock)
      writer.add_scalar("prequential/bits_per_byte", float(m["bits_per_byte"]), step)
      writer.add_scalar("prequential/bits_per_byte_running", self.totals.bits_per_byte, step)
      writer.add_scalar("prequential/bits_per_token", float(m["bits_per_token"]), step)
      writer.add_scalar("speed/bytes_per_s", rate, step)
      writer.add_scalar("speed/tokens_per_s", rate * self.totals.tokens / max(self.totals.bytes, 1), step)
      writer.add_scalar("train/grad_norm", float(m["grad_norm"]), step)
      writer.add_scalar("train/learning_rate", float(m["learning_rate"]), step)
      writer.add_scalar("safety/skipped", float(skipped), step)
      if (score := self.guard.score()) is not None:
        writer.add_scalar("safety/score", score, step)
      for key, tag in _TAGS.items():
        if key in m:
          writer.add_scalar(tag, float(m[key]), step)
      if self.swarm is not None:
        self.swarm.log(writer, step)
    if self.canaries.due(step):
      self._score_canaries(step)
    progress.update(self._progress_text(clock))
    return alarm

  def _score_canaries(self, step: int) -> None:
    """Each canary's bits/byte under the current (a swarm's: the leader's) parameters."""
    if self._score_fn is None:
      self._score_fn = make_score(self.predictor)
    params = self.state.params if self.swarm is None else self.swarm.leader_params(self.state)
    empty = self.predictor.init_carry(1, self.tokenizer.bos_id)
    for name, bpb in self.canaries.score(self._score_fn, params, empty).items():
      self._writer.add_scalar(f"canary/{name}/bits_per_byte", bpb, step)

  def _evolve(self) -> None:
    """One population-based-training event: poor members replaced on the device."""
    self.state, plan = self.swarm.evolve(self.state, self.totals.bytes, self.totals.chunks)
    replaced = int(plan.copied_N.sum() + plan.fresh_N.sum())
    self._writer.add_scalar("swarm/replaced", replaced, self.totals.chunks)
    if replaced:
      self._set_members()
      self.registry.write()

  # --- the safety net ---------------------------------------------------------------------

  def _rollback(self, alarm: Alarm, position: dict, token_stream: TokenStream) -> dict | None:
    """Restores the last good version and lowers the learning rate, unless a spike is the data's.

    Returns the stream position to save the restored state at (`position`, the current one,
    or the restored version's with `replay`); None when nothing was restored.
    """
    cfg = self.config.safety
    self.checkpointer.wait()
    self._register()  # every complete version in the registry before any is marked
    steps = self.checkpointer.all_steps()
    candidates = rollback_candidates(steps, alarm.before, self.discarded)
    try:
      got = self.checkpointer.restore_newest(abstract_like(self.state), candidates)
    except VersionError as err:  # not even the base restores: nothing safe to go on with
      log.error(f"error: rollback at chunk {alarm.chunk:,} ({alarm.detail}) impossible: {err}")
      self.failed = self.stopped = True
      return None
    if alarm.reason == "spike" and not self._confirmed(alarm, got.step, *self._judged(got)):
      return None
    lr_scale = lowered_lr_scale(float(np.max(self.state.lr_scale)), cfg)
    discarded = [s for s in steps if s > got.step]
    # Only the source the version was read from can be streamed again (never a pipe).
    replay = cfg.replay and same_source(got.record.get("source"), self.source)
    event = {"kind": "rollback", "time": time.time(), "reason": alarm.reason,
             "detail": alarm.detail, "chunk": alarm.chunk, "to": got.step,
             "discarded": discarded, "unreadable": [s for s, _ in got.unreadable],
             "lr_scale": lr_scale, "replay": replay}
    log.warning(f"rollback at chunk {alarm.chunk:,}: {alarm.detail}; restored version "
                f"{got.step}, learning rate x{lr_scale:g}")
    self._writer.add_scalar("safety/rollback_to", got.step, alarm.chunk)
    self._writer.add_text("safety/events", json.dumps(event), alarm.chunk)
    self.state = got.state.replace(
        lr_scale=jnp.full(np.shape(got.state.lr_scale), lr_scale, jnp.float32))
    if self.swarm is not None:  # the whole swarm goes back; member ids are never reused
      self.swarm.rolled_back_to(got.record["swarm"])
    # A version from before this session's resume may predate its config's changes.
    self.state = self._retune(self.state, got.record)
    if self.swarm is not None:
      self.state = self.swarm.place(self.state)
    self.guard.reset()
    self.events.append(event)
    self.parent = got.step
    self.registry.add_event(event)
    if replay:  # the stream goes back too; the versions after the target move aside
      where = move_aside(self.run_dir, discarded, f"rolled-back-from-{alarm.chunk}")
      self.checkpointer.reload()
      self.registry.mark_aside(discarded, where)
      self.totals = Totals(**got.record["totals"])
      remaining = (None if token_stream.max_bytes is None
                   else token_stream.max_bytes - token_stream.bytes_read)
      self._chunks = iter(self._stream(got.record["position"], remaining))
      position = got.record["position"]
    else:
      self.discarded.update(discarded)
      self.registry.mark_rolled_back(discarded)
    self.registry.write()
    return position

  def _judged(self, got) -> tuple:
    """(current, version's) parameters a spike is judged by: a swarm's, its leaders'."""
    if self.swarm is None:
      return self.state.params, got.state.params
    return (self.swarm.leader_params(self.state),
            self.swarm.leader_params(got.state, got.record["swarm"]))

  def _confirmed(self, alarm: Alarm, step: int, params_now, params_then) -> bool:
    """Whether version `step`'s parameters predict the alarm's chunks clearly better than now."""
    if self._score_fn is None:
      self._score_fn = make_score(self.predictor)
    # Both frozen, both from an empty carry: neither gains from context the other lacks.
    carry = self.predictor.init_carry(1, self.tokenizer.bos_id)
    now = score_through(self._score_fn, params_now, carry, alarm.window).bits_per_byte
    then = score_through(self._score_fn, params_then, carry, alarm.window).bits_per_byte
    if then * (1.0 + self.config.safety.spike_fraction / 2) < now:
      return True
    event = {"kind": "spike_ignored", "time": time.time(), "detail": alarm.detail,
             "chunk": alarm.chunk, "checked": step, "checked_bpb": then, "current_bpb": now}
    log.info(f"spike at chunk {alarm.chunk:,} ({alarm.detail}), but version {step} does no "
             f"better on those chunks ({then:.3f} bits/byte against {now:.3f} now): the data "
             f"changed, not the model; nothing rolled back")
    self._writer.add_text("safety/events", json.dumps(event), alarm.chunk)
    self.guard.reset()  # the new level is the norm now
    self.registry.add_event(event)  # not in self.events: versions carry only rollbacks
    self.registry.write()
    return False

  def _safety_text(self) -> str:
    rollbacks = sum(e["kind"] == "rollback" for e in self.events)
    parts = []
    if self.totals.skipped:
      parts.append(f"{self.totals.skipped} updates skipped (NaN/Inf)")
    if rollbacks:
      parts.append(f"{rollbacks} rollback{'s' * (rollbacks > 1)}")
    return f" ({', '.join(parts)})" if parts else ""

  def _rate(self, clock) -> float:
    """Bytes per second since this invocation started."""
    start_time, start_bytes = clock
    return (self.totals.bytes - start_bytes) / max(time.monotonic() - start_time, 1e-9)

  def _progress_text(self, clock) -> str:
    rate = self._rate(clock)
    saved = f"version {self.last_saved}" if self.last_saved is not None else "no version yet"
    return (f"{human_bytes(self.totals.bytes)} seen | {human_bytes(rate)}/s | "
            f"{self.totals.bits_per_byte:.3f} bits/byte | {saved}" + self._safety_text())


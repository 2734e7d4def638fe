"""The main loop: chunks through the jitted step, each booked once it is scored; versions saved.

    session, progress = open_session(config, run_dir=..., data=..., resume=...)
    exit_code = run(session, progress, max_bytes=None)

Reads as a run goes: the next chunk; the step dispatched on it; the chunk
before it booked (its score, the safety net's watch, TensorBoard, the status
line) while that step runs; at a checkpoint, a swarm event or an alarm, the
last chunk booked too and then a version saved, members replaced or a
rollback done. When the stream ends, --max-bytes is reached or the user
presses Ctrl-C (or sends SIGTERM), a final version is saved.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import jax

from streamlearn.data.sources import SourceError
from streamlearn.data.stream import HostChunk, TokenStream
from streamlearn.distributed import is_primary
from streamlearn.learn.prequential import step_chunk
from streamlearn.run.console import Interrupts, StatusLine, human_bytes
from streamlearn.run.rollback import RollbackError, rollback
from streamlearn.run.safety import Alarm
from streamlearn.run.session import Progress, Session
from streamlearn.run.tags import NoWriter, write_chunk

log = logging.getLogger("streamlearn.run")


@dataclasses.dataclass
class Report:
  """What the run shows as it goes: TensorBoard, the status line, and its counts."""

  writer: object
  status: StatusLine
  started: tuple[float, int]     # (monotonic time, bytes seen) when this invocation began
  saved: int | None = None       # the newest version saved
  attempted: int = 0             # the chunk of the last save tried: the next is due from it
  data_shifts: int = 0           # spikes judged the data's: nothing rolled back
  failed: bool = False           # the run stops on an error: exit code 1
  unsaved: bool = False          # saving failed, and the run ends that way: exit code 2

  def rate(self, progress: Progress) -> float:
    """Bytes per second since this invocation started."""
    start_time, start_bytes = self.started
    return (progress.totals.bytes - start_bytes) / max(time.monotonic() - start_time, 1e-9)

  def text(self, progress: Progress) -> str:
    saved = f"version {self.saved}" if self.saved is not None else "no version yet"
    return (f"{human_bytes(progress.totals.bytes)} seen | {human_bytes(self.rate(progress))}/s"
            f" | {bits_text(progress.totals)} | {saved}"
            + safety_text(progress, self.data_shifts))


def bits_text(totals) -> str:
  """The running score for the status line (none yet while the BPE warm-up streams)."""
  if totals.vocab_bytes and totals.bytes == totals.vocab_bytes + totals.skipped_bytes:
    return "BPE warm-up: learned from, not scored"
  return f"{totals.bits_per_byte:.3f} bits/byte"


def safety_text(progress: Progress, data_shifts: int = 0) -> str:
  """What the safety net did, for the status line: '' when nothing."""
  rollbacks = sum(e["kind"] == "rollback" for e in progress.events)
  parts = []
  if progress.totals.skipped:
    parts.append(f"{progress.totals.skipped} updates skipped (NaN/Inf)")
  if rollbacks:
    parts.append(f"{rollbacks} rollback{'s' * (rollbacks > 1)}")
  if data_shifts:
    parts.append(f"{data_shifts} data shift{'s' * (data_shifts > 1)}, nothing rolled back")
  return f" ({', '.join(parts)})" if parts else ""


def run(session: Session, progress: Progress, max_bytes: int | None = None) -> int:
  """Streams until the source ends, max_bytes, or Ctrl-C; returns the exit code."""
  report, streams, chunks = start(session, progress, max_bytes)
  in_flight = None  # (metrics on device, chunk) of the step dispatched last
  held_alarm = None  # an alarm raised while idle: acted on with the next chunk
  interrupts = Interrupts()
  idle = Idle(session.config.checkpoint.idle_seconds)

  def on_wait() -> None:
    """A followed stream waits for more: register the version being written and, once idle
    long enough, save what was learned, so a quiet stream loses nothing to a kill -9."""
    nonlocal in_flight, held_alarm
    with interrupts.held():  # a stop asked for now comes after the save
      session.finish_saving()
      if not idle.due():
        return
      if in_flight:
        held_alarm = book(session, progress, report, *in_flight)
        in_flight = None
      if held_alarm is None and progress.totals.chunks > report.attempted:
        save(session, progress, report)

  session.source.on_wait = on_wait
  try:
    with interrupts.installed():
      while not interrupts.requested:
        # --- the next chunk (Ctrl-C may cut only the wait for data)
        try:
          with interrupts.raising():
            chunk = next(chunks, None)
          idle.reset()
        except SourceError as err:  # e.g. the file became unreadable mid-stream
          log.error(f"error: {err}")
          report.failed = True
          break
        if chunk is None:
          break
        # --- its step in flight; only now the one dispatched before it is read
        progress.state, metrics = session.step_fn(progress.state, step_chunk(chunk))
        alarm = book(session, progress, report, *in_flight) if in_flight else held_alarm
        held_alarm = None
        in_flight = (metrics, chunk)
        session.register_if_saved()
        # --- a checkpoint, a swarm event or an alarm: book this chunk too, then act.
        # (A swarm's event comes after the chunk that crosses its interval: the same
        # point on a resume.)
        due = (progress.totals.chunks + 1 - report.attempted
               >= session.config.checkpoint.every_chunks)
        evolve = (session.swarm is not None
                  and session.swarm.due(progress.totals.bytes + chunk.n_bytes))
        if not (alarm or due or evolve):
          continue
        last = book(session, progress, report, *in_flight)
        alarm, in_flight = alarm or last, None  # the earlier alarm marks the onset
        progress, restream, stop = act_between_chunks(session, progress, report, alarm, due,
                                                      evolve)
        if restream:
          chunks = streams.open(progress.position)
        if stop:
          break
  except KeyboardInterrupt:
    interrupts.requested = True
  except RollbackError as err:
    log.error(f"error: {err}")
    report.failed = True
  finally:
    progress = finish(session, progress, report, in_flight, held_alarm)
  log.info(summary(session, progress, report, interrupts.requested))
  return 1 if report.failed else 2 if report.unsaved else 0


def start(session: Session, progress: Progress, max_bytes: int | None):
  """(report, streams, chunks) of an invocation; a new run saves its original (version 0)."""
  from streamlearn.store.events import EventWriter  # tensorboardX: imported when a run starts

  report = Report(EventWriter(session.run_dir / "tb") if is_primary() else NoWriter(),
                  StatusLine(session.config.log.progress_seconds),
                  (time.monotonic(), progress.totals.bytes))
  streams = Streams(session, max_bytes)
  chunks = streams.open(progress.position)
  report.saved = progress.totals.chunks if progress.position is not None else None
  report.attempted = progress.totals.chunks
  if progress.position is None:
    progress.position = streams.current.start_position
    save(session, progress, report)
  return report, streams, chunks


class Idle:
  """When a followed stream has waited `seconds` for data since its last chunk (0: never)."""

  def __init__(self, seconds: float):
    self.seconds, self.since = seconds, None

  def reset(self) -> None:
    self.since = None

  def due(self) -> bool:
    now = time.monotonic()
    if self.since is None:
      self.since = now
    return self.seconds > 0 and now - self.since >= self.seconds


def act_between_chunks(session: Session, progress: Progress, report: Report,
                       alarm: Alarm | None, due: bool, evolve: bool):
  """A rollback, a swarm event and a save, in that order, once the last chunk is booked.
  Returns (progress, whether to stream again from progress.position, whether to stop)."""
  restored = restream = False
  if alarm:
    progress, restored, restream = act_on(session, progress, alarm, report)
  if evolve and not restored:
    evolve_swarm(session, progress, report)
  if restored or due:  # a rollback is saved at once
    save(session, progress, report)
    if session.gave_up_saving:
      log.error(f"error: {session.failed_in_a_row} saves in a row failed; stopping; the "
                f"newest saved version is {session.checkpointer.latest_step()}")
      report.unsaved = True
      return progress, restream, True
  return progress, restream, False


def finish(session: Session, progress: Progress, report: Report, in_flight,
           held_alarm: Alarm | None = None) -> Progress:
  """The way out: the last chunk booked, a final version, everything closed."""
  alarm = book(session, progress, report, *in_flight) if in_flight else held_alarm
  if alarm:
    try:
      progress, _, _ = act_on(session, progress, alarm, report)
    except RollbackError as err:
      log.error(f"error: {err}")
      report.failed = True
  if not report.unsaved:
    save(session, progress, report)
  session.close()  # waits for that save: a failure is one line, and exit code 2
  drain_save_failures(session, report)
  report.unsaved = report.unsaved or session.failed_in_a_row > 0
  report.saved = session.newest_saved
  report.writer.close()
  report.status.update(report.text(progress), force=True)
  report.status.close()
  return progress


def save(session: Session, progress: Progress, report: Report) -> None:
  """Saves a version (a failed save is one line, counted; the run goes on: the next save is
  tried an interval later)."""
  report.attempted = progress.totals.chunks
  saved = session.save(progress)
  report.saved = saved if saved is not None else session.checkpointer.latest_step()
  drain_save_failures(session, report)


def drain_save_failures(session: Session, report: Report) -> None:
  """Failed saves to TensorBoard, at the step of the version that was not saved."""
  while session.save_failures:
    report.writer.add_scalar("safety/save_failed", 1.0, session.save_failures.pop(0).step)


class Streams:
  """The run's token stream, opened again at a rollback's position when it restreams,
  with --max-bytes counting every byte streamed this invocation (twice if streamed again)."""

  def __init__(self, session: Session, max_bytes: int | None):
    self.session, self.max_bytes = session, max_bytes
    self.current: TokenStream | None = None
    # Bytes of the chunks handed out, not the bytes read: a stream reads ahead (a whole
    # block), and what it read but never cut into chunks is read again after a restream.
    self.streamed = 0

  def open(self, position: dict | None):
    remaining = None if self.max_bytes is None else max(self.max_bytes - self.streamed, 0)
    self.current = self.session.token_stream(position, remaining)
    return self._counted(iter(self.current))

  def _counted(self, chunks):
    for chunk in chunks:
      self.streamed += chunk.n_bytes
      yield chunk


def book(session: Session, progress: Progress, report: Report, metrics,
         chunk: HostChunk) -> Alarm | None:
  """Books one scored chunk into the run's totals and logs; returns the alarm it raises."""
  m = jax.device_get(metrics)
  if session.swarm is not None:  # every member booked; the run's score: the mixture's or leader's
    m = session.swarm.observe(m, chunk.n_bytes, chunk.n_tokens, session.unscored_until)
  totals, skipped = progress.totals, bool(m["skipped"])
  totals.add(chunk.n_bytes, chunk.n_tokens, float(m["bits"]), skipped, session.unscored_until)
  if skipped:
    log.warning(f"warning: chunk {totals.chunks:,}: update skipped (NaN/Inf loss or gradient)")
  progress.position = chunk.position
  step = totals.chunks
  alarm = progress.guard.observe(step, float(m["bits"]), chunk, skipped)
  if step % session.config.log.tensorboard_every == 0:
    write_chunk(report.writer, step, m, totals.bits_per_byte, report.rate(progress),
                totals.tokens / max(totals.bytes, 1), skipped, progress.guard.score())
    if session.swarm is not None:
      session.swarm.log(report.writer, step, m)
  if session.canaries.due(step):
    score_canaries(session, progress, report.writer, step)
  report.status.update(report.text(progress))
  return alarm


def act_on(session: Session, progress: Progress, alarm: Alarm, report: Report):
  """(progress, whether a version was restored, whether the stream goes back) after an alarm."""
  outcome = rollback(session, progress, alarm, report.writer)
  if outcome.restored is None:
    report.data_shifts += 1
  return outcome.progress, outcome.restored is not None, outcome.restream


def evolve_swarm(session: Session, progress: Progress, report: Report) -> None:
  """One population-based-training event: poor members replaced on the device."""
  totals = progress.totals
  progress.state, plan = session.swarm.evolve(progress.state, totals.bytes, totals.chunks)
  replaced = int(plan.copied_N.sum() + plan.fresh_N.sum())
  report.writer.add_scalar("swarm/replaced", replaced, totals.chunks)
  if replaced:
    session.set_members()
    session.registry.write()


def score_canaries(session: Session, progress: Progress, writer, step: int) -> None:
  """Each canary's bits/byte under the current (a swarm's: the leader's) parameters."""
  params = session.leader_params(progress.state)
  empty = session.predictor.init_carry(1, session.tokenizer.bos_id)
  for name, bpb in session.canaries.score(session.score_fn, params, empty).items():
    writer.add_scalar(f"canary/{name}/bits_per_byte", bpb, step)


def summary(session: Session, progress: Progress, report: Report, interrupted: bool) -> str:
  """The run's last line."""
  totals = progress.totals
  if totals.bytes == 0:
    log.info("the stream was empty: nothing learned")
  skipped = ", ".join(f"{n} {why}" for why, n in sorted(session.source.skipped.items()))
  unsaved = (f" (the last {session.failed_in_a_row} save(s) failed: --resume goes on from "
             f"version {session.newest_saved})" if session.failed_in_a_row else "")
  return (f"{'interrupted' if interrupted else 'done'}: {totals.bytes:,} bytes, "
          f"{totals.bits_per_byte:.4f} bits/byte prequential{totals.scope()}"
          f"{session.swarm.describe() if session.swarm is not None else ''}, version "
          f"{session.newest_saved} in {session.run_dir}" + safety_text(progress, report.data_shifts)
          + unsaved
          + (f" (files skipped: {skipped})" if skipped else ""))

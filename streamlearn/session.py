"""A run of the main job: run directory, tokenizer, learner, checkpoints, the loop.

Reads top to bottom as the run does: open (run directory, source, tokenizer,
learner state — fresh or resumed), then `run` (stream chunks through the
jitted step, log, checkpoint), then a final version on the way out, whether
the stream ended, --max-bytes was reached, or the user pressed Ctrl-C.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import signal
import sys
import time
from pathlib import Path

import jax

from streamlearn.checkpoint import Checkpointer, abstract_like
from streamlearn.config import Config, config_to_dict
from streamlearn.learner import LearnerState, build, init_learner
from streamlearn.prequential import Totals, device_chunk
from streamlearn.sources import Block, Source, SourceError, open_source
from streamlearn.stream import HostChunk, TokenStream
from streamlearn.tokenizer import Tokenizer, load_tokenizer, make_tokenizer

log = logging.getLogger("streamlearn.run")

CONFIG_FILE = "config.json"
# Sections that fix the shapes of the state: a resumed run must keep them.
_FROZEN_ON_RESUME = ("model", "match", "tokenizer", "data.chunk_tokens")


class RunError(RuntimeError):
  """A run that cannot start or continue; the message is one line."""


class _ReplaySource(Source):
  """A source whose first blocks were already read (for BPE warm-up); replays them."""

  def __init__(self, inner: Source, first_blocks: list[Block], rest):
    super().__init__(inner.name, block_bytes=inner.block_bytes)
    self.inner, self.first_blocks, self.rest = inner, first_blocks, rest
    self.skipped = inner.skipped

  def blocks(self, start=None):
    if start is not None:
      return self.inner.blocks(start)
    return self._replay()

  def _replay(self):
    yield from self.first_blocks
    yield from self.rest


def _read_prefix(source: Source, n_bytes: int) -> tuple[bytes, Source]:
  """The first n_bytes of a source, and a source that still yields them first."""
  blocks, total = [], 0
  iterator = source.blocks()
  for block in iterator:
    blocks.append(block)
    total += len(block.data)
    if total >= n_bytes:
      break
  data = b"".join(b.data for b in blocks)[:n_bytes]
  return data, _ReplaySource(source, blocks, iterator)


def _check_same(saved: dict, current: dict, key: str) -> None:
  node_s, node_c = saved, current
  for part in key.split("."):
    node_s, node_c = node_s.get(part), node_c.get(part)
  if node_s != node_c:
    raise RunError(f"{key}: this run was made with {node_s!r}, the config says {node_c!r}; "
                   f"resume with the run's own config or start a new --run-dir")


class Progress:
  """One live line on a terminal; a plain line every few seconds otherwise."""

  def __init__(self, every_s: float):
    self.tty = sys.stderr.isatty()
    self.every_s = every_s if self.tty else max(every_s, 10.0)
    self.last = 0.0

  def update(self, text: str, force: bool = False) -> None:
    now = time.monotonic()
    if not force and now - self.last < self.every_s:
      return
    self.last = now
    if self.tty:
      sys.stderr.write("\r" + text[:200].ljust(100))
    else:
      sys.stderr.write(text + "\n")
    sys.stderr.flush()

  def close(self) -> None:
    if self.tty:
      sys.stderr.write("\n")


def _human_bytes(n: float) -> str:
  for unit in ("B", "KB", "MB", "GB"):
    if n < 1000 or unit == "GB":
      return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
    n /= 1000
  return f"{n:.1f} GB"


class Session:
  """An opened run: everything `run` needs, fresh or resumed."""

  def __init__(self, config: Config, run_dir: Path, source: Source, tokenizer: Tokenizer,
               state: LearnerState, stream_start: dict | None, totals: Totals):
    self.config, self.run_dir, self.source = config, run_dir, source
    self.tokenizer, self.state, self.stream_start, self.totals = (
        tokenizer, state, stream_start, totals)
    self.predictor, self.optimizer, self.step_fn = build(config, tokenizer.vocab_size)
    self.checkpointer = Checkpointer(run_dir, config.checkpoint)

  # --- opening ------------------------------------------------------------------------------

  @classmethod
  def open(cls, config: Config, *, run_dir: str | None, data: str | None,
           resume: bool) -> "Session":
    run_dir_path = Path(run_dir) if run_dir else Path("checkpoints") / config.name
    source = open_source(data, max_file_bytes=config.data.max_file_bytes,
                         block_bytes=config.data.block_bytes)
    config_path = run_dir_path / CONFIG_FILE
    if resume:
      return cls._resume(config, run_dir_path, source)
    if config_path.exists() or (run_dir_path / "versions").exists():
      raise RunError(f"{run_dir_path} already holds a run; add --resume to continue it, "
                     f"or pick another --run-dir / --set name=...")
    run_dir_path.mkdir(parents=True, exist_ok=True)
    if config.tokenizer.kind == "bpe":
      warmup, source = _read_prefix(source, config.tokenizer.warmup_bytes)
      log.info(f"training a {config.tokenizer.vocab_size}-token BPE on the first "
               f"{len(warmup):,} bytes of the stream")
    else:
      warmup = b""
    tokenizer = make_tokenizer(config.tokenizer.kind, vocab_size=config.tokenizer.vocab_size,
                               warmup=warmup)
    tokenizer.save(run_dir_path)
    config_path.write_text(json.dumps(config_to_dict(config), indent=2))
    predictor, optimizer, _ = build(config, tokenizer.vocab_size)
    state = init_learner(predictor, optimizer, seed=config.seed, bos_id=tokenizer.bos_id)
    return cls(config, run_dir_path, source, tokenizer, state, None, Totals())

  @classmethod
  def _resume(cls, config: Config, run_dir: Path, source: Source) -> "Session":
    config_path = run_dir / CONFIG_FILE
    if not config_path.exists():
      raise RunError(f"{run_dir}: no run to resume (no {CONFIG_FILE})")
    saved = json.loads(config_path.read_text())
    for key in _FROZEN_ON_RESUME:
      _check_same(saved, config_to_dict(config), key)
    tokenizer = load_tokenizer(run_dir)
    predictor, optimizer, _ = build(config, tokenizer.vocab_size)
    fresh = init_learner(predictor, optimizer, seed=config.seed, bos_id=tokenizer.bos_id)
    checkpointer = Checkpointer(run_dir, config.checkpoint)
    if checkpointer.latest_step() is None:
      raise RunError(f"{run_dir}: no complete checkpoint to resume from")
    state, stream, _ = checkpointer.restore(None, abstract_like(fresh))
    checkpointer.close()
    totals = Totals(**stream["totals"])
    log.info(f"resuming {run_dir} at chunk {totals.chunks:,} ({totals.bytes:,} bytes seen)")
    return cls(config, run_dir, source, tokenizer, state, stream["position"], totals)

  # --- the loop -------------------------------------------------------------------------

  def _save(self, position: dict | None) -> int:
    step = self.totals.chunks
    if position is None or step in self.checkpointer.all_steps():
      return step
    # A host copy: the step donates the device buffers the moment it runs next.
    host_state = jax.device_get(self.state)
    stream = {"position": position, "totals": dataclasses.asdict(self.totals),
              "source": self.source.name, "time": time.time()}
    tokenizer_json = json.loads((self.run_dir / "tokenizer.json").read_text())
    self.checkpointer.save(step, host_state, stream, tokenizer_json)
    return step

  def run(self, max_bytes: int | None = None) -> int:
    """Streams until the source ends, max_bytes, or Ctrl-C; returns the exit code."""
    from tensorboardX import SummaryWriter

    config = self.config
    stream = iter(TokenStream(self.source, self.tokenizer, config.data.chunk_tokens,
                              start=self.stream_start, max_bytes=max_bytes))
    writer = SummaryWriter(str(self.run_dir / "tb"))
    progress = Progress(config.log.progress_seconds)
    clock = (time.monotonic(), self.totals.bytes)
    position = self.stream_start
    self.last_saved = self.totals.chunks if self.stream_start is not None else None
    in_flight = None  # (metrics on device, chunk) of the step dispatched last
    self.failed = False
    interrupts = _Interrupts()
    try:
      with interrupts.installed():
        while not interrupts.requested:
          try:
            with interrupts.raising():  # Ctrl-C may cut only the wait for data
              chunk = next(stream, None)
          except SourceError as err:  # e.g. the file became unreadable mid-stream
            log.error(f"error: {err}")
            self.failed = True
            break
          if chunk is None:
            break
          self.state, metrics = self.step_fn(self.state, device_chunk(chunk))
          # That step is in flight; only now read the one dispatched before it.
          if in_flight is not None:
            self._record(*in_flight, writer, progress, clock)
          in_flight, position = (metrics, chunk), chunk.position
          if self.totals.chunks + 1 - (self.last_saved or 0) >= config.checkpoint.every_chunks:
            self._record(*in_flight, writer, progress, clock)
            in_flight = None
            self.last_saved = self._save(position)
    except KeyboardInterrupt:
      interrupts.requested = True
    finally:
      if in_flight is not None:
        self._record(*in_flight, writer, progress, clock)
      self.last_saved = self._save(position)
      self.checkpointer.close()
      writer.close()
      progress.update(self._progress_text(clock), force=True)
      progress.close()
    skipped = ", ".join(f"{n} {why}" for why, n in sorted(self.source.skipped.items()))
    if self.totals.bytes == 0:
      log.info("the stream was empty: nothing learned")
    log.info(f"{'interrupted' if interrupts.requested else 'done'}: {self.totals.bytes:,} "
             f"bytes, {self.totals.bits_per_byte:.4f} bits/byte prequential, version "
             f"{self.last_saved} in {self.run_dir}"
             + (f" (files skipped: {skipped})" if skipped else ""))
    return 1 if self.failed else 0

  def _record(self, metrics, chunk: HostChunk, writer, progress, clock) -> None:
    m = jax.device_get(metrics)
    self.totals.bytes += chunk.n_bytes
    self.totals.tokens += chunk.n_tokens
    self.totals.bits += float(m["bits"])
    self.totals.chunks += 1
    step = self.totals.chunks
    if step % self.config.log.tensorboard_every == 0:
      rate = self._rate(clock)
      writer.add_scalar("prequential/bits_per_byte", float(m["bits_per_byte"]), step)
      writer.add_scalar("prequential/bits_per_byte_running", self.totals.bits_per_byte, step)
      writer.add_scalar("prequential/bits_per_token", float(m["bits_per_token"]), step)
      writer.add_scalar("speed/bytes_per_s", rate, step)
      writer.add_scalar("speed/tokens_per_s", rate * self.totals.tokens / max(self.totals.bytes, 1), step)
      writer.add_scalar("train/grad_norm", float(m["grad_norm"]), step)
      writer.add_scalar("train/learning_rate", float(m["learning_rate"]), step)
    progress.update(self._progress_text(clock))

  def _rate(self, clock) -> float:
    """Bytes per second since this invocation started."""
    start_time, start_bytes = clock
    return (self.totals.bytes - start_bytes) / max(time.monotonic() - start_time, 1e-9)

  def _progress_text(self, clock) -> str:
    rate = self._rate(clock)
    saved = f"version {self.last_saved}" if self.last_saved is not None else "no version yet"
    return (f"{_human_bytes(self.totals.bytes)} seen | {_human_bytes(rate)}/s | "
            f"{self.totals.bits_per_byte:.3f} bits/byte | {saved}")


class _Interrupts:
  """Ctrl-C and SIGTERM ask the loop to stop after the current step.

  While the loop waits for data (a quiet stdin, say) they raise instead, so a
  stop never waits on input; never inside a step, whose state is being donated.
  """

  def __init__(self):
    self.requested = False
    self._raising = False

  def _handle(self, signum, frame):
    self.requested = True
    if self._raising:
      raise KeyboardInterrupt

  @contextlib.contextmanager
  def installed(self):
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
      signal.signal(sig, self._handle)
    try:
      yield self
    finally:
      for sig, handler in previous.items():
        signal.signal(sig, handler)

  @contextlib.contextmanager
  def raising(self):
    self._raising = True
    try:
      if self.requested:
        raise KeyboardInterrupt
      yield
    finally:
      self._raising = False

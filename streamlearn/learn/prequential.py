"""Prequential passes over a chunk stream, shared by the benchmark and evaluation scripts.

`learn_through` is the learner as the CLI runs it (score first, then learn);
`score_through` scores with frozen parameters (the recurrent state still
carries). Both dispatch step k+1 before reading step k's metrics.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable

import jax
import numpy as np

from streamlearn.data.stream import HostChunk
from streamlearn.learn.chunk import Chunk
from streamlearn.learn.state import Carry, LearnerState


def step_chunk(chunk: HostChunk) -> Chunk:
  """A host chunk as the step's [1, T] arrays, left in NumPy: the jitted step moves them to
  the device itself, in a fifth of the time three `jnp.asarray` calls take."""
  T = len(chunk.tokens_T)
  mask = (np.arange(T) < chunk.n_tokens).astype(np.float32)
  return Chunk(chunk.tokens_T[None], mask[None], np.asarray([chunk.n_bytes], np.float32))


@dataclasses.dataclass
class Totals:
  """What a pass (or a whole run) has seen; a run saves it with every version."""

  bytes: int = 0
  tokens: int = 0
  bits: float = 0.0
  chunks: int = 0
  skipped: int = 0        # chunks whose update was skipped for a NaN/Inf loss or gradient
  skipped_bytes: int = 0  # their bytes: they have no score, so bits/byte leaves them out
  # Bytes of chunks that began inside the stream prefix a BPE vocabulary was trained
  # on: their scores are not prequential (the tokenizer saw them), so they are learned
  # from but left out of bits/byte, like skipped ones.
  vocab_bytes: int = 0
  vocab_last_chunk: int = 0  # the last chunk booked so (a version's score starts after it)

  @property
  def bits_per_byte(self) -> float:
    scored = self.bytes - self.skipped_bytes - self.vocab_bytes
    return self.bits / scored if scored else float("nan")

  def add(self, n_bytes: int, n_tokens: int, bits: float, skipped: bool = False,
          unscored_until: int = 0) -> None:
    """Books one chunk; its bits count unless its update was skipped or it began before
    byte `unscored_until` of the stream (the vocabulary's warm-up)."""
    self.chunks += 1
    if skipped:
      self.skipped += 1
      self.skipped_bytes += n_bytes
    elif self.bytes < unscored_until:
      self.vocab_bytes += n_bytes
      self.vocab_last_chunk = self.chunks
    else:
      self.bits += bits
    self.bytes += n_bytes
    self.tokens += n_tokens

  def scope(self) -> str:
    """What bits/byte is over, when that is not every byte: '' or a parenthesis to print."""
    if not self.vocab_bytes:
      return ""
    if self.bytes == self.vocab_bytes + self.skipped_bytes:
      return (f" (no byte scored yet: all {self.vocab_bytes:,} so far are the BPE vocabulary's "
              "warm-up, which it was trained on: learned from, not scored)")
    return (f" (over the {self.bytes - self.vocab_bytes - self.skipped_bytes:,} bytes after "
            f"the BPE vocabulary's warm-up: its first {self.vocab_bytes:,} bytes, which the "
            "vocabulary was trained on, were learned from but not scored)")


@dataclasses.dataclass
class PassResult(Totals):
  seconds: float = 0.0          # wall time of the whole pass, compilation included
  steady_seconds: float = 0.0   # wall time after the first chunk (compiled)
  steady_bytes: int = 0         # bytes after the first chunk
  # (bytes seen, running bits/byte) every `curve_every` chunks: the learning curve.
  curve: list[tuple[int, float]] = dataclasses.field(default_factory=list)
  curve_every: int = 0          # 0: no curve

  @property
  def bytes_per_s(self) -> float:
    return self.steady_bytes / self.steady_seconds if self.steady_seconds else float("nan")


def _drive(run_one, chunks: Iterable[HostChunk], curve_every: int = 0,
           unscored_until: int = 0) -> PassResult:
  result = PassResult(curve_every=curve_every)
  start = time.perf_counter()
  first_done = None
  in_flight = None
  for chunk in chunks:
    metrics = run_one(step_chunk(chunk))
    if in_flight is not None:
      _add(result, *in_flight, unscored_until)
    in_flight = (metrics, chunk)
    if first_done is None:
      jax.block_until_ready(metrics)
      first_done = time.perf_counter()
  if in_flight is not None:
    _add(result, *in_flight, unscored_until)
  end = time.perf_counter()
  result.seconds = end - start
  if first_done is not None:
    result.steady_seconds = end - first_done
  return result


def _add(result: PassResult, metrics, chunk: HostChunk, unscored_until: int) -> None:
  bits = float(jax.device_get(metrics["bits"]))
  if result.chunks:  # the first chunk paid for compilation: keep it out of the rate
    result.steady_bytes += chunk.n_bytes
  result.add(chunk.n_bytes, chunk.n_tokens, bits, unscored_until=unscored_until)
  if result.curve_every and result.chunks % result.curve_every == 0:
    result.curve.append((result.bytes, result.bits_per_byte))


def learn_through(step_fn, state: LearnerState, chunks: Iterable[HostChunk],
                  curve_every: int = 0, unscored_until: int = 0):
  """(final state, PassResult) of the score-first learner over the chunks.

  Chunks that begin before byte `unscored_until` (a BPE vocabulary's warm-up) are
  learned from but not scored (`Totals.add`).
  """
  holder = [state]

  def run_one(chunk):
    holder[0], metrics = step_fn(holder[0], chunk)
    return metrics

  result = _drive(run_one, chunks, curve_every, unscored_until)
  return holder[0], result


def score_through(score_fn, params, carry: Carry, chunks: Iterable[HostChunk],
                  curve_every: int = 0, unscored_until: int = 0):
  """PassResult of frozen scoring over the chunks (the carry still moves on)."""
  holder = [carry]

  def run_one(chunk):
    holder[0], metrics = score_fn(params, holder[0], chunk)
    return metrics

  return _drive(run_one, chunks, curve_every, unscored_until)

"""The safety net's decisions, on the host: when to roll back, and to which version.

Two alarms, checked after every chunk:
  non-finite  the step skipped its update (NaN/Inf loss or gradient, see
              `learn.step.learn_if_finite`) `max_skips` chunks in a row;
  spike       the score — prequential bits/byte over the last `signal_chunks`
              chunks — exceeds the median of its last `median_chunks` values
              by more than `spike_fraction`.
The score is any lower-is-better number per observation: a canary's bits/byte
can feed a `SpikeDetector` of its own in place of the prequential one.

A spike alarm is confirmed before anything is rolled back: the version to
restore and the current parameters both score the very chunks that raised the
alarm, frozen and from an empty carry (so neither gains from context the
other lacks). Unless the version does clearly better — by half the spike
fraction — the data got harder, not the model worse (a new kind of file in
the stream), and the watch starts over at the new level with nothing
restored. Non-finite alarms need no confirmation.

A rollback restores the newest version older than the update that preceded
the first bad chunk (`Alarm.before`), so no update that may have caused the
alarm survives. Afterwards too the watch starts over (the median refills
before the next spike check).

The guard's state is saved in every version, so a resumed run raises exactly
the alarms an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import NamedTuple

import numpy as np

from streamlearn.config import SafetyConfig
from streamlearn.data.stream import HostChunk, decode_tokens, encode_tokens


class Alarm(NamedTuple):
  reason: str        # "non-finite" | "spike"
  chunk: int         # the chunk (1-based count) whose metrics raised it
  before: int        # roll back to the newest version with step <= before
  detail: str        # one line for logs and the registry
  window: tuple = ()  # spike: the chunks that raised it (HostChunks, oldest first)


class SpikeDetector:
  """Flags a score that exceeds the median of its recent history by a fraction."""

  def __init__(self, fraction: float, window: int, history: list[float] = ()):
    self.fraction, self.window = fraction, window
    self.history = list(history)[-window:]

  def update(self, score: float) -> float | None:
    """Adds a score; returns the median it exceeded (a spike), else None."""
    spike = None
    if self.fraction > 0 and len(self.history) >= self.window:
      median = statistics.median(self.history)
      if score > median * (1.0 + self.fraction):
        spike = median
    self.history = (self.history + [score])[-self.window:]
    return spike


@dataclasses.dataclass
class Guard:
  """Watches the learner's per-chunk metrics and raises an `Alarm` when it must roll back."""

  cfg: SafetyConfig
  # [chunk, bits, bytes, tokens (encode_tokens), chunk length] of the last chunks
  recent: list = dataclasses.field(default_factory=list)
  skips: list = dataclasses.field(default_factory=list)   # chunks skipped in a row, oldest first
  detector: SpikeDetector | None = None

  def __post_init__(self):
    if self.detector is None:
      self.detector = SpikeDetector(self.cfg.spike_fraction, self.cfg.median_chunks)

  def score(self) -> float | None:
    """Prequential bits/byte over the last `signal_chunks` chunks (None before any)."""
    n_bytes = sum(r[2] for r in self.recent)
    return sum(r[1] for r in self.recent) / n_bytes if n_bytes else None

  def observe(self, chunk: int, bits: float, host: HostChunk, skipped: bool) -> Alarm | None:
    """Takes one chunk's metrics (in stream order)."""
    n_bytes = host.n_bytes
    if skipped:
      self.skips.append(chunk)
      if len(self.skips) >= self.cfg.max_skips:
        return Alarm("non-finite", chunk, self.skips[0] - 2,
                     f"{len(self.skips)} updates in a row skipped for NaN/Inf "
                     f"(chunks {self.skips[0]}-{chunk})")
      return None
    self.skips = []
    if n_bytes == 0:
      return None
    tokens = encode_tokens(host.tokens_T[:host.n_tokens])
    entry = [chunk, bits, n_bytes, tokens, len(host.tokens_T)]
    self.recent = (self.recent + [entry])[-self.cfg.signal_chunks:]
    if len(self.recent) < self.cfg.signal_chunks:
      return None
    score = self.score()
    median = self.detector.update(score)
    if median is None:
      return None
    # The first chunk of the window that alone crosses the line marks the onset.
    line = median * (1.0 + self.cfg.spike_fraction)
    onset = next((r[0] for r in self.recent if r[1] / r[2] > line), self.recent[0][0])
    return Alarm("spike", chunk, onset - 2,
                 f"bits/byte {score:.3f} over the last {len(self.recent)} chunks > median "
                 f"{median:.3f} x {1 + self.cfg.spike_fraction:g}", self.window())

  def window(self) -> tuple[HostChunk, ...]:
    """The last chunks, as the stream gave them (for confirming a spike)."""
    chunks = []
    for _, _, n_bytes, tokens, length in self.recent:
      real = decode_tokens(tokens)
      padded = np.zeros(length, np.int32)  # only the real tokens count: the mask ignores the rest
      padded[:len(real)] = real
      chunks.append(HostChunk(padded, len(real), n_bytes, {}))
    return tuple(chunks)

  def to_json(self) -> dict:
    return {"recent": self.recent, "skips": self.skips, "history": self.detector.history}

  @classmethod
  def from_json(cls, cfg: SafetyConfig, saved: dict | None) -> "Guard":
    saved = saved or {}
    return cls(cfg, [list(r) for r in saved.get("recent", [])], list(saved.get("skips", [])),
               SpikeDetector(cfg.spike_fraction, cfg.median_chunks, saved.get("history", [])))


def spike_confirmed(now_bpb: float, version_bpb: float, cfg: SafetyConfig) -> bool:
  """Whether the version to restore predicts the alarm's chunks clearly better than the
  current parameters: by half the spike fraction. Otherwise the data changed, not the model."""
  return version_bpb * (1.0 + cfg.spike_fraction / 2) < now_bpb


def lowered_lr_scale(current: float, cfg: SafetyConfig) -> float:
  """The learning-rate scale after one more rollback."""
  return max(current * cfg.lr_factor, cfg.min_lr_scale)


def rollback_candidates(steps: list[int], before: int, discarded: set[int]) -> list[int]:
  """Versions a rollback may restore, oldest first; the original (0) always qualifies."""
  return [s for s in steps if (s <= before and s not in discarded) or s == 0]

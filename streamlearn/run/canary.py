"""Canaries: fixed held-out text scored now and then without adaptation.

A canary is a file, or a byte slice of one (`path@START:END`), tokenized once
when the run opens. Every `canary.every_chunks` chunks the current parameters
score each canary frozen, from an empty carry (no recurrent state and no match
history from the stream), so the numbers compare across a run: a canary whose
bits/byte climbs while the stream's falls is being forgotten.
"""

from __future__ import annotations

from pathlib import Path

from streamlearn.config import CanaryConfig
from streamlearn.data.stream import HostChunk, chunk_bytes
from streamlearn.data.tokenizer import Tokenizer
from streamlearn.learn.prequential import score_through


class CanaryError(ValueError):
  """A canary that cannot be read; the message is one line and names it."""


def read_canary(spec: str, max_bytes: int) -> bytes:
  """The bytes of `path` or `path@START:END`, at most max_bytes of them."""
  path, _, span = spec.partition("@")
  try:
    data = Path(path).read_bytes()
  except OSError as err:
    raise CanaryError(f"canary.paths: {spec}: {err.strerror or err}") from None
  if span:
    start, sep, end = span.partition(":")
    try:
      data = data[int(start or 0):int(end) if end else None]
    except ValueError:
      raise CanaryError(f"canary.paths: {spec}: expected path@START:END in bytes") from None
  if not data:
    raise CanaryError(f"canary.paths: {spec}: no bytes")
  return data[:max_bytes]


class Canaries:
  """The run's canaries, tokenized: name -> chunks."""

  def __init__(self, cfg: CanaryConfig, tokenizer: Tokenizer, chunk_tokens: int):
    self.cfg = cfg
    self.chunks: dict[str, list[HostChunk]] = {
        Path(spec.partition("@")[0]).name + (f"@{spec.partition('@')[2]}" if "@" in spec else ""):
        chunk_bytes(read_canary(spec, cfg.max_bytes), tokenizer, chunk_tokens)
        for spec in cfg.paths}

  def __bool__(self) -> bool:
    return bool(self.chunks)

  def due(self, chunks_seen: int) -> bool:
    return bool(self.chunks) and chunks_seen % self.cfg.every_chunks == 0

  def score(self, score_fn, params, empty_carry) -> dict[str, float]:
    """Bits/byte of each canary under `params`, frozen, from `empty_carry`."""
    return {name: score_through(score_fn, params, empty_carry, chunks).bits_per_byte
            for name, chunks in self.chunks.items()}

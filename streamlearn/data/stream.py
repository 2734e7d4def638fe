"""Cuts a source's bytes into fixed-length token chunks, resumably.

A `TokenStream` reads blocks from a source, encodes them, puts a `doc` token
between documents (files), and emits chunks of exactly `chunk_tokens` tokens;
only the very end of a finite stream emits a shorter, padded chunk. Its
`position` after any chunk is enough to continue with the next token exactly:
the source position after the last block read, plus the tokens already cut
from it but not yet emitted.
"""

from __future__ import annotations

import base64
import itertools
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from streamlearn.data.sources import Source
from streamlearn.data.tokenizer import Tokenizer


class HostChunk(NamedTuple):
  tokens_T: np.ndarray   # int32, padded with pad_id past the end of the stream
  n_tokens: int          # real tokens (< T only for the last chunk of a finite stream)
  n_bytes: int           # bytes the real tokens stand for
  position: dict         # the stream position right after this chunk


def encode_tokens(tokens: np.ndarray) -> str:
  """Token ids as compact JSON-safe text (base64 of little-endian int32)."""
  return base64.b64encode(tokens.astype("<i4").tobytes()).decode("ascii")


def decode_tokens(text: str) -> np.ndarray:
  return np.frombuffer(base64.b64decode(text), "<i4").astype(np.int32)


class TokenStream:
  """Iterates HostChunks of `chunk_tokens` tokens from a source."""

  def __init__(self, source: Source, tokenizer: Tokenizer, chunk_tokens: int, *,
               start: dict | None = None, max_bytes: int | None = None):
    self.source = source
    self.tokenizer = tokenizer
    self.chunk_tokens = chunk_tokens
    self.max_bytes = max_bytes
    self.bytes_read = 0  # source bytes consumed by this TokenStream (for max_bytes)
    start = start or {}
    self._source_start = start.get("source")
    # Bytes of the block at _source_start already consumed (a max_bytes cut).
    self._skip = int(start.get("skip", 0))
    self._pending = decode_tokens(start.get("pending", ""))
    # Whether a document has begun: the doc separator goes *between* documents.
    self._started = bool(start.get("started", False))

  @property
  def start_position(self) -> dict:
    """Where this stream starts: the position of a version saved before its first chunk."""
    return self._position(self._source_start, self._skip, self._pending)

  def _position(self, source_position, skip: int, pending: np.ndarray) -> dict:
    return {"source": source_position, "skip": skip, "pending": encode_tokens(pending),
            "started": self._started}

  def _token_blocks(self) -> Iterator[tuple[np.ndarray, dict, int]]:
    """(tokens, source position, skip) per block read, honouring max_bytes."""
    block_start, skip = self._source_start, self._skip
    for block in self.source.blocks(block_start):
      data = block.data[skip:]
      new_document = block.new_document and skip == 0
      already = len(block.data) - len(data)
      if self.max_bytes is not None:
        data = data[:self.max_bytes - self.bytes_read]
      if not data:
        return
      self.bytes_read += len(data)
      tokens = self.tokenizer.encode(data)
      if new_document:
        if self._started:
          tokens = np.concatenate([[self.tokenizer.doc_id], tokens]).astype(np.int32)
        self._started = True
      if already + len(data) == len(block.data):
        block_start, skip = block.position, 0
      else:  # cut by max_bytes: resume re-reads this block and skips what was taken
        skip = already + len(data)
      yield tokens, block_start, skip
      if self.max_bytes is not None and self.bytes_read >= self.max_bytes:
        return

  def __iter__(self) -> Iterator[HostChunk]:
    T = self.chunk_tokens
    token_bytes = self.tokenizer.token_bytes
    pending = self._pending
    # An empty block first: a resumed stream may hold more than a chunk already cut.
    start = (np.zeros(0, np.int32), self._source_start, self._skip)
    for tokens, source_position, skip in itertools.chain([start], self._token_blocks()):
      pending = np.concatenate([pending, tokens]) if len(pending) else tokens
      while len(pending) >= T:
        chunk, pending = pending[:T], pending[T:]
        yield HostChunk(chunk.astype(np.int32), T, int(token_bytes[chunk].sum()),
                        self._position(source_position, skip, pending))
    if len(pending):  # the end of a finite stream: one padded chunk
      n = len(pending)
      padded = np.full(T, self.tokenizer.pad_id, np.int32)
      padded[:n] = pending
      yield HostChunk(padded, n, int(token_bytes[pending].sum()),
                      self._position(source_position, skip, pending[:0]))


def chunk_bytes(data: bytes, tokenizer: Tokenizer, chunk_tokens: int) -> list[HostChunk]:
  """A fixed text as chunks (the last one padded), for scoring it whole, e.g. a canary."""
  tokens, T = tokenizer.encode(data), chunk_tokens
  token_bytes = tokenizer.token_bytes
  chunks = []
  for start in range(0, len(tokens), T):
    part = tokens[start:start + T]
    padded = np.full(T, tokenizer.pad_id, np.int32)
    padded[:len(part)] = part
    chunks.append(HostChunk(padded, len(part), int(token_bytes[part].sum()), {}))
  return chunks

"""Tokenizers for a byte stream: raw bytes, or BPE learned on a warm-up slice.

Both map ANY `bytes` to int32 ids and back exactly: decode(encode(x)) == x for
invalid UTF-8, NUL bytes, lone \\r, binary junk. The stream is whatever the user
typed or saved, so nothing may be dropped or replaced.

  ByteTokenizer  ids 0..255 are the bytes themselves; no training.
  BpeTokenizer   byte-pair merges learned once by the HuggingFace `tokenizers`
                 library on a warm-up slice of the stream.

Why latin-1: `tokenizers` works on text, the stream is bytes. Latin-1 maps each
byte 0..255 to exactly one char U+0000..U+00FF and back, so every byte string is
a valid string of the same length, and a token's latin-1 text *is* its bytes.
The trainer gets all 256 chars as its initial alphabet, so no byte is ever
unknown; decoding concatenates the tokens' bytes ourselves instead of trusting
the library's decoder.

Ids: in both tokenizers ids 0..255 are the single bytes (a BPE with no merges
numbers tokens exactly like ByteTokenizer), learned merges follow in the order
they were learned, and the three specials come last: bos (start of stream),
doc (document separator, inserted by the caller between files), pad. So for a
vocabulary of V ids, bos = V-3, doc = V-2, pad = V-1; `encode` never produces
them and `decode` turns them into b"" (they stand for no bytes).

Why `token_bytes`: a BPE token stands for a variable number of bytes, so loss
per token is not comparable across tokenizers. `token_bytes[id]` is how many
bytes token `id` stands for (0 for specials); the bytes in a chunk are exactly
`token_bytes[ids].sum()`, which turns summed nats into bits per byte.

Note: encoding a stream in pieces need not give the same ids as encoding their
concatenation (a merge may straddle the cut); both still round-trip exactly.
"""

from __future__ import annotations

import abc
import json
import os
import pathlib
from collections.abc import Iterable

import numpy as np
import tokenizers

from streamlearn.disk import write_atomic

__all__ = ["Tokenizer", "ByteTokenizer", "BpeTokenizer", "KINDS", "TOKENIZER_FILE",
           "NUM_SPECIALS", "SPLIT_PATTERN", "make_tokenizer", "load_tokenizer",
           "tokenizer_from_json", "trained_on"]

KINDS = ("bytes", "bpe")
TOKENIZER_FILE = "tokenizer.json"
NUM_SPECIALS = 3  # bos, doc, pad: always the last three ids
_FORMAT = "streamlearn.tokenizer"
_VERSION = 1

# BPE pre-tokenizer: runs of letters, of digits, of other symbols (each may take
# one leading space), and whitespace runs that leave their last space to the
# next word (GPT-2 style). Bytes 0x80..0xFF count as letters so a UTF-8
# multi-byte character, whatever script, stays inside its word; whitespace is
# spelled out because \s would also match U+0085 and U+00A0 (bytes 0x85, 0xA0).
# Every char matches exactly one class, so splitting loses nothing. It is saved
# with each tokenizer: changing it here never changes a saved one.
_WS = r"\t\n\x0b\x0c\r "
_HIGH = r"\u0080-\u00ff"  # not \x80-\xff: Oniguruma reads those as raw UTF-8 bytes
SPLIT_PATTERN = (rf" ?[A-Za-z{_HIGH}]+| ?[0-9]+| ?[^{_WS}A-Za-z0-9{_HIGH}]+"
                 rf"|[{_WS}]+(?![^{_WS}])|[{_WS}]+")
# A pair must occur at least this often in the warm-up to be merged: merging
# pairs seen once only memorizes the warm-up and spends vocabulary on it.
_MIN_PAIR_COUNT = 2


class Tokenizer(abc.ABC):
  """What the learner needs from a tokenizer: ids for bytes, and back, exactly."""

  kind: str
  vocab_size: int
  bos_id: int
  doc_id: int
  pad_id: int
  token_bytes: np.ndarray  # int32 [vocab_size]: bytes each id stands for

  @abc.abstractmethod
  def encode(self, data: bytes) -> np.ndarray:
    """int32 ids for `data`; never a special id."""

  @abc.abstractmethod
  def decode(self, ids: Iterable[int] | np.ndarray) -> bytes:
    """The bytes `ids` stand for; specials give b""."""

  @abc.abstractmethod
  def _config(self) -> dict:
    """The kind-specific part of tokenizer.json."""

  @property
  def special_ids(self) -> tuple[int, int, int]:
    """(bos_id, doc_id, pad_id)."""
    return self.bos_id, self.doc_id, self.pad_id

  def _set_specials(self, num_tokens: int) -> None:
    self.vocab_size = num_tokens + NUM_SPECIALS
    self.bos_id, self.doc_id, self.pad_id = range(num_tokens, self.vocab_size)

  def save(self, directory: str | os.PathLike) -> pathlib.Path:
    """Writes `directory`/tokenizer.json (created if needed); returns its path."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"format": _FORMAT, "version": _VERSION, "kind": self.kind,
              "vocab_size": self.vocab_size, "bos_id": self.bos_id,
              "doc_id": self.doc_id, "pad_id": self.pad_id, **self._config()}
    path = directory / TOKENIZER_FILE
    # One key a line: the header stays readable, each table is one long line.
    text = "{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in config.items())
    # Written whole or not at all: a crash or a full disk never leaves a truncated file.
    write_atomic(path, (text + "\n}\n").encode("ascii"))
    return path

  def _check_ids(self, ids) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.size == 0:
      return ids.reshape(-1).astype(np.int64)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"decode: ids must be a 1-D sequence of integers; got shape "
                       f"{ids.shape}, dtype {ids.dtype}")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= self.vocab_size:
      raise ValueError(f"decode: ids must be in [0, {self.vocab_size}); got {lo}..{hi}")
    return ids

  def __repr__(self) -> str:
    return f"{type(self).__name__}(vocab_size={self.vocab_size})"


def _as_bytes(data) -> bytes | bytearray | memoryview:
  if isinstance(data, str):
    raise TypeError("encode takes bytes, not str; encode text first, e.g. s.encode('utf-8')")
  return data


def _readonly(a: np.ndarray) -> np.ndarray:
  a.flags.writeable = False  # shared by every caller: nobody may scribble on it
  return a


class ByteTokenizer(Tokenizer):
  """One id per byte (0..255), then bos = 256, doc = 257, pad = 258."""

  kind = "bytes"

  def __init__(self):
    self._set_specials(256)
    self.token_bytes = _readonly(np.array([1] * 256 + [0] * NUM_SPECIALS, np.int32))

  def encode(self, data: bytes) -> np.ndarray:
    """int32 ids: the byte values themselves."""
    return np.frombuffer(_as_bytes(data), np.uint8).astype(np.int32)

  def decode(self, ids: Iterable[int] | np.ndarray) -> bytes:
    """The bytes of the non-special ids."""
    ids = self._check_ids(ids)
    return ids[ids < 256].astype(np.uint8).tobytes()

  def _config(self) -> dict:
    return {}


class BpeTokenizer(Tokenizer):
  """Byte-level BPE over latin-1 text: single bytes, merged tokens, specials."""

  kind = "bpe"

  def __init__(self, tokens: list[str], merges: list[tuple[str, str]], *,
               pattern: str = SPLIT_PATTERN):
    """Builds the tokenizer from its tables (use `train` or `load_tokenizer`).

    Args:
      tokens: each id's token as a latin-1 string (one char per byte); ids
        0..255 must be the single bytes, in order.
      merges: the learned merges, highest priority first, as (left, right).
      pattern: the pre-tokenizer regex (`tokenizers.Regex` syntax).
    """
    if tokens[:256] != [chr(b) for b in range(256)]:
      raise ValueError("BpeTokenizer: ids 0..255 must be the 256 single bytes in order")
    if len(set(tokens)) != len(tokens):
      raise ValueError("BpeTokenizer: tokens must be distinct")
    self.tokens = list(tokens)
    self.merges = [(a, b) for a, b in merges]
    self.pattern = pattern
    model = tokenizers.models.BPE(vocab={t: i for i, t in enumerate(self.tokens)},
                                  merges=self.merges)
    self._hf = tokenizers.Tokenizer(model)
    self._hf.pre_tokenizer = tokenizers.pre_tokenizers.Split(
        tokenizers.Regex(pattern), behavior="isolated")
    # Encodings without offsets are ~2x faster; older `tokenizers` lack them.
    self._encode_batch = getattr(self._hf, "encode_batch_fast", self._hf.encode_batch)
    self._set_specials(len(self.tokens))
    self._bytes_of = [t.encode("latin-1") for t in self.tokens] + [b""] * NUM_SPECIALS
    self.token_bytes = _readonly(np.array([len(b) for b in self._bytes_of], np.int32))

  @classmethod
  def train(cls, data: bytes, vocab_size: int) -> BpeTokenizer:
    """Learns up to `vocab_size` - 3 tokens (256 bytes + merges) from `data`.

    Too little data for that many merges just gives a smaller vocabulary;
    `vocab_size` then reports the real size. Deterministic: the same data and
    size give the same vocabulary (checked across processes and thread counts).
    """
    if not isinstance(vocab_size, (int, np.integer)) or vocab_size < 256 + NUM_SPECIALS:
      raise ValueError(f"BPE vocab_size must be an integer >= {256 + NUM_SPECIALS} "
                       f"(256 bytes + {NUM_SPECIALS} specials); got {vocab_size!r}")
    text = bytes(_as_bytes(data)).decode("latin-1")
    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Split(
        tokenizers.Regex(SPLIT_PATTERN), behavior="isolated")
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=int(vocab_size) - NUM_SPECIALS, min_frequency=_MIN_PAIR_COUNT,
        initial_alphabet=[chr(b) for b in range(256)], show_progress=False)
    hf.train_from_iterator([text] if text else [], trainer=trainer)
    # The library keeps merges to itself; its JSON lists them as [left, right].
    merges = json.loads(hf.to_str())["model"]["merges"]
    if any(not isinstance(m, list) for m in merges):
      raise RuntimeError("BpeTokenizer.train: unexpected merges format from `tokenizers` "
                         f"{tokenizers.__version__}")
    # Renumber so ids 0..255 are the bytes whatever order the library used;
    # merged tokens keep the library's (learning) order.
    learned = sorted(hf.get_vocab().items(), key=lambda kv: kv[1])
    tokens = [chr(b) for b in range(256)] + [t for t, _ in learned if len(t) > 1]
    return cls(tokens, [tuple(m) for m in merges])

  def encode(self, data: bytes) -> np.ndarray:
    """int32 ids for `data`, one library call over the whole latin-1 string."""
    text = bytes(_as_bytes(data)).decode("latin-1")
    if not text:
      return np.zeros(0, np.int32)
    return np.asarray(self._encode_batch([text], add_special_tokens=False)[0].ids, np.int32)

  def decode(self, ids: Iterable[int] | np.ndarray) -> bytes:
    """Concatenates the tokens' bytes; specials give b""."""
    ids = self._check_ids(ids)
    return b"".join(map(self._bytes_of.__getitem__, ids.tolist()))

  def _config(self) -> dict:
    # Tokens as latin-1 strings: JSON escapes control and high chars (\u00XX),
    # so the file is ASCII and each char is exactly one byte of the token.
    return {"pattern": self.pattern, "tokens": self.tokens,
            "merges": [list(m) for m in self.merges]}


def make_tokenizer(kind: str, *, vocab_size: int, warmup: bytes) -> Tokenizer:
  """"bytes" -> ByteTokenizer (ignores the rest); "bpe" -> BPE trained on `warmup`."""
  if kind == "bytes":
    return ByteTokenizer()
  if kind == "bpe":
    return BpeTokenizer.train(warmup, vocab_size)
  raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {', '.join(KINDS)}")


def trained_on(kind: str, warmup_bytes: int) -> int:
  """How many bytes at the start of its stream a tokenizer of this kind learned from: their
  scores are not prequential (a BPE vocabulary fits the very text it then encodes)."""
  return warmup_bytes if kind == "bpe" else 0


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
  """Reads back what `Tokenizer.save` wrote to `directory` (or a tokenizer.json path)."""
  path = pathlib.Path(directory)
  if path.is_dir():
    path = path / TOKENIZER_FILE
  return tokenizer_from_json(json.loads(path.read_text(encoding="ascii")), path)


def tokenizer_from_json(config: dict, path: str | os.PathLike = "tokenizer") -> Tokenizer:
  """A tokenizer from the parsed contents of a tokenizer.json (`path` names it in errors)."""
  if config.get("format") != _FORMAT or config.get("version") != _VERSION:
    raise ValueError(f"{path}: not a streamlearn tokenizer (format "
                     f"{config.get('format')!r} version {config.get('version')!r})")
  kind = config.get("kind")
  if kind == "bytes":
    tok = ByteTokenizer()
  elif kind == "bpe":
    tok = BpeTokenizer(config["tokens"], [tuple(m) for m in config["merges"]],
                       pattern=config["pattern"])
  else:
    raise ValueError(f"{path}: unknown tokenizer kind {kind!r}; expected one of "
                     f"{', '.join(KINDS)}")
  recorded = tuple(config[k] for k in ("vocab_size", "bos_id", "doc_id", "pad_id"))
  if recorded != (tok.vocab_size, *tok.special_ids):
    raise ValueError(f"{path}: recorded vocab_size/bos/doc/pad {recorded} do not match "
                     f"the tables ({tok.vocab_size}, {tok.bos_id}, {tok.doc_id}, {tok.pad_id})")
  return tok

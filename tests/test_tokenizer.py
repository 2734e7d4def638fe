"""Tokenizers: exact round trip for any bytes, specials, token_bytes, save/load, BPE training."""

import argparse
import collections
import inspect
import json
import os
import textwrap

import numpy as np
import pytest

from streamlearn.data.tokenizer import (KINDS, TOKENIZER_FILE, BpeTokenizer, ByteTokenizer,
                                        Tokenizer, load_tokenizer, make_tokenizer)

BPE_VOCAB = 700

# Bytes that stress the pre-tokenizer: every whitespace kind, the latin-1 chars
# \s would wrongly treat as space (0x85, 0xA0), NUL, UTF-8 lead/continuation
# bytes, letters, digits, punctuation.
EDGE_ALPHABET = b" \t\n\r\x0b\x0c\x00\x85\xa0\xc3\xa9\xe6\x97\xa5\xffaZ09._'(\\"

SPECIAL_CASES = [
    b"",
    b"\x00",
    b"\r",
    b"\n",
    b" ",
    b"\r\n\r",
    bytes(range(256)),
    bytes(range(255, -1, -1)) * 3,
    b"\x00" * 37,
    b" " * 100 + b"x" + b"\t" * 9,
    b"\xff\xfe\xc3",  # invalid UTF-8
    b"\xc3\x28\xa0\xa1",  # invalid continuation
    b"\xed\xa0\x80",  # an encoded lone surrogate
    b"\x85\xa0\x85 \xa0",
    "naïve café — 日本語のテキスト, Ελληνικά!\r\n".encode(),
    "naïve café".encode("utf-16"),
    b"def f(x):\n    return x  \n\n\n# done\r\n\t\t",
]


def _python_source() -> bytes:
  return "\n".join(inspect.getsource(m) for m in (os, inspect, json.decoder)).encode()


def _held_out_source() -> bytes:
  return "\n".join(inspect.getsource(m) for m in (argparse, textwrap)).encode()


@pytest.fixture(scope="module")
def bpe() -> BpeTokenizer:
  return BpeTokenizer.train(_python_source(), BPE_VOCAB)


@pytest.fixture(params=["bytes", "bpe"])
def tok(request, bpe) -> Tokenizer:
  return ByteTokenizer() if request.param == "bytes" else bpe


def _random_inputs(rng, n: int = 60) -> list[bytes]:
  """Random byte strings: uniform bytes, edge-alphabet bytes, slices of text."""
  text = _held_out_source() + SPECIAL_CASES[14]
  out = []
  for i in range(n):
    size = int(rng.integers(0, 2000)) if i % 10 else int(rng.integers(0, 5))
    if i % 3 == 0:
      out.append(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    elif i % 3 == 1:
      alphabet = np.frombuffer(EDGE_ALPHABET, np.uint8)
      out.append(rng.choice(alphabet, size).tobytes())
    else:  # text cut at arbitrary bytes, so often mid UTF-8 character
      start = int(rng.integers(0, len(text)))
      out.append(text[start:start + size])
  return out


def _check_encoding(tok: Tokenizer, data: bytes) -> np.ndarray:
  ids = tok.encode(data)
  assert ids.dtype == np.int32 and ids.ndim == 1
  assert not np.isin(ids, tok.special_ids).any()
  assert ids.size == 0 or (ids.min() >= 0 and ids.max() < tok.vocab_size)
  assert tok.token_bytes[ids].sum() == len(data)
  assert tok.decode(ids) == data
  return ids


# --- round trip -------------------------------------------------------------

@pytest.mark.parametrize("data", SPECIAL_CASES)
def test_round_trip_special_cases(tok, data):
  _check_encoding(tok, data)


def test_round_trip_random(tok, rng):
  for data in _random_inputs(rng):
    _check_encoding(tok, data)


def test_round_trip_large_mixed(tok, rng):
  noise = rng.integers(0, 256, 50_000, dtype=np.uint8).tobytes()
  data = _held_out_source() + noise + _python_source()
  _check_encoding(tok, data)


def test_decode_accepts_lists_and_any_integer_dtype(tok):
  ids = tok.encode(b"hello, world")
  for form in (ids.tolist(), ids.astype(np.int64), ids.astype(np.uint16), tuple(ids)):
    assert tok.decode(form) == b"hello, world"
  assert tok.decode([]) == b"" and tok.decode(np.zeros(0, np.int32)) == b""


# --- specials and token_bytes ------------------------------------------------

def test_specials_are_the_last_three_ids_and_decode_to_nothing(tok):
  assert tok.special_ids == (tok.vocab_size - 3, tok.vocab_size - 2, tok.vocab_size - 1)
  assert (tok.bos_id, tok.doc_id, tok.pad_id) == tok.special_ids
  assert tok.decode(list(tok.special_ids)) == b""
  ids = tok.encode(b"one\x00two")
  mixed = np.concatenate([[tok.bos_id], ids[:2], [tok.doc_id, tok.pad_id], ids[2:], [tok.pad_id]])
  assert tok.decode(mixed) == b"one\x00two"


def test_token_bytes(tok):
  tb = tok.token_bytes
  assert tb.dtype == np.int32 and tb.shape == (tok.vocab_size,)
  assert (tb[list(tok.special_ids)] == 0).all()
  assert (tb[:256] == 1).all()  # ids 0..255 are the single bytes in both kinds
  assert (tb[:tok.vocab_size - 3] >= 1).all()
  for i in range(tok.vocab_size):
    assert len(tok.decode([i])) == tb[i]
  with pytest.raises(ValueError):
    tb[0] = 5  # shared and read-only


def test_byte_tokenizer_layout():
  tok = ByteTokenizer()
  assert tok.kind == "bytes" and tok.vocab_size == 259
  assert (tok.bos_id, tok.doc_id, tok.pad_id) == (256, 257, 258)
  np.testing.assert_array_equal(tok.encode(bytes(range(256))), np.arange(256))


def test_decode_rejects_ids_out_of_range(tok):
  for bad in ([tok.vocab_size], [-1], [0, 1, tok.vocab_size + 10]):
    with pytest.raises(ValueError, match="ids must be in"):
      tok.decode(bad)
  with pytest.raises(ValueError):
    tok.decode(np.zeros((2, 2), np.int32))


def test_encode_rejects_str(tok):
  with pytest.raises(TypeError, match="bytes"):
    tok.encode("text")


# --- BPE training -------------------------------------------------------------

def test_bpe_layout(bpe):
  assert bpe.kind == "bpe" and bpe.vocab_size == BPE_VOCAB
  assert bpe.tokens[:256] == [chr(b) for b in range(256)]
  for b in range(256):  # a lone byte is its own id
    assert bpe.encode(bytes([b])).tolist() == [b]


def test_bpe_compresses_text(bpe):
  for data in (_held_out_source(), inspect.getdoc(collections.Counter).encode()):
    ids = _check_encoding(bpe, data)
    assert len(ids) < 0.6 * len(data), (len(ids), len(data))


def test_bpe_keeps_utf8_words_whole():
  # Accented letters must stay in their word: "à" is C3 A0 and A0 is NBSP in
  # latin-1, "é" is C3 A9 and A9 is "©"; a naive \s or \p{L} split cuts both.
  words = [" café", " voilà", " Müller", " naïve", " 日本語", " Ελληνικά"]
  tok = BpeTokenizer.train(("".join(words) + "\n").encode() * 30, 400)
  for word in words:
    assert len(_check_encoding(tok, word.encode())) == 1, word


def test_bpe_training_is_deterministic(bpe):
  again = BpeTokenizer.train(_python_source(), BPE_VOCAB)
  assert again.tokens == bpe.tokens and again.merges == bpe.merges
  data = _held_out_source()
  np.testing.assert_array_equal(again.encode(data), bpe.encode(data))


@pytest.mark.parametrize("vocab_size", [258, 256, 0, -5, 300.0, "512"])
def test_bpe_rejects_bad_vocab_size(vocab_size):
  with pytest.raises(ValueError, match="vocab_size"):
    BpeTokenizer.train(b"hello world", vocab_size)


def test_bpe_minimum_vocab_is_byte_tokenizer(rng):
  tok = BpeTokenizer.train(_python_source()[:5000], 259)
  assert tok.vocab_size == 259 and not tok.merges
  data = rng.integers(0, 256, 1000, dtype=np.uint8).tobytes() + b"hello hello"
  np.testing.assert_array_equal(tok.encode(data), ByteTokenizer().encode(data))


@pytest.mark.parametrize("warmup", [b"", b"x", b"hello hello hello, world"])
def test_bpe_small_warmup_gives_smaller_vocab(warmup):
  tok = BpeTokenizer.train(warmup, 5000)
  assert 259 <= tok.vocab_size < 5000
  assert tok.token_bytes.shape == (tok.vocab_size,)
  assert tok.pad_id == tok.vocab_size - 1
  _check_encoding(tok, warmup + bytes(range(256)))


# --- save / load -----------------------------------------------------------------

def test_save_load_round_trip(tok, tmp_path, rng):
  path = tok.save(tmp_path / "run")
  assert path == tmp_path / "run" / TOKENIZER_FILE
  config = json.loads(path.read_text())
  assert config["kind"] == tok.kind and config["vocab_size"] == tok.vocab_size
  loaded = load_tokenizer(tmp_path / "run")
  assert type(loaded) is type(tok) and loaded.kind == tok.kind
  assert loaded.vocab_size == tok.vocab_size and loaded.special_ids == tok.special_ids
  np.testing.assert_array_equal(loaded.token_bytes, tok.token_bytes)
  if isinstance(tok, BpeTokenizer):
    assert loaded.tokens == tok.tokens and loaded.merges == tok.merges
  for data in _random_inputs(rng, 20) + [_held_out_source()]:
    np.testing.assert_array_equal(loaded.encode(data), tok.encode(data))
  assert not list((tmp_path / "run").glob("*.tmp"))


def test_load_rejects_unknown_kind_and_format(tmp_path):
  path = ByteTokenizer().save(tmp_path)
  config = json.loads(path.read_text())
  path.write_text(json.dumps({**config, "kind": "wordpiece"}))
  with pytest.raises(ValueError, match="unknown tokenizer kind 'wordpiece'"):
    load_tokenizer(tmp_path)
  path.write_text(json.dumps({"kind": "bytes"}))
  with pytest.raises(ValueError, match="not a streamlearn tokenizer"):
    load_tokenizer(tmp_path)


# --- make_tokenizer ----------------------------------------------------------------

def test_make_tokenizer_dispatch():
  warmup = _python_source()[:20_000]
  assert isinstance(make_tokenizer("bytes", vocab_size=0, warmup=b""), ByteTokenizer)
  tok = make_tokenizer("bpe", vocab_size=300, warmup=warmup)
  assert isinstance(tok, BpeTokenizer) and tok.vocab_size == 300
  # Trained on the warm-up: its merges are that text's commonest pairs (Python source: four
  # spaces, "self", "def "), and it encodes that text in far fewer tokens than its bytes.
  assert {" " * 4, "self", "def"} & {t.strip(".") for t in tok.tokens[256:]}
  assert "    " in tok.tokens or "  " in tok.tokens
  assert len(tok.encode(warmup)) < 0.75 * len(warmup)  # 41 merges: ~0.67 measured
  untrained = make_tokenizer("bpe", vocab_size=300, warmup=b"ab" * 50)
  assert len(untrained.encode(warmup)) > len(tok.encode(warmup))
  with pytest.raises(ValueError, match="vocab_size"):
    make_tokenizer("bpe", vocab_size=100, warmup=warmup)


def test_make_tokenizer_unknown_kind():
  with pytest.raises(ValueError) as err:
    make_tokenizer("chars", vocab_size=300, warmup=b"")
  for kind in KINDS:
    assert kind in str(err.value)

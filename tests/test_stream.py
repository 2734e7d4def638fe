"""TokenStream: fixed-length chunks, document separators, exact resume."""

import numpy as np
import pytest

from streamlearn.data.sources import DirectorySource, FileSource
from streamlearn.data.stream import TokenStream
from streamlearn.data.tokenizer import BpeTokenizer, ByteTokenizer


def chunks_of(stream):
  return [(c.tokens_T[:c.n_tokens].tolist(), c.n_bytes, c.position) for c in stream]


@pytest.fixture
def tree(tmp_path):
  (tmp_path / "a.txt").write_bytes(b"alpha " * 30)
  (tmp_path / "b.txt").write_bytes(b"beta\n" * 17)
  (tmp_path / "c.bin").write_bytes(b"\x00\x01binary")
  return tmp_path


def test_chunks_cover_the_stream_with_separators_between_documents(tree):
  tok = ByteTokenizer()
  source = DirectorySource(tree, max_file_bytes=10_000, block_bytes=16)
  chunks = list(TokenStream(source, tok, 32))
  assert all(len(c.tokens_T) == 32 for c in chunks)
  assert all(c.n_tokens == 32 for c in chunks[:-1]) and 0 < chunks[-1].n_tokens <= 32
  tokens = np.concatenate([c.tokens_T[:c.n_tokens] for c in chunks])
  want = list(b"alpha " * 30) + [tok.doc_id] + list(b"beta\n" * 17)
  assert tokens.tolist() == want
  assert sum(c.n_bytes for c in chunks) == 6 * 30 + 5 * 17  # the separator is no byte
  assert np.all(chunks[-1].tokens_T[chunks[-1].n_tokens:] == tok.pad_id)
  assert source.skipped["binary"] == 1


@pytest.mark.parametrize("make_source", [
    lambda tree: DirectorySource(tree, max_file_bytes=10_000, block_bytes=16),
    lambda tree: FileSource(tree / "a.txt", block_bytes=7),
    # One block holds many chunks: a resume after the source's end still has whole chunks cut.
    lambda tree: FileSource(tree / "a.txt", block_bytes=4096),
])
def test_resume_from_any_chunk_continues_exactly(tree, make_source):
  tok = ByteTokenizer()
  full = chunks_of(TokenStream(make_source(tree), tok, 10))
  for k in range(len(full) - 1):
    resumed = chunks_of(TokenStream(make_source(tree), tok, 10, start=full[k][2]))
    assert [c[:2] for c in resumed] == [c[:2] for c in full[k + 1:]], k


def test_max_bytes_cuts_exactly_and_resume_takes_the_rest(tree):
  tok = ByteTokenizer()
  src = lambda: DirectorySource(tree, max_file_bytes=10_000, block_bytes=16)
  whole = b"alpha " * 30 + b"beta\n" * 17
  for cut in (1, 15, 16, 100, 180, 181):
    first = TokenStream(src(), tok, 8, max_bytes=cut)
    got = list(first)
    assert first.bytes_read == cut and sum(c.n_bytes for c in got) == cut
    rest = list(TokenStream(src(), tok, 8, start=got[-1].position))
    data = b"".join(tok.decode(c.tokens_T[:c.n_tokens]) for c in got + rest)
    assert data == whole, cut


def test_bpe_chunks_count_bytes_exactly(tree):
  data = (tree / "a.txt").read_bytes()
  tok = BpeTokenizer.train(data, 300)
  chunks = list(TokenStream(FileSource(tree / "a.txt"), tok, 8))
  assert sum(c.n_bytes for c in chunks) == len(data)
  assert sum(c.n_tokens for c in chunks) < len(data)


def test_empty_source_gives_no_chunk(tmp_path):
  (tmp_path / "empty.txt").write_bytes(b"")
  assert list(TokenStream(FileSource(tmp_path / "empty.txt"), ByteTokenizer(), 8)) == []

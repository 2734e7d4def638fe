"""Stream sources: block sizes, exact resume from every position, directory skips, dispatch."""

import io
import json
import logging
import os

import pytest

from streamlearn.data import sources
from streamlearn.data.sources import (Block, DirectorySource, FileSource, SourceError,
                                      StdinSource, open_source, stdlib_source)

MAX = 1000


def data_of(blocks) -> bytes:
  return b"".join(b.data for b in blocks)


def through_json(position: dict) -> dict:
  """Positions are saved as JSON in checkpoints; resume from what survives that."""
  return json.loads(json.dumps(position))


def assert_resumes_everywhere(source, blocks):
  """Restarting from each yielded position gives exactly the rest of the stream."""
  everything = data_of(blocks)
  consumed = 0
  for block in blocks:
    consumed += len(block.data)
    assert data_of(source.blocks(through_json(block.position))) == everything[consumed:]


def write(path, data: bytes):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(data)
  return path


# --- file -------------------------------------------------------------------

def test_file_blocks_sizes_positions_and_flags(tmp_path):
  data = bytes(range(256)) * 3 + b"tail"  # any bytes: a single file is never filtered
  path = write(tmp_path / "notes.txt", data)
  blocks = list(FileSource(path, block_bytes=100).blocks())
  assert data_of(blocks) == data
  assert all(1 <= len(b.data) <= 100 for b in blocks)
  assert [b.new_document for b in blocks] == [True] + [False] * (len(blocks) - 1)
  assert blocks[-1].position == {"kind": "file", "path": str(path), "offset": len(data)}
  assert all(isinstance(b, Block) for b in blocks)


def test_file_resumes_exactly_from_every_position(tmp_path):
  path = write(tmp_path / "notes.txt", "héllo wörld, ünïcode split across blocks\n".encode() * 5)
  source = FileSource(path, block_bytes=7)
  blocks = list(source.blocks())
  assert_resumes_everywhere(source, blocks)
  resumed = list(source.blocks(blocks[2].position))
  assert not resumed[0].new_document  # a continuation, not a new document


def test_file_empty_yields_nothing(tmp_path):
  assert list(FileSource(write(tmp_path / "empty", b"")).blocks()) == []


def test_file_errors_are_one_line_source_errors(tmp_path):
  path = write(tmp_path / "notes.txt", b"abc")
  with pytest.raises(SourceError, match=r"^.*gone\.txt: no such file or directory$"):
    list(FileSource(tmp_path / "gone.txt").blocks())
  with pytest.raises(SourceError, match="only 3 bytes"):
    list(FileSource(path).blocks({"kind": "file", "path": str(path), "offset": 10}))
  with pytest.raises(SourceError, match="not a 'file' position"):
    FileSource(path).blocks({"kind": "stdin", "offset": 0})
  with pytest.raises(SourceError, match="offset"):
    FileSource(path).blocks({"kind": "file", "path": str(path), "offset": -1})
  with pytest.raises(SourceError, match="block_bytes"):
    FileSource(path, block_bytes=0)


# --- directory --------------------------------------------------------------

def good_tree(root):
  write(root / "b.txt", b"bee " * 30)
  write(root / "a.txt", b"ay " * 10)
  write(root / "a" / "z.txt", b"zed")  # "a.txt" < "a/z.txt": '.' sorts before '/'
  write(root / "c" / "d" / "e.py", "é = 1\n".encode())
  return ["a.txt", "a/z.txt", "b.txt", "c/d/e.py"]


def test_directory_order_flags_and_blocks(tmp_path):
  order = good_tree(tmp_path)
  source = DirectorySource(tmp_path, max_file_bytes=MAX, block_bytes=16)
  assert source.files() == order
  blocks = list(source.blocks())
  assert data_of(blocks) == b"".join((tmp_path / f).read_bytes() for f in order)
  assert all(1 <= len(b.data) <= 16 for b in blocks)
  starts = [b.position["file"] for b in blocks if b.new_document]
  assert starts == order  # exactly one new_document per file, on its first block
  for b in blocks:
    assert b.position["kind"] == "dir" and b.position["root"] == str(tmp_path)
  assert not source.skipped


def test_directory_suffix_filter(tmp_path):
  good_tree(tmp_path)
  source = DirectorySource(tmp_path, max_file_bytes=MAX, suffixes=(".py",))
  assert source.files() == ["c/d/e.py"]
  assert not source.skipped  # not matching the suffix is not a skip


def test_directory_resumes_from_every_position(tmp_path):
  good_tree(tmp_path)
  source = DirectorySource(tmp_path, max_file_bytes=MAX, block_bytes=8)
  assert_resumes_everywhere(source, list(source.blocks()))


def test_directory_resume_mid_file_and_at_file_boundary(tmp_path):
  good_tree(tmp_path)
  source = DirectorySource(tmp_path, max_file_bytes=MAX, block_bytes=8)
  blocks = list(source.blocks())
  mid = next(b for b in blocks if b.position["file"] == "b.txt" and not b.new_document)
  resumed = list(source.blocks(mid.position))
  assert resumed[0].position["file"] == "b.txt" and not resumed[0].new_document
  end_of_a = [b for b in blocks if b.position["file"] == "a.txt"][-1]
  assert end_of_a.position["offset"] == len((tmp_path / "a.txt").read_bytes())
  resumed = list(source.blocks(end_of_a.position))
  assert resumed[0].position["file"] == "a/z.txt" and resumed[0].new_document


def test_directory_resume_when_current_file_was_deleted(tmp_path):
  good_tree(tmp_path)
  source = DirectorySource(tmp_path, max_file_bytes=MAX, block_bytes=8)
  blocks = list(source.blocks())
  mid = next(b for b in blocks if b.position["file"] == "b.txt" and not b.new_document)
  (tmp_path / "b.txt").unlink()
  write(tmp_path / "0new.txt", b"added before the position: must not shift the resume")
  resumed = list(source.blocks(mid.position))
  assert data_of(resumed) == (tmp_path / "c" / "d" / "e.py").read_bytes()
  assert resumed[0].new_document


def test_directory_skips_each_reason_and_logs_once(tmp_path, caplog):
  good_tree(tmp_path)
  write(tmp_path / "big.txt", b"x" * (MAX + 1))
  write(tmp_path / "empty.txt", b"")
  write(tmp_path / "nul.txt", b"text\0more")
  write(tmp_path / "latin1.txt", b"\xff\xfeabc")
  os.symlink(tmp_path / "nowhere", tmp_path / "dangling.txt")
  source = DirectorySource(tmp_path, max_file_bytes=MAX)
  with caplog.at_level(logging.DEBUG, logger="streamlearn.data.sources"):
    blocks = list(source.blocks())
  assert {b.position["file"] for b in blocks} == {"a.txt", "a/z.txt", "b.txt", "c/d/e.py"}
  assert source.skipped == {"too_large": 1, "empty": 1, "binary": 1, "not_utf8": 1,
                            "unreadable": 1}
  messages = [r.getMessage() for r in caplog.records]
  assert len(messages) == 5 and all("\n" not in m for m in messages)
  for name, reason in [("big.txt", "too_large"), ("empty.txt", "empty"), ("nul.txt", "binary"),
                       ("latin1.txt", "not_utf8"), ("dangling.txt", "unreadable")]:
    assert sum(name in m and reason in m for m in messages) == 1


def test_directory_file_removed_after_listing_is_unreadable(tmp_path):
  good_tree(tmp_path)
  source = DirectorySource(tmp_path, max_file_bytes=MAX)
  blocks = source.blocks()
  first = next(blocks)  # the listing is taken; b.txt is read later
  (tmp_path / "b.txt").unlink()
  rest = list(blocks)
  assert [b.position["file"] for b in [first] + rest] == ["a.txt", "a/z.txt", "c/d/e.py"]
  assert source.skipped == {"unreadable": 1}


def test_permission_denied(tmp_path, monkeypatch):
  good_tree(tmp_path)
  # The fault the OS raises for a file without read permission, injected: as root (CI)
  # chmod 0 would not stop the read.
  real_open = open

  def denying_open(path, *args, **kwargs):
    if os.fspath(path).endswith("b.txt"):
      raise PermissionError(13, "Permission denied", os.fspath(path))
    return real_open(path, *args, **kwargs)

  monkeypatch.setattr(sources, "open", denying_open, raising=False)
  source = DirectorySource(tmp_path, max_file_bytes=MAX)
  assert "b.txt" not in {b.position["file"] for b in source.blocks()}
  assert source.skipped == {"unreadable": 1}
  with pytest.raises(SourceError, match=r"b\.txt: permission denied$"):
    list(FileSource(tmp_path / "b.txt").blocks())


def test_directory_symlink_loop_does_not_hang(tmp_path):
  good_tree(tmp_path)
  os.symlink(tmp_path, tmp_path / "c" / "loop")
  os.symlink(tmp_path / "c", tmp_path / "up")
  source = DirectorySource(tmp_path, max_file_bytes=MAX)
  assert source.files() == ["a.txt", "a/z.txt", "b.txt", "c/d/e.py"]


def test_directory_errors(tmp_path):
  with pytest.raises(SourceError, match="no such file or directory"):
    DirectorySource(tmp_path / "missing", max_file_bytes=MAX).blocks()
  with pytest.raises(SourceError, match="'file' must be a string"):
    DirectorySource(tmp_path, max_file_bytes=MAX).blocks({"kind": "dir", "offset": 0})
  with pytest.raises(SourceError, match="max_file_bytes"):
    DirectorySource(tmp_path, max_file_bytes=0)


# --- stdin ------------------------------------------------------------------

def test_stdin_from_stream_and_resume_error():
  data = b"typed by the user\n" * 10
  source = StdinSource(io.BytesIO(data), block_bytes=32)
  blocks = list(source.blocks())
  assert data_of(blocks) == data
  assert all(1 <= len(b.data) <= 32 for b in blocks)
  assert [b.new_document for b in blocks] == [True] + [False] * (len(blocks) - 1)
  assert blocks[-1].position == {"kind": "stdin", "offset": len(data)}
  assert source.name == "stdin"
  with pytest.raises(SourceError, match="stdin cannot resume") as err:
    source.blocks(blocks[0].position)
  assert "\n" not in str(err.value)
  assert data_of(StdinSource(io.BytesIO(b"ok")).blocks({"kind": "stdin", "offset": 0})) == b"ok"


class Trickle(io.RawIOBase):
  """A live pipe: each read returns only what has 'arrived' so far."""

  def __init__(self, pieces):
    self.pieces = list(pieces)

  def readable(self):
    return True

  def read1(self, n=-1):
    return self.pieces.pop(0) if self.pieces else b""


def test_stdin_yields_data_as_it_arrives():
  blocks = list(StdinSource(Trickle([b"one\n", b"two\n"]), block_bytes=1024).blocks())
  assert [b.data for b in blocks] == [b"one\n", b"two\n"]


def test_stdin_default_reads_sys_stdin(monkeypatch):
  monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"piped")))
  assert data_of(StdinSource().blocks()) == b"piped"


# --- open_source and the stdlib default ----------------------------------------

def test_open_source_dispatch(tmp_path):
  path = write(tmp_path / "notes.txt", b"abc")
  kw = dict(max_file_bytes=MAX, block_bytes=2)
  assert isinstance(open_source("-", **kw), StdinSource)
  file_source = open_source(str(path), **kw)
  assert isinstance(file_source, FileSource) and file_source.block_bytes == 2
  dir_source = open_source(str(tmp_path), **kw)
  assert isinstance(dir_source, DirectorySource) and dir_source.max_file_bytes == MAX
  stdlib = open_source(None, **kw)
  assert isinstance(stdlib, DirectorySource) and stdlib.name.startswith("stdlib (")
  missing = str(tmp_path / "nope.txt")
  with pytest.raises(SourceError) as err:
    open_source(missing, **kw)
  assert str(err.value) == f"{missing}: no such file or directory"
  with pytest.raises(SourceError):
    open_source("", **kw)


def test_stdlib_source_streams_python_text_without_site_packages():
  source = stdlib_source(max_file_bytes=1 << 20, block_bytes=4096)
  files = source.files()
  assert files and all(f.endswith(".py") for f in files)
  assert not any(part in ("site-packages", "dist-packages") for f in files for part in f.split("/"))
  assert "os.py" in files
  blocks = source.blocks()
  first = [next(blocks) for _ in range(5)]
  assert first[0].new_document and first[0].position["kind"] == "dir"
  assert all(b.position["file"].endswith(".py") for b in first)
  text = data_of(first).decode("utf-8", errors="ignore")  # a block may end mid-character
  assert "import " in text or "def " in text


def test_open_source_leaves_tool_directories_out(tmp_path):
  (tmp_path / "notes.txt").write_bytes(b"mine\n")
  for tool_dir in (".git/objects/ab", "__pycache__", "node_modules/x"):
    (tmp_path / tool_dir).mkdir(parents=True)
    (tmp_path / tool_dir / "f.txt").write_bytes(b"not mine\n")
  source = open_source(str(tmp_path), max_file_bytes=1000, block_bytes=64)
  assert [b.data for b in source.blocks()] == [b"mine\n"]
  assert not source.skipped

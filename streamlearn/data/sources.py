"""Stream sources: the raw bytes a learner reads, as blocks with a resumable position.

Every source has the same shape: `name`, `skipped` (a Counter of reason -> files
skipped) and `blocks(start=None)`, an iterator of `Block(data, position,
new_document)`. `data` is 1..block_bytes bytes; `new_document` marks the first
block of each file (and of a file or stdin stream).

`position` is a JSON-serialisable dict describing the stream *just after* the
block it comes with:

  {"kind": "file",  "path": str, "offset": int}
  {"kind": "dir",   "root": str, "file": relpath, "offset": int}
  {"kind": "stdin", "offset": int}
  {"kind": "spool", "root": str, "segment": int, "offset": int}

"After" because a learner checkpoints once it has consumed a block: saving that
block's position and later calling `blocks(start=position)` continues with
exactly the next byte, with nothing repeated and nothing lost. A "before"
position would make every resume replay the last block.

A capture spool (`streamlearn capture`'s directory of segments, data/spoolfile.py)
streams the text of its items, never their headers, each item a document; its
offset is a byte offset in the segment file. With `follow`, a spool streams its
sealed segments and then waits for the next to be sealed, and a file waits for
more bytes at its end: the learner trains while capture fills the next segment.

A directory position names its file by path relative to the root, using '/'
(sorted listings are ordered by that string, so the order is platform-stable),
and is looked up in a fresh listing on resume: files added or removed elsewhere
in the tree do not disturb it. The block that ends a file carries
`offset == len(file)`; resuming there moves on to the next file. If the named
file has gone, the stream continues with the next file after it in sorted
order. `path` and `root` are recorded for the caller to compare; a source
resumes from `offset` (and `file`) only.

Every error a user can cause (a missing path, an unreadable file, a position
that does not fit the source) is a `SourceError`, a ValueError with a one-line
message. A bad `start` position or directory root raises from `blocks()` itself;
a single file that cannot be opened or read raises while iterating. Inside a
directory, bad files are skipped, counted and logged, never fatal.
"""

from __future__ import annotations

import abc
import bisect
import collections
import dataclasses
import logging
import os
import stat
import sys
import sysconfig
import time
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from streamlearn.data import spoolfile

__all__ = ["Block", "SourceError", "Source", "FileSource", "DirectorySource", "StdinSource",
           "SpoolSource",
           "stdlib_source", "open_source", "DEFAULT_BLOCK_BYTES"]

DEFAULT_BLOCK_BYTES = 65536

# Installed third-party packages live inside the stdlib directory on most
# layouts; they are not the standard library and can be huge.
_STDLIB_EXCLUDED_DIRS = ("site-packages", "dist-packages")
# Never the user's own text: version-control internals, caches, installed packages.
TOOL_DIRS = (".git", ".hg", ".svn", "__pycache__", ".pytest_cache", ".mypy_cache",
             ".venv", "node_modules")

_log = logging.getLogger(__name__)


class SourceError(ValueError):
  """A problem with a stream source that the user caused or can fix; one-line message."""


@dataclasses.dataclass(frozen=True)
class Block:
  """Up to block_bytes bytes of the stream and the position just after them."""

  data: bytes
  position: dict
  new_document: bool


def _why(err: OSError) -> str:
  """'permission denied' from an OSError, without the traceback-style decoration."""
  return (err.strerror or str(err)).lower()


def _positive_int(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise SourceError(f"{name} must be a positive integer; got {value!r}")
  return value


def _start_offset(start: dict | None, kind: str, name: str) -> int:
  """The offset in `start`, after checking it is a position of this kind of source."""
  if start is None:
    return 0
  if not isinstance(start, dict) or start.get("kind") != kind:
    raise SourceError(f"{name}: cannot resume from {start!r}: not a {kind!r} position")
  offset = start.get("offset")
  if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
    raise SourceError(f"{name}: cannot resume from {start!r}: offset must be an integer >= 0")
  return offset


class Source(abc.ABC):
  """A stream of bytes delivered as `Block`s that can restart at any yielded position."""

  kind: str = ""

  def __init__(self, name: str, *, block_bytes: int = DEFAULT_BLOCK_BYTES):
    self.name = name
    self.block_bytes = _positive_int("block_bytes", block_bytes)
    self.skipped: collections.Counter = collections.Counter()
    # Called (if set) each time a followed source waits for more: the learner finishes
    # what it can meanwhile (a version being written is registered).
    self.on_wait = None

  def _wait(self, seconds: float) -> None:
    if self.on_wait is not None:
      self.on_wait()
    time.sleep(seconds)

  @abc.abstractmethod
  def blocks(self, start: dict | None = None) -> Iterator[Block]:
    """Blocks from `start` (a position this source yielded earlier) or the beginning."""

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self.name!r})"


class FileSource(Source):
  """One file, read block by block (never whole), seeking to the offset on resume."""

  kind = "file"

  def __init__(self, path: str | os.PathLike, *, block_bytes: int = DEFAULT_BLOCK_BYTES,
               follow: bool = False, poll_seconds: float = 1.0):
    super().__init__(os.fspath(path), block_bytes=block_bytes)
    self.path, self.follow, self.poll_seconds = os.fspath(path), follow, poll_seconds

  def blocks(self, start: dict | None = None) -> Iterator[Block]:
    """The file's bytes from `start`; a single file is streamed even if binary."""
    return self._blocks(_start_offset(start, self.kind, self.name))

  def _blocks(self, offset: int) -> Iterator[Block]:
    try:
      # Unbuffered: one read() is one system call, so a pipe or FIFO given as
      # a path yields data as it arrives instead of waiting to fill a block.
      f = open(self.path, "rb", buffering=0)
    except OSError as err:
      raise SourceError(f"{self.name}: {_why(err)}") from None
    with f:
      if offset:
        self._seek(f, offset)
      first = offset == 0
      while True:
        data = self._read(f)
        if not data:
          if not self.follow:
            return
          self._wait(self.poll_seconds)  # a growing file: wait for more at its end
          continue
        offset += len(data)
        yield Block(data, {"kind": self.kind, "path": self.path, "offset": offset}, first)
        first = False

  def _seek(self, f: BinaryIO, offset: int) -> None:
    try:
      st = os.fstat(f.fileno())
      if stat.S_ISREG(st.st_mode) and offset > st.st_size:
        raise SourceError(f"{self.name}: cannot resume at byte {offset}: the file has only "
                          f"{st.st_size} bytes (was it truncated or replaced?)")
      f.seek(offset)
    except OSError as err:
      raise SourceError(f"{self.name}: cannot resume at byte {offset}: {_why(err)}") from None

  def _read(self, f: BinaryIO) -> bytes:
    try:
      return f.read(self.block_bytes) or b""
    except OSError as err:
      raise SourceError(f"{self.name}: read failed: {_why(err)}") from None


class DirectorySource(Source):
  """Every regular file under a root, in sorted relative-path order; bad files are skipped."""

  kind = "dir"

  def __init__(self, root: str | os.PathLike, *, max_file_bytes: int,
               suffixes: Iterable[str] | None = None, exclude_dirs: Iterable[str] = (),
               block_bytes: int = DEFAULT_BLOCK_BYTES, name: str | None = None):
    """`exclude_dirs`: directory names never descended into, wherever they occur."""
    super().__init__(name or os.fspath(root), block_bytes=block_bytes)
    self.root = os.fspath(root)
    self.max_file_bytes = _positive_int("max_file_bytes", max_file_bytes)
    self.suffixes = tuple(suffixes) if suffixes else None
    self.exclude_dirs = frozenset(exclude_dirs)

  def files(self) -> list[str]:
    """The candidate files' paths relative to root ('/'-separated), sorted; none read yet."""
    try:
      with os.scandir(self.root):
        pass
    except OSError as err:
      raise SourceError(f"{self.root}: {_why(err)}") from None
    relpaths = []
    # followlinks=False (the default) lists a directory symlink but never
    # enters it, so a link back up the tree cannot loop.
    for dirpath, dirnames, filenames in os.walk(self.root, onerror=self._unlistable):
      dirnames[:] = [d for d in dirnames if d not in self.exclude_dirs]
      reldir = os.path.relpath(dirpath, self.root)
      for filename in filenames:
        if self.suffixes and not filename.endswith(self.suffixes):
          continue
        relpath = filename if reldir == os.curdir else os.path.join(reldir, filename)
        relpaths.append(relpath.replace(os.sep, "/"))
    relpaths.sort()
    return relpaths

  def blocks(self, start: dict | None = None) -> Iterator[Block]:
    """Each usable file's bytes in order, from `start` or the first file."""
    offset = _start_offset(start, self.kind, self.name)
    relpaths = self.files()
    index = 0
    if start is not None:
      resume_file = start.get("file")
      if not isinstance(resume_file, str):
        raise SourceError(f"{self.name}: cannot resume from {start!r}: 'file' must be a string")
      index = bisect.bisect_left(relpaths, resume_file)
      if index == len(relpaths) or relpaths[index] != resume_file:
        offset = 0  # the file has gone: start the next one from its beginning
    return self._blocks(relpaths[index:], offset)

  def _blocks(self, relpaths: list[str], offset: int) -> Iterator[Block]:
    for relpath in relpaths:
      data = self._read(relpath)
      if data is not None:
        for begin in range(offset, len(data), self.block_bytes):
          chunk = data[begin:begin + self.block_bytes]
          position = {"kind": self.kind, "root": self.root, "file": relpath,
                      "offset": begin + len(chunk)}
          yield Block(chunk, position, begin == 0)
      offset = 0

  def _read(self, relpath: str) -> bytes | None:
    """The whole file if it is usable text, else None (counted and logged)."""
    path = os.path.join(self.root, relpath)
    try:
      st = os.stat(path)
      if not stat.S_ISREG(st.st_mode):
        return self._skip(path, "not_regular", "not a regular file")
      if st.st_size > self.max_file_bytes:
        return self._skip(path, "too_large", f"{st.st_size} bytes > {self.max_file_bytes}")
      with open(path, "rb") as f:
        data = f.read(self.max_file_bytes + 1)  # +1: notice a file that grew since stat
    except OSError as err:
      return self._skip(path, "unreadable", _why(err))
    if len(data) > self.max_file_bytes:
      return self._skip(path, "too_large", f"more than {self.max_file_bytes} bytes")
    if not data:
      return self._skip(path, "empty")
    if b"\0" in data:
      return self._skip(path, "binary", "contains a NUL byte")
    try:
      data.decode("utf-8")
    except UnicodeDecodeError as err:
      return self._skip(path, "not_utf8", f"invalid UTF-8 at byte {err.start}")
    return data

  def _skip(self, path: str, reason: str, detail: str = "") -> None:
    self.skipped[reason] += 1
    # One line per file at DEBUG (a tree can hold thousands); the run reports
    # the counts by reason. %r keeps an odd file name on one line.
    _log.debug("skipping %r: %s%s", path, reason, f" ({detail})" if detail else "")
    return None

  def _unlistable(self, err: OSError) -> None:
    self._skip(err.filename or self.root, "unreadable", f"cannot list directory: {_why(err)}")


class StdinSource(Source):
  """Standard input (or any binary stream), yielding data as it arrives; cannot resume."""

  kind = "stdin"

  def __init__(self, stream: BinaryIO | None = None, *,
               block_bytes: int = DEFAULT_BLOCK_BYTES):
    super().__init__("stdin", block_bytes=block_bytes)
    self.stream = stream

  def blocks(self, start: dict | None = None) -> Iterator[Block]:
    """The stream's bytes until EOF; `start` may only be a position at offset 0."""
    if _start_offset(start, self.kind, self.name) > 0:
      raise SourceError(f"stdin cannot resume at byte {start['offset']}: a pipe cannot be "
                        "rewound; start without the saved position, or save the input to a "
                        "file and stream that")
    return self._blocks()

  def _blocks(self) -> Iterator[Block]:
    # Looked up at iteration time so a replaced sys.stdin (tests, embedding) is honoured.
    stream = self.stream if self.stream is not None else sys.stdin.buffer
    # read1 returns what one read gives (a line from a terminal, a pipe's
    # current contents) instead of blocking until a whole block has arrived.
    read = getattr(stream, "read1", stream.read)
    offset = 0
    while True:
      try:
        data = read(self.block_bytes)
      except OSError as err:
        raise SourceError(f"stdin: read failed: {_why(err)}") from None
      if not data:
        return
      yield Block(bytes(data), {"kind": self.kind, "offset": offset + len(data)}, offset == 0)
      offset += len(data)


class SpoolSource(Source):
  """A capture spool's items in order, segment by segment (see data/spoolfile.py)."""

  kind = "spool"

  def __init__(self, root: str | os.PathLike, *, follow: bool = False,
               poll_seconds: float = 1.0, block_bytes: int = DEFAULT_BLOCK_BYTES):
    super().__init__(os.fspath(root), block_bytes=block_bytes)
    self.root, self.follow, self.poll_seconds = os.fspath(root), follow, poll_seconds

  def blocks(self, start: dict | None = None) -> Iterator[Block]:
    offset = _start_offset(start, self.kind, self.name)
    segment = 1
    if start is not None:
      segment = start.get("segment")
      if isinstance(segment, bool) or not isinstance(segment, int) or segment < 1:
        raise SourceError(f"{self.name}: cannot resume from {start!r}: 'segment' must be >= 1")
    return self._blocks(segment, offset)

  def _blocks(self, segment: int, offset: int) -> Iterator[Block]:
    first = min((int(m.group(1)) for p in os.scandir(self.root)
                 if (m := spoolfile.SEGMENT.match(p.name))), default=segment)
    segment = max(segment, first)  # segments before the first were consumed and removed
    while True:
      path = spoolfile.segment_path(self.root, segment)
      sealed = spoolfile.sealed(self.root, segment)
      if self.follow and not sealed:
        self._wait(self.poll_seconds)  # capture is filling it: wait until it is sealed
        continue
      try:
        data = path.read_bytes()
      except FileNotFoundError:
        return  # not following: every segment read
      except OSError as err:
        raise SourceError(f"{path}: {_why(err)}") from None
      for _, start, end in spoolfile.items(data):
        if end <= offset:
          continue
        for begin in range(max(start, offset), end, self.block_bytes):
          chunk = data[begin:min(begin + self.block_bytes, end)]
          position = {"kind": self.kind, "root": self.root, "segment": segment,
                      "offset": begin + len(chunk)}
          yield Block(chunk, position, begin == start)
      if not sealed:
        return  # the open segment, read to its last whole item
      segment, offset = segment + 1, 0


def stdlib_source(*, max_file_bytes: int,
                  block_bytes: int = DEFAULT_BLOCK_BYTES) -> DirectorySource:
  """The embedded default: the running interpreter's standard-library .py files."""
  root = sysconfig.get_paths()["stdlib"]
  return DirectorySource(root, max_file_bytes=max_file_bytes, suffixes=(".py",),
                         exclude_dirs=_STDLIB_EXCLUDED_DIRS, block_bytes=block_bytes,
                         name=f"stdlib ({root})")


def open_source(spec: str | None, *, max_file_bytes: int, block_bytes: int,
                follow: bool = False) -> Source:
  """None: the stdlib; "-": stdin; a capture spool: its items; a directory: every file in
  it; otherwise one file. `follow`: a spool or a file waits for more at its end."""
  _positive_int("max_file_bytes", max_file_bytes)
  if spec is None:
    return stdlib_source(max_file_bytes=max_file_bytes, block_bytes=block_bytes)
  if spec == "-":
    return StdinSource(block_bytes=block_bytes)
  if not spec:
    raise SourceError("the source path is empty; give a file, a directory, or '-' for stdin")
  try:
    st = os.stat(spec)
  except OSError as err:
    raise SourceError(f"{spec}: {_why(err)}") from None
  if follow and not (stat.S_ISDIR(st.st_mode) and spoolfile.is_spool(spec)
                     or stat.S_ISREG(st.st_mode)):
    raise SourceError(f"{spec}: --follow reads a capture spool or a growing file")
  if stat.S_ISDIR(st.st_mode) and spoolfile.is_spool(spec):
    return SpoolSource(spec, follow=follow, block_bytes=block_bytes)
  if stat.S_ISDIR(st.st_mode):
    return DirectorySource(spec, max_file_bytes=max_file_bytes, block_bytes=block_bytes,
                           exclude_dirs=TOOL_DIRS)
  # Anything else that exists (a regular file, a FIFO, a device) streams as one file.
  return FileSource(spec, block_bytes=block_bytes, follow=follow)


class _WarmupSource(Source):
  """A source whose first blocks were already read (for BPE warm-up); yields them again first."""

  def __init__(self, inner: Source, first_blocks: list[Block], rest):
    super().__init__(inner.name, block_bytes=inner.block_bytes)
    self.inner, self.first_blocks, self.rest = inner, first_blocks, rest
    self.skipped, self.kind = inner.skipped, inner.kind

  @property
  def on_wait(self):
    return getattr(self.inner, "on_wait", None)

  @on_wait.setter
  def on_wait(self, fn):
    if hasattr(self, "inner"):
      self.inner.on_wait = fn

  def blocks(self, start=None):
    if start is not None:
      return self.inner.blocks(start)
    return self._again()

  def _again(self):
    yield from self.first_blocks
    yield from self.rest


def read_warmup(source: Source, n_bytes: int) -> tuple[bytes, Source]:
  """(warm-up text: the first n_bytes of a source, a source that still yields them first)."""
  blocks, total = [], 0
  iterator = source.blocks()
  for block in iterator:
    blocks.append(block)
    total += len(block.data)
    if total >= n_bytes:
      break
  data = b"".join(b.data for b in blocks)[:n_bytes]
  return data, _WarmupSource(source, blocks, iterator)

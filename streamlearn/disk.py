"""Files that a crash or a full disk never leaves half-written, and what a write error says.

`write_atomic` writes to a temporary name beside the target, flushes it to the
disk, renames it over the target and flushes the directory: a reader finds the
old file or the new one, never a part of either. On an error the temporary file
is removed and the OSError goes on to the caller, who turns it into one line.
`append_whole` does the same for a file that grows (TensorBoard's events): all of
the new records, or none of them.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
  """Replaces `path` with `data` (text as UTF-8) whole, or leaves it as it was."""
  path = Path(path)
  tmp = path.with_name(path.name + ".tmp")
  payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
  try:
    with open(tmp, "wb") as f:
      f.write(payload)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    try:
      tmp.unlink()
    except OSError:
      pass
    raise
  _sync_directory(path.parent)


def append_whole(path: str | os.PathLike, data: bytes) -> None:
  """Appends `data` to `path` whole: on an error the file is cut back to its old end."""
  fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    end = os.lseek(fd, 0, os.SEEK_END)
    try:
      view = memoryview(data)
      while view:
        view = view[os.write(fd, view):]
    except BaseException:
      os.ftruncate(fd, end)
      raise
  finally:
    os.close(fd)


def _sync_directory(directory: Path) -> None:
  """Flushes a directory's entries (the rename) to the disk, where the OS allows it."""
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def why(err: BaseException) -> str:
  """An error in a few words: 'no space left on device', not a storage library's page."""
  if out_of_space(err):
    return "no space left on device"
  if isinstance(err, OSError) and err.strerror:
    return err.strerror.lower()
  text = str(err).strip().splitlines()
  return (text[0][:120] + ("..." if len(text[0]) > 120 else "")) if text else type(err).__name__


def out_of_space(err: BaseException) -> bool:
  """Whether an error is the disk (or a quota) being full, however deep it was wrapped."""
  while err is not None:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if "no space left on device" in str(err).lower() or "resource_exhausted" in str(err).lower():
      return True
    err = err.__cause__ or err.__context__
  return False

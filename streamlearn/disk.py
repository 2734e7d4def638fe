"""Files that a crash or a full disk never leaves half-written, and what a write error says.

`write_atomic` writes to a temporary name beside the target, flushes it to the
disk, renames it over the target and flushes the directory: a reader finds the
old file or the new one, never a part of either. On an error the temporary file
is removed and the OSError goes on to the caller, who turns it into one line.
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
  """An OS error in a few lowercase words: 'no space left on device'."""
  if isinstance(err, OSError) and err.strerror:
    return err.strerror.lower()
  text = str(err).strip().splitlines()
  return text[0][:160] if text else type(err).__name__


def out_of_space(err: BaseException) -> bool:
  """Whether an error is the disk (or a quota) being full, however deep it was wrapped."""
  while err is not None:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if "no space left on device" in str(err).lower() or "resource_exhausted" in str(err).lower():
      return True
    err = err.__cause__ or err.__context__
  return False

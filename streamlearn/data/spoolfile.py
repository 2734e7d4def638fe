"""The capture spool's file format, for the writer (capture/spool.py) and the reader (the
learner's `SpoolSource`) alike.

    SPOOL/segment-000001.txt    items, each `\x1e<time> <collector> <bytes> <source>\n<text>\n`
    SPOOL/segment-000001.json   its manifest; `"sealed": true` once it is training ready

<bytes> is the length of `<text>\n` in UTF-8. An item shorter than its header
says is being written (or was torn by a crash): readers stop before it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

SEPARATOR = b"\x1e"
SEGMENT = re.compile(r"segment-(\d{6})\.txt$")


def segment_path(root: str | Path, number: int) -> Path:
  return Path(root) / f"segment-{number:06d}.txt"


def manifest_path(root: str | Path, number: int) -> Path:
  return Path(root) / f"segment-{number:06d}.json"


def is_spool(root: str | Path) -> bool:
  """Whether a directory is a capture spool (it holds a segment)."""
  return any(SEGMENT.match(p.name) for p in Path(root).iterdir())


def sealed(root: str | Path, number: int) -> bool:
  try:
    return bool(json.loads(manifest_path(root, number).read_text()).get("sealed"))
  except (OSError, ValueError, AttributeError):
    return False


def items(data: bytes) -> list[tuple[bytes, int, int]]:
  """(header, start, end) of each whole item in a segment's bytes: its text (with the final
  newline) is data[start:end]."""
  found, at = [], data.find(SEPARATOR)
  while at >= 0:
    newline = data.find(b"\n", at)
    if newline < 0:
      break
    header = data[at + 1:newline]
    fields = header.split(b" ", 3)
    if len(fields) < 3 or not fields[2].isdigit():
      break
    start, end = newline + 1, newline + 1 + int(fields[2])
    if end > len(data):
      break  # being written
    found.append((header, start, end))
    at = data.find(SEPARATOR, end)
  return found

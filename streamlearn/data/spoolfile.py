"""The capture spool's file format, for the writer (capture/spool.py) and the reader (the
learner's `SpoolSource`) alike.

    SPOOL/segment-000001.txt    items, each `\x1e<time> <collector> <bytes> <source>\n<text>\n`
    SPOOL/segment-000001.json   its manifest; `"sealed": true` once it is training ready
    SPOOL/consumed.json         written by the learner that follows the spool: segments
                                before `segment` are learned and in no version it keeps

<bytes> is the length of `<text>\n` in UTF-8. An item shorter than its header
says is being written (or was torn by a crash): readers stop before it.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from streamlearn.disk import write_atomic

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
    if end > len(data) or (end < len(data) and data[end:end + 1] != SEPARATOR):
      break  # being written, or torn by a crash (the writer cuts a torn tail when it opens)
    found.append((header, start, end))
    at = data.find(SEPARATOR, end)
  return found


def write_consumed(root: str | Path, segment: int, run_dir: str | Path) -> None:
  write_atomic(Path(root) / "consumed.json", json.dumps(
      {"segment": segment, "run": str(run_dir), "time": time.time()}))


def consumed(root: str | Path) -> int:
  """The first segment a learner may still need (1 when no learner has said)."""
  try:
    return int(json.loads((Path(root) / "consumed.json").read_text())["segment"])
  except (OSError, ValueError, KeyError, TypeError):
    return 1

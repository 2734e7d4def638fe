"""The capture spool's file format, for the writer (capture/spool.py) and the reader (the
learner's `SpoolSource`) alike.

    SPOOL/segment-000001.txt    items, each `\x1e<time> <collector> <bytes> <source>\n<text>\n`
    SPOOL/segment-000001.json   its manifest; `"sealed": true` once it is training ready
    SPOOL/consumed.json         written by the learner that follows the spool: segments
                                before `segment` are learned and in no version it keeps
    SPOOL/pruned.json           what capture deleted of those: segments and text bytes

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


def pruned(root: str | Path) -> dict:
  """{"segments": n, "text_bytes": n} deleted from the spool so far (learned, past a cap)."""
  try:
    data = json.loads((Path(root) / "pruned.json").read_text())
    return {"segments": int(data["segments"]), "text_bytes": int(data["text_bytes"])}
  except (OSError, ValueError, KeyError, TypeError):
    return {"segments": 0, "text_bytes": 0}


def add_pruned(root: str | Path, segment: int, text_bytes: int) -> None:
  """Counts a segment about to be deleted, before it is (a crash between the two counts it
  and leaves it: the count may run ahead by a segment, never behind)."""
  total = pruned(root)
  write_atomic(Path(root) / "pruned.json", json.dumps(
      {"segments": total["segments"] + 1, "text_bytes": total["text_bytes"] + text_bytes,
       "last": segment}))


def text_bytes(root: str | Path) -> dict:
  """What the spool holds, in the items' text bytes (what a learner reads): `captured` ever
  (pruned segments included), `sealed` (training ready) and `open` (being filled)."""
  sealed_bytes = open_bytes = 0
  for path in sorted(Path(root).glob("segment-*.txt")):
    if not (m := SEGMENT.match(path.name)):
      continue
    number = int(m.group(1))
    try:
      manifest = json.loads(manifest_path(root, number).read_text())
      if manifest.get("sealed"):  # final: its count is the file's
        sealed_bytes += int(manifest["text_bytes"])
        continue
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
      manifest = {}
    try:  # the open segment (or an old manifest): count its whole items
      n = sum(end - start for _, start, end in items(path.read_bytes()))
    except OSError:
      continue
    if isinstance(manifest, dict) and manifest.get("sealed"):
      sealed_bytes += n
    else:
      open_bytes += n
  gone = pruned(root)["text_bytes"]
  return {"captured": gone + sealed_bytes + open_bytes, "sealed": gone + sealed_bytes,
          "open": open_bytes}

"""The spool: captured text on disk, in segments a learner reads while capture fills the next.

    SPOOL/segment-000001.txt    plain UTF-8: every item is a header line and its text
    SPOOL/segment-000001.json   its manifest: samples, bytes, sources, redactions, ...
    SPOOL/seen.txt              the sha256 of every item captured (duplicates are dropped)

Items are written in the format of `streamlearn/data/spoolfile.py`, appended and
fsynced one by one: a `kill -9` loses at most the item being written, and a
reader that meets a torn last item (shorter than its header says) leaves it.
A segment is sealed when it holds 90% of `segment_bytes` ("training ready": its
manifest says `sealed`, and a line is logged); the next item starts the next
segment at once, so capture never waits for training. Only text that went
through `Capture.offer` (redacted, deduplicated) is ever given to `Spool.add`.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path

from streamlearn.data import spoolfile
from streamlearn.disk import write_atomic

log = logging.getLogger("streamlearn.capture")

SEPARATOR = spoolfile.SEPARATOR.decode()
SEAL_FRACTION = 0.9  # a segment this full is training ready


@dataclasses.dataclass
class Item:
  """One captured text, before prep: what a collector found, and where."""
  text: str
  collector: str   # folders, push, stdin, screen, audio
  source: str      # a path, a client, a window


def normalise(text: str) -> str:
  """The text as dedup compares it: whitespace runs as one space, no edges."""
  return " ".join(text.split())


@dataclasses.dataclass
class Manifest:
  segment: int
  samples: int = 0
  bytes: int = 0
  text_bytes: int = 0   # the items' text alone (what a learner reads): bytes less the headers
  sealed: bool = False
  started: float = dataclasses.field(default_factory=time.time)
  first_item_at: float | None = None
  sealed_at: float | None = None
  sources: dict = dataclasses.field(default_factory=dict)      # collector -> items
  redactions: dict = dataclasses.field(default_factory=dict)   # kind -> count (never values)
  duplicates: int = 0
  skipped: dict = dataclasses.field(default_factory=dict)      # why -> count
  paused_seconds: float = 0.0  # time capture was paused while this segment was open

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)


class Spool:
  """Appends prepared items to the current segment; seals it at 90% of `segment_bytes`."""

  def __init__(self, directory: str | Path, segment_bytes: int):
    self.directory = Path(directory)
    self.directory.mkdir(parents=True, exist_ok=True)
    self.segment_bytes = segment_bytes
    self._seen = self._load_seen()
    numbers = sorted(int(m.group(1)) for p in self.directory.iterdir()
                     if (m := spoolfile.SEGMENT.match(p.name)))
    last = numbers[-1] if numbers else 0
    manifest = self._read_manifest(last) if last else None
    if manifest is None or manifest.sealed:
      manifest = Manifest(segment=last + 1)
    self.manifest = manifest
    self._cut_torn_tail()
    self.sealed_events = 0

  # --- the files -------------------------------------------------------------------------

  def segment_path(self, number: int) -> Path:
    return spoolfile.segment_path(self.directory, number)

  def manifest_path(self, number: int) -> Path:
    return spoolfile.manifest_path(self.directory, number)

  def _read_manifest(self, number: int) -> Manifest | None:
    try:
      return Manifest(**json.loads(self.manifest_path(number).read_text()))
    except (OSError, ValueError, TypeError):
      size = self.segment_path(number).stat().st_size if self.segment_path(number).exists() else 0
      return Manifest(segment=number, bytes=size)  # a crash before the first manifest

  def _cut_torn_tail(self) -> None:
    """A crash mid-item left part of it at the open segment's end: cut it, so the next
    item starts on a whole one (the torn item was never acknowledged as captured)."""
    path = self.segment_path(self.manifest.segment)
    try:
      data = path.read_bytes()
    except FileNotFoundError:
      return
    whole = spoolfile.items(data)
    end = whole[-1][2] if whole else 0
    if end < len(data):
      with open(path, "r+b") as f:
        f.truncate(end)
        os.fsync(f.fileno())
      log.warning(f"{path}: cut a torn item at its end ({len(data) - end} bytes, left by a crash)")
    self.manifest.samples, self.manifest.bytes = len(whole), end
    self.manifest.text_bytes = sum(stop - start for _, start, stop in whole)

  def _load_seen(self) -> set[str]:
    try:
      return set((self.directory / "seen.txt").read_text().split())
    except OSError:
      return set()

  # --- writing ---------------------------------------------------------------------------

  def seen(self, text: str) -> bool:
    return hashlib.sha256(normalise(text).encode()).hexdigest() in self._seen

  def count(self, field: str, key: str, n: int = 1) -> None:
    """Counts something in the current manifest: `skipped` or `redactions` by kind."""
    table = getattr(self.manifest, field)
    table[key] = table.get(key, 0) + n

  def duplicate(self) -> None:
    self.manifest.duplicates += 1

  def add(self, item: Item, redactions: collections.Counter) -> None:
    """Writes one prepared item (redacted, not seen before) whole, then its hash."""
    digest = hashlib.sha256(normalise(item.text).encode()).hexdigest()
    body = (item.text.replace(SEPARATOR, " ") + "\n").encode("utf-8")
    header = (f"{SEPARATOR}{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} "
              f"{item.collector} {len(body)} {' '.join(item.source.split())}\n")
    data = header.encode("utf-8") + body
    _append_synced(self.segment_path(self.manifest.segment), data)
    _append_synced(self.directory / "seen.txt", (digest + "\n").encode())
    self._seen.add(digest)
    m = self.manifest
    m.samples += 1
    m.bytes += len(data)
    m.text_bytes += len(body)
    m.first_item_at = m.first_item_at or time.time()
    m.sources[item.collector] = m.sources.get(item.collector, 0) + 1
    for kind, n in redactions.items():
      m.redactions[kind] = m.redactions.get(kind, 0) + n
    if m.bytes >= SEAL_FRACTION * self.segment_bytes:
      self.seal()
    else:
      self.write_manifest()

  def write_manifest(self) -> None:
    try:
      write_atomic(self.manifest_path(self.manifest.segment), self.manifest.to_json())
    except OSError as err:
      log.warning(f"warning: {self.manifest_path(self.manifest.segment)} not written "
                  f"({err.strerror})")

  def seal(self) -> None:
    """Training ready: this segment is closed, the next item starts the next one."""
    m = self.manifest
    if m.samples == 0:
      return
    m.sealed, m.sealed_at = True, time.time()
    self.write_manifest()
    self.sealed_events += 1
    log.info(f"segment {m.segment} sealed, training ready: {m.samples} items, "
             f"{m.bytes:,} bytes ({self.segment_path(m.segment)})")
    self.manifest = Manifest(segment=m.segment + 1)

  def seal_if_older(self, seconds: float) -> None:
    """Seals the open segment once its first item is `seconds` old (0: never), so a learner
    following the spool lags capture by at most that when text arrives slowly."""
    first = self.manifest.first_item_at
    if seconds > 0 and first is not None and time.time() - first >= seconds:
      self.seal()

  def prune(self, max_bytes: int, max_age_s: float) -> list[int]:
    """Deletes the oldest sealed segments while the spool holds over `max_bytes` (0: no cap)
    or they are older than `max_age_s` (0: no limit) — only those the learner following the
    spool no longer needs (its consumed.json); returns the segments deleted."""
    if not max_bytes and not max_age_s:
      return []
    needed = spoolfile.consumed(self.directory)
    numbers = sorted(int(m.group(1)) for p in self.directory.iterdir()
                     if (m := spoolfile.SEGMENT.match(p.name)))
    total = sum(self.segment_path(n).stat().st_size for n in numbers)
    removed = []
    for n in numbers:
      if n >= needed or n >= self.manifest.segment:
        break
      manifest = self._read_manifest(n)
      too_old = max_age_s and time.time() - (manifest.sealed_at or manifest.started) > max_age_s
      if not manifest.sealed or not (too_old or (max_bytes and total > max_bytes)):
        break
      total -= self.segment_path(n).stat().st_size
      spoolfile.add_pruned(self.directory, n, manifest.text_bytes
                           or _text_bytes(self.segment_path(n)))
      self.segment_path(n).unlink()
      self.manifest_path(n).unlink(missing_ok=True)
      removed.append(n)
    if removed:
      log.info(f"spool: deleted learned segment(s) {', '.join(map(str, removed))} "
               f"({'over capture.max_bytes' if max_bytes and not too_old else 'too old'})")
    return removed

  def close(self) -> None:
    if self.manifest.samples or self.manifest.duplicates or self.manifest.skipped:
      self.write_manifest()


def _append_synced(path: Path, data: bytes) -> None:
  fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
  try:
    view = memoryview(data)
    while view:
      view = view[os.write(fd, view):]
    os.fsync(fd)
  finally:
    os.close(fd)


def _text_bytes(path: Path) -> int:
  """The items' text bytes in a segment (for a manifest written before it counted them)."""
  return sum(end - start for _, start, end in spoolfile.items(path.read_bytes()))


def read_segment(path: str | Path) -> list[tuple[str, str]]:
  """[(header, text)] of a segment's whole items (a torn last item is left out)."""
  data = Path(path).read_bytes()
  return [(header.decode("utf-8", "replace"), data[start:end - 1].decode("utf-8", "replace"))
          for header, start, end in spoolfile.items(data)]

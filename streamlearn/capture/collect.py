"""Capture: collectors find text, `Capture.offer` preps it in memory, the spool keeps it.

Prep happens before any byte reaches the disk: the item is split to at most
`capture.max_item_bytes`, redacted (redact.py: placeholders, counts per kind),
and dropped if the same normalised text was captured before (sha256). What is
skipped is counted in the segment's manifest and said in one line per kind
(repeats of a kind within a minute are only counted).

Collectors here:
- `Folders`: small text files under watched directories. A file is read when it
  is a regular file (never a FIFO, device, socket or symlink), under
  `capture.max_file_bytes` (checked before it is opened), not in a sensitive
  place (`SENSITIVE`, whatever folder is watched), matched by the include and
  not the exclude globs, unchanged for `settle_seconds` (finished being
  written), valid UTF-8 without NUL bytes. A changed file is read again, an
  unchanged one never (`files.json` in the spool remembers size and mtime).
  `watchdog` (inotify) wakes the scan at once where it is installed; a poll
  every `capture.poll_seconds` is the fallback and the safety net.
- Images (OCR) and WAV recordings (speech) dropped in a watched folder: media.py.
- push: see push.py (`POST /ingest` on loopback) and stdin (`--stdin`).
"""

from __future__ import annotations

import collections
import fnmatch
import json
import logging
import os
import shutil
import stat
import threading
import time
from pathlib import Path

from streamlearn.capture import media
from streamlearn.capture.redact import redact
from streamlearn.capture.spool import Item, Spool
from streamlearn.config import CaptureConfig
from streamlearn.disk import write_atomic

log = logging.getLogger("streamlearn.capture")

# Never read, whatever folder is watched: keys, password stores, browser profiles, VCS
# internals, environments. Matched against every component of the path (fnmatch).
SENSITIVE = (
    ".ssh", ".gnupg", ".gpg", ".password-store", ".aws", ".azure", ".kube", ".docker",
    ".netrc", ".pgpass", ".git-credentials", ".npmrc", ".pypirc",
    ".env", ".env.*", "*.env", "*.pem", "*.key", "*.p12", "*.pfx", "*.keystore", "*.jks",
    "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*", "*.kdbx", "*.kdb", "*.1pif", "*.opvault",
    "*.agilekeychain", "*.keychain", "*.keychain-db", "keyring*",
    ".mozilla", ".thunderbird", "google-chrome*", "chromium", "BraveSoftware", "Login Data",
    "Cookies", "*.sqlite", "*.db",
    ".git", ".hg", ".svn", ".venv", "venv", "env", "node_modules", "__pycache__", "site-packages",
)


def sensitive(path: Path) -> bool:
  return any(fnmatch.fnmatch(part, pattern) for part in path.parts for pattern in SENSITIVE)


def split_text(text: str, limit_bytes: int) -> list[str]:
  """Pieces of at most `limit_bytes` in UTF-8, cut at line ends where there are any."""
  pieces, current, size = [], [], 0
  for line in text.splitlines(keepends=True):
    n = len(line.encode("utf-8"))
    while n > limit_bytes:  # one line longer than the limit: cut it by characters
      cut = len(line.encode("utf-8")[:limit_bytes].decode("utf-8", "ignore"))
      if current:
        pieces.append("".join(current))
        current, size = [], 0
      pieces.append(line[:cut])
      line = line[cut:]
      n = len(line.encode("utf-8"))
    if size + n > limit_bytes and current:
      pieces.append("".join(current))
      current, size = [], 0
    current.append(line)
    size += n
  if current:
    pieces.append("".join(current))
  return [p for p in pieces if p.strip()]


class Capture:
  """The prep in front of the spool, shared by every collector (one lock: one writer)."""

  def __init__(self, cfg: CaptureConfig, spool: Spool):
    self.cfg, self.spool = cfg, spool
    self.lock = threading.Lock()
    self.paused = threading.Event()
    self._low_disk = False  # below capture.min_free_mb: nothing is taken until there is room
    self.totals = collections.Counter()      # captured, duplicates, skipped, bytes
    self._said: dict[str, float] = {}

  def offer(self, item: Item) -> int:
    """Preps an item and spools what is new; returns the number of pieces written."""
    written = 0
    with self.lock:
      for piece in split_text(item.text, self.cfg.max_item_bytes):
        text, counts = redact(piece, spoken=item.collector == "speech")
        if self.spool.seen(text):
          self.spool.duplicate()
          self.totals["duplicates"] += 1
          continue
        sealed = self.spool.sealed_events
        # The source goes into the item's header: a path or a title may hold PII too.
        self.spool.add(Item(text, item.collector, redact(item.source)[0]), counts)
        if self.spool.sealed_events != sealed:  # a segment sealed: room to make?
          self.prune()
        self.totals["captured"] += 1
        self.totals["bytes"] += len(text.encode("utf-8"))
        written += 1
      if not written:
        self.spool.write_manifest()
    return written

  def disk_low(self) -> bool:
    """Whether the spool's disk is below `capture.min_free_mb`; says so when that changes.
    Folders are then not scanned (their files are read once there is room) and pushes
    are refused (507), so capture never fills the disk."""
    floor = self.cfg.min_free_mb * 2**20
    try:
      free = shutil.disk_usage(self.spool.directory).free
    except OSError:
      return self._low_disk
    low = free < floor
    if low != self._low_disk:
      self._low_disk = low
      if low:
        log.warning(f"warning: capture paused: {free / 2**20:,.0f} MB free on "
                    f"{self.spool.directory}, below capture.min_free_mb ({self.cfg.min_free_mb:g})"
                    f"; it goes on when there is room")
      else:
        log.info(f"capture resumed: {free / 2**20:,.0f} MB free")
    return low

  def prune(self) -> list[int]:
    """Learned segments past the byte or age cap go (the caller holds the lock)."""
    return self.spool.prune(self.cfg.max_bytes, self.cfg.max_age_days * 86400.0)

  def skip(self, why: str, what: str) -> None:
    """Counts a skipped input; one line per kind a minute (never its contents)."""
    with self.lock:
      self.spool.count("skipped", why)
      self.totals["skipped"] += 1
      now = time.monotonic()
      if now - self._said.get(why, -1e9) >= 60:
        self._said[why] = now
        log.warning(f"skipped {redact(what)[0]}: {why} (more of these are only counted)")


class Folders:
  """Small text files under watched directories."""

  def __init__(self, capture: Capture, folders: list[str]):
    self.capture, self.cfg = capture, capture.cfg
    self.folders = [Path(f).expanduser() for f in folders]
    self.state_path = capture.spool.directory / "files.json"
    try:
      self.known: dict[str, list] = json.loads(self.state_path.read_text())
    except (OSError, ValueError):
      self.known = {}
    self.wake = threading.Event()
    self._observer = None

  def watch(self) -> None:
    """inotify through watchdog where installed: a change wakes the next scan at once."""
    try:
      from watchdog.events import FileSystemEventHandler
      from watchdog.observers import Observer
    except ImportError:
      log.info("watchdog is not installed: folders are polled every "
               f"{self.cfg.poll_seconds:g} s")
      return
    wake = self.wake

    class Wake(FileSystemEventHandler):
      def on_any_event(self, event):
        wake.set()

    self._observer = Observer()
    for folder in self.folders:
      if folder.is_dir():
        self._observer.schedule(Wake(), str(folder), recursive=True)
    self._observer.start()

  def stop(self) -> None:
    if self._observer is not None:
      self._observer.stop()
      self._observer.join()

  def scan(self, settled: bool = True) -> int:
    """One pass over the folders; returns the files captured. `settled`: only files left
    unchanged for settle_seconds (False: everything now, as --once does)."""
    captured = 0
    for folder in self.folders:
      if not folder.is_dir():
        self.capture.skip("not a directory", str(folder))
        continue
      for root, dirs, files in os.walk(folder, followlinks=False):
        here = Path(root)
        dirs[:] = sorted(d for d in dirs if not sensitive(Path(d)))
        for name in sorted(files):
          captured += self._consider(here / name, folder, settled)
    try:
      write_atomic(self.state_path, json.dumps(self.known))
    except OSError as err:
      log.warning(f"warning: {self.state_path} not written ({err.strerror})")
    return captured

  def _consider(self, path: Path, folder: Path, settled: bool) -> int:
    relative = path.relative_to(folder)
    if sensitive(relative) or not self._included(relative):
      return 0
    try:
      st = path.lstat()
    except OSError:  # vanished
      return 0
    key, signature = str(path), [st.st_size, st.st_mtime_ns]
    if self.known.get(key) == signature:
      return 0  # seen as it is now (read, or skipped and counted)
    if not stat.S_ISREG(st.st_mode):  # symlinks, FIFOs, devices, sockets: never opened
      self.known[key] = signature
      self.capture.skip("not a regular file", str(path))
      return 0
    if settled and time.time() - st.st_mtime < self.cfg.settle_seconds:
      return 0  # still being written, perhaps: the next scan takes it
    self.known[key] = signature
    if st.st_size > self.cfg.max_file_bytes:
      self.capture.skip("too large", str(path))
      return 0
    suffix = path.suffix.lower()
    if suffix in media.IMAGE_SUFFIXES or suffix in media.AUDIO_SUFFIXES:
      return self._media(path, suffix)
    try:
      with open(path, "rb") as f:
        data = f.read(self.cfg.max_file_bytes + 1)
    except OSError as err:
      self.capture.skip(f"unreadable ({err.strerror})", str(path))
      return 0
    if len(data) > self.cfg.max_file_bytes:  # it grew while we looked
      self.capture.skip("too large", str(path))
      return 0
    if b"\0" in data[:8192]:
      self.capture.skip("binary", str(path))
      return 0
    try:
      text = data.decode("utf-8")
    except UnicodeDecodeError:
      self.capture.skip("not UTF-8", str(path))
      return 0
    if not text.strip():
      return 0
    return int(self.capture.offer(Item(text, "folders", str(path))) > 0)

  def _media(self, path: Path, suffix: str) -> int:
    """An image through OCR, a recording through speech recognition."""
    image = suffix in media.IMAGE_SUFFIXES
    try:
      text = media.image_text(path) if image else media.speech_text(path)
    except media.MediaError as err:
      self.capture.skip(str(err), str(path))
      return 0
    if not text.strip():
      self.capture.skip("no text in the image" if image else "no speech heard", str(path))
      return 0
    return int(self.capture.offer(Item(text, "ocr" if image else "speech", str(path))) > 0)

  def _included(self, relative: Path) -> bool:
    name = str(relative)
    include = self.cfg.include or ("*",)
    return (any(fnmatch.fnmatch(name, g) or fnmatch.fnmatch(relative.name, g) for g in include)
            and not any(fnmatch.fnmatch(name, g) or fnmatch.fnmatch(relative.name, g)
                        for g in self.cfg.exclude))

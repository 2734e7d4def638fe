"""A run directory: what it holds besides the versions' arrays, and opening it for the tools.

    <run_dir>/config.json     the run's config, written whole when the run starts
    <run_dir>/tokenizer.json  its frozen tokenizer
    <run_dir>/versions/       Orbax versions (checkpoint.py)
    <run_dir>/registry.json   every version, rollback and restore (registry.py)
    <run_dir>/aside/          versions a restore or a rollback moved out of the way: kept
    <run_dir>/tb/             TensorBoard events
    <run_dir>/.lock           held by the one process that writes the directory
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from pathlib import Path
from typing import NamedTuple

from streamlearn.config import Config, ConfigError, config_from_dict
from streamlearn.data.tokenizer import Tokenizer, load_tokenizer, tokenizer_from_json
from streamlearn.distributed import barrier, is_primary
from streamlearn.store.checkpoint import VERSIONS_DIR, Checkpointer, VersionError
from streamlearn.store.registry import Registry

CONFIG_FILE = "config.json"
ASIDE_DIR = "aside"

log = logging.getLogger("streamlearn.run")


class RunError(RuntimeError):
  """A run that cannot start or continue; the message is one line."""


class _Unlocked:
  """The lock of a process that is not process 0: that one holds the run's."""

  def release(self) -> None:
    pass


def lock_run(run_dir: Path) -> RunLock | _Unlocked:
  if not is_primary():
    return _Unlocked()
  try:
    return RunLock(run_dir)
  except VersionError as err:
    raise RunError(str(err)) from None


def run_tokenizer(run_dir: Path, checkpointer: Checkpointer, steps: list[int], *,
                  repair: bool = True) -> Tokenizer:
  """The run's tokenizer: tokenizer.json, or the newest version's copy if that file is lost
  (written back to tokenizer.json when `repair`: the run's own process does, readers do not)."""
  try:
    return load_tokenizer(run_dir)
  except (OSError, ValueError) as err:
    problem = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
  for step in reversed(steps):
    try:
      tokenizer = tokenizer_from_json(checkpointer.read_record(step)[1], f"version {step}")
    except (VersionError, ValueError, KeyError):
      continue
    log.warning(f"warning: {run_dir / 'tokenizer.json'} is unreadable ({problem}); "
                f"restored it from version {step}")
    if repair and is_primary():
      tokenizer.save(run_dir)
    return tokenizer
  raise RunError(f"{run_dir / 'tokenizer.json'}: unreadable ({problem}) and no version has a copy")


class RunDir(NamedTuple):
  path: Path
  config: Config
  checkpointer: Checkpointer
  registry: Registry


def read_config(run_dir: str | Path) -> Config:
  """A run directory's config; a VersionError (one line) if it is not a run directory."""
  config_path = Path(run_dir) / CONFIG_FILE
  if not config_path.is_file():
    raise VersionError(f"{run_dir}: not a run directory (no {CONFIG_FILE})")
  try:
    return config_from_dict(json.loads(config_path.read_text(encoding="utf-8")))
  except (ValueError, ConfigError) as err:
    raise VersionError(f"{config_path}: unreadable ({err})") from None


def open_run(run_dir: str | Path, *, writable: bool = False) -> RunDir:
  """A run directory's config, versions and registry (brought in line with versions/)."""
  path = Path(run_dir)
  config = read_config(path)
  checkpointer = Checkpointer(path, config.checkpoint, writable=writable)
  registry = Registry.open(path, checkpointer.all_steps(),
                           lambda step: checkpointer.read_record(step)[0])
  return RunDir(path, config, checkpointer, registry)


def move_aside(run_dir: Path, steps: list[int], why: str) -> Path | None:
  """Moves versions out of versions/ into aside/<time>-<why>/ (kept, never deleted).

  Over several processes: process 0 moves them, the others wait until it has
  (and get None: the place is process 0's to record).
  """
  if not steps:
    return None
  if not is_primary():
    barrier(f"move-aside-{why}")
    return None
  try:
    return _move_aside(Path(run_dir), steps, why)
  finally:
    barrier(f"move-aside-{why}")


def _move_aside(run_dir: Path, steps: list[int], why: str) -> Path:
  aside = run_dir / ASIDE_DIR / f"{time.strftime('%Y%m%d-%H%M%S')}-{why}"
  n = 1
  while aside.exists():
    n += 1
    aside = aside.with_name(f"{aside.name.rsplit('~', 1)[0]}~{n}")
  aside.mkdir(parents=True)
  # Newest first: a crash halfway leaves the oldest of them as the latest, not a gap.
  for step in sorted(steps, reverse=True):
    os.replace(run_dir / VERSIONS_DIR / str(step), aside / str(step))
  return aside


class RunLock:
  """One writer per run directory: the run, or a restore; never both at once.

  An advisory lock on <run_dir>/.lock that the OS drops when its holder exits,
  so a run killed with SIGKILL never leaves a stale lock behind.
  """

  def __init__(self, run_dir: Path):
    if not Path(run_dir).is_dir():
      raise VersionError(f"{run_dir}: no such run directory")
    self.path = Path(run_dir) / ".lock"
    self._file = open(self.path, "a+")
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      self._file.seek(0)
      holder = self._file.read().strip() or "another process"
      self._file.close()
      raise VersionError(f"{run_dir} is in use by {holder}; stop it first") from None
    self._file.seek(0)
    self._file.truncate()
    self._file.write(f"pid {os.getpid()}")
    self._file.flush()

  def release(self) -> None:
    if not self._file.closed:
      self._file.close()

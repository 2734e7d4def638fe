"""Backups of a run directory: its newest version, on a schedule, the last N kept.

    BACKUPS/20261202T201500Z-v1200/
        versions/0/  versions/1200/      the original and the newest version (Orbax)
        registry.json  tokenizer.json  config.json
        backup.json                      {time, run_dir, step, bytes, score}

A backup is written under a temporary name (`.partial-...`) and renamed into
place when whole, so a crash leaves a partial one that the next start removes,
never a backup that looks whole and is not. Beyond `keep` the oldest are
deleted, never the one being written. `restore_backup` (and `streamlearn
restore --backup`) brings one back into a run directory.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from streamlearn.disk import why, write_atomic

log = logging.getLogger("streamlearn.daemon")

META = "backup.json"
RUN_FILES = ("registry.json", "tokenizer.json", "config.json")
PARTIAL = ".partial-"


class BackupError(OSError):
  """A backup that could not be made or restored; the message is one line."""


def backups(root: str | Path) -> list[tuple[Path, dict]]:
  """The whole backups in `root`, oldest first, with what each says of itself."""
  found = []
  root = Path(root)
  if not root.is_dir():
    return []
  for path in root.iterdir():
    if path.name.startswith(PARTIAL) or not path.is_dir():
      continue
    try:
      meta = json.loads((path / META).read_text())
    except (OSError, ValueError):
      continue
    found.append((path, meta))
  return sorted(found, key=lambda pm: (pm[1].get("time", 0), pm[0].name))


def remove_partial(root: str | Path) -> list[str]:
  """Deletes what a crash left half-written; returns their names."""
  root = Path(root)
  gone = [p.name for p in root.glob(PARTIAL + "*")] if root.is_dir() else []
  for name in gone:
    shutil.rmtree(root / name, ignore_errors=True)
  return gone


def newest_version(run_dir: str | Path) -> tuple[int, dict] | None:
  """(step, registry entry) of the run's newest kept version that is on disk."""
  try:
    registry = json.loads((Path(run_dir) / "registry.json").read_text())
  except (OSError, ValueError):
    return None
  kept = [v for v in registry.get("versions", []) if v.get("status") == "kept"
          and (Path(run_dir) / "versions" / str(v["step"])).is_dir()]
  return (kept[-1]["step"], kept[-1]) if kept else None


def make_backup(run_dir: str | Path, root: str | Path, keep: int) -> Path | None:
  """Copies the run's newest version (and its original) into `root`; keeps the last `keep`.
  None when there is nothing new to back up. Raises BackupError (one line) when it fails."""
  run_dir, root = Path(run_dir), Path(root)
  newest = newest_version(run_dir)
  if newest is None:
    return None
  step, entry = newest
  existing = backups(root)
  if existing and existing[-1][1].get("step") == step and existing[-1][1].get("bytes") == \
      entry.get("bytes"):
    return None  # the newest backup holds this version already
  stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
  name = f"{stamp}-v{step}"
  partial = root / f"{PARTIAL}{name}"
  try:
    root.mkdir(parents=True, exist_ok=True)
    _copy(run_dir, partial, step)
    write_atomic(partial / META, json.dumps(
        {"time": time.time(), "run_dir": str(run_dir.resolve()), "step": step,
         "bytes": entry.get("bytes"), "score": (entry.get("scores") or {}).get("score")},
        indent=1))
    final = root / name
    if final.exists():  # two in one second: the later wins the name
      final = root / f"{name}-{time.monotonic_ns()}"
    partial.rename(final)
  except OSError as err:
    shutil.rmtree(partial, ignore_errors=True)
    raise BackupError(f"backup of version {step} not made: {why(err)}") from None
  rotate(root, keep, final)
  return final


def _copy(run_dir: Path, partial: Path, step: int) -> None:
  versions = partial / "versions"
  versions.mkdir(parents=True)
  for s in sorted({0, step}):
    source = run_dir / "versions" / str(s)
    if source.is_dir():
      shutil.copytree(source, versions / str(s))
  for name in RUN_FILES:
    if (run_dir / name).exists():
      shutil.copy2(run_dir / name, partial / name)


def rotate(root: str | Path, keep: int, current: Path | None = None) -> list[Path]:
  """Deletes the oldest backups beyond `keep` (never `current`); returns them."""
  whole = [p for p, _ in backups(root)]
  gone = [p for p in whole[:max(len(whole) - keep, 0)] if p != current]
  for path in gone:
    shutil.rmtree(path, ignore_errors=True)
  return gone


def last_backup_time(root: str | Path) -> float | None:
  found = backups(root)
  return found[-1][1].get("time") if found else None


def restore_backup(backup: str | Path, run_dir: str | Path | None = None) -> str:
  """Brings a backup back into `run_dir` (default: the run it was taken of); returns what was
  done, in one line. The run's versions are moved aside first (kept, never deleted), and its
  registry with them; then the backup's versions and files are copied in, so `streamlearn run
  --resume` continues from the backup's version. Raises BackupError when it cannot, having
  changed nothing (the backup is checked whole first; a run using the directory stops it)."""
  from streamlearn.store.checkpoint import VersionError
  from streamlearn.store.rundir import RunLock, move_aside

  backup = Path(backup)
  try:
    meta = json.loads((backup / META).read_text())
  except (OSError, ValueError):
    raise BackupError(f"{backup}: not a backup (no readable {META}); nothing changed") from None
  steps = sorted(int(p.name) for p in (backup / "versions").iterdir() if p.name.isdigit()) \
      if (backup / "versions").is_dir() else []
  missing = [n for n in RUN_FILES if not (backup / n).is_file()]
  if meta.get("step") not in steps or missing:
    raise BackupError(f"{backup}: incomplete (versions {steps}, missing "
                      f"{', '.join(missing) or 'nothing'}); nothing changed")
  run_dir = Path(run_dir or meta["run_dir"])
  run_dir.mkdir(parents=True, exist_ok=True)
  try:
    lock = RunLock(run_dir)
  except VersionError as err:
    raise BackupError(f"{err}; nothing changed") from None
  where = None
  try:
    current = sorted(int(p.name) for p in (run_dir / "versions").iterdir()
                     if p.name.isdigit()) if (run_dir / "versions").is_dir() else []
    where = move_aside(run_dir, current, f"before-backup-{backup.name}")
    if where is not None and (run_dir / "registry.json").exists():
      shutil.copy2(run_dir / "registry.json", where / "registry.json")
    for step in steps:
      shutil.copytree(backup / "versions" / str(step), run_dir / "versions" / str(step))
    for name in RUN_FILES:
      text = (backup / name).read_text()
      if name == "registry.json":  # its history, plus this restore
        registry = json.loads(text)
        registry.setdefault("events", []).append(
            {"kind": "restore_backup", "time": time.time(), "backup": str(backup.resolve()),
             "to": meta["step"], "aside": current, "path": str(where) if where else None})
        text = json.dumps(registry, indent=1)
      write_atomic(run_dir / name, text)
  except OSError as err:
    kept = f"; the run's versions are in {where}" if where else ""
    raise BackupError(f"restore from {backup} stopped halfway: {why(err)}{kept}") from None
  finally:
    lock.release()
  moved = (f"; its versions {', '.join(map(str, current))} moved to {where}" if current
           else "")
  return (f"{run_dir} is back at version {meta['step']} from backup {backup.name} "
          f"({meta.get('bytes') or 0:,} bytes seen){moved}. `streamlearn run --run-dir {run_dir} "
          f"--resume` continues from it")

"""A run back to one of its versions, or to its original (version 0, before any learning).

    streamlearn restore --run-dir checkpoints/default --step 3000
    streamlearn restore --run-dir checkpoints/default --original
    streamlearn restore --backup ~/.local/share/streamlearn/backups/20261202T201500Z-v1200

The version is read whole (and its CRC checked) before anything moves; then
every later version is moved to <run_dir>/aside/<time>-restored-to-<N>/ (kept,
never deleted), so the next `streamlearn run --run-dir DIR --resume` continues
from it, at its stream position. The registry records the restore. A missing
or unreadable version, or a run still using the directory, stops with one
line and changes nothing. --backup brings back a daemon's backup (streamlearn/daemon/
backup.py) into the run it was taken of, or --run-dir: the run's versions are moved
aside first, the same way.
"""

from __future__ import annotations

import argparse
import time

from streamlearn.cli.common import error, standalone



def restore(run_dir: str, step: int, *, to_original: bool) -> str:
  """Rolls `run_dir` back to version `step`; returns what was done, in one line."""
  from streamlearn.data.tokenizer import tokenizer_from_json
  from streamlearn.store.checkpoint import VersionError, abstract_like
  from streamlearn.store.rundir import RunLock, move_aside, open_run
  from streamlearn.swarm.swarm import initial_state

  lock = RunLock(run_dir)
  try:
    run = open_run(run_dir, writable=True)
    try:
      # Read it whole before touching anything: a version that cannot restore stops here.
      _, tokenizer_json = run.checkpointer.read_record(step)
      try:
        tokenizer = tokenizer_from_json(tokenizer_json, f"version {step}")
      except (ValueError, KeyError) as err:
        raise VersionError(f"version {step} has an unreadable tokenizer ({err})") from None
      fresh = initial_state(run.config, tokenizer.vocab_size, tokenizer.bos_id)  # or a swarm
      _, record, _ = run.checkpointer.restore(step, abstract_like(fresh))
      later = [s for s in run.checkpointer.all_steps() if s > step]
    finally:
      run.checkpointer.close()
    where = move_aside(run.path, later, f"restored-to-{step}")
    run.registry.mark_aside(later, where)
    run.registry.add_event({"kind": "reset_to_original" if to_original else "restore",
                            "time": time.time(), "to": step, "aside": later,
                            "path": str(where) if where else None})
    run.registry.write()
  finally:
    lock.release()
  moved = (f"; versions {', '.join(map(str, later))} moved to {where}" if later
           else "; no later versions")
  return (f"{run_dir} is back at version {step} ({record['totals']['bytes']:,} bytes seen)"
          f"{moved}. `streamlearn run --run-dir {run_dir} --resume` continues from it")


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--run-dir", metavar="DIR",
                      help="the run (with --backup: default, the run it was taken of)")
  which = parser.add_mutually_exclusive_group(required=True)
  which.add_argument("--backup", metavar="PATH", help="a daemon's backup to bring back")
  which.add_argument("--step", type=int, metavar="N", help="the version to go back to")
  which.add_argument("--original", "--reset-to-base", dest="original", action="store_true",
                     help="go back to the original (version 0, before any learning)")


def command(args: argparse.Namespace) -> int:
  from streamlearn.store.checkpoint import ORIGINAL_STEP, VersionError

  if args.backup:
    from streamlearn.daemon.backup import BackupError, restore_backup
    try:
      print(restore_backup(args.backup, args.run_dir))
    except BackupError as err:
      return error(str(err))
    return 0
  if not args.run_dir:
    return error("--run-dir is needed with --step or --original")
  step = ORIGINAL_STEP if args.original else args.step
  try:
    print(restore(args.run_dir, step, to_original=args.original))
  except VersionError as err:
    return error(f"{err}; nothing changed")
  return 0


main = standalone(add_arguments, command, "streamlearn restore", __doc__.splitlines()[0])

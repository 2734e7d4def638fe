"""Roll a run back to one of its versions, or start it over from its original base.

    python scripts/restore.py --run-dir checkpoints/default --step 3000
    python scripts/restore.py --run-dir checkpoints/default --reset-to-base

The version is read whole (and its CRC checked) before anything moves; then
every later version is moved to <run_dir>/aside/<time>-restored-to-<N>/ (kept,
never deleted), so the next `python -m streamlearn.run --run-dir DIR --resume`
continues from it, at its stream position. The registry records the restore.
A missing or unreadable version, or a run still using the directory, stops
with one line and changes nothing.
"""

from __future__ import annotations

import argparse
import sys
import time

from streamlearn.data.tokenizer import tokenizer_from_json
from streamlearn.run.console import log_to_stderr
from streamlearn.store.checkpoint import BASE_STEP, VersionError, abstract_like
from streamlearn.store.rundir import RunLock, move_aside
from streamlearn.store.rundir import open_run
from streamlearn.swarm.swarm import initial_state


def restore(run_dir: str, step: int, *, reset: bool) -> str:
  """Rolls `run_dir` back to version `step`; returns what was done, in one line."""
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
    kind = "reset_to_base" if reset else "restore"
    run.registry.add_event({"kind": kind, "time": time.time(), "to": step, "aside": later,
                            "path": str(where) if where else None})
    run.registry.write()
  finally:
    lock.release()
  moved = (f"; versions {', '.join(map(str, later))} moved to {where}" if later
           else "; no later versions")
  return (f"{run_dir} is back at version {step} ({record['totals']['bytes']:,} bytes seen)"
          f"{moved}. `python -m streamlearn.run --run-dir {run_dir} --resume` continues from it")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--run-dir", required=True, metavar="DIR")
  which = parser.add_mutually_exclusive_group(required=True)
  which.add_argument("--step", type=int, metavar="N", help="the version to go back to")
  which.add_argument("--reset-to-base", action="store_true",
                     help="go back to the original base (version 0, before any learning)")
  args = parser.parse_args(argv)
  log_to_stderr()
  step = BASE_STEP if args.reset_to_base else args.step
  try:
    print(restore(args.run_dir, step, reset=args.reset_to_base))
  except VersionError as err:
    print(f"error: {err}; nothing changed", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())

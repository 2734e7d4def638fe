"""A run's versions, listed.

    streamlearn versions --run-dir DIR [--all]

Prints one row per version in versions/ (with --all, also the ones rotated
away or moved aside): step (chunks of the stream seen), time, bytes seen,
scores (bits/byte over the last chunks, and since the start), parent version,
learning-rate scale, and which is the original, the latest and the best. Then the
rollbacks and restores. Reading only: a live run is never disturbed.
"""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING

from streamlearn.cli.common import error, standalone

if TYPE_CHECKING:
  from streamlearn.store.registry import Registry



def _when(t: float | None) -> str:
  return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _num(x: float | None, fmt: str) -> str:
  return "-" if x is None else format(x, fmt)


def table(registry: Registry, *, everything: bool = False) -> list[str]:
  """The listing, one line per version."""
  entries = registry.data["versions"] if everything else registry.kept()
  kept = registry.kept()
  latest = kept[-1]["step"] if kept else None
  best = registry.best_step()
  rows = [("step", "time", "bytes seen", "score", "running", "parent", "lr x", "")]
  for e in entries:
    scores = e.get("scores") or {}
    marks = []
    if e.get("status") == "kept":
      marks += ["original"] * (e["step"] == registry.data["original"])
      marks += ["latest"] * (e["step"] == latest) + ["best"] * (e["step"] == best)
      marks += ["rolled back"] * bool(e.get("rolled_back"))
    else:
      marks.append(e.get("status", "?") + (f" ({e['path']})" if e.get("path") else ""))
    rows.append((str(e["step"]), _when(e.get("time")), _num(e.get("bytes"), ","),
                 _num(scores.get("score"), ".4f"), _num(scores.get("running_bpb"), ".4f"),
                 _num(e.get("parent"), "d"), _num(e.get("lr_scale"), "g"), ", ".join(marks)))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
  return ["  ".join(c.rjust(w) if i != 1 else c.ljust(w) for i, (c, w) in
                    enumerate(zip(r, widths))) + ("  " + r[-1] if r[-1] else "") for r in rows]


def describe_event(e: dict) -> str:
  when = _when(e.get("time"))
  if e.get("kind") == "rollback":
    return (f"{when}  rollback at chunk {e['chunk']:,} ({e['detail']}) -> version {e['to']}, "
            f"learning rate x{e['lr_scale']:g}")
  if e.get("kind") == "spike_ignored":
    return (f"{when}  spike at chunk {e['chunk']:,} ({e['detail']}) not rolled back: version "
            f"{e['checked']} does no better on those chunks ({e['checked_bpb']:.3f} bits/byte "
            f"against {e['current_bpb']:.3f})")
  aside = f"; moved aside: {', '.join(map(str, e['aside']))}" if e.get("aside") else ""
  return f"{when}  {e.get('kind', '?').replace('_', ' ')} -> version {e.get('to')}{aside}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--run-dir", required=True, metavar="DIR")
  parser.add_argument("--all", action="store_true",
                      help="also versions rotated away or moved aside")


def command(args: argparse.Namespace) -> int:
  from streamlearn.store.checkpoint import VersionError
  from streamlearn.store.rundir import open_run

  try:
    run = open_run(args.run_dir)
  except VersionError as err:
    return error(str(err))
  run.checkpointer.close()
  print("\n".join(table(run.registry, everything=args.all)))
  for event in run.registry.data["events"]:
    print(describe_event(event))
  return 0


main = standalone(add_arguments, command, "streamlearn versions", __doc__.splitlines()[0])

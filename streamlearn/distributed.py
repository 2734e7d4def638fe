"""One swarm over several processes (hosts): `jax.distributed`, and what each process may do.

Every process runs the same program on the same stream: the same chunks, the
same compiled step over the global member mesh (its own members on its own
devices), the same metrics (the step hands them back replicated), hence the
same host decisions — replacements, rollbacks, versions. The run directory is
one, shared by every process (a network or cluster filesystem across hosts,
as Orbax expects): each process writes its own members' shards of a version,
and process 0 alone writes everything else — the lock, config, tokenizer,
registry, TensorBoard events — and moves versions aside. One process is the
plain case of all of this: every call here is then free.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def initialize(coordinator: str, num_processes: int, process_id: int) -> None:
  """Joins the processes; call before anything touches a JAX device."""
  # CPU processes reach each other through gloo (the tests, CPU-only clusters);
  # GPU processes use NCCL, which JAX picks itself.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id)


# A peer silent this long has died: say so and stop, well before JAX's own heartbeat
# timeout (100 s), after which it aborts with a page of C++ trace.
PEER_TIMEOUT_S = 30.0
_BEAT_S = 2.0

log = logging.getLogger("streamlearn.run")


def watch_peers(run_dir: str | os.PathLike, timeout_s: float | None = None) -> None:
  """Several processes: each touches run_dir/.alive/<process> every few seconds, and stops
  with one line (exit code 3) when another has not for `timeout_s`. Mtimes are compared
  with their own earlier values, never with this host's clock. The versions on disk stay:
  `--resume` goes on from the newest complete one."""
  if not several():
    return
  timeout_s = PEER_TIMEOUT_S if timeout_s is None else timeout_s
  me, folder = jax.process_index(), Path(run_dir) / ".alive"
  folder.mkdir(parents=True, exist_ok=True)
  mine = folder / str(me)
  mine.touch()
  others = [p for p in range(jax.process_count()) if p != me]
  seen = {p: (None, time.monotonic()) for p in others}  # (mtime, when it last changed)

  def watch():
    while True:
      time.sleep(_BEAT_S)
      mine.touch()
      now = time.monotonic()
      for p in others:
        try:
          mtime = (folder / str(p)).stat().st_mtime_ns
        except OSError:
          mtime = None
        if mtime != seen[p][0]:
          seen[p] = (mtime, now)
        elif now - seen[p][1] > timeout_s:
          log.error(f"error: process {p} stopped answering (no sign of it for "
                    f"{now - seen[p][1]:.0f} s); this process stops too; --resume continues "
                    f"from the newest complete version")
          sys.stderr.flush()
          os._exit(3)

  threading.Thread(target=watch, name="watch-peers", daemon=True).start()


def several() -> bool:
  return jax.process_count() > 1


def is_primary() -> bool:
  """Whether this process writes the run directory's shared files (process 0)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process got here (`name` must be the same on all of them)."""
  if several():
    multihost_utils.sync_global_devices(name)


def everywhere() -> NamedSharding:
  """Whole on every device of every process: where a restored version lands first."""
  return NamedSharding(Mesh(np.asarray(jax.devices()), ("all",)), PartitionSpec())


def host_copy(tree: Any) -> Any:
  """A NumPy copy of a pytree whose arrays may be split over processes.

  Collective when some are (each process holds only its members): every
  process must then call it at the same point.
  """
  def local(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      return np.asarray(x)
    if x.is_fully_replicated:  # this process has it whole already
      return np.asarray(x.addressable_data(0))
    return None  # gathered below

  leaves, treedef = jax.tree.flatten(tree)
  if not several():
    return jax.device_get(tree)  # every transfer started at once
  out = [local(x) for x in leaves]
  split = [i for i, x in enumerate(out) if x is None]
  if split:  # one gather for all of them
    gathered = multihost_utils.process_allgather([leaves[i] for i in split], tiled=True)
    for i, x in zip(split, gathered):
      out[i] = np.asarray(x)
  return treedef.unflatten(out)

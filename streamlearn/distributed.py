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

"""A µLM swarm: N learners stacked on a leading member axis, one vmapped step, sharded.

The swarm's state is the single learner's `LearnerState` with every leaf
stacked on axis 0 (N members); each member has its own seed (parameters, key)
and its own `hp` values, which are arrays in the state, so neither recompiles
anything. One jitted step feeds the same chunk to every member: `vmap` of the
learner's own step inside a `shard_map` that splits the member axis over the
devices (one GPU, several, or the CPU), so no member's work ever crosses a
device. Replacements (pbt.py decides them) are one jitted gather over the member
axis and, for each fresh member, the learner's init (jitted with the seed an
array) written into its slot by a jitted `.at[slot].set` (the slot an array too):
the same compiled code for every event.

Dimension letters: N = members, B = streams per member (1), T = tokens per chunk.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from streamlearn.config import Config, SwarmConfig
from streamlearn.distributed import host_copy, several
from streamlearn.learn.build import build, step_shaping
from streamlearn.learn.chunk import Chunk
from streamlearn.learn.state import LearnerState, init_learner
from streamlearn.store.checkpoint import Checkpointer, VersionError, abstract_like
from streamlearn.swarm.pbt import Plan, Population

log = logging.getLogger(__name__)

MEMBER_AXIS = "member"


def member_mesh(size: int) -> Mesh:
  """A 1-D mesh over as many devices as divide the swarm size (all of them, ideally)."""
  devices = jax.devices()
  n = max(d for d in range(1, len(devices) + 1) if size % d == 0)
  if n < len(devices):
    log.info(f"swarm of {size} on {n} of {len(devices)} devices (a device holds a whole "
             f"number of members: make swarm.size a multiple of the device count to use all)")
  return Mesh(np.asarray(devices[:n]), (MEMBER_AXIS,))


class SwarmFns(NamedTuple):
  """The swarm's compiled functions, built once per (config, vocabulary, devices)."""

  mesh: Mesh
  members: NamedSharding  # every state leaf split on its leading (member) axis
  replicated: NamedSharding  # whole on every device: chunks, metrics, replacement plans
  init: Any      # seed -> one member's state, unstacked, with the learner's own hp
  step: Any      # (state, chunk) -> (state, metrics with a leading N axis); state donated
  exploit: Any   # (state, src_N, copied_N, seed_N, hp_N) -> state; state donated
  put: Any       # (state, slot, member state) -> state with that slot replaced; state donated
  copy: Any      # state -> a copy, split alike, that the next (donating) step leaves alone


def build_swarm(config: Config, vocab_size: int, bos_id: int) -> SwarmFns:
  """The jitted swarm functions; runs whose configs differ only in what does not shape the
  step (PBT settings among them) share them."""
  compiled_alike = dataclasses.replace(step_shaping(config),
                                       swarm=SwarmConfig(size=config.swarm.size))
  return _build_swarm(compiled_alike, vocab_size, bos_id)


@functools.cache
def _build_swarm(config: Config, vocab_size: int, bos_id: int) -> SwarmFns:
  predictor, optimizer, step = build(config, vocab_size)
  mesh = member_mesh(config.swarm.size)
  members = NamedSharding(mesh, PartitionSpec(MEMBER_AXIS))
  replicated = NamedSharding(mesh, PartitionSpec())

  def init(seed):
    # The plain learner's init with the seed an array: one compilation serves every member.
    return init_learner(predictor, optimizer, seed=seed, bos_id=bos_id)

  def swarm_step(state: LearnerState, chunk):
    # Every member sees the same chunk; the learner's step is the single-learner one.
    return jax.vmap(step, in_axes=(0, None))(state, chunk)

  spec = PartitionSpec(MEMBER_AXIS)
  # shard_map, not just a sharded jit: each device runs its own members' steps with
  # no collective, whatever the partitioner would make of the scan kernel's loops.
  sharded_step = jax.shard_map(swarm_step, mesh=mesh, in_specs=(spec, PartitionSpec()),
                               out_specs=(spec, spec), check_vma=False)

  def exploit(state: LearnerState, src_N, copied_N, seed_N, hp_N):
    state = jax.tree.map(lambda x: x[src_N], state)
    # A copy gets its own key: two members must never draw the same numbers.
    keys_Nx2 = jax.vmap(jax.random.PRNGKey)(seed_N)
    return state.replace(rng=jnp.where(copied_N[:, None], keys_Nx2, state.rng), hp=hp_N)

  def put(state: LearnerState, slot, member: LearnerState):
    # lr_scale is the safety net's, not the member's: a newcomer learns at the
    # rate the last rollback left the swarm at (every member holds the same).
    member = member.replace(lr_scale=jnp.max(state.lr_scale))
    # The slot is an array, not a constant: any slot, one compilation.
    return jax.tree.map(lambda x, m: x.at[slot].set(m), state, member)

  return SwarmFns(
      mesh=mesh, members=members, replicated=replicated, init=jax.jit(init),
      # The metrics come back whole on every device (N floats each), so every
      # process reads them all and takes the same host decisions.
      step=jax.jit(sharded_step, in_shardings=(members, replicated),
                   out_shardings=(members, replicated), donate_argnums=0),
      exploit=jax.jit(exploit, in_shardings=(members,) + (replicated,) * 4,
                      out_shardings=members, donate_argnums=0),
      put=jax.jit(put, in_shardings=(members, replicated, replicated), out_shardings=members,
                  donate_argnums=0),
      copy=jax.jit(lambda state: jax.tree.map(jnp.copy, state), in_shardings=members,
                   out_shardings=members))


def with_hparams(state: LearnerState, hp: dict[str, float]) -> LearnerState:
  return state.replace(hp={k: jnp.asarray(v, jnp.float32) for k, v in hp.items()})


def first_population(config: Config, fns: SwarmFns) -> Population:
  """The population a new swarm starts with, around the learner's own hp values."""
  # Read from a real state, not a list here: every key the learner has is explored.
  centre_hp = {k: float(v) for k, v in fns.init(np.int32(config.seed)).hp.items()}
  return Population(config.swarm, config.seed, centre_hp)


def initial_state(config: Config, vocab_size: int, bos_id: int) -> LearnerState:
  """A run's state before the first chunk: the plain learner, or the stacked swarm."""
  predictor, optimizer, _ = build(config, vocab_size)
  if config.swarm.size == 1:
    return init_learner(predictor, optimizer, seed=config.seed, bos_id=bos_id)
  fns = build_swarm(config, vocab_size, bos_id)
  first = first_population(config, fns)
  states = [with_hparams(fns.init(np.int32(first.members[m]["seed"])), first.members[m]["hp"])
            for m in first.slots]
  stacked = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *states)
  return jax.device_put(stacked, fns.members)


def member_state(state: LearnerState, slot: int) -> LearnerState:
  """One member's state, unstacked: what the single learner's code takes."""
  # Sliced on the host: an eager slice would compile once per leaf shape.
  return jax.tree.map(lambda x: jnp.asarray(x[slot]), host_copy(state))


class Swarm:
  """A session's swarm: its compiled functions and its host population."""

  def __init__(self, config: Config, vocab_size: int, bos_id: int, saved: dict | None = None):
    self.config = config
    self.fns = build_swarm(config, vocab_size, bos_id)
    self.population = (first_population(config, self.fns) if saved is None
                       else Population(config.swarm, config.seed, saved=saved))

  def place(self, state: LearnerState) -> LearnerState:
    """A state from elsewhere (a checkpoint) split over the devices as the step expects.

    The member sharding is part of the arrays' type: without it the step would
    compile a second time.
    """
    if several():  # each process holds it whole, on the host, and keeps its part
      state = host_copy(state)
    return jax.device_put(state, self.fns.members)

  def snapshot(self, state: LearnerState) -> LearnerState:
    """A device copy to save while the step goes on: over several processes each
    writes its own members' part of a version (checkpoint.py)."""
    return self.fns.copy(state)

  def step(self, state: LearnerState, chunk: Chunk) -> tuple[LearnerState, dict]:
    """The jitted swarm step; over several processes the chunk goes in as one global array."""
    if several():
      chunk = jax.device_put(jax.device_get(chunk), self.fns.replicated)
    return self.fns.step(state, chunk)

  def observe(self, m: dict, n_bytes: float) -> dict:
    """Books one chunk's per-member metrics; returns the leader's as the run's.

    The leader is the one chosen before the chunk was read, so the run's
    bits/byte stay prequential: the prediction it counts was picked on past data.
    """
    leader = self.population.slots.index(self.population.leader)
    self.population.observe(np.asarray(m["bits"], np.float64), n_bytes, m["skipped"] > 0)
    return {k: v[leader] for k, v in m.items()}

  def log(self, writer, step: int) -> None:
    """Per-member curves and the leader, to TensorBoard."""
    for member, score in zip(self.population.slots, self.population.scores_N()):
      if np.isfinite(score):
        writer.add_scalar(f"swarm/member_{member}/bits_per_byte", float(score), step)
    writer.add_scalar("swarm/leader", self.population.leader, step)

  def due(self, total_bytes: int) -> bool:
    return self.population.due(total_bytes)

  def evolve(self, state: LearnerState, total_bytes: int,
             chunk: int) -> tuple[LearnerState, Plan]:
    """One replacement event on the device; the host work is the plan's few small arrays."""
    plan = self.population.plan(total_bytes, chunk)
    if plan.copied_N.any():
      state = self.fns.exploit(state, plan.src_N, plan.copied_N, plan.seed_N, plan.hp_N)
    for slot in np.flatnonzero(plan.fresh_N):  # rare: one init and one put each
      member = self.population.members[self.population.slots[slot]]
      new = with_hparams(self.fns.init(np.int32(member["seed"])), member["hp"])
      state = self.fns.put(state, np.int32(slot), new)
    return state, plan

  def leader_params(self, state: LearnerState, saved: dict | None = None) -> Any:
    """The leader's parameters (of a version's swarm when `saved` is its record's)."""
    pop = self.population if saved is None else Population(self.config.swarm, self.config.seed,
                                                           saved=saved)
    return member_state(state.params, pop.slots.index(pop.leader))

  def rolled_back_to(self, saved: dict) -> None:
    self.population = self.population.rolled_back_to(saved)

  def to_json(self) -> dict:
    return self.population.to_json()


def restore_member(checkpointer: Checkpointer, config: Config, vocab_size: int, bos_id: int,
                   step: int | None, member: str | int = "best"):
  """(state, record, tokenizer) of one member of a version: `best` (the leader) or an id."""
  state = initial_state(config, vocab_size, bos_id)
  state, record, tokenizer = checkpointer.restore(step, abstract_like(state))
  if config.swarm.size == 1:
    if str(member) not in ("best", "0"):
      raise VersionError(f"member {member}: this run has one learner (member 0, also best)")
    return state, record, tokenizer
  pop = Population(config.swarm, config.seed, saved=record["swarm"])
  try:
    slot = pop.slot_of(member)
  except (KeyError, ValueError):
    raise VersionError(f"member {member}: not in this version (members "
                       f"{', '.join(map(str, pop.slots))}, or best)") from None
  return member_state(state, slot), record, tokenizer

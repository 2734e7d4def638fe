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

The swarm predicts together: the step also mixes the members' per-token
predictions (mix.py), with weights that this host side keeps between steps and
every version records; the mixture's score is the run's (`swarm.mix`), the
leader's is reported beside it.

Dimension letters: N = members, B = streams per member (1), T = tokens per chunk.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from streamlearn.config import Config, SwarmConfig
from streamlearn.distributed import host_copy, several
from streamlearn.learn import xla
from streamlearn.learn.build import build, step_shaping
from streamlearn.learn.chunk import Chunk
from streamlearn.learn.prequential import Totals
from streamlearn.learn.state import LearnerState, init_learner
from streamlearn.learn.step import LN2
from streamlearn.store.checkpoint import Checkpointer, VersionError, abstract_like
from streamlearn.swarm.mix import Mixing, mix_chunk, uniform_logw
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
  step: Any      # (state, chunk, Mixing) -> (state, metrics: a leading N axis, and the
                 # mixture's "mix_bits" and "mix_logw_N"); state donated
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

  def members_step(state: LearnerState, chunk):
    # Every member sees the same chunk; the learner's step is the single-learner one
    # (traced, not jitted: only the outer jit may carry compile options, learn/xla.py).
    return jax.vmap(xla.traced(step), in_axes=(0, None))(state, chunk)

  spec = PartitionSpec(MEMBER_AXIS)
  # shard_map, not just a sharded jit: each device runs its own members' steps with
  # no collective, whatever the partitioner would make of the scan kernel's loops.
  sharded_step = jax.shard_map(members_step, mesh=mesh, in_specs=(spec, PartitionSpec()),
                               out_specs=(spec, spec), check_vma=False)

  def swarm_step(state: LearnerState, chunk, mixing: Mixing):
    state, metrics = sharded_step(state, chunk)
    # The mixture, over the whole member axis (N x T numbers gathered: a swarm has one stream).
    if chunk.tokens_BxT.shape[0] != 1:
      raise ValueError("a swarm learns one stream: chunks are [1, T]")
    logw_N, mix_nll_T = mix_chunk(mixing.logw_N, metrics.pop("token_nll")[:, 0],
                                  chunk.mask_BxT[0], mixing.eta, mixing.share)
    metrics.update(mix_bits=jnp.sum(mix_nll_T) / LN2, mix_logw_N=logw_N)
    return state, metrics

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
      step=xla.jit(swarm_step, in_shardings=(members, replicated, replicated),
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
  """A session's swarm: its compiled functions, its host population, and its mixture's
  weights and scores."""

  def __init__(self, config: Config, vocab_size: int, bos_id: int, saved: dict | None = None):
    self.config = config
    self.fns = build_swarm(config, vocab_size, bos_id)
    self.population = (first_population(config, self.fns) if saved is None
                       else Population(config.swarm, config.seed, saved=saved))
    self._load_mix(saved, with_scores=True)

  def _load_mix(self, saved: dict | None, with_scores: bool) -> None:
    """The mixture's weights (and, with_scores, its and the leader's running scores) from a
    version's record; uniform (and none) for a new swarm or a version that predates them."""
    mix = (saved or {}).get("mix")
    logw = uniform_logw(self.config.swarm.size) if mix is None else mix["logw"]
    self._set_logw(np.asarray(logw, np.float32))
    if with_scores:
      self.scores = {name: Totals(**(mix or {}).get("scores", {}).get(name, {}))
                     for name in ("mixture", "leader")}

  def _set_logw(self, logw_N: np.ndarray) -> None:
    # The host copy is the weights after the last chunk booked (what a version records);
    # the device one after the last step dispatched, which the next step reads.
    self.logw_N = logw_N
    self._logw_device = jax.device_put(logw_N, self.fns.replicated)

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
    """The jitted swarm step; over several processes the chunk goes in as one global array.

    The mixture's weights go from this step's output to the next step's input on the
    device: nothing waits for the host.
    """
    if several():
      chunk = jax.device_put(jax.device_get(chunk), self.fns.replicated)
    cfg = self.config.swarm
    state, metrics = self.fns.step(state, chunk, Mixing(self._logw_device,
                                                        np.float32(cfg.mix_eta),
                                                        np.float32(cfg.mix_share)))
    self._logw_device = metrics["mix_logw_N"]
    return state, metrics

  def observe(self, m: dict, n_bytes: float, n_tokens: int = 0,
              unscored_until: int = 0) -> dict:
    """Books one chunk's per-member metrics; returns the run's: the leader's, with the
    score the mixture's when `swarm.mix` (and both beside: `leader_bits`, `mixture_bits`).

    The leader is the one chosen before the chunk was read, and the mixture's weights
    come from earlier tokens only, so the run's bits/byte stay prequential.
    """
    leader = self.population.slots.index(self.population.leader)
    self.population.observe(np.asarray(m["bits"], np.float64), n_bytes, m["skipped"] > 0)
    self.logw_N = np.asarray(m["mix_logw_N"], np.float32)
    run = {k: v[leader] for k, v in m.items() if k not in ("mix_bits", "mix_logw_N")}
    run["leader_bits"], run["mixture_bits"] = float(run["bits"]), float(m["mix_bits"])
    skipped = bool(run["skipped"])  # the run's rule for both: the leader's update
    for name in ("mixture", "leader"):
      self.scores[name].add(n_bytes, n_tokens, run[f"{name}_bits"], skipped, unscored_until)
    if self.config.swarm.mix:
      bits = run["mixture_bits"]
      run.update(bits=bits, bits_per_byte=bits / max(float(run["bytes"]), 1.0),
                 bits_per_token=bits / max(float(run["tokens"]), 1.0))
    return run

  def log(self, writer, step: int, m: dict | None = None) -> None:
    """Per-member curves, the leader, the mixture's weights, both scores, to TensorBoard."""
    weights_N = np.exp(self.logw_N - np.logaddexp.reduce(self.logw_N))
    for member, score, weight in zip(self.population.slots, self.population.scores_N(),
                                     weights_N):
      if np.isfinite(score):
        writer.add_scalar(f"swarm/member_{member}/bits_per_byte", float(score), step)
      writer.add_scalar(f"swarm/member_{member}/mix_weight", float(weight), step)
    writer.add_scalar("swarm/leader", self.population.leader, step)
    for name, totals in self.scores.items():
      if m is not None:
        writer.add_scalar(f"swarm/{name}/bits_per_byte",
                          m[f"{name}_bits"] / max(float(m["bytes"]), 1.0), step)
      if math.isfinite(totals.bits_per_byte):
        writer.add_scalar(f"swarm/{name}/bits_per_byte_running", totals.bits_per_byte, step)

  def describe(self) -> str:
    """The run's score's company, for its last line: '' before anything is scored."""
    mixture, leader = (self.scores[k].bits_per_byte for k in ("mixture", "leader"))
    if not (math.isfinite(mixture) and math.isfinite(leader)):
      return ""
    if self.config.swarm.mix:
      return f" (the {self.config.swarm.size} members' mixture; the leader alone: {leader:.4f})"
    return f" (the leader's; the {self.config.swarm.size} members' mixture: {mixture:.4f})"

  def due(self, total_bytes: int) -> bool:
    return self.population.due(total_bytes)

  def evolve(self, state: LearnerState, total_bytes: int,
             chunk: int) -> tuple[LearnerState, Plan]:
    """One replacement event on the device; the host work is the plan's few small arrays.

    A copy takes its source's mixture weight (the same predictions); a fresh member the
    lowest weight there is (it has predicted nothing yet).
    """
    plan = self.population.plan(total_bytes, chunk)
    if plan.copied_N.any():
      state = self.fns.exploit(state, plan.src_N, plan.copied_N, plan.seed_N, plan.hp_N)
    for slot in np.flatnonzero(plan.fresh_N):  # rare: one init and one put each
      member = self.population.members[self.population.slots[slot]]
      new = with_hparams(self.fns.init(np.int32(member["seed"])), member["hp"])
      state = self.fns.put(state, np.int32(slot), new)
    if plan.copied_N.any() or plan.fresh_N.any():
      logw_N = np.where(plan.copied_N, self.logw_N[plan.src_N], self.logw_N)
      self._set_logw(np.where(plan.fresh_N, logw_N.min(), logw_N).astype(np.float32))
    return state, plan

  def leader_params(self, state: LearnerState, saved: dict | None = None) -> Any:
    """The leader's parameters (of a version's swarm when `saved` is its record's)."""
    pop = self.population if saved is None else Population(self.config.swarm, self.config.seed,
                                                           saved=saved)
    return member_state(state.params, pop.slots.index(pop.leader))

  def rolled_back_to(self, saved: dict, restream: bool = True) -> None:
    """The swarm of a restored version; its running scores go back only with the stream."""
    self.population = self.population.rolled_back_to(saved)
    self._load_mix(saved, with_scores=restream)

  def to_json(self) -> dict:
    return {**self.population.to_json(),
            "mix": {"logw": self.logw_N.tolist(),
                    "scores": {k: dataclasses.asdict(t) for k, t in self.scores.items()}}}


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

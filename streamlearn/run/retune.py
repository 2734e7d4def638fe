"""What a resume may change in a run, what it must keep, and where its stream goes on.

A run's state fixes part of its config: the network, the `delta.lag` slots of
the forecast ring, the replay buffer, and whether an EMA teacher, a frozen
anchor or a surprise head is kept at all. A resume must keep those. The weights
the step reads from the state (`LearnerState.hp`) and the frozen anchor itself
are the user's to change when resuming, e.g. a stronger KL guard towards the
model as it is now before streaming new data (docs/benchmarks.md, forgetting).
The version being resumed, not the run's first config, says what the state
holds now, so a change is applied once and a rollback behind it re-applies it.
A version's stream position goes on only in the source it was read from.
"""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from streamlearn.config import Config
from streamlearn.data.sources import Source
from streamlearn.data.tokenizer import tokenizer_from_json
from streamlearn.learn.state import LearnerState
from streamlearn.store.checkpoint import VersionError
from streamlearn.store.rundir import RunError, open_run
from streamlearn.swarm.pbt import Population
from streamlearn.swarm.swarm import member_state, restore_member

log = logging.getLogger("streamlearn.run")

# Keys that fix the shapes of the state.
FROZEN_ON_RESUME = ("model", "match", "tokenizer", "data.chunk_tokens", "delta.lag",
                    "delta.forecast_tokens", "delta.forecast_channel", "replay.capacity",
                    "replay.tokens", "swarm.size")
# Zero removes a part of the state (the teacher, the anchor, the surprise head): a
# resume may change the weight, not turn the part on or off.
_OFF_AT_ZERO = ("delta.consistency", "delta.kl", "delta.residual")
# The state's array hyperparameters, by the config key that sets them.
HP_OF_KEY = {"delta.consistency": "consistency", "delta.kl": "kl",
             "delta.ema_decay": "ema_decay", "delta.gate_temperature": "gate_temperature",
             "replay.weight": "replay"}


def _get(tree: dict, key: str):
  for part in key.split("."):
    tree = tree.get(part)
  return tree


def check_resumable(saved: dict, current: dict) -> None:
  """Raises a one-line RunError naming the first key a resume cannot change."""
  for key in FROZEN_ON_RESUME:
    check_same(saved, current, key)
  for key in _OFF_AT_ZERO:
    was, now = _get(saved, key), _get(current, key)
    if bool(was) != bool(now):
      raise RunError(f"{key}: this run was made with {was!r}, the config says {now!r}; a resume "
                     f"can change this weight but not turn its part {'on' if now else 'off'}; "
                     f"start a new --run-dir")


def changed_hparams(config: Config, now: dict[str, float]) -> dict[str, tuple[str, float]]:
  """{hp name: (config key, the config's value)} for each that differs from the state's `now`.

  Compared in float32, the state's precision: 0.01 stays "unchanged".
  """
  changed = {}
  for key, name in HP_OF_KEY.items():
    section, field = key.split(".")
    want = getattr(getattr(config, section), field)
    if name in now and np.float32(want) != np.float32(now[name]):
      changed[name] = (key, float(want))
  return changed


def retuned(config: Config, state: LearnerState, record: dict, first_anchor: str,
            population: Population | None) -> tuple[LearnerState, str]:
  """(state, the anchor its KL guard now holds to) for a restored version under this config.

  `record` is the version's; `first_anchor` the run's first config's `delta.anchor`,
  for versions from before each recorded its own. A swarm's `population` takes
  the new values too. Logs each change.
  """
  # A swarm's members explore their own values around the centre its record keeps.
  now = (population.centre_hp if population is not None
         else {k: float(np.asarray(v)) for k, v in state.hp.items()})
  changed = changed_hparams(config, now)
  if changed:
    hp = dict(state.hp)
    for name, (key, value) in changed.items():
      hp[name] = jnp.full(np.shape(hp[name]), value, jnp.float32)
      log.info(f"{key}: {now[name]:g} -> {value:g} from the config"
               + (", for every member" if population is not None else ""))
    state = state.replace(hp=hp)
    if population is not None:
      population.set_hparams({name: v for name, (_, v) in changed.items()})
  held = record.get("anchor", record.get("base", first_anchor))  # ("base": older versions)
  wanted = config.delta.anchor
  if wanted and wanted != held and state.delta is not None and state.delta.anchor is not None:
    # The anchor's own recurrent state starts where the student's is: exact when the
    # new anchor is this run's newest version, the usual case.
    state = state.replace(delta=state.delta.replace(
        anchor=guard_anchor(config, wanted, state.params),
        anchor_rec=jax.tree.map(jnp.array, state.carry.rec_state)))
    log.info(f"delta.anchor: the KL guard now holds to {wanted} (was {held or 'the run start'})")
    held = wanted
  return state, held


def guard_anchor(config: Config, spec: str, params):
  """The named frozen anchor `spec`, shaped like `params` (stacked for a swarm)."""
  if config.swarm.size == 1:
    return named_anchor(spec, params)
  # Every member is guarded by the same model (the session places the copies).
  one = named_anchor(spec, member_state(params, 0))
  return jax.tree.map(
      lambda x: np.broadcast_to(np.asarray(x), (config.swarm.size,) + x.shape).copy(), one)


def same_source(saved_name: str | None, source: Source) -> bool:
  """Whether a version's position is in `source`: the same file or directory, not a pipe."""
  if saved_name is None or source.kind == "stdin":
    return False
  return os.path.realpath(saved_name) == os.path.realpath(source.name)


def check_same(saved: dict, current: dict, key: str) -> None:
  node_s, node_c = saved, current
  for part in key.split("."):
    node_s, node_c = node_s.get(part), node_c.get(part)
  if node_s != node_c:
    raise RunError(f"{key}: this run was made with {node_s!r}, the config says {node_c!r}; "
                   f"resume with the run's own config or start a new --run-dir")


def named_anchor(spec: str, like_params):
  """The parameters of version STEP (default: the newest) of run RUN_DIR, for `delta.anchor`
  (a swarm's: its leader's).

  Parameters the named run lacks (the forecast channel, when it learned
  without one) keep this run's start values: the anchor never reads a forecast.
  """
  run_dir, _, step = spec.partition("@")
  try:
    run = open_run(run_dir)
  except VersionError as err:
    raise RunError(f"delta.anchor: {err}") from None
  try:
    if step and not step.isdigit():
      raise VersionError(f"{spec}: expected RUN_DIR or RUN_DIR@STEP")
    _, tokenizer_json = run.checkpointer.read_record(
        int(step) if step else run.checkpointer.latest_step())
    tokenizer = tokenizer_from_json(tokenizer_json, spec)
    state, _, _ = restore_member(run.checkpointer, run.config, tokenizer.vocab_size,
                                 tokenizer.bos_id, int(step) if step else None, "best")
  except (VersionError, ValueError, TypeError) as err:
    raise RunError(f"delta.anchor: {err}") from None
  finally:
    run.checkpointer.close()
  named = dict(state.params)
  for key, value in like_params.items():
    got = named.get(key)
    if got is None:
      named[key] = value
    elif jax.tree.map(jnp.shape, got) != jax.tree.map(jnp.shape, value):
      raise RunError(f"delta.anchor: {spec} has a different model ({key} differs in shape)")
  extra = set(named) - set(like_params)
  return {k: v for k, v in named.items() if k not in extra}

"""What a resume may change in a run, and what it must keep.

A run's state fixes part of its config: the network, the `delta.lag` slots of
the forecast ring, the replay buffer, and whether an EMA teacher, a frozen
base or a surprise head is kept at all. A resume must keep those. The weights
the step reads from the state (`LearnerState.hp`) and the frozen base itself
are the user's to change when resuming, e.g. a stronger KL guard towards the
model as it is now before streaming new data (docs/benchmarks.md, forgetting).
The version being resumed, not the run's first config, says what the state
holds now, so a change is applied once and a rollback behind it re-applies it.
"""

from __future__ import annotations

import numpy as np

from streamlearn.config import Config
from streamlearn.run_files import RunError, check_same

# Keys that fix the shapes of the state.
FROZEN_ON_RESUME = ("model", "match", "tokenizer", "data.chunk_tokens", "delta.lag",
                    "delta.forecast_tokens", "delta.forecast_channel", "replay.capacity",
                    "replay.tokens", "swarm.size")
# Zero removes a part of the state (the teacher, the base, the surprise head): a
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

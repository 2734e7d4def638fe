"""Population-based training, host side: member scores, who replaces whom, the lineage.

A swarm has N slots; each holds one member (an id that is never reused). Every
`interval_bytes` of the stream, `plan` ranks the members by their rolling
bits/byte and replaces the worst `bottom_quantile` of them (those past
`grace_bytes` of age) by
  copy   a member of the best `top_quantile` (its whole state, exploit), with
         every hyperparameter multiplied by one of `perturb`, or with
         probability `resample_prob` drawn afresh from the initial range (explore);
  fresh  with probability `fresh_prob`: a new member from the start (a new seed,
         hyperparameters drawn from the initial range), so new models keep coming.
The device applies a `Plan` with one jitted gather and, per fresh member, a jitted init
(swarm.py); this file is NumPy and JSON only, and its state goes into every
version's record, so a resumed run replaces exactly the members an
uninterrupted one would.

Hyperparameters are the keys of `LearnerState.hp`, all treated alike: x' = x f,
except keys ending in `_decay`, which live in (0, 1) and move as
1 - x' = (1 - x) f. A hyperparameter at 0 stays 0 (off stays off).

Dimension letters: N = swarm members (slots), W = chunks in the score window.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from streamlearn.config import SwarmConfig
from streamlearn.store.registry import registry_view

_DECAY_SUFFIX = "_decay"
_DECAY_EPS = 1e-6  # keeps a decay strictly inside (0, 1) in float32


@dataclasses.dataclass
class Plan:
  """One replacement event, for the device: every slot's source, seed and hyperparameters."""

  src_N: np.ndarray       # int32: the slot each slot's state is copied from (itself if kept)
  copied_N: np.ndarray    # bool: slots that take a copy of another member
  fresh_N: np.ndarray     # bool: slots re-initialised from the start
  seed_N: np.ndarray      # int32: each slot's member seed (new members: their new seed)
  hp_N: dict[str, np.ndarray]  # float32: every slot's hyperparameters after the event


def scale_hparam(name: str, value: float, factor: float) -> float:
  """`value` moved by `factor`: multiplied, or for a *_decay its distance to 1 multiplied."""
  if name.endswith(_DECAY_SUFFIX):
    return float(np.clip(1.0 - (1.0 - value) * factor, _DECAY_EPS, 1.0 - _DECAY_EPS))
  return value * factor


class Population:
  """The swarm's host state: slots, lineage, score windows, the next event."""

  def __init__(self, cfg: SwarmConfig, seed: int, centre_hp: dict[str, float] | None = None,
               saved: dict | None = None):
    """A new population around `centre_hp` (the learner's own values), or a saved one."""
    self.cfg, self.seed = cfg, seed
    if saved is not None:
      self._load(saved)
      return
    self.centre_hp = dict(centre_hp)
    N = cfg.size
    rng = np.random.default_rng([seed, 0])
    self.members: dict[int, dict] = {}
    for i in range(N):  # member 0 is the plain learner: the run's seed, the centre values
      hp = self.centre_hp if i == 0 else self._resampled(rng)
      self.members[i] = _entry(i, None, "centre" if i == 0 else "initial", seed + i, 0, 0, hp)
    self.slots = list(range(N))
    self.next_id, self.events, self.next_bytes = N, 0, cfg.interval_bytes
    # The last W chunks' bits and bytes per slot (0 bytes: skipped, or before the member's birth).
    self.bits_WxN = np.zeros((0, N))
    self.bytes_WxN = np.zeros((0, N))
    self.leader = 0

  # --- scores -------------------------------------------------------------------------------

  def observe(self, bits_N: np.ndarray, n_bytes: float, skipped_N: np.ndarray) -> None:
    """Books one chunk's bits per slot; a skipped update (NaN/Inf) counts no bytes and no bits."""
    ok_N = ~np.asarray(skipped_N, bool) & np.isfinite(bits_N)
    W = self.cfg.score_chunks
    self.bits_WxN = np.concatenate([self.bits_WxN, np.where(ok_N, bits_N, 0.0)[None]])[-W:]
    self.bytes_WxN = np.concatenate([self.bytes_WxN, np.where(ok_N, n_bytes, 0.0)[None]])[-W:]
    self.leader = self.slots[self.leader_slot()]

  def scores_N(self) -> np.ndarray:
    """Rolling bits/byte per slot; inf where a member has no scored chunk yet."""
    n_bytes_N = self.bytes_WxN.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
      return np.where(n_bytes_N > 0, self.bits_WxN.sum(0) / n_bytes_N, np.inf)

  def leader_slot(self) -> int:
    """The best slot among members with the fullest windows (a lucky few chunks never lead)."""
    counts_N = (self.bytes_WxN > 0).sum(0)
    scores_N = np.where(counts_N == counts_N.max(initial=0), self.scores_N(), np.inf)
    return int(np.argmin(scores_N)) if np.isfinite(scores_N).any() else 0

  # --- replacement --------------------------------------------------------------------------

  def due(self, total_bytes: int) -> bool:
    return self.cfg.size > 1 and total_bytes >= self.next_bytes

  def plan(self, total_bytes: int, chunk: int) -> Plan:
    """Decides one event: who is replaced, by what; updates the lineage."""
    cfg, N = self.cfg, self.cfg.size
    self.events += 1
    while self.next_bytes <= total_bytes:
      self.next_bytes += cfg.interval_bytes
    rng = np.random.default_rng([self.seed, self.events])
    scores_N = self.scores_N()
    for slot, member in enumerate(self.slots):
      score = float(scores_N[slot])
      self.members[member]["scores"].append([chunk, score if math.isfinite(score) else None])
    n_top = min(max(1, round(N * cfg.top_quantile)), N - 1)
    n_bottom = min(max(1, round(N * cfg.bottom_quantile)), N - n_top)
    order = np.argsort(scores_N, kind="stable")  # best first; members with no score last
    top = [int(s) for s in order[:n_top]]
    src_N = np.arange(N, dtype=np.int32)
    copied_N, fresh_N = np.zeros(N, bool), np.zeros(N, bool)
    for slot in (int(s) for s in order[::-1][:n_bottom]):
      old = self.members[self.slots[slot]]
      if total_bytes - old["born_bytes"] < cfg.grace_bytes:
        continue
      new_id = self.next_id
      self.next_id += 1
      if rng.random() < cfg.fresh_prob:
        fresh_N[slot] = True
        entry = _entry(new_id, None, "fresh", self.seed + new_id, chunk, total_bytes,
                       self._resampled(rng))
      else:
        src = top[int(rng.integers(len(top)))]
        src_N[slot], copied_N[slot] = src, True
        parent = self.members[self.slots[src]]
        entry = _entry(new_id, parent["id"], "copy", self.seed + new_id, chunk, total_bytes,
                       self._explored(parent["hp"], rng))
      old["died_chunk"] = chunk
      self.members[new_id] = entry
      self.slots[slot] = new_id
      # A copy's recent past is its parent's (same parameters, same chunks); a fresh
      # member has none, so it leads only once its window is as full as the others'.
      src = src_N[slot] if copied_N[slot] else None
      self.bits_WxN[:, slot] = 0.0 if src is None else self.bits_WxN[:, src]
      self.bytes_WxN[:, slot] = 0.0 if src is None else self.bytes_WxN[:, src]
    self.leader = self.slots[self.leader_slot()]
    return Plan(src_N, copied_N, fresh_N, self.seeds_N(), self.hp_N())

  def _resampled(self, rng: np.random.Generator) -> dict[str, float]:
    """Hyperparameters drawn from the initial range: centre x [1/spread, spread], log-uniform."""
    log_spread = math.log(self.cfg.init_spread)
    return {k: scale_hparam(k, v, math.exp(rng.uniform(-log_spread, log_spread)))
            for k, v in sorted(self.centre_hp.items())}

  def _explored(self, hp: dict[str, float], rng: np.random.Generator) -> dict[str, float]:
    """A copy's hyperparameters: each perturbed, or resampled with probability resample_prob."""
    resampled = self._resampled(rng)
    out = {}
    for k in sorted(hp):
      if rng.random() < self.cfg.resample_prob:
        out[k] = resampled[k]
      else:
        out[k] = scale_hparam(k, hp[k], float(rng.choice(self.cfg.perturb)))
    return out

  def set_hparams(self, values: dict[str, float]) -> None:
    """Every living member, and the centre new ones are drawn around, takes these values."""
    self.centre_hp.update(values)
    for m in self.slots:
      self.members[m] = {**self.members[m], "hp": {**self.members[m]["hp"], **values}}

  # --- views ------------------------------------------------------------------------------

  def seeds_N(self) -> np.ndarray:
    return np.asarray([self.members[m]["seed"] for m in self.slots], np.int32)

  def hp_N(self) -> dict[str, np.ndarray]:
    return {k: np.asarray([self.members[m]["hp"][k] for m in self.slots], np.float32)
            for k in sorted(self.centre_hp)}

  def slot_of(self, member: str | int) -> int:
    """The slot of member `best` (the leader) or of a member id; KeyError if not alive."""
    if member == "best":
      return self.slots.index(self.leader)
    member = int(member)
    if member not in self.slots:
      raise KeyError(member)
    return self.slots.index(member)

  def registry_view(self) -> dict:
    return registry_view(self.to_json())

  def to_json(self) -> dict:
    return {"centre_hp": self.centre_hp, "slots": self.slots,
            "members": [self.members[m] for m in sorted(self.members)],
            "next_id": self.next_id, "events": self.events, "next_bytes": self.next_bytes,
            "bits": self.bits_WxN.tolist(), "bytes": self.bytes_WxN.tolist(),
            "leader": self.leader}

  def _load(self, saved: dict) -> None:
    N = self.cfg.size
    # ("base_hp": versions saved before the name changed)
    self.centre_hp = {k: float(v) for k, v in saved.get("centre_hp", saved.get("base_hp")).items()}
    self.slots = [int(m) for m in saved["slots"]]
    self.members = {int(e["id"]): dict(e) for e in saved["members"]}
    self.next_id, self.events = int(saved["next_id"]), int(saved["events"])
    self.next_bytes = int(saved["next_bytes"])
    self.bits_WxN = np.asarray(saved["bits"], np.float64).reshape(-1, N)
    self.bytes_WxN = np.asarray(saved["bytes"], np.float64).reshape(-1, N)
    self.leader = int(saved["leader"])

  def rolled_back_to(self, saved: dict) -> "Population":
    """The population of a restored version; members born since stay in the lineage, marked."""
    restored = Population(self.cfg, self.seed, saved=saved)
    restored.next_id = max(restored.next_id, self.next_id)  # ids are never reused
    for member, entry in self.members.items():
      if member not in restored.members:
        restored.members[member] = {**entry, "rolled_back": True}
    return restored


def _entry(member: int, parent: int | None, kind: str, seed: int, chunk: int, n_bytes: int,
           hp: dict[str, float]) -> dict:
  """A lineage entry; `scores` gets [chunk, rolling bits/byte] at every event."""
  return {"id": member, "parent": parent, "kind": kind, "seed": seed, "born_chunk": chunk,
          "born_bytes": n_bytes, "died_chunk": None, "hp": dict(hp), "scores": []}


"""Which model answers a request: a multi-armed bandit over the pool, learning from feedback.

Each model is an arm with a Beta posterior over "the user liked the answer"
(α = 1 + liked, β = 1 + disliked; a score in [0, 1] counts fractionally).
Because the models keep learning, old feedback is discounted: at every rating
each arm's counts shrink toward the prior by `discount`, so an arm remembers
about 1 / (1 - discount) ratings. Policies:

- `thompson` (default): draw from every posterior, take the best draw;
- `ucb1`: posterior mean plus sqrt(2 ln N / n) (unrated arms first);
- `egreedy`: the best posterior mean.

On top of any policy a fraction `explore` of requests goes to an arm drawn
uniformly, so a model that started badly can still show that it improved.
The state is a small JSON map written whole (`disk.write_atomic`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path

from streamlearn.disk import write_atomic

POLICIES = ("thompson", "ucb1", "egreedy")


@dataclasses.dataclass
class Arm:
  alpha: float = 1.0   # 1 + discounted liked
  beta: float = 1.0    # 1 + discounted disliked
  pulls: int = 0       # requests answered
  ratings: int = 0     # ratings received (not discounted)

  @property
  def mean(self) -> float:
    return self.alpha / (self.alpha + self.beta)

  @property
  def rated(self) -> float:
    """Discounted number of ratings."""
    return self.alpha + self.beta - 2.0


class Bandit:
  """Arms by model id; `choose` a model for a request, `rate` its answer."""

  def __init__(self, policy: str = "thompson", explore: float = 0.1, discount: float = 0.999,
               seed: int | None = None):
    if policy not in POLICIES:
      raise ValueError(f"bandit policy {policy!r}: expected one of {', '.join(POLICIES)}")
    if not 0.0 <= explore <= 1.0 or not 0.0 < discount <= 1.0:
      raise ValueError("bandit: explore must be in [0, 1] and discount in (0, 1]")
    self.policy, self.explore, self.discount = policy, explore, discount
    self.arms: dict[str, Arm] = {}
    self._random = random.Random(seed)

  def add(self, model_id: str) -> None:
    """A new model enters with the prior."""
    self.arms.setdefault(model_id, Arm())

  def remove(self, model_id: str) -> None:
    self.arms.pop(model_id, None)

  def choose(self, among: list[str] | None = None) -> str:
    """The model for the next request (among `among`, default every arm)."""
    ids = sorted(among if among is not None else self.arms)
    if not ids:
      raise LookupError("no model to choose from")
    for i in ids:
      self.add(i)
    if len(ids) == 1 or self._random.random() < self.explore:
      chosen = self._random.choice(ids)
    elif self.policy == "thompson":
      chosen = max(ids, key=lambda i: self._random.betavariate(self.arms[i].alpha,
                                                               self.arms[i].beta))
    elif self.policy == "ucb1":
      chosen = max(ids, key=self._upper_bound(ids))
    else:
      chosen = max(ids, key=lambda i: (self.arms[i].mean, self._random.random()))
    self.arms[chosen].pulls += 1
    return chosen

  def _upper_bound(self, ids: list[str]):
    total = sum(self.arms[i].rated for i in ids)

    def bound(i: str) -> float:
      n = self.arms[i].rated
      if n < 1e-9:
        return math.inf
      return self.arms[i].mean + math.sqrt(2.0 * math.log(max(total, 1.0)) / n)

    return bound

  def rate(self, model_id: str, score: float) -> None:
    """Feedback on one answer: a score in [0, 1] (thumbs up 1, down 0)."""
    if not 0.0 <= score <= 1.0:
      raise ValueError(f"score {score}: expected a number in [0, 1]")
    for arm in self.arms.values():  # the models keep learning: old ratings fade
      arm.alpha = 1.0 + self.discount * (arm.alpha - 1.0)
      arm.beta = 1.0 + self.discount * (arm.beta - 1.0)
    arm = self.arms.setdefault(model_id, Arm())
    arm.alpha += score
    arm.beta += 1.0 - score
    arm.ratings += 1

  def worst(self, among: list[str]) -> str:
    """The arm to drop first: the lowest posterior mean among those rated (ties: fewer pulls)."""
    return min(among, key=lambda i: (self.arms.get(i, Arm()).mean,
                                     self.arms.get(i, Arm()).pulls, i))

  # --- persistence ------------------------------------------------------------------------

  def to_json(self) -> dict:
    return {"policy": self.policy, "explore": self.explore, "discount": self.discount,
            "arms": {i: dataclasses.asdict(a) for i, a in sorted(self.arms.items())}}

  def save(self, path: str | Path) -> None:
    write_atomic(path, json.dumps(self.to_json(), indent=1))

  def load(self, path: str | Path) -> bool:
    """Takes the arms saved at `path` (keeping this bandit's policy settings); False when
    there is no readable file."""
    try:
      saved = json.loads(Path(path).read_text())
      self.arms = {i: Arm(**a) for i, a in saved["arms"].items()}
    except (OSError, ValueError, KeyError, TypeError):
      return False
    return True

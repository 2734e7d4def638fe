"""What the server's handlers share: the pool, the bandit, the answers awaiting feedback."""

from __future__ import annotations

import collections
import datetime
import logging
import threading
import time
from pathlib import Path

from streamlearn.capture.collect import Capture
from streamlearn.capture.spool import Item
from streamlearn.config import ServeConfig
from streamlearn.serve.bandit import Bandit
from streamlearn.serve.pool import Model, Pool
from streamlearn.serve.protocol import AUTO, BadRequest

log = logging.getLogger("streamlearn.serve")


def iso(t: float) -> str:
  return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat().replace(
      "+00:00", "Z")


class Service:
  """What the handlers share: the pool, the bandit, the answers awaiting feedback."""

  def __init__(self, pool: Pool, bandit: Bandit, cfg: ServeConfig, state_path: Path | None,
               use: Capture | None = None):
    """`use`: where prompts and liked answers go when the models learn from their use
    (serve.learn_from_use): a capture spool, redacted and deduplicated like any capture."""
    self.pool, self.bandit, self.cfg, self.state_path = pool, bandit, cfg, state_path
    self.use = use
    self.slots = threading.BoundedSemaphore(cfg.max_concurrent)
    self.answers: collections.OrderedDict[str, dict] = collections.OrderedDict()
    self.lock = threading.Lock()  # the bandit and the answers
    self.started = time.time()

  def pick(self, name: str) -> Model:
    if name not in AUTO:
      model = self.pool.get(name)
      if model is None:
        raise BadRequest(404, f"model {name!r} not found (GET /api/tags lists the pool)")
      with self.lock:
        self.bandit.add(name)
        self.bandit.arms[name].pulls += 1
      return model
    for _ in range(3):  # the pool may change between the choice and the lookup
      ids = self.pool.ids()
      if not ids:
        break
      with self.lock:
        chosen = self.bandit.choose(ids)
      model = self.pool.get(chosen)
      if model is not None:
        return model
    raise BadRequest(503, "no model in the pool yet (is a run directory's first version saved?)")

  def remember(self, request_id: str, model_id: str, prompt: str) -> None:
    if self.use is not None and prompt.strip():
      self.use.offer(Item(prompt, "use", f"prompt to {model_id}"))
    with self.lock:
      self.answers[request_id] = {"model": model_id, "rated": False, "prompt": prompt,
                                  "text": None}

  def answered(self, request_id: str, text: str) -> None:
    """The whole answer, kept (while it can be rated) for learning from a thumbs up."""
    with self.lock:
      if request_id in self.answers:
        self.answers[request_id]["text"] = text
      while len(self.answers) > self.cfg.remember_answers:
        self.answers.popitem(last=False)

  def rate(self, body: dict) -> dict:
    request_id, score = body.get("id"), body.get("score")
    if not isinstance(request_id, str):
      raise BadRequest(400, "id: expected the id of an answer")
    if isinstance(score, bool) or not isinstance(score, (int, float)):
      raise BadRequest(400, "score: expected +1, -1 or a number in [0, 1]")
    if score == -1:
      score = 0.0
    if not 0.0 <= score <= 1.0:
      raise BadRequest(400, "score: expected +1, -1 or a number in [0, 1]")
    with self.lock:
      answer = self.answers.get(request_id)
      if answer is None:
        raise BadRequest(404, f"answer {request_id!r} not found (too old, or never given)")
      if answer["rated"]:
        raise BadRequest(409, f"answer {request_id!r} is rated already")
      answer["rated"] = True
      self.bandit.rate(answer["model"], float(score))
      liked = score >= 0.5 and answer["text"]
      arm = self.bandit.arms[answer["model"]]
      if self.state_path is not None:
        try:
          self.bandit.save(self.state_path)
        except OSError as err:
          log.warning(f"warning: {self.state_path} not written ({err.strerror})")
    if liked and self.use is not None:  # a liked answer, in its prompt's context
      self.use.offer(Item(answer["prompt"] + answer["text"], "use",
                          f"liked answer of {answer['model']}"))
    return {"id": request_id, "model": answer["model"], "posterior": arm.mean,
            "ratings": arm.ratings}

  def pool_table(self) -> dict:
    rows = []
    with self.lock:
      for model_id in self.pool.ids():
        model = self.pool.get(model_id)
        arm = self.bandit.arms.get(model_id)
        if model is None or arm is None:
          continue
        c = model.candidate
        rows.append({"id": model_id, "run": str(c.run_dir), "version": c.step,
                     "member": c.member, "bits_per_byte": c.bits_per_byte,
                     "pulls": arm.pulls, "ratings": arm.ratings, "posterior": arm.mean,
                     "alpha": arm.alpha, "beta": arm.beta, "parameters": model.n_params})
    return {"policy": self.bandit.policy, "explore": self.bandit.explore,
            "discount": self.bandit.discount, "size": self.pool.size, "models": rows}

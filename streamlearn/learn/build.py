"""One place that builds a config's learner: the plain step, or the delta learner's."""

from __future__ import annotations

import functools

from streamlearn.config import Config
from streamlearn.learn.delta_step import make_delta_step
from streamlearn.learn.state import make_optimizer, make_predictor
from streamlearn.learn.step import make_plain_step


@functools.cache
def build(config: Config, vocab_size: int):
  """(predictor, optimizer, step) for a config and a vocabulary size; cached, so
  runs in one process with the same config share one compiled step."""
  predictor = make_predictor(config, vocab_size)
  optimizer = make_optimizer(config.optim, config.match.lr_mult)
  make_step = make_plain_step if predictor.delta is None else make_delta_step
  return predictor, optimizer, make_step(predictor, optimizer, config.optim)

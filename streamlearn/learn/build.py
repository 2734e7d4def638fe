"""One place that builds a config's learner: the plain step, or the delta learner's."""

from __future__ import annotations

import dataclasses
import functools

from streamlearn.config import Config, DeltaConfig, ReplayConfig
from streamlearn.learn.delta import delta_spec
from streamlearn.learn.delta_step import make_delta_step
from streamlearn.learn.state import make_optimizer, make_predictor
from streamlearn.learn.step import make_plain_step


def build(config: Config, vocab_size: int):
  """(predictor, optimizer, step) for a config and a vocabulary size.

  Cached by what shapes the step, so every run in one process whose config
  differs only elsewhere (name, seed, checkpoints, logs, the safety net, the
  anchor's path, swarm settings) shares one compiled step.
  """
  return _build(step_shaping(config), vocab_size)


def step_shaping(config: Config) -> Config:
  """The config with only what shapes the compiled step kept; the rest at its defaults
  (the delta learner's settings too, when every part of it is off)."""
  delta, replay = dataclasses.replace(config.delta, anchor=DeltaConfig.anchor), config.replay
  if delta_spec(config.delta, config.replay, config.data.chunk_tokens) is None:
    delta, replay = DeltaConfig(), ReplayConfig()
  return Config(model=config.model, match=config.match, counts=config.counts,
                mixer=config.mixer, tokenizer=config.tokenizer, data=config.data,
                optim=config.optim, replay=replay, delta=delta)


@functools.cache
def _build(config: Config, vocab_size: int):
  predictor = make_predictor(config, vocab_size)
  optimizer = make_optimizer(config.optim, config.match.lr_mult,
                             config.mixer.lr_mult if config.mixer.enabled else None)
  make_step = make_plain_step if predictor.delta is None else make_delta_step
  return predictor, optimizer, make_step(predictor, optimizer, config.optim)


def forget_built() -> None:
  """Drops every cached learner, so the next `build` traces anew (after a test patches a part)."""
  _build.cache_clear()

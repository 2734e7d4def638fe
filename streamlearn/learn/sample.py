"""Sampling a continuation from a learner's state: the step's own logits, then the user's options.

The logits each token is drawn from are `Predictor.read_next`'s: what the step
would score that token with, given the same text (tests/test_generate.py checks
it for every kind of learner). The options then shape the draw:

  temperature         logits / T; 0 is greedy (the most likely token)
  top_k               only the k most likely tokens (0: all)
  top_p               only the smallest set of tokens whose probability reaches p (1: all)
  repetition_penalty  a token among the last `window` ones has its logit divided by it when
                      positive, multiplied when negative (CTRL's form; 1: off)
The special tokens (start of stream, padding) are never drawn; the document
separator may be, and ends a generation (api.py).

Tokens are drawn in blocks of a fixed size (one compiled scan serves every
length); the host stops between blocks at max_tokens or a stop string.

Dimension letters: B = streams (1), V = vocabulary, W = repetition window, K = forecast tokens.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from streamlearn.learn import xla
from streamlearn.learn.state import Carry, Predictor
from streamlearn.nn.model import ForecastInput

BLOCK = 32   # tokens drawn per compiled call
WINDOW = 64  # tokens the repetition penalty looks back over


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is drawn from the model's logits."""

  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  repetition_penalty: float = 1.0

  def __post_init__(self):
    checks = ((self.temperature >= 0, "temperature", ">= 0"),
              (self.top_k >= 0, "top_k", ">= 0 (0: all tokens)"),
              (0 < self.top_p <= 1, "top_p", "in (0, 1]"),
              (self.repetition_penalty > 0, "repetition_penalty", "> 0"))
    for ok, name, want in checks:
      if not ok:
        raise ValueError(f"{name} must be {want}; got {getattr(self, name)}")

  def arrays(self):
    """The options as arrays: changing one never recompiles the sampler."""
    return (jnp.float32(self.temperature), jnp.int32(self.top_k), jnp.float32(self.top_p),
            jnp.float32(self.repetition_penalty))


def shaped_logits(logits_V, recent_W, never_V, temperature, top_k, top_p, penalty):
  """The logits a token is drawn from: penalised, masked, tempered, cut to top-k and top-p.

  recent_W: the last tokens (-1: none yet); never_V: bool, tokens that are never drawn.
  """
  V = logits_V.shape[0]
  logits_V = logits_V.astype(jnp.float32)
  seen_V = jnp.zeros((V,), bool).at[jnp.where(recent_W >= 0, recent_W, V)].set(
      True, mode="drop")  # (-1, none yet, goes to V: out of range, dropped)
  logits_V = jnp.where(seen_V, jnp.where(logits_V > 0, logits_V / penalty, logits_V * penalty),
                       logits_V)
  logits_V = jnp.where(never_V, -jnp.inf, logits_V)
  logits_V = logits_V / jnp.where(temperature > 0, temperature, 1.0)
  sorted_V = jnp.sort(logits_V)[::-1]  # most likely first
  kth = sorted_V[jnp.clip(top_k, 1, V) - 1]
  logits_V = jnp.where((top_k > 0) & (logits_V < kth), -jnp.inf, logits_V)
  # Nucleus: keep a token if the tokens likelier than it hold less than top_p.
  probs_V = jax.nn.softmax(jnp.where((top_k > 0) & (sorted_V < kth), -jnp.inf, sorted_V))
  before_V = jnp.cumsum(probs_V) - probs_V
  keep_V = (before_V < top_p) | (top_p >= 1.0)
  last = jnp.max(jnp.where(keep_V & (sorted_V > -jnp.inf), jnp.arange(V), 0))
  return jnp.where(logits_V < sorted_V[last], -jnp.inf, logits_V)


def draw(key, logits_V, temperature) -> jax.Array:
  """A token from shaped logits: the most likely at temperature 0."""
  return jnp.where(temperature > 0, jax.random.categorical(key, logits_V),
                   jnp.argmax(logits_V)).astype(jnp.int32)


def forecast_at(forecast_K, forecast_on, position) -> ForecastInput:
  """The delta learner's forecast input [1, 1] at a chunk position (off past its K tokens)."""
  K = forecast_K.shape[0]
  on = forecast_on & (position < K)
  token = forecast_K[jnp.clip(position, 0, K - 1)]
  return ForecastInput(jnp.reshape(token, (1, 1)), jnp.reshape(on.astype(jnp.float32), (1, 1)))


@functools.cache
def block_sampler(predictor: Predictor):
  """Jitted: BLOCK tokens drawn one by one from (carry, chunk position, recent tokens).

  sample(params, carry, position, recent_W, key, never_V, options, forecast_K, forecast_on)
    -> (tokens [BLOCK], carry, position, recent_W)
  """
  channel = predictor.lm.forecast_channel

  def sample(params, carry: Carry, position, recent_W, key, never_V, options, forecast_K,
             forecast_on):
    temperature, top_k, top_p, penalty = options

    def one(state, key_i):
      carry, position, recent_W = state
      forecast = forecast_at(forecast_K, forecast_on, position) if channel else None
      logits_1xV, after = predictor.read_next(params, carry, forecast)
      logits_V = shaped_logits(logits_1xV[0], recent_W, never_V, temperature, top_k, top_p,
                               penalty)
      token = draw(key_i, logits_V, temperature)
      recent_W = jnp.concatenate([recent_W[1:], token[None]])
      return (predictor.with_next(after, token[None]), position + 1, recent_W), token

    (carry, position, recent_W), tokens = jax.lax.scan(
        one, (carry, position, recent_W), jax.random.split(key, BLOCK))
    return tokens, carry, position, recent_W

  return xla.jit(sample)


@functools.cache
def walker(predictor: Predictor):
  """Jitted: the carry after the first n of T tokens, read as the step reads a chunk
  (beside the forecast at chunk positions `start`...)."""
  channel = predictor.lm.forecast_channel

  def walk(params, carry: Carry, tokens_1xT, n, start, forecast_K, forecast_on):
    forecast = None
    if channel:
      T, K = tokens_1xT.shape[1], forecast_K.shape[0]
      position_T = start + jnp.arange(T)
      on_T = forecast_on & (position_T < K)
      forecast = ForecastInput(forecast_K[jnp.clip(position_T, 0, K - 1)][None],
                               on_T.astype(jnp.float32)[None])
    return predictor.read_along(params, carry, tokens_1xT, jnp.reshape(n, (1,)), forecast)

  return xla.jit(walk)


@functools.cache
def next_logits(predictor: Predictor):
  """Jitted: the next token's logits [1, V] after a carry, at a chunk position."""
  channel = predictor.lm.forecast_channel

  def logits(params, carry: Carry, position, forecast_K, forecast_on):
    forecast = forecast_at(forecast_K, forecast_on, position) if channel else None
    return predictor.next_logits(params, carry, forecast)

  return xla.jit(logits)

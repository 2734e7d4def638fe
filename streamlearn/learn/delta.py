"""Two-stream delta learning: the learner forecasts, then learns from how reality differed.

One tick = one chunk. At tick t the real chunk x_t arrives and the step
  1. scores x_t (prequential, as the plain learner does), reading beside it
     the forecast of x_t made at tick t-1 (the second input stream);
  2. files x_t in a ring of `lag` slots, with the state it started from, its
     match features, the forecast made for it, and what the EMA teacher and the
     frozen anchor made of it;
  3. learns from the slot of chunk t-lag+1: the real tokens, read with their
     forecast (made at tick t-lag), dropped on a fraction of tokens ("reality
     injection") so the model never comes to trust its own forecasts; losses:
     cross-entropy, consistency to the EMA teacher, optionally the residual
     linearisation, KL to the frozen anchor; all scaled by a gate that shrinks
     the step when the forecast was uncertain; plus a prioritized replay batch;
  4. forecasts x_{t+1}: an open-loop rollout of K tokens from the state after
     x_t, with the parameters just updated.
lag = 0 makes no forecasts and learns from x_t in the very pass that scored
it: the plain learner, with the teacher, anchor and replay still available.
With `arrival` (lag >= 1) step 1 is also a learning step: the plain learner's
update from the pass that scored x_t, so every chunk is learned twice — as it
arrives, and `lag` ticks later beside its forecast, from where the first
update left the parameters.

The forecaster rolls the µLM alone (no match features: the match model's
tables hold only real history), so forecasts are the network's own belief.

Dimension letters: L = lag slots, B = streams, T = chunk tokens, K = forecast
tokens, V = vocabulary, D = d_model, R = replayed tokens per entry, S = samples.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from streamlearn.config import DeltaConfig, ReplayConfig
from streamlearn.learn import replay as replay_lib
from streamlearn.nn.match import MatchFeatures
from streamlearn.nn.model import LM, ForecastInput


@dataclasses.dataclass(frozen=True)
class DeltaSpec:
  """What the delta learner keeps and does, fixed for a run (it shapes the state)."""

  delta: DeltaConfig
  replay: ReplayConfig
  chunk_tokens: int

  @property
  def forecasting(self) -> bool:
    return self.delta.lag >= 1

  @property
  def channel(self) -> bool:
    return self.forecasting and self.delta.forecast_channel

  @property
  def teacher(self) -> bool:
    return self.delta.consistency > 0

  @property
  def anchor(self) -> bool:
    return self.delta.kl > 0

  @property
  def replaying(self) -> bool:
    return self.replay.capacity > 0


def delta_spec(delta: DeltaConfig, replay: ReplayConfig, chunk_tokens: int) -> DeltaSpec | None:
  """The spec, or None when every part is off (the plain learner's step is used)."""
  spec = DeltaSpec(delta, replay, chunk_tokens)
  if spec.forecasting or spec.teacher or spec.anchor or spec.replaying:
    return spec
  return None


@flax.struct.dataclass
class Forecast:
  token_BxK: jax.Array       # int32: the rollout's tokens
  logp_BxKxV: jax.Array      # float32: its log-probabilities at each step
  made_at: jax.Array         # int32: the tick that made it; -1 = none (before the stream)


@flax.struct.dataclass
class Observed:
  """A chunk as it was met at its tick: everything learning from it later needs."""

  tokens_BxT: jax.Array
  mask_BxT: jax.Array
  last_token_B: jax.Array    # the token before the chunk
  rec_state: Any             # the student's recurrent state before the chunk
  match: MatchFeatures | None
  forecast: Forecast | None  # the forecast made for this chunk (lag >= 1)
  teacher_hidden_BxTxD: jax.Array | None  # the EMA teacher's view of the real chunk
  anchor_logp_BxTxV: jax.Array | None     # the frozen anchor's prediction of it
  bits_per_token: jax.Array  # its prequential score: the replay priority
  tick: jax.Array            # int32: the tick it arrived at


@flax.struct.dataclass
class DeltaState:
  ring: Observed | None      # [L, ...]: the last `lag` chunks (lag >= 1)
  pending: Forecast | None   # the forecast of the next chunk (lag >= 1)
  teacher: Any               # EMA teacher parameters
  teacher_rec: Any           # ...and its own recurrent state along the stream
  anchor: Any                # the KL guard's frozen parameters (never updated)
  anchor_rec: Any            # ...and their own recurrent state along the stream
  entropy_ref: jax.Array     # running mean of forecast entropy (nats/token), the gate's centre
  replay: replay_lib.ReplayBuffer | None


# --- the pieces --------------------------------------------------------------------------------


def empty_forecast(batch: int, K: int, vocab: int) -> Forecast:
  """No forecast yet: uniform, made at tick -1 (the channel and gate ignore it)."""
  return Forecast(jnp.zeros((batch, K), jnp.int32),
                  jnp.full((batch, K, vocab), -math.log(vocab), jnp.float32),
                  jnp.full((), -1, jnp.int32))


def rollout(lm: LM, params, rec_state, last_token_B, K: int, key, temperature: float,
            tick) -> Forecast:
  """An open-loop forecast of the next K tokens from `rec_state` (greedy at temperature 0)."""
  B = last_token_B.shape[0]
  none = None
  if lm.match_len:  # no match predictions: length 0 everywhere
    zeros_Bx1xO = jnp.zeros((B, 1, lm.match_orders), jnp.int32)
    none = MatchFeatures(zeros_Bx1xO, zeros_Bx1xO)
  one_B = jnp.ones((B,), jnp.int32)

  def one_token(c, key_k):
    rec, token_B = c
    logits_Bx1xV, rec = lm.apply(params, token_B[:, None], rec, one_B, none)
    logp_BxV = jax.nn.log_softmax(logits_Bx1xV[:, 0].astype(jnp.float32))
    if temperature > 0:
      next_B = jax.random.categorical(key_k, logp_BxV / temperature).astype(jnp.int32)
    else:
      next_B = jnp.argmax(logp_BxV, axis=-1).astype(jnp.int32)
    return (rec, next_B), (next_B, logp_BxV)

  _, (token_KxB, logp_KxBxV) = jax.lax.scan(one_token, (rec_state, last_token_B),
                                            jax.random.split(key, K))
  return Forecast(token_KxB.T, jnp.swapaxes(logp_KxBxV, 0, 1), jnp.asarray(tick, jnp.int32))


def forecast_input(forecast: Forecast, T: int, keep_BxK=None) -> ForecastInput:
  """The forecast as the trunk's second input: on for its K positions (where kept)."""
  B, K = forecast.token_BxK.shape
  on_BxK = jnp.broadcast_to((forecast.made_at >= 0).astype(jnp.float32), (B, K))
  if keep_BxK is not None:
    on_BxK = on_BxK * keep_BxK
  pad = ((0, 0), (0, T - K))
  return ForecastInput(jnp.pad(forecast.token_BxK, pad), jnp.pad(on_BxK, pad))


def forecast_surprise(forecast: Forecast, tokens_BxT, mask_BxT):
  """(surprise [B, K] in nats of the real tokens under the forecast, mask [B, K])."""
  K = forecast.token_BxK.shape[1]
  real_BxK = tokens_BxT[:, :K]
  surprise_BxK = -jnp.take_along_axis(forecast.logp_BxKxV, real_BxK[..., None], -1)[..., 0]
  return surprise_BxK, mask_BxT[:, :K]


def entropy(forecast: Forecast) -> jax.Array:
  """Mean entropy of the forecast's distributions, nats/token."""
  return jnp.mean(-jnp.sum(jnp.exp(forecast.logp_BxKxV) * forecast.logp_BxKxV, axis=-1))


def gate(entropy_nats, entropy_ref, temperature, gate_min):
  """The update's scale: 1 at the running mean entropy, less when more uncertain, up to 2.

  2 sigmoid((ref - H) / temperature), never below gate_min: non-increasing in H.
  """
  return jnp.maximum(2.0 * jax.nn.sigmoid((entropy_ref - entropy_nats) / temperature), gate_min)


def ema(teacher, params, decay):
  """teacher <- decay * teacher + (1 - decay) * params, leaf by leaf."""
  return jax.tree.map(lambda t, p: decay * t + (1.0 - decay) * p, teacher, params)


def kl_to_anchor(logp_BxTxV, anchor_logp_BxTxV, mask_BxT):
  """Mean over real tokens of KL(student || anchor), nats."""
  kl_BxT = jnp.sum(jnp.exp(logp_BxTxV) * (logp_BxTxV - anchor_logp_BxTxV), axis=-1)
  return jnp.sum(kl_BxT * mask_BxT) / jnp.maximum(jnp.sum(mask_BxT), 1.0)


def masked_mean(x_BxT, mask_BxT):
  return jnp.sum(x_BxT * mask_BxT) / jnp.maximum(jnp.sum(mask_BxT), 1.0)


# --- state ---------------------------------------------------------------------------------------


def init_delta(spec: DeltaSpec, lm: LM, params, rec_state, batch: int) -> DeltaState:
  """The delta learner's state before the stream: teacher = anchor = the starting parameters."""
  V = lm.vocab_size
  ring = pending = None
  if spec.forecasting:
    K = spec.delta.forecast_tokens
    pending = empty_forecast(batch, K, V)
    one = _observed_like(spec, lm, params, rec_state, batch, pending)
    ring = jax.tree.map(lambda x: jnp.zeros((spec.delta.lag,) + x.shape, x.dtype), one)
  buffer = None
  if spec.replaying:
    R = spec.replay.tokens
    example = replay_lib.ReplayEntry(
        tokens_BxR=jnp.zeros((batch, R), jnp.int32), mask_BxR=jnp.zeros((batch, R), jnp.float32),
        last_token_B=jnp.zeros((batch,), jnp.int32), rec_state=rec_state,
        match=_zero_match(lm, batch, R))
    buffer = replay_lib.init_replay(spec.replay.capacity, example)
  copy = lambda tree: jax.tree.map(jnp.array, tree)  # own buffers: the step donates the state
  return DeltaState(
      ring=ring, pending=pending,
      teacher=copy(params) if spec.teacher else None,
      teacher_rec=copy(rec_state) if spec.teacher else None,
      anchor=copy(params) if spec.anchor else None,
      anchor_rec=copy(rec_state) if spec.anchor else None,
      entropy_ref=jnp.full((), jnp.nan, jnp.float32), replay=buffer)


def _zero_match(lm: LM, batch: int, T: int) -> MatchFeatures | None:
  if not lm.match_len:
    return None
  zeros = jnp.zeros((batch, T, lm.match_orders), jnp.int32)
  return MatchFeatures(zeros, zeros)


def _observed_like(spec: DeltaSpec, lm: LM, params, rec_state, batch: int,
                   forecast: Forecast) -> Observed:
  T, D, V = spec.chunk_tokens, lm.cfg.d_model, lm.vocab_size
  return Observed(
      tokens_BxT=jnp.zeros((batch, T), jnp.int32), mask_BxT=jnp.zeros((batch, T), jnp.float32),
      last_token_B=jnp.zeros((batch,), jnp.int32), rec_state=rec_state,
      match=_zero_match(lm, batch, T), forecast=forecast,
      teacher_hidden_BxTxD=jnp.zeros((batch, T, D), jnp.float32) if spec.teacher else None,
      anchor_logp_BxTxV=jnp.zeros((batch, T, V), jnp.float32) if spec.anchor else None,
      bits_per_token=jnp.zeros((), jnp.float32), tick=jnp.zeros((), jnp.int32))


def ring_put(ring: Observed, slot, entry: Observed) -> Observed:
  return jax.tree.map(lambda all_, x: all_.at[slot].set(x), ring, entry)


def ring_get(ring: Observed, slot) -> Observed:
  return jax.tree.map(lambda all_: all_[slot], ring)


def replay_entry(spec: DeltaSpec, entry: Observed) -> replay_lib.ReplayEntry:
  """A learned chunk's opening, as the replay buffer keeps it."""
  R = spec.replay.tokens
  match = None if entry.match is None else MatchFeatures(*(f[:, :R] for f in entry.match))
  return replay_lib.ReplayEntry(entry.tokens_BxT[:, :R], entry.mask_BxT[:, :R],
                                entry.last_token_B, entry.rec_state, match)

"""The learner's state: one pytree a jitted step takes and returns, and how it starts.

A learner is a `Predictor` (the µLM plus the match model) with an optimizer;
its `LearnerState` holds everything that changes along a stream: parameters,
optimizer state, the `Carry` (recurrent state, last token, match history),
the step count, the key, the safety net's learning-rate scale, the array
hyperparameters and, for the delta learner, its `DeltaState`.

Dimension letters: B = streams (1 for the CLI), T = tokens per chunk, V = vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax

from streamlearn.config import Config, ConfigError, CountsConfig, MatchConfig, OptimConfig
from streamlearn.learn.chunk import NEWLINE, last_real_token, line_positions, shift_in
from streamlearn.learn.delta import DeltaSpec, DeltaState, delta_spec, init_delta
from streamlearn.nn.counts import (CountFeatures, CountState, counts_append, counts_next,
                                   counts_update, init_counts, n_contexts)
from streamlearn.nn.match import (MatchFeatures, MatchState, init_match, match_update,
                                  with_last_token)
from streamlearn.nn.model import LINE_POSITIONS, LM, ForecastInput


@flax.struct.dataclass
class Carry:
  """What a stream carries from chunk to chunk besides the parameters."""

  rec_state: Any           # the model's recurrent state (per layer h and conv tail)
  last_token_B: jax.Array  # int32: the token before the next chunk (not yet read by the model)
  match: MatchState | None  # the match model's history and tables (None: match model off)
  counts: CountState | None = None  # the count models' recent tokens and tables (None: off)
  # int32: how many tokens precede the next one on its line, at most LINE_POSITIONS - 1
  # (None: the model does not read line positions)
  line_position_B: jax.Array | None = None


@flax.struct.dataclass
class LearnerState:
  params: Any
  opt_state: Any
  carry: Carry
  step: jax.Array          # int32: chunks learned from so far
  rng: jax.Array           # uint32[2]: the run's key; each step folds in `step`
  lr_scale: jax.Array      # float32: multiplies every update; rollbacks lower it (safety.py)
  # Hyperparameters that are arrays, not constants, so changing one (a swarm's
  # exploration, a schedule) never recompiles the step: name -> float32 scalar.
  # "lr" multiplies every update (on top of lr_scale); the delta learner's loss
  # weights, EMA decay, gate temperature and replay weight live here too.
  hp: dict[str, jax.Array]
  delta: DeltaState | None = None  # forecasts, teacher, anchor, replay (streamlearn/learn/delta.py)


def make_optimizer(cfg: OptimConfig, match_lr_mult: float = 1.0,
                   mixer_lr_mult: float | None = None) -> optax.GradientTransformation:
  """AdamW after global-norm clipping, on the schedule of `learning_rate`.

  The match model's trust table (`match_trust`) gets `match_lr_mult` times the
  learning rate: its few numbers must settle within the first hundred chunks,
  where matches help most, not over thousands. The mixer's weights (`mixer`;
  None: there is no mixer) get `mixer_lr_mult` times it, and no weight decay
  (that would pull the network's weight of 1 towards nothing).
  """

  def adamw(lr_mult: float, decay: float) -> optax.GradientTransformation:
    schedule = lambda count: learning_rate(cfg, count) * lr_mult
    # Decay matrices only: norms' scales, biases and the LRU's decay logits stay put.
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
    return optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                       weight_decay=decay, mask=decay_mask)

  def labels(params):
    part = {"match_trust": "match", "mixer": "mixer"}
    return {k: jax.tree.map(lambda _: part.get(k, "net"), v) for k, v in params.items()}

  parts = {"net": adamw(1.0, cfg.weight_decay), "match": adamw(match_lr_mult, cfg.weight_decay)}
  if mixer_lr_mult is not None:  # (a part more changes the optimizer state's structure)
    parts["mixer"] = adamw(mixer_lr_mult, 0.0)
  return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                     optax.multi_transform(parts, labels))


def learning_rate(cfg: OptimConfig, step: jax.Array) -> jax.Array:
  """The schedule: a linear warm-up from 0 over `optim.warmup_steps` (0: none, the full rate
  from the first update), then constant, or with `optim.decay_steps` > 0 decaying as
  1 / sqrt(1 + step / decay_steps), as online compressors' networks do."""
  lr = jnp.asarray(cfg.learning_rate, jnp.float32)
  if cfg.warmup_steps:
    lr = lr * jnp.minimum(1.0, step / cfg.warmup_steps)
  if cfg.decay_steps:
    lr = lr * jax.lax.rsqrt(1.0 + step / cfg.decay_steps)
  return lr


class Read(NamedTuple):
  """A chunk as the model meets it: its inputs and match features, and what it leaves behind."""

  inputs_BxT: jax.Array     # each token's predecessor: what the model reads
  n_real_B: jax.Array       # int32: real tokens per row (the rest is padding)
  features: MatchFeatures | None  # the match model's prediction of each token
  match: MatchState | None  # the match model's state after the chunk
  last_B: jax.Array         # the last real token: the next chunk's first input
  count_features: CountFeatures | None = None  # the count models' counts for each token
  counts: CountState | None = None  # the count models' state after the chunk
  line_position_BxT: jax.Array | None = None  # how far into its line each token is
  line_position_B: jax.Array | None = None    # the same for the token after the chunk


@dataclasses.dataclass(frozen=True)
class Predictor:
  """The µLM plus the match model: how a stream's tokens become next-token logits.

  `delta` says what the delta learner around them keeps (None: the plain learner).
  """

  lm: LM
  match_cfg: MatchConfig | None   # None: the match model is off
  delta: DeltaSpec | None = None
  counts_cfg: CountsConfig | None = None  # None: the count models are off
  chunk_tokens: int = 0     # the step's chunk length (the count models fold in whole chunks)

  def init_carry(self, batch: int, bos_id: int) -> Carry:
    """The carry before the stream's first token."""
    return Carry(rec_state=self.lm.init_state(batch),
                 last_token_B=jnp.full((batch,), bos_id, jnp.int32),
                 match=init_match(self.match_cfg, batch) if self.match_cfg else None,
                 counts=(init_counts(self.counts_cfg, batch, self.chunk_tokens,
                                     self.lm.vocab_size)
                         if self.counts_cfg else None),
                 line_position_B=(jnp.zeros((batch,), jnp.int32)
                                  if self.lm.cfg.line_position else None))

  def read(self, carry: Carry, tokens_BxT, n_real_B, next_only: bool = False) -> Read:
    """What the model reads to predict a chunk, and what the chunk leaves for the next one.

    Tokens from n_real_B on are padding: the match and count models record none of them.
    next_only: one token that is not known yet (`read_next`): the count models read
    their pending tokens and keep their state.
    """
    features = match = count_features = counts = None
    if self.match_cfg:
      features, match = match_update(self.match_cfg, carry.match, tokens_BxT, n_real_B)
    if self.counts_cfg and next_only:
      count_features, counts = counts_next(self.counts_cfg, self.lm.vocab_size,
                                           carry.counts), carry.counts
    elif self.counts_cfg:
      count_features, counts = counts_update(self.counts_cfg, self.lm.vocab_size, carry.counts,
                                             tokens_BxT, n_real_B)
    position_BxT = position_B = None
    if carry.line_position_B is not None:
      position_BxT, position_B = line_positions(carry.line_position_B, tokens_BxT, n_real_B,
                                                LINE_POSITIONS - 1)
    return Read(shift_in(carry.last_token_B, tokens_BxT), n_real_B, features, match,
                last_real_token(tokens_BxT, n_real_B, carry.last_token_B), count_features,
                counts, position_BxT, position_B)

  def logits(self, params, rec_state, seen: Read, forecast: ForecastInput | None = None):
    """(logits_BxTxV, recurrent state after the real tokens); logits[:, t] predicts token t."""
    return self.lm.apply(params, seen.inputs_BxT, rec_state, seen.n_real_B, seen.features,
                         forecast, seen.count_features, seen.line_position_BxT)

  def advance(self, params, carry: Carry, tokens_BxT, n_real_B,
              forecast: ForecastInput | None = None):
    """(logits_BxTxV, carry after the first n_real_B tokens); logits[:, t] predicts tokens[:, t].

    Tokens from n_real_B on are padding: no state moves past them, and the
    logits there mean nothing (for the next token's prediction: `next_logits`).
    The logits at t < n_real_B depend only on the carry and tokens[:, :t].
    `forecast` is the delta learner's second input stream, where the step reads one.
    """
    seen = self.read(carry, tokens_BxT, n_real_B)
    logits_BxTxV, rec_state = self.logits(params, carry.rec_state, seen, forecast)
    return logits_BxTxV, Carry(rec_state, seen.last_B, seen.match, seen.counts,
                               seen.line_position_B)

  def read_along(self, params, carry: Carry, tokens_BxT, n_real_B,
                 forecast: ForecastInput | None = None) -> Carry:
    """The carry after reading tokens to generate from them, not to learn: `advance`'s,
    except that the count models keep an unfinished chunk pending, as `with_next` does
    (the step folds its tables in only at a chunk's end)."""
    _, after = self.advance(params, carry, tokens_BxT, n_real_B, forecast)
    if self.counts_cfg is None:
      return after
    return after.replace(counts=counts_append(self.counts_cfg, self.lm.vocab_size, carry.counts,
                                              tokens_BxT, n_real_B))

  def next_logits(self, params, carry: Carry,
                  forecast: ForecastInput | None = None) -> jax.Array:
    """Logits [B, V] for the token after everything `carry` has read; the carry does not move.

    Exactly what the step would score that token with: `advance` over a
    one-token chunk whose token is real. Its logits at t = 0 cannot depend on
    that token (the model reads carry.last_token_B there, the match model the
    tokens before it), so a placeholder stands in for the unknown token, and the
    carry that took it in is dropped. `forecast`: [B, 1] for that position.
    """
    return self.read_next(params, carry, forecast)[0]

  def read_next(self, params, carry: Carry,
                forecast: ForecastInput | None = None) -> tuple[jax.Array, Carry]:
    """(`next_logits`, the carry once the next token is read, that token still unknown).

    The model's state after the next token does not depend on it (the model
    reads a token only when predicting the one after), so one pass serves
    both; `with_next` puts the token in once it is chosen.
    """
    B = carry.last_token_B.shape[0]
    seen = self.read(carry, jnp.zeros((B, 1), jnp.int32), jnp.ones((B,), jnp.int32),
                     next_only=True)
    logits_Bx1xV, rec_state = self.logits(params, carry.rec_state, seen, forecast)
    return logits_Bx1xV[:, 0], Carry(rec_state, seen.last_B, seen.match, seen.counts,
                                     seen.line_position_B)

  def with_next(self, after: Carry, token_B) -> Carry:
    """The carry from `read_next` with its placeholder replaced by the token that came:
    exactly `advance` over that one token (tested), but for the count models, which keep
    it pending until its chunk is full (`read_along`)."""
    match = None if after.match is None else with_last_token(after.match, token_B)
    counts = after.counts
    if counts is not None:
      counts = counts_append(self.counts_cfg, self.lm.vocab_size, counts, token_B[:, None],
                             jnp.ones(token_B.shape, jnp.int32))
    position_B = after.line_position_B
    if position_B is not None:  # `read_next` moved it past the placeholder: undo a break
      position_B = jnp.where(token_B == NEWLINE, 0, position_B)
    return after.replace(last_token_B=token_B, match=match, counts=counts,
                         line_position_B=position_B)


def make_predictor(config: Config, vocab_size: int) -> Predictor:
  match_cfg = config.match if config.match.enabled else None
  counts_cfg = config.counts if config.counts.enabled else None
  mixer_cfg = config.mixer if config.mixer.enabled else None
  spec = delta_spec(config.delta, config.replay, config.data.chunk_tokens)
  if spec is not None and mixer_cfg is not None:
    # Its ring, replay and forecasts keep the match features only, not the counts.
    raise ConfigError("mixer.enabled: not built for the delta learner yet (set "
                      "counts.enabled = false and mixer.enabled = false, as configs/full.toml "
                      "does, or turn the delta learner off: delta.lag = 0, replay.capacity = 0 "
                      "and the delta losses 0)")
  if spec is not None and config.model.line_position:
    # Its ring and replay keep no line positions.
    raise ConfigError("model.line_position: not built for the delta learner yet (set "
                      "model.line_position = false, or turn the delta learner off)")
  lm = LM(config.model, vocab_size, match_len=match_cfg.max_len if match_cfg else 0,
          match_orders=len(match_cfg.orders) if match_cfg else 0,
          forecast_channel=bool(spec and spec.channel),
          surprise_head=bool(spec and spec.delta.residual > 0), mixer_cfg=mixer_cfg,
          count_orders=n_contexts(counts_cfg) if counts_cfg else 0,
          gate_orders=len(counts_cfg.orders) if counts_cfg else 0)
  return Predictor(lm, match_cfg, spec, counts_cfg, config.data.chunk_tokens)


def initial_hparams(spec: DeltaSpec | None = None) -> dict[str, jax.Array]:
  """The array hyperparameters of a new learner (see LearnerState.hp)."""
  values = {"lr": 1.0}
  if spec is not None:
    values.update(consistency=spec.delta.consistency, kl=spec.delta.kl,
                  ema_decay=spec.delta.ema_decay, gate_temperature=spec.delta.gate_temperature,
                  replay=spec.replay.weight)
  return {k: jnp.asarray(v, jnp.float32) for k, v in values.items()}


@functools.cache
def _jitted(fn):
  """One compiled function per (hashable) callable: a new jit each call would compile anew."""
  return jax.jit(fn)


def init_learner(predictor: Predictor, optimizer: optax.GradientTransformation, *, seed: int,
                 bos_id: int, batch: int = 1) -> LearnerState:
  """The state before the first chunk."""
  # A raw uint32 key, not a typed one: checkpoints store it as a plain array.
  key = jax.random.PRNGKey(seed)
  params = _jitted(predictor.lm.init)(jax.random.fold_in(key, 0))
  carry = predictor.init_carry(batch, bos_id)
  spec = predictor.delta
  return LearnerState(
      params=params, opt_state=_jitted(optimizer.init)(params), carry=carry,
      step=jnp.zeros((), jnp.int32), rng=key, lr_scale=jnp.ones((), jnp.float32),
      hp=initial_hparams(spec),
      delta=init_delta(spec, predictor.lm, params, carry.rec_state, batch) if spec else None)

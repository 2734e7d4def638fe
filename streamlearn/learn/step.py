"""The score-first streaming learner: one pure, jitted step over one state pytree.

At each tick a chunk of the stream arrives. The step
  1. scores it: cross-entropy of every token under the current parameters and
     recurrent state, in bits (prequential: no update has seen this chunk);
  2. learns from it: one AdamW update (global-norm clipped) on that same loss —
     the score is the loss value of the very forward pass the gradient comes
     from, so scoring costs nothing extra;
  3. carries the recurrent state on, with a stop-gradient at the boundary.

Dimension letters: B = streams (1 for the CLI), T = tokens per chunk.

The first token of a chunk is predicted from the last token of the previous
one (kept in the state as `last_token_B`; a BOS token before the stream), so
every token of the stream is scored exactly once.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax

from streamlearn.config import Config, MatchConfig, OptimConfig
from streamlearn.learn.delta import DeltaSpec, DeltaState, delta_spec, init_delta
from streamlearn.nn.match import MatchState, init_match, match_update
from streamlearn.nn.model import LM

_LN2 = math.log(2.0)


@flax.struct.dataclass
class Carry:
  """What a stream carries from chunk to chunk besides the parameters."""

  rec_state: Any           # the model's recurrent state (per layer h and conv tail)
  last_token_B: jax.Array  # int32: the token before the next chunk (not yet read by the model)
  match: MatchState | None  # the match model's history and tables (None: match model off)


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
  delta: DeltaState | None = None  # forecasts, teacher, base, replay (streamlearn/learn/delta.py)


class Chunk(NamedTuple):
  tokens_BxT: jax.Array    # int32
  mask_BxT: jax.Array      # float32: 0 on padding after the end of the stream
  n_bytes_B: jax.Array     # float32: bytes the chunk's real tokens stand for


def make_optimizer(cfg: OptimConfig, match_lr_mult: float = 1.0) -> optax.GradientTransformation:
  """AdamW after global-norm clipping; linear warm-up, then constant (a stream never ends).

  The match model's trust table (`match_trust`) gets `match_lr_mult` times the
  learning rate: its few numbers must settle within the first hundred chunks,
  where matches help most, not over thousands.
  """

  def adamw(lr_mult: float) -> optax.GradientTransformation:
    schedule = optax.linear_schedule(0.0, cfg.learning_rate * lr_mult,
                                     max(cfg.warmup_steps, 1))
    # Decay matrices only: norms' scales, biases and the LRU's decay logits stay put.
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
    return optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                       weight_decay=cfg.weight_decay, mask=decay_mask)

  def labels(params):
    return {k: jax.tree.map(lambda _: "match" if k == "match_trust" else "net", v)
            for k, v in params.items()}

  return optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip),
      optax.multi_transform({"net": adamw(1.0), "match": adamw(match_lr_mult)}, labels),
  )


def learning_rate(cfg: OptimConfig, step: jax.Array) -> jax.Array:
  return cfg.learning_rate * jnp.minimum(1.0, step / max(cfg.warmup_steps, 1))


@dataclasses.dataclass(frozen=True)
class Predictor:
  """The µLM plus the match model: how a stream's tokens become next-token logits.

  `delta` says what the delta learner around them keeps (None: the plain learner).
  """

  lm: LM
  match_cfg: MatchConfig | None   # None: the match model is off
  delta: DeltaSpec | None = None

  def init_carry(self, batch: int, bos_id: int) -> Carry:
    """The carry before the stream's first token."""
    return Carry(rec_state=self.lm.init_state(batch),
                 last_token_B=jnp.full((batch,), bos_id, jnp.int32),
                 match=init_match(self.match_cfg, batch) if self.match_cfg else None)

  def advance(self, params, carry: Carry, tokens_BxT, n_real_B):
    """(logits_BxTxV, carry after the first n_real_B tokens); logits[:, t] predicts tokens[:, t].

    Tokens from n_real_B on are padding: no state moves past them. With
    n_real_B = 0, the logits at t = 0 are the prediction for the next token.
    """
    inputs_BxT = jnp.concatenate([carry.last_token_B[:, None], tokens_BxT[:, :-1]], axis=1)
    features, match = None, None
    if self.match_cfg:
      features, match = match_update(self.match_cfg, carry.match, tokens_BxT, n_real_B)
    logits_BxTxV, rec_state = self.lm.apply(params, inputs_BxT, carry.rec_state, n_real_B,
                                            features)
    last_B = jnp.take_along_axis(tokens_BxT, jnp.maximum(n_real_B - 1, 0)[:, None], 1)[:, 0]
    last_B = jnp.where(n_real_B > 0, last_B, carry.last_token_B)
    return logits_BxTxV, Carry(rec_state, last_B, match)


def make_predictor(config: Config, vocab_size: int) -> Predictor:
  match_cfg = config.match if config.match.enabled else None
  spec = delta_spec(config.delta, config.replay, config.data.chunk_tokens)
  lm = LM(config.model, vocab_size, match_len=match_cfg.max_len if match_cfg else 0,
          match_orders=len(match_cfg.orders) if match_cfg else 0,
          forecast_channel=bool(spec and spec.channel),
          surprise_head=bool(spec and spec.delta.residual > 0))
  return Predictor(lm, match_cfg, spec)


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


def chunk_nll(predictor: Predictor, params, carry: Carry, chunk: Chunk):
  """Summed next-token NLL (nats) of the chunk's real tokens, and the carry after it."""
  n_real_B = jnp.sum(chunk.mask_BxT > 0, axis=1).astype(jnp.int32)
  logits_BxTxV, carry = predictor.advance(params, carry, chunk.tokens_BxT, n_real_B)
  nll_BxT = optax.softmax_cross_entropy_with_integer_labels(
      logits_BxTxV.astype(jnp.float32), chunk.tokens_BxT)
  return jnp.sum(nll_BxT * chunk.mask_BxT), carry


def score_metrics(nll_sum, chunk: Chunk) -> dict[str, jax.Array]:
  bits = nll_sum / _LN2
  n_tokens = jnp.sum(chunk.mask_BxT)
  n_bytes = jnp.sum(chunk.n_bytes_B)
  return dict(bits=bits, tokens=n_tokens, bytes=n_bytes,
              bits_per_token=bits / jnp.maximum(n_tokens, 1.0),
              bits_per_byte=bits / jnp.maximum(n_bytes, 1.0))


def learn_if_finite(ok, learn, old: LearnerState,
                    carry: Carry) -> tuple[LearnerState, jax.Array]:
  """The safety net's guard: a NaN/Inf loss or gradient leaves the state as it was.

  `learn()` builds the updated state; it runs only when `ok`. Otherwise the
  network never saw the chunk (parameters, optimizer, recurrent state, last
  token and step are the old ones), so nothing non-finite can reach them. The
  match model's history does keep the chunk (`carry.match`): it holds only
  tokens, which are never non-finite. Returns (state, 1.0 if skipped else 0.0).

  A branch, not a select between the new and the old state: a select needs
  both alive at once, which costs a copy of parameters and optimizer state
  every step; the branch lets the donated buffers update in place. (Under vmap,
  a swarm, JAX turns it back into a select.)
  """
  kept = old.replace(carry=old.carry.replace(match=carry.match))
  new = jax.lax.cond(ok, lambda: learn().replace(carry=carry), lambda: kept)
  return new, 1.0 - ok.astype(jnp.float32)


def make_plain_step(predictor: Predictor, optimizer: optax.GradientTransformation,
                    optim_cfg: OptimConfig):
  """The plain learner's jitted step(state, chunk) -> (state, metrics); `state` is donated.

  The key for the step's random draws is `fold_in(state.rng, state.step)`:
  it lives in the state so checkpoints carry it and a resumed run draws the
  same numbers (this learner draws none yet; later parts of the step do).
  """

  def step(state: LearnerState, chunk: Chunk) -> tuple[LearnerState, dict]:
    def loss_fn(params):
      nll_sum, carry = chunk_nll(predictor, params, state.carry, chunk)
      return nll_sum / jnp.maximum(jnp.sum(chunk.mask_BxT), 1.0), (nll_sum, carry)

    # Score first: the loss below is computed with the parameters as they were
    # before this chunk; the update that follows is the first to see it.
    (_, (nll_sum, carry)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)

    def learn() -> LearnerState:
      updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
      # An array in the state, not a constant: lowering it never recompiles the step.
      updates = jax.tree.map(lambda u: u * (state.lr_scale * state.hp["lr"]), updates)
      return state.replace(params=optax.apply_updates(state.params, updates),
                           opt_state=opt_state, step=state.step + 1)

    metrics = score_metrics(nll_sum, chunk)
    metrics.update(grad_norm=grad_norm,
                   learning_rate=learning_rate(optim_cfg, state.step) * state.lr_scale
                   * state.hp["lr"])
    ok = jnp.isfinite(nll_sum) & jnp.isfinite(grad_norm)
    new_state, metrics["skipped"] = learn_if_finite(ok, learn, state,
                                                    jax.lax.stop_gradient(carry))
    return new_state, metrics

  return jax.jit(step, donate_argnums=0)


def make_score(predictor: Predictor):
  """The jitted score(params, carry, chunk) -> (carry, metrics).

  Scoring with no learning, for frozen evaluation; the carry still moves on.
  """

  def score(params, carry: Carry, chunk: Chunk):
    nll_sum, carry = chunk_nll(predictor, params, carry, chunk)
    return carry, score_metrics(nll_sum, chunk)

  return jax.jit(score)


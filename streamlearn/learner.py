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

import functools
import math
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax

from streamlearn.config import Config, OptimConfig
from streamlearn.model import LM

_LN2 = math.log(2.0)


@flax.struct.dataclass
class LearnerState:
  params: Any
  opt_state: Any
  rec_state: Any           # the model's carried state (per layer h and conv tail)
  last_token_B: jax.Array  # int32: the token before the next chunk
  step: jax.Array          # int32: chunks learned from so far
  rng: jax.Array           # uint32[2]: the run's key; each step folds in `step`
  lr_scale: jax.Array      # float32: multiplies every update; rollbacks lower it (safety.py)


class Chunk(NamedTuple):
  tokens_BxT: jax.Array    # int32
  mask_BxT: jax.Array      # float32: 0 on padding after the end of the stream
  n_bytes_B: jax.Array     # float32: bytes the chunk's real tokens stand for


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  """AdamW after global-norm clipping; linear warm-up, then constant (a stream never ends)."""
  schedule = optax.linear_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1))
  # Decay matrices only: norms' scales, biases and the LRU's decay logits stay put.
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
  return optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip),
      optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                  weight_decay=cfg.weight_decay, mask=decay_mask),
  )


def learning_rate(cfg: OptimConfig, step: jax.Array) -> jax.Array:
  return cfg.learning_rate * jnp.minimum(1.0, step / max(cfg.warmup_steps, 1))


def init_learner(lm: LM, optimizer: optax.GradientTransformation, *, seed: int,
                 bos_id: int, batch: int = 1) -> LearnerState:
  """The state before the first chunk."""
  # A raw uint32 key, not a typed one: checkpoints store it as a plain array.
  key = jax.random.PRNGKey(seed)
  params = jax.jit(lm.init)(jax.random.fold_in(key, 0))
  return LearnerState(
      params=params, opt_state=jax.jit(optimizer.init)(params), rec_state=lm.init_state(batch),
      last_token_B=jnp.full((batch,), bos_id, jnp.int32), step=jnp.zeros((), jnp.int32),
      rng=key, lr_scale=jnp.ones((), jnp.float32))


def chunk_nll(lm: LM, params, rec_state, last_token_B, chunk: Chunk):
  """Summed next-token NLL (nats) of the chunk's real tokens, and the state after it."""
  inputs_BxT = jnp.concatenate([last_token_B[:, None], chunk.tokens_BxT[:, :-1]], axis=1)
  n_real_B = jnp.sum(chunk.mask_BxT > 0, axis=1).astype(jnp.int32)
  logits_BxTxV, new_rec_state = lm.apply(params, inputs_BxT, rec_state, n_real_B)
  nll_BxT = optax.softmax_cross_entropy_with_integer_labels(
      logits_BxTxV.astype(jnp.float32), chunk.tokens_BxT)
  return jnp.sum(nll_BxT * chunk.mask_BxT), new_rec_state


def _last_real_token(chunk: Chunk, fallback_B: jax.Array) -> jax.Array:
  n_real_B = jnp.sum(chunk.mask_BxT > 0, axis=1).astype(jnp.int32)
  last_B = jnp.take_along_axis(chunk.tokens_BxT, jnp.maximum(n_real_B - 1, 0)[:, None], 1)[:, 0]
  return jnp.where(n_real_B > 0, last_B, fallback_B)


def score_metrics(nll_sum, chunk: Chunk) -> dict[str, jax.Array]:
  bits = nll_sum / _LN2
  n_tokens = jnp.sum(chunk.mask_BxT)
  n_bytes = jnp.sum(chunk.n_bytes_B)
  return dict(bits=bits, tokens=n_tokens, bytes=n_bytes,
              bits_per_token=bits / jnp.maximum(n_tokens, 1.0),
              bits_per_byte=bits / jnp.maximum(n_bytes, 1.0))


def _skip_if_non_finite(old: LearnerState, new: LearnerState, loss, grad_norm):
  """The safety net's guard: a NaN/Inf loss or gradient leaves the whole state as it was.

  Returns (state, 1.0 if skipped else 0.0). The chunk is then as if never
  seen (recurrent state and last token included), so nothing non-finite can
  reach the parameters, the optimizer or the carried state.
  """
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  state = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
  return state, 1.0 - ok.astype(jnp.float32)


def make_step(lm: LM, optimizer: optax.GradientTransformation, optim_cfg: OptimConfig):
  """The jitted step(state, chunk) -> (state, metrics); `state` is donated.

  The key for the step's random draws is `fold_in(state.rng, state.step)`:
  it lives in the state so checkpoints carry it and a resumed run draws the
  same numbers (this learner draws none yet; later parts of the step do).
  """

  def step(state: LearnerState, chunk: Chunk) -> tuple[LearnerState, dict]:
    def loss_fn(params):
      nll_sum, new_rec = chunk_nll(lm, params, state.rec_state, state.last_token_B, chunk)
      return nll_sum / jnp.maximum(jnp.sum(chunk.mask_BxT), 1.0), (nll_sum, new_rec)

    # Score first: the loss below is computed with the parameters as they were
    # before this chunk; the update that follows is the first to see it.
    (_, (nll_sum, new_rec)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    # An array in the state, not a constant: lowering it never recompiles the step.
    updates = jax.tree.map(lambda u: u * state.lr_scale, updates)
    params = optax.apply_updates(state.params, updates)
    metrics = score_metrics(nll_sum, chunk)
    metrics.update(grad_norm=optax.tree.norm(grads),
                   learning_rate=learning_rate(optim_cfg, state.step) * state.lr_scale)
    new_state = state.replace(
        params=params, opt_state=opt_state,
        rec_state=jax.lax.stop_gradient(new_rec),
        last_token_B=_last_real_token(chunk, state.last_token_B),
        step=state.step + 1)
    new_state, metrics["skipped"] = _skip_if_non_finite(state, new_state, nll_sum,
                                                        metrics["grad_norm"])
    return new_state, metrics

  return jax.jit(step, donate_argnums=0)


def make_score(lm: LM):
  """The jitted score(params, rec_state, last_token, chunk) -> (rec_state, last_token, metrics).

  Scoring with no learning: for frozen evaluation and for reading probabilities.
  """

  def score(params, rec_state, last_token_B, chunk: Chunk):
    nll_sum, new_rec = chunk_nll(lm, params, rec_state, last_token_B, chunk)
    return new_rec, _last_real_token(chunk, last_token_B), score_metrics(nll_sum, chunk)

  return jax.jit(score)


@functools.cache
def build(config: Config, vocab_size: int):
  """(lm, optimizer, step) for a config and a vocabulary size; cached, so runs in
  one process with the same config share one compiled step."""
  lm = LM(config.model, vocab_size)
  optimizer = make_optimizer(config.optim)
  return lm, optimizer, make_step(lm, optimizer, config.optim)

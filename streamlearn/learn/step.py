"""The score-first streaming learner's step, and the pieces every step shares.

At each tick a chunk of the stream arrives. The plain step
  1. scores it: cross-entropy of every token under the current parameters and
     recurrent state, in bits (prequential: no update has seen this chunk);
  2. learns from it: one AdamW update (global-norm clipped) on that same loss —
     the score is the loss value of the very forward pass the gradient comes
     from, so scoring costs nothing extra;
  3. carries the recurrent state on, with a stop-gradient at the boundary.
The delta learner's step (delta_step.py) is built from the same pieces.

Dimension letters: B = streams (1 for the CLI), T = tokens per chunk, V = vocabulary.

The first token of a chunk is predicted from the last token of the previous
one (kept in the state as `last_token_B`; a BOS token before the stream), so
every token of the stream is scored exactly once.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from streamlearn.config import OptimConfig
from streamlearn.learn import xla
from streamlearn.learn.chunk import Chunk, n_real
from streamlearn.learn.state import Carry, LearnerState, Predictor, learning_rate

LN2 = math.log(2.0)


# --- what every step shares -----------------------------------------------------------------


def token_nll(logits_BxTxV, tokens_BxT) -> jax.Array:
  """Each token's negative log-likelihood in nats, float32 [B, T]."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits_BxTxV.astype(jnp.float32), tokens_BxT)


def chunk_token_nll(predictor: Predictor, params, carry: Carry, chunk: Chunk):
  """Each token's next-token NLL (nats; 0 on padding) [B, T], and the carry after the chunk."""
  logits_BxTxV, carry = predictor.advance(params, carry, chunk.tokens_BxT, n_real(chunk.mask_BxT))
  return token_nll(logits_BxTxV, chunk.tokens_BxT) * chunk.mask_BxT, carry


def chunk_nll(predictor: Predictor, params, carry: Carry, chunk: Chunk):
  """Summed next-token NLL (nats) of the chunk's real tokens, and the carry after it."""
  nll_BxT, carry = chunk_token_nll(predictor, params, carry, chunk)
  return jnp.sum(nll_BxT), carry


def apply_update(optimizer: optax.GradientTransformation, state: LearnerState, grads,
                 params, opt_state):
  """(params, opt_state) after one optimizer step on `grads`, scaled by the state's
  learning-rate scale and its "lr" hyperparameter (arrays: lowering one never recompiles)."""
  updates, opt_state = optimizer.update(grads, opt_state, params)
  updates = jax.tree.map(lambda u: u * (state.lr_scale * state.hp["lr"]), updates)
  return optax.apply_updates(params, updates), opt_state


def score_metrics(nll_sum, chunk: Chunk) -> dict[str, jax.Array]:
  """The prequential score of a chunk from its summed NLL: bits, per token, per byte."""
  bits = nll_sum / LN2
  n_tokens = jnp.sum(chunk.mask_BxT)
  n_bytes = jnp.sum(chunk.n_bytes_B)
  return dict(bits=bits, tokens=n_tokens, bytes=n_bytes,
              bits_per_token=bits / jnp.maximum(n_tokens, 1.0),
              bits_per_byte=bits / jnp.maximum(n_bytes, 1.0))


def step_learning_rate(optim_cfg: OptimConfig, state: LearnerState) -> jax.Array:
  """The learning rate this step's update used (for the logs)."""
  return learning_rate(optim_cfg, state.step) * state.lr_scale * state.hp["lr"]


def learn_if_finite(ok, learn, old: LearnerState,
                    carry: Carry) -> tuple[LearnerState, jax.Array]:
  """The safety net's guard: a NaN/Inf loss or gradient leaves the state as it was.

  `learn()` builds the updated state; it runs only when `ok`. Otherwise the
  network never saw the chunk (parameters, optimizer, recurrent state, last
  token and step are the old ones), so nothing non-finite can reach them. The
  match model's history does keep the chunk (`carry.match`): it holds only
  tokens, which are never non-finite; so do the count models' tables (`carry.counts`) and
  the line position, which are the stream's, not the network's.
  Returns (state, 1.0 if skipped else 0.0).

  A branch, not a select between the new and the old state: a select needs
  both alive at once, which costs a copy of parameters and optimizer state
  every step; the branch lets the donated buffers update in place. (Under vmap,
  a swarm, JAX turns it back into a select.)
  """
  kept = old.replace(carry=old.carry.replace(match=carry.match, counts=carry.counts,
                                             line_position_B=carry.line_position_B))
  new = jax.lax.cond(ok, lambda: learn().replace(carry=carry), lambda: kept)
  return new, 1.0 - ok.astype(jnp.float32)


# --- the plain step -------------------------------------------------------------------------


def make_plain_step(predictor: Predictor, optimizer: optax.GradientTransformation,
                    optim_cfg: OptimConfig):
  """The plain learner's jitted step(state, chunk) -> (state, metrics); `state` is donated.

  The key for the step's random draws is `fold_in(state.rng, state.step)`:
  it lives in the state so checkpoints carry it and a resumed run draws the
  same numbers (this learner draws none; the delta learner does).
  """

  def step(state: LearnerState, chunk: Chunk) -> tuple[LearnerState, dict]:
    def loss_fn(params):
      nll_BxT, carry = chunk_token_nll(predictor, params, state.carry, chunk)
      nll_sum = jnp.sum(nll_BxT)
      return nll_sum / jnp.maximum(jnp.sum(chunk.mask_BxT), 1.0), (nll_sum, nll_BxT, carry)

    # Score first: the loss below is computed with the parameters as they were
    # before this chunk; the update that follows is the first to see it.
    (_, (nll_sum, nll_BxT, carry)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    grad_norm = optax.tree.norm(grads)

    def learn() -> LearnerState:
      params, opt_state = apply_update(optimizer, state, grads, state.params, state.opt_state)
      return state.replace(params=params, opt_state=opt_state, step=state.step + 1)

    metrics = score_metrics(nll_sum, chunk)
    # Each token's NLL too: a swarm mixes its members' predictions token by token (swarm/mix.py).
    metrics.update(grad_norm=grad_norm, learning_rate=step_learning_rate(optim_cfg, state),
                   token_nll=nll_BxT)
    ok = jnp.isfinite(nll_sum) & jnp.isfinite(grad_norm)
    new_state, metrics["skipped"] = learn_if_finite(ok, learn, state,
                                                    jax.lax.stop_gradient(carry))
    return new_state, metrics

  return xla.jit(step, donate_argnums=0)


def make_score(predictor: Predictor):
  """The jitted score(params, carry, chunk) -> (carry, metrics).

  Scoring with no learning, for frozen evaluation; the carry still moves on.
  """

  def score(params, carry: Carry, chunk: Chunk):
    nll_sum, carry = chunk_nll(predictor, params, carry, chunk)
    return carry, score_metrics(nll_sum, chunk)

  return xla.jit(score)

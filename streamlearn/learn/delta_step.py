"""The delta learner's jitted step, as a list of phases (delta.py has the timeline).

    step(state, chunk)
      1. read      the chunk's inputs and match features; what the EMA teacher and
                   the frozen anchor make of it
      2. score     its prequential score (on arrival: also the plain update from it)
      3. file      it in the ring of the last `lag` chunks; take the one due
      4. learn     the gradient of the delta loss on that chunk (gate, replay)
      5. commit    if every number was finite: the update, the teacher, the replay
                   buffer, and the forecast of the next chunk; else the state as it
                   was (the match model keeps the chunk's tokens)

Each part exists in the traced step only when its switch is on: a part that
is off adds no forward pass, no loss term and no state.

Dimension letters: B = streams, T = chunk tokens, K = forecast tokens, V = vocabulary,
D = d_model, S = replay samples.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from streamlearn.config import OptimConfig
from streamlearn.learn import delta as dl
from streamlearn.learn import replay as replay_lib
from streamlearn.learn import xla
from streamlearn.learn.chunk import Chunk, n_real, shift_in
from streamlearn.learn.delta import DeltaSpec
from streamlearn.learn.state import Carry, LearnerState, Predictor, Read
from streamlearn.learn.step import LN2, apply_update, score_metrics, step_learning_rate, token_nll
from streamlearn.nn.model import LM, ForecastInput


class Seen(NamedTuple):
  """Phase 1: a chunk as the step meets it, before any update."""

  read: Read                # what the model reads of it (the predictor's, as the sampler's)
  n_tokens: jax.Array       # real tokens, at least 1 (a divisor)
  teacher_hidden_BxTxD: jax.Array | None
  teacher_rec: Any
  anchor_logp_BxTxV: jax.Array | None
  anchor_rec: Any


class Scored(NamedTuple):
  """Phase 2: the chunk's prequential score by the parameters before any update."""

  nll_sum: jax.Array        # nats over the real tokens
  nll_BxT: jax.Array        # each token's (0 on padding): a swarm mixes its members' by token
  rec_after: Any            # the student's recurrent state after the chunk
  grads: Any                # on arrival: the plain learner's gradient; else None
  ok: jax.Array             # bool: score (and gradient) finite


def read(predictor: Predictor, state: LearnerState, chunk: Chunk) -> Seen:
  spec, lm, carry, d = predictor.delta, predictor.lm, state.carry, state.delta
  seen = predictor.read(carry, chunk.tokens_BxT, n_real(chunk.mask_BxT))
  teacher_hidden = teacher_rec = anchor_logp = anchor_rec = None
  if spec.teacher:
    _, teacher_rec, teacher_hidden = lm.apply_with_hidden(
        d.teacher, seen.inputs_BxT, d.teacher_rec, seen.n_real_B, seen.features)
  if spec.anchor:
    anchor_logits, anchor_rec = predictor.logits(d.anchor, d.anchor_rec, seen)
    anchor_logp = jax.nn.log_softmax(anchor_logits.astype(jnp.float32))
  return Seen(seen, jnp.maximum(jnp.sum(chunk.mask_BxT), 1.0), teacher_hidden, teacher_rec,
              anchor_logp, anchor_rec)


def score(predictor: Predictor, params, rec_state, seen: Seen, chunk: Chunk,
          forecast: ForecastInput | None, with_grads: bool) -> Scored:
  """The chunk's score by `params`, read beside its forecast; with its gradient on arrival.

  The predictor's own `logits`: what the sampler reads (api.py) is what is scored here.
  """

  def loss_fn(params):
    logits, rec_after = predictor.logits(params, rec_state, seen.read, forecast)
    nll_BxT = token_nll(logits, chunk.tokens_BxT) * chunk.mask_BxT
    return jnp.sum(nll_BxT) / seen.n_tokens, (jnp.sum(nll_BxT), nll_BxT, rec_after)

  if not with_grads:
    _, (nll_sum, nll_BxT, rec_after) = loss_fn(params)
    return Scored(nll_sum, nll_BxT, rec_after, None, jnp.isfinite(nll_sum))
  (_, (nll_sum, nll_BxT, rec_after)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return Scored(nll_sum, nll_BxT, rec_after, grads,
                jnp.isfinite(nll_sum) & jnp.isfinite(optax.tree.norm(grads)))


def forecast_metrics(pending: dl.Forecast, chunk: Chunk) -> dict[str, jax.Array]:
  """How well the forecast made a tick ago foresaw this chunk."""
  K = pending.token_BxK.shape[1]
  surprise_BxK, mask_BxK = dl.forecast_surprise(pending, chunk.tokens_BxT, chunk.mask_BxT)
  agree_BxK = (pending.token_BxK == chunk.tokens_BxT[:, :K]).astype(jnp.float32)
  return {"forecast_bits": dl.masked_mean(surprise_BxK, mask_BxK) / LN2,
          "forecast_agreement": dl.masked_mean(agree_BxK, mask_BxK),
          "delta_rms_bits": jnp.sqrt(dl.masked_mean(jnp.square(surprise_BxK), mask_BxK)) / LN2,
          "forecast_made_at": pending.made_at}


def observed(spec: DeltaSpec, state: LearnerState, chunk: Chunk, seen: Seen,
             bits_per_token) -> dl.Observed:
  """The chunk as the ring keeps it, for learning from it `lag` ticks later."""
  return dl.Observed(
      tokens_BxT=chunk.tokens_BxT, mask_BxT=chunk.mask_BxT,
      last_token_B=state.carry.last_token_B, rec_state=state.carry.rec_state,
      match=seen.read.features, forecast=state.delta.pending if spec.forecasting else None,
      teacher_hidden_BxTxD=seen.teacher_hidden_BxTxD, anchor_logp_BxTxV=seen.anchor_logp_BxTxV,
      bits_per_token=bits_per_token, tick=state.step)


def file(spec: DeltaSpec, ring: dl.Observed | None, now: dl.Observed, tick):
  """(ring, the chunk due to be learned from, whether one is due yet): phase 3."""
  if not spec.forecasting:  # lag 0: the chunk itself, at once
    return ring, now, jnp.bool_(True)
  L = spec.delta.lag
  ring = dl.ring_put(ring, tick % L, now)
  return ring, dl.ring_get(ring, (tick + 1) % L), tick >= L - 1  # the chunk of tick t - L + 1


def gate(spec: DeltaSpec, d: dl.DeltaState, entry: dl.Observed, hp) -> tuple[jax.Array, dict]:
  """(the update's scale from the entry's forecast entropy, its metrics)."""
  if not spec.forecasting:
    return jnp.ones((), jnp.float32), {"gate": jnp.ones((), jnp.float32)}
  entropy = dl.entropy(entry.forecast)
  centre = jnp.where(jnp.isnan(d.entropy_ref), entropy, d.entropy_ref)  # starts at the first
  value = jnp.ones((), jnp.float32)
  if spec.delta.gate:
    value = jnp.where(entry.forecast.made_at >= 0,
                      dl.gate(entropy, centre, hp["gate_temperature"], spec.delta.gate_min), 1.0)
  return value, {"forecast_entropy": entropy, "gate": value}


def fresh_loss(spec: DeltaSpec, lm: LM, params, entry: dl.Observed, keep_BxK, hp):
  """Loss on the entry's real chunk, read beside its forecast (where kept): (loss, aux)."""
  forecast = dl.forecast_input(entry.forecast, entry.tokens_BxT.shape[1], keep_BxK) \
      if spec.channel else None
  logits_BxTxV, rec_after, hidden_BxTxD = lm.apply_with_hidden(
      params, shift_in(entry.last_token_B, entry.tokens_BxT), entry.rec_state,
      n_real(entry.mask_BxT), entry.match, forecast)
  nll_BxT = token_nll(logits_BxTxV, entry.tokens_BxT) * entry.mask_BxT
  nll_sum = jnp.sum(nll_BxT)
  terms = {"ce": nll_sum / jnp.maximum(jnp.sum(entry.mask_BxT), 1.0)}
  total = terms["ce"]
  if spec.teacher:
    gap_BxT = jnp.mean(jnp.square(hidden_BxTxD - entry.teacher_hidden_BxTxD), axis=-1)
    terms["consistency"] = dl.masked_mean(gap_BxT, entry.mask_BxT)
    total = total + hp["consistency"] * terms["consistency"]
  if spec.anchor:
    logp_BxTxV = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32))
    terms["kl"] = dl.kl_to_anchor(logp_BxTxV, entry.anchor_logp_BxTxV, entry.mask_BxT)
    total = total + hp["kl"] * terms["kl"]
  if spec.delta.residual > 0:
    surprise_BxK, mask_BxK = dl.forecast_surprise(entry.forecast, entry.tokens_BxT,
                                                   entry.mask_BxT)
    K = surprise_BxK.shape[1]
    predicted_BxK = hidden_BxTxD[:, :K] @ params["surprise_w"]
    mask_BxK = mask_BxK * (entry.forecast.made_at >= 0)
    terms["residual"] = dl.masked_mean(
        jnp.square(jax.lax.stop_gradient(surprise_BxK) - predicted_BxK), mask_BxK)
    total = total + spec.delta.residual * terms["residual"]
  return total, (terms, nll_sum, rec_after, nll_BxT)


def replay_loss(spec: DeltaSpec, lm: LM, params, buffer: replay_lib.ReplayBuffer, key):
  """Importance-weighted cross-entropy of a prioritized sample of past chunk openings."""
  rcfg = spec.replay
  index_S, weight_S = replay_lib.sample(buffer, key, rcfg.batch, rcfg.alpha, rcfg.beta)
  got = replay_lib.gather(buffer, index_S)
  logits, _ = lm.apply(params, shift_in(got.last_token_B, got.tokens_BxR), got.rec_state,
                       n_real(got.mask_BxR), got.match)
  nll_rows = token_nll(logits, got.tokens_BxR)
  per_row = jnp.sum(nll_rows * got.mask_BxR, 1) / jnp.maximum(jnp.sum(got.mask_BxR, 1), 1.0)
  nll_S = jnp.mean(per_row.reshape(rcfg.batch, -1), axis=1)
  return jnp.mean(weight_S * nll_S), (index_S, nll_S / LN2)


def delta_loss(spec: DeltaSpec, lm: LM, params, entry: dl.Observed, keep_BxK, gate_value, hp,
               buffer, key):
  """The gated fresh loss plus the weighted replay loss: what phase 4 differentiates."""
  fresh, aux = fresh_loss(spec, lm, params, entry, keep_BxK, hp)
  total, replay_aux = gate_value * fresh, None
  if spec.replaying:
    replayed, replay_aux = replay_loss(spec, lm, params, buffer, key)
    total = total + hp["replay"] * replayed
  return total, (aux, replay_aux)


def learned_state(spec: DeltaSpec, lm: LM, update, state: LearnerState, learned, params,
                  opt_state, grads, rec_after, seen: Seen, ring, entry: dl.Observed,
                  learn_nll, replay_aux, key) -> LearnerState:
  """Phase 5, when every number was finite: the state after this tick."""
  d, cfg = state.delta, spec.delta
  # Before the ring is full only the arrival update (if any) is taken.
  params, opt_state = jax.lax.cond(learned, lambda: update(grads, params, opt_state),
                                   lambda: (params, opt_state))
  teacher, buffer, entropy_ref, pending = d.teacher, d.replay, d.entropy_ref, d.pending
  if spec.teacher:
    teacher = jax.lax.cond(learned, lambda: dl.ema(d.teacher, params, state.hp["ema_decay"]),
                           lambda: d.teacher)
  if spec.replaying:
    index_S, replay_bits_S = replay_aux
    buffer = replay_lib.reprioritize(buffer, index_S, replay_bits_S, learned)
    priority = entry.bits_per_token if spec.forecasting else learn_nll / LN2 / seen.n_tokens
    buffer = replay_lib.insert(buffer, dl.replay_entry(spec, entry), priority, learned)
  if spec.forecasting:
    entropy = dl.entropy(entry.forecast)
    centre = jnp.where(jnp.isnan(d.entropy_ref), entropy, d.entropy_ref)
    entropy_ref = jnp.where(learned & (entry.forecast.made_at >= 0),
                            0.99 * centre + 0.01 * entropy, d.entropy_ref)
    # The forecast of the next chunk, from where this one left the state.
    pending = dl.rollout(lm, params, rec_after, seen.read.last_B, cfg.forecast_tokens, key,
                         cfg.temperature, state.step)
  return state.replace(
      params=params, opt_state=opt_state,
      carry=Carry(jax.lax.stop_gradient(rec_after), seen.read.last_B, seen.read.match),
      step=state.step + 1,
      delta=d.replace(ring=ring, pending=pending, teacher=teacher, teacher_rec=seen.teacher_rec,
                      anchor_rec=seen.anchor_rec, entropy_ref=entropy_ref, replay=buffer))


def state_metrics(spec: DeltaSpec, state: LearnerState) -> dict[str, jax.Array]:
  """What the logs show of the teacher and the replay buffer after the step."""
  metrics, d = {}, state.delta
  if spec.teacher:
    metrics["teacher_distance"] = optax.tree.norm(
        jax.tree.map(lambda t, p: t - p, d.teacher, state.params))
  if spec.replaying:
    filled_C = jnp.isfinite(d.replay.surprise_C)
    metrics["replay_fill"] = jnp.sum(filled_C).astype(jnp.float32)
    metrics["replay_priority_mean"] = (jnp.sum(jnp.where(filled_C, d.replay.surprise_C, 0.0))
                                       / jnp.maximum(jnp.sum(filled_C), 1))
    metrics["replay_priority_max"] = jnp.max(jnp.where(filled_C, d.replay.surprise_C, 0.0))
  return metrics


def make_delta_step(predictor: Predictor, optimizer: optax.GradientTransformation,
                    optim_cfg: OptimConfig):
  """The jitted step(state, chunk) -> (state, metrics) of the delta learner; `state` is donated."""
  spec, lm = predictor.delta, predictor.lm
  arrival = spec.delta.arrival

  def step(state: LearnerState, chunk: Chunk):
    d, hp, tick = state.delta, state.hp, state.step
    k_drop, k_replay, k_forecast = jax.random.split(jax.random.fold_in(state.rng, tick), 3)
    update = lambda grads, params, opt_state: apply_update(optimizer, state, grads, params,
                                                           opt_state)
    seen = read(predictor, state, chunk)                                          # 1. read
    metrics = forecast_metrics(d.pending, chunk) if spec.forecasting else {}
    params, opt_state, scored = state.params, state.opt_state, None               # 2. score
    if spec.forecasting:  # (lag 0: the learning pass below is the scoring pass)
      beside = dl.forecast_input(d.pending, chunk.tokens_BxT.shape[1]) if spec.channel else None
      scored = score(predictor, params, state.carry.rec_state, seen, chunk, beside, arrival)
    if arrival:  # the plain update, as the chunk is scored; the delta update goes on from it
      params, opt_state = update(scored.grads, params, opt_state)
      metrics["arrival_grad_norm"] = optax.tree.norm(scored.grads)
    bits = scored.nll_sum / LN2 / seen.n_tokens if scored else jnp.zeros((), jnp.float32)
    ring, entry, valid = file(spec, d.ring, observed(spec, state, chunk, seen, bits), tick)  # 3.
    gate_value, gate_metrics = gate(spec, d, entry, hp)                           # 4. learn
    keep_BxK = None
    if spec.channel:  # reality injection: the forecast is hidden on some tokens
      keep_BxK = jax.random.bernoulli(k_drop, 1.0 - spec.delta.reality_drop,
                                      entry.forecast.token_BxK.shape).astype(jnp.float32)
    (total, ((terms, learn_nll, learn_rec, learn_nll_BxT), replay_aux)), grads = \
        jax.value_and_grad(delta_loss, argnums=2, has_aux=True)(
            spec, lm, params, entry, keep_BxK, gate_value, hp, d.replay, k_replay)
    if scored is None:
      scored = Scored(learn_nll, learn_nll_BxT, learn_rec, None, jnp.isfinite(learn_nll))
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(total) & jnp.isfinite(grad_norm) & scored.ok               # 5. commit
    skipped = state.replace(carry=state.carry.replace(match=seen.read.match))
    new = jax.lax.cond(ok, lambda: learned_state(
        spec, lm, update, state, valid, params, opt_state, grads, scored.rec_after, seen, ring,
        entry, learn_nll, replay_aux, k_forecast), lambda: skipped)

    metrics.update(gate_metrics, **score_metrics(scored.nll_sum, chunk), **state_metrics(spec, new))
    metrics.update({f"loss_{k}": v for k, v in terms.items()})
    if spec.replaying:
      metrics["replay_bits"] = jnp.mean(replay_aux[1])
    metrics.update(grad_norm=grad_norm, skipped=1.0 - ok.astype(jnp.float32),
                   token_nll=scored.nll_BxT,  # each token's: a swarm mixes them (swarm/mix.py)
                   learned=(valid & ok).astype(jnp.float32), learned_tick=entry.tick,
                   learning_rate=step_learning_rate(optim_cfg, state))
    return new, metrics

  return xla.jit(step, donate_argnums=0)

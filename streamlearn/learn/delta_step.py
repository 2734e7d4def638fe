"""The delta learner's jitted step (see streamlearn/learn/delta.py for the timeline).

Each part exists in the traced step only when its switch is on: a part that
is off adds no forward pass, no loss term and no state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from streamlearn.config import OptimConfig
from streamlearn.learn import delta as dl
from streamlearn.learn import replay as replay_lib
from streamlearn.learn.step import (Carry, Chunk, LearnerState, Predictor, learning_rate,
                                    score_metrics)
from streamlearn.nn.match import match_update

_LN2 = dl._LN2


def _nll_BxT(logp_BxTxV, tokens_BxT):
  return -jnp.take_along_axis(logp_BxTxV, tokens_BxT[..., None], -1)[..., 0]


def make_delta_step(predictor: Predictor, optimizer: optax.GradientTransformation,
                    optim_cfg: OptimConfig):
  """The jitted step(state, chunk) -> (state, metrics) of the delta learner; `state` is donated."""
  spec, lm = predictor.delta, predictor.lm
  cfg, rcfg = spec.delta, spec.replay
  L, K = cfg.lag, cfg.forecast_tokens

  def entry_inputs(entry: dl.Observed, keep_BxK):
    """What the trunk reads to learn from `entry`: its real tokens beside their forecast."""
    T = entry.tokens_BxT.shape[1]
    forecast = dl.forecast_input(entry.forecast, T, keep_BxK) if spec.channel else None
    return (dl.shift_in(entry.last_token_B, entry.tokens_BxT), entry.rec_state,
            dl.n_real(entry.mask_BxT), entry.match, forecast)

  def fresh_loss(params, entry: dl.Observed, keep_BxK, hp):
    """Loss on the real chunk of `entry` (read with its forecast), before the gate."""
    outputs = lm.apply_with_hidden(params, *entry_inputs(entry, keep_BxK))
    return fresh_terms(params, entry, outputs, hp)

  def fresh_terms(params, entry: dl.Observed, outputs, hp):
    """fresh_loss from the trunk's outputs (logits, state after, hidden) on `entry`."""
    logits_BxTxV, rec_after, hidden_BxTxD = outputs
    logp_BxTxV = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32))
    nll_sum = jnp.sum(_nll_BxT(logp_BxTxV, entry.tokens_BxT) * entry.mask_BxT)
    terms = {"ce": nll_sum / jnp.maximum(jnp.sum(entry.mask_BxT), 1.0)}
    total = terms["ce"]
    if spec.teacher:
      gap_BxT = jnp.mean(jnp.square(hidden_BxTxD - entry.teacher_hidden_BxTxD), axis=-1)
      terms["consistency"] = dl.masked_mean(gap_BxT, entry.mask_BxT)
      total = total + hp["consistency"] * terms["consistency"]
    if spec.base:
      terms["kl"] = dl.kl_to_base(logp_BxTxV, entry.base_logp_BxTxV, entry.mask_BxT)
      total = total + hp["kl"] * terms["kl"]
    if cfg.residual > 0:
      surprise_BxK, mask_BxK = dl.forecast_surprise(entry.forecast, entry.tokens_BxT,
                                                     entry.mask_BxT)
      predicted_BxK = hidden_BxTxD[:, :K] @ params["surprise_w"]
      mask_BxK = mask_BxK * (entry.forecast.made_at >= 0)
      terms["residual"] = dl.masked_mean(
          jnp.square(jax.lax.stop_gradient(surprise_BxK) - predicted_BxK), mask_BxK)
      total = total + cfg.residual * terms["residual"]
    return total, (terms, nll_sum, rec_after)

  def replay_loss(params, buffer: replay_lib.ReplayBuffer, key):
    """Importance-weighted cross-entropy of a prioritized sample of past chunk openings."""
    index_S, weight_S = replay_lib.sample(buffer, key, rcfg.batch, rcfg.alpha, rcfg.beta)
    got = replay_lib.gather(buffer, index_S)
    logits, _ = lm.apply(params, dl.shift_in(got.last_token_B, got.tokens_BxR), got.rec_state,
                         dl.n_real(got.mask_BxR), got.match)
    nll_rows = _nll_BxT(jax.nn.log_softmax(logits.astype(jnp.float32)), got.tokens_BxR)
    per_row = jnp.sum(nll_rows * got.mask_BxR, 1) / jnp.maximum(jnp.sum(got.mask_BxR, 1), 1.0)
    nll_S = jnp.mean(per_row.reshape(rcfg.batch, -1), axis=1)
    return jnp.mean(weight_S * nll_S), (index_S, nll_S / _LN2)

  def step(state: LearnerState, chunk: Chunk):
    d, hp, carry, tick = state.delta, state.hp, state.carry, state.step
    k_drop, k_replay, k_forecast = jax.random.split(jax.random.fold_in(state.rng, tick), 3)
    B, T = chunk.tokens_BxT.shape
    n_real_B = dl.n_real(chunk.mask_BxT)
    inputs_BxT = dl.shift_in(carry.last_token_B, chunk.tokens_BxT)
    features = match = None
    if predictor.match_cfg:
      features, match = match_update(predictor.match_cfg, carry.match, chunk.tokens_BxT, n_real_B)
    last_B = jnp.take_along_axis(chunk.tokens_BxT, jnp.maximum(n_real_B - 1, 0)[:, None], 1)[:, 0]
    last_B = jnp.where(n_real_B > 0, last_B, carry.last_token_B)
    n_tokens = jnp.maximum(jnp.sum(chunk.mask_BxT), 1.0)
    metrics = {}

    # 1. Read the chunk: the student scores it (beside its forecast), the teacher
    #    and the base make of it what the learning step will compare against.
    score_nll = rec_after = None
    score_forecast = dl.forecast_input(d.pending, T) if spec.channel else None
    if spec.forecasting and not cfg.arrival:  # (on arrival, the learning pass scores it)
      logits, rec_after = lm.apply(state.params, inputs_BxT, carry.rec_state, n_real_B, features,
                                   score_forecast)
      logp = jax.nn.log_softmax(logits.astype(jnp.float32))
      score_nll = jnp.sum(_nll_BxT(logp, chunk.tokens_BxT) * chunk.mask_BxT)
    if spec.forecasting:
      surprise_BxK, mask_BxK = dl.forecast_surprise(d.pending, chunk.tokens_BxT, chunk.mask_BxT)
      metrics["forecast_bits"] = dl.masked_mean(surprise_BxK, mask_BxK) / _LN2
      metrics["forecast_agreement"] = dl.masked_mean(
          (d.pending.token_BxK == chunk.tokens_BxT[:, :K]).astype(jnp.float32), mask_BxK)
      metrics["delta_rms_bits"] = jnp.sqrt(dl.masked_mean(jnp.square(surprise_BxK), mask_BxK)) / _LN2
      metrics["forecast_made_at"] = d.pending.made_at
    teacher_hidden = teacher_rec = base_logp = base_rec = None
    if spec.teacher:
      _, teacher_rec, teacher_hidden = lm.apply_with_hidden(
          d.teacher, inputs_BxT, d.teacher_rec, n_real_B, features)
    if spec.base:
      base_logits, base_rec = lm.apply(d.base, inputs_BxT, d.base_rec, n_real_B, features)
      base_logp = jax.nn.log_softmax(base_logits.astype(jnp.float32))
    now = dl.Observed(
        tokens_BxT=chunk.tokens_BxT, mask_BxT=chunk.mask_BxT, last_token_B=carry.last_token_B,
        rec_state=carry.rec_state, match=features,
        forecast=d.pending if spec.forecasting else None,
        teacher_hidden_BxTxD=teacher_hidden, base_logp_BxTxV=base_logp,
        # (On arrival the score comes with the learning pass; filed after it.)
        bits_per_token=(score_nll / _LN2 / n_tokens if score_nll is not None
                        else jnp.zeros((), jnp.float32)),
        tick=tick)

    # 2. File it; take the chunk the learner is due to learn from.
    ring = None
    if spec.forecasting:
      ring = dl.ring_put(d.ring, tick % L, now)
      entry = dl.ring_get(ring, (tick + 1) % L)   # the chunk of tick t - L + 1
      valid = tick >= L - 1
    else:
      entry, valid = now, jnp.bool_(True)

    # 3. Learn from it, with the gate and a replay batch.
    gate = jnp.ones((), jnp.float32)
    keep_BxK = None
    if spec.forecasting:
      has_forecast = entry.forecast.made_at >= 0
      entropy = dl.entropy(entry.forecast)
      # The running mean starts at the first forecast's entropy.
      centre = jnp.where(jnp.isnan(d.entropy_ref), entropy, d.entropy_ref)
      if cfg.gate:
        gate = jnp.where(has_forecast, dl.gate(entropy, centre, hp["gate_temperature"],
                                               cfg.gate_min), 1.0)
      metrics["forecast_entropy"] = entropy
      if spec.channel:
        keep_BxK = jax.random.bernoulli(k_drop, 1.0 - cfg.reality_drop, (B, K)).astype(jnp.float32)

    def sgd(grads, opt_state, params):
      updates, opt_state = optimizer.update(grads, opt_state, params)
      # An array in the state, not a constant: lowering it never recompiles the step.
      updates = jax.tree.map(lambda u: u * (state.lr_scale * hp["lr"]), updates)
      return optax.apply_updates(params, updates), opt_state

    params, opt_state, arrival_ok = state.params, state.opt_state, jnp.bool_(True)
    if cfg.arrival:
      # The plain learner's update, from the pass that scored the chunk: the scoring
      # parameters are never `lag` chunks stale, and the update below is a second,
      # later look at each chunk, beside its forecast. Two steps one after the other,
      # not one on both losses: the second is taken from where the first left off
      # (held-aside tuning: the sum gained a fraction of what the two steps did).
      def arrival_loss(params):
        logits, rec_after = lm.apply(params, inputs_BxT, carry.rec_state, n_real_B, features,
                                     score_forecast)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        nll = jnp.sum(_nll_BxT(logp, chunk.tokens_BxT) * chunk.mask_BxT)
        return nll / n_tokens, (nll, rec_after)

      (_, (score_nll, rec_after)), arrival_grads = jax.value_and_grad(
          arrival_loss, has_aux=True)(params)
      metrics["arrival_grad_norm"] = optax.tree.norm(arrival_grads)
      arrival_ok = jnp.isfinite(score_nll) & jnp.isfinite(metrics["arrival_grad_norm"])
      params, opt_state = sgd(arrival_grads, opt_state, params)
      # Its score is known only now: filed for the replay priority.
      ring = ring.replace(bits_per_token=ring.bits_per_token.at[tick % L].set(
          score_nll / _LN2 / n_tokens))
      if L == 1:
        entry = entry.replace(bits_per_token=ring.bits_per_token[0])

    def loss_fn(params):
      fresh, aux = fresh_loss(params, entry, keep_BxK, hp)
      total, replay_aux = gate * fresh, None
      if spec.replaying:
        replayed, replay_aux = replay_loss(params, d.replay, k_replay)
        total = total + hp["replay"] * replayed
      return total, (aux, replay_aux)

    arrived = params, opt_state
    (total, ((terms, learn_nll, learn_rec), replay_aux)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(params)
    params, opt_state = sgd(grads, opt_state, params)
    if not spec.forecasting:  # lag 0: the learning pass was the scoring pass
      score_nll, rec_after = learn_nll, learn_rec
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(total) & jnp.isfinite(grad_norm) & jnp.isfinite(score_nll) & arrival_ok
    learned = valid & ok
    keep_new = lambda new, old: jax.tree.map(lambda n, o: jnp.where(learned, n, o), new, old)
    # Before the ring is full only the arrival update (if any) is taken.
    params, opt_state = keep_new((params, opt_state), arrived)

    teacher = d.teacher
    if spec.teacher:
      teacher = keep_new(dl.ema(d.teacher, params, hp["ema_decay"]), d.teacher)
      metrics["teacher_distance"] = optax.tree.norm(
          jax.tree.map(lambda t, p: t - p, teacher, params))
    buffer = d.replay
    if spec.replaying:
      index_S, replay_bits_S = replay_aux
      buffer = replay_lib.reprioritize(buffer, index_S, replay_bits_S, learned)
      priority = entry.bits_per_token if spec.forecasting else learn_nll / _LN2 / n_tokens
      buffer = replay_lib.insert(buffer, dl.replay_entry(spec, entry), priority, learned)
      filled_C = jnp.isfinite(buffer.surprise_C)
      metrics["replay_bits"] = jnp.mean(replay_bits_S)
      metrics["replay_fill"] = jnp.sum(filled_C).astype(jnp.float32)
      metrics["replay_priority_mean"] = (jnp.sum(jnp.where(filled_C, buffer.surprise_C, 0.0))
                                         / jnp.maximum(jnp.sum(filled_C), 1))
      metrics["replay_priority_max"] = jnp.max(jnp.where(filled_C, buffer.surprise_C, 0.0))
    entropy_ref, pending = d.entropy_ref, d.pending
    if spec.forecasting:
      entropy_ref = jnp.where(learned & has_forecast, 0.99 * centre + 0.01 * entropy,
                              d.entropy_ref)
      # 4. Forecast the next chunk from where this one left the state.
      pending = dl.rollout(lm, params, rec_after, last_B, K, k_forecast, cfg.temperature, tick)

    new = state.replace(
        params=params, opt_state=opt_state,
        carry=Carry(jax.lax.stop_gradient(rec_after), last_B, match),
        step=tick + 1,
        delta=d.replace(ring=ring, pending=pending, teacher=teacher, teacher_rec=teacher_rec,
                        base_rec=base_rec, entropy_ref=entropy_ref, replay=buffer))
    # A non-finite score, loss or gradient: as if the chunk never came (the match
    # model keeps its tokens, which are never non-finite; see learner.learn_if_finite).
    without_match = lambda s: s.replace(carry=s.carry.replace(match=None),
                                        delta=s.delta.replace(base=None))
    kept = jax.tree.map(lambda n, o: jnp.where(ok, n, o), without_match(new),
                        without_match(state))
    new = kept.replace(carry=kept.carry.replace(match=match),
                       delta=kept.delta.replace(base=d.base))

    metrics.update(score_metrics(score_nll, chunk))
    metrics.update({f"loss_{k}": v for k, v in terms.items()})
    metrics.update(grad_norm=grad_norm, gate=gate, skipped=1.0 - ok.astype(jnp.float32),
                   learned=learned.astype(jnp.float32), learned_tick=entry.tick,
                   learning_rate=learning_rate(optim_cfg, tick) * state.lr_scale * hp["lr"])
    return new, metrics

  return jax.jit(step, donate_argnums=0)

"""The µLM: a Griffin-style recurrent language model whose state carries across chunks.

Dimension letters: B = batch (streams), T = tokens in a chunk, D = d_model,
W = lru_width, M = MLP hidden width, K = conv taps, V = vocabulary.

Each layer is two residual blocks:
  recurrent: RMSNorm -> [GeLU(Dense) gate] * [Dense -> causal depthwise conv ->
             RG-LRU (input-dependent decay, via `linear_scan`)] -> Dense -> +
  MLP:       RMSNorm -> GeGLU -> Dense -> +
then a final RMSNorm and a head tied to the embedding. The first layer reads the
token's embedding plus, where they are on, the match model's predictions and how
far into its line the position is (`model.line_position`).

The state a stream carries from one chunk to the next is, per layer, the
recurrence's h [B, W] (float32) and the conv's last K-1 inputs [B, K-1, W].
Feeding a sequence in chunks with the carried state gives the same logits as
one call over the whole sequence.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from streamlearn.config import MixerConfig, ModelConfig
from streamlearn.nn.counts import CountFeatures
from streamlearn.nn.match import MatchFeatures
from streamlearn.nn.mixer import Mixer, init_online
from streamlearn.nn.scan import linear_scan

# Line positions the trunk tells apart (`model.line_position`): 0 to 126, and 127 or more.
LINE_POSITIONS = 128

# RG-LRU: the decay is a^(c * r_t) with a learned a in (0, 1) and gate r_t;
# c = 8 as in Griffin, so a^c at init spans a useful range of memory lengths.
_LRU_C = 8.0


class ForecastInput(NamedTuple):
  """The second input stream: a forecast of each position's target token, made a tick earlier."""

  token_BxT: jax.Array   # int32: the forecast token for position t's target
  on_BxT: jax.Array      # float32: 1 where the trunk reads it (0: no forecast, or dropped)


class LayerState(NamedTuple):
  h_BxW: jax.Array      # recurrence state, float32
  conv_BxKm1xW: jax.Array  # last K-1 inputs of the causal conv


class RMSNorm(nn.Module):
  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1],))
    var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(var + 1e-6) * (1.0 + scale)[(None,) * (x.ndim - 1)]


class CausalConv(nn.Module):
  """Depthwise causal conv over time whose last K-1 inputs carry to the next chunk."""

  taps: int

  @nn.compact
  def __call__(self, x_BxTxW, tail_BxKm1xW, n_real_B):
    W = x_BxTxW.shape[-1]
    kernel_KxW = self.param("kernel", nn.initializers.normal(1.0 / math.sqrt(self.taps)),
                            (self.taps, W))
    bias_W = self.param("bias", nn.initializers.zeros_init(), (W,))
    T = x_BxTxW.shape[1]
    ext_BxSxW = jnp.concatenate([tail_BxKm1xW.astype(x_BxTxW.dtype), x_BxTxW], axis=1)
    # Tap k looks k steps back: y_t = sum_k w_k x_{t-k}.
    y_BxTxW = sum(kernel_KxW[k][None, None] * ext_BxSxW[:, self.taps - 1 - k: self.taps - 1 - k + T]
                  for k in range(self.taps))
    # The carried tail is the last K-1 *real* inputs: padding after the end
    # of a stream must not leak into the next chunk.
    tail_BxKm1xW = jax.vmap(
        lambda ext, n: jax.lax.dynamic_slice_in_dim(ext, n, self.taps - 1, axis=0))(
            ext_BxSxW, n_real_B)
    return y_BxTxW + bias_W[None, None], tail_BxKm1xW


@jax.custom_jvp
def _sqrt_bounded_grad(x):
  """sqrt whose derivative is capped: d/dx sqrt(x) is unbounded at 0.

  sqrt(1 - a^2) meets x -> 0 whenever a gate drives the decay a to 1; an
  uncapped derivative there turns one step's gradient into inf (seen as NaN
  at learning rate 5e-3). Capped at 1000, as Griffin does.
  """
  return jnp.sqrt(x)


@_sqrt_bounded_grad.defjvp
def _sqrt_bounded_grad_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  y = jnp.sqrt(x)
  return y, dx / jnp.maximum(2.0 * y, 1e-3)


def _lru_a_init(key, shape, dtype=jnp.float32):
  """Λ with a = sigmoid(Λ) such that a^c is uniform in [0.9, 0.999] (Griffin)."""
  a_pow_c = jax.random.uniform(key, shape, dtype, 0.9, 0.999)
  a = a_pow_c ** (1.0 / _LRU_C)
  return jnp.log(a) - jnp.log1p(-a)


def _match_trust_init(key, shape, dtype=jnp.float32):
  """A prior that longer matches are likelier right: bonus 0.25 per token, up to 4.

  Learning moves it from there; starting at zero would waste the start of the
  stream, where the network knows least and matches help most.
  """
  del key
  return jnp.broadcast_to(0.25 * jnp.minimum(jnp.arange(shape[-1]), 16), shape).astype(dtype)


class RGLRU(nn.Module):
  """Real-gated linear recurrent unit: h_t = a_t h_{t-1} + sqrt(1 - a_t^2) (i_t x_t)."""

  width: int
  scan_impl: str

  @nn.compact
  def __call__(self, x_BxTxW, h_BxW, real_BxT):
    lam_W = self.param("a_logit", _lru_a_init, (self.width,))
    # Both gates from one matmul: same math as two Dense layers, half the ops.
    gates_BxTx2W = nn.sigmoid(nn.Dense(2 * self.width, name="gates")(x_BxTxW))
    r_BxTxW, i_BxTxW = jnp.split(gates_BxTx2W, 2, axis=-1)
    # log a_t = c r_t log sigmoid(Λ), computed without forming a small a first.
    log_a_BxTxW = -_LRU_C * r_BxTxW * jax.nn.softplus(-lam_W)[None, None]
    a_BxTxW = jnp.exp(log_a_BxTxW)
    # sqrt(1 - a^2) keeps the state's scale steady whatever the decay.
    mult_BxTxW = _sqrt_bounded_grad(-jnp.expm1(2.0 * log_a_BxTxW))
    b_BxTxW = mult_BxTxW * i_BxTxW * x_BxTxW
    # Padded steps hold the state (a = 1, b = 0), so h_last is the state after
    # the last real token.
    real_BxTx1 = real_BxT[:, :, None]
    a_BxTxW = jnp.where(real_BxTx1, a_BxTxW, 1.0)
    b_BxTxW = jnp.where(real_BxTx1, b_BxTxW, 0.0)
    h_all_BxTxW, h_last_BxW = linear_scan(a_BxTxW, b_BxTxW, h_BxW, impl=self.scan_impl)
    return h_all_BxTxW, h_last_BxW


class RecurrentBlock(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD, state: LayerState, n_real_B):
    cfg = self.cfg
    y_BxTxD = RMSNorm(name="norm")(x_BxTxD)
    gate_BxTxW, u_BxTxW = jnp.split(nn.Dense(2 * cfg.lru_width, name="gate_input")(y_BxTxD),
                                    2, axis=-1)
    gate_BxTxW = nn.gelu(gate_BxTxW)
    u_BxTxW, conv_tail = CausalConv(cfg.conv_width, name="conv")(
        u_BxTxW, state.conv_BxKm1xW, n_real_B)
    real_BxT = jnp.arange(x_BxTxD.shape[1])[None, :] < n_real_B[:, None]
    u_BxTxW, h_BxW = RGLRU(cfg.lru_width, cfg.scan_impl, name="rg_lru")(
        u_BxTxW, state.h_BxW, real_BxT)
    out_BxTxD = nn.Dense(cfg.d_model, name="output",
                         kernel_init=_residual_init(cfg))(gate_BxTxW * u_BxTxW)
    return x_BxTxD + out_BxTxD, LayerState(h_BxW, conv_tail)


class MLPBlock(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD):
    cfg = self.cfg
    hidden = cfg.mlp_mult * cfg.d_model
    y_BxTxD = RMSNorm(name="norm")(x_BxTxD)
    gate_BxTxM, up_BxTxM = jnp.split(nn.Dense(2 * hidden, name="gate_up")(y_BxTxD), 2, axis=-1)
    out_BxTxD = nn.Dense(cfg.d_model, name="down", kernel_init=_residual_init(cfg))(
        nn.gelu(gate_BxTxM) * up_BxTxM)
    return x_BxTxD + out_BxTxD


def _residual_init(cfg: ModelConfig):
  # Branches that write into the residual stream start small, so depth does
  # not inflate the stream's scale at init.
  return nn.initializers.variance_scaling(1.0 / (2 * cfg.n_layers), "fan_in", "normal")


class MicroLM(nn.Module):
  cfg: ModelConfig
  vocab_size: int
  match_len: int = 0     # longest match length the match model reports; 0: no match input
  match_orders: int = 0  # how many predictions (one per context order) it makes per token
  forecast_channel: bool = False  # reads a forecast of each target token (streamlearn/learn/delta.py)
  surprise_head: bool = False     # holds W of the residual linearisation (delta.residual > 0)
  mixer_cfg: MixerConfig | None = None  # the final logits are the mixer's (streamlearn/nn/mixer.py)
  count_orders: int = 0           # count models it reads (CountFeatures; 0: none)
  gate_orders: int = 0            # the first ones: n-gram orders, ascending (the mixer's gate)

  def setup(self):
    cfg = self.cfg
    self.embed = nn.Embed(self.vocab_size, cfg.d_model,
                          embedding_init=nn.initializers.normal(1.0))
    self.recurrent = [RecurrentBlock(cfg) for _ in range(cfg.n_layers)]
    self.mlp = [MLPBlock(cfg) for _ in range(cfg.n_layers)]
    self.final_norm = RMSNorm()
    if self.match_len:
      # Logit bonus for the match model's token, learned per verified length:
      # how far a match of that length is to be trusted on this stream.
      self.match_trust = self.param("match_trust", _match_trust_init,
                                    (self.match_orders, self.match_len + 1))
      # The trunk reads the matches too: which tokens they predict, and how long they are.
      self.match_token_embed = nn.Embed(self.vocab_size, cfg.d_model,
                                        embedding_init=nn.initializers.normal(0.1))
      self.match_length_embed = nn.Embed(self.match_orders * (self.match_len + 1), cfg.d_model,
                                         embedding_init=nn.initializers.zeros_init())
    if self.forecast_channel:
      self.forecast_embed = nn.Embed(self.vocab_size, cfg.d_model,
                                     embedding_init=nn.initializers.normal(0.1))
      # A learned per-feature gate on the channel, starting mostly closed
      # (sigmoid(-2) = 0.12): the forecast must earn its way into the stream.
      self.forecast_gate = self.param("forecast_gate", nn.initializers.constant(-2.0),
                                      (cfg.d_model,))
    if self.surprise_head:
      # Read by streamlearn/learn/delta.py, not here: surprise ≈ hidden · W.
      self.surprise_w = self.param("surprise_w", nn.initializers.zeros_init(), (cfg.d_model,))
    if cfg.line_position:
      # Where a line break comes is mostly how far into its line a token is (prose wrapped
      # at ~70 columns, code's indentation), which a recurrence learns to count only slowly.
      self.line_position_embed = nn.Embed(LINE_POSITIONS, cfg.d_model,
                                          embedding_init=nn.initializers.zeros_init())
    if self.mixer_cfg is not None:
      self.mixer = Mixer(self.mixer_cfg, self.count_orders, self.match_len > 0,
                         self.gate_orders)

  def __call__(self, tokens_BxT, state: tuple[LayerState, ...], n_real_B=None,
               match: MatchFeatures | None = None, forecast: ForecastInput | None = None,
               with_hidden: bool = False, counts: CountFeatures | None = None,
               line_position_BxT: jax.Array | None = None):
    x_BxTxD = self.embed(tokens_BxT)
    if self.cfg.line_position:
      if line_position_BxT is None:
        raise ValueError("model.line_position: apply needs each position's line position")
      x_BxTxD = x_BxTxD + self.line_position_embed(line_position_BxT)
    if self.forecast_channel:
      on_BxTx1 = (jnp.zeros(tokens_BxT.shape) if forecast is None else forecast.on_BxT)[..., None]
      token_BxT = tokens_BxT if forecast is None else forecast.token_BxT
      x_BxTxD = x_BxTxD + (on_BxTx1 * nn.sigmoid(self.forecast_gate)[None, None]
                           * self.forecast_embed(token_BxT))
    if match is not None:
      found_BxTxOx1 = (match.length_BxTxO > 0)[..., None]
      offset_1x1xO = (jnp.arange(self.match_orders) * (self.match_len + 1))[None, None]
      x_BxTxD = x_BxTxD + jnp.sum(
          found_BxTxOx1 * self.match_token_embed(match.token_BxTxO)
          + self.match_length_embed(offset_1x1xO + match.length_BxTxO), axis=2)
    return self.from_embeddings(x_BxTxD, state, n_real_B, match, with_hidden, counts,
                                tokens_BxT)

  def from_embeddings(self, x_BxTxD, state: tuple[LayerState, ...], n_real_B=None,
                      match: MatchFeatures | None = None, with_hidden: bool = False,
                      counts: CountFeatures | None = None, tokens_BxT: jax.Array | None = None):
    """The model after the embedding lookup (tests differentiate through inputs here).

    n_real_B: real tokens per row (the rest is end-of-stream padding, which
    leaves the carried state untouched); None means all T are real.
    match: the match model's prediction for each position's *target* token.
    with_hidden: also return the final normed hidden state [B, T, D] (what
    the EMA teacher's consistency loss compares).
    counts: the count models' counts for each position's target (with the mixer).
    tokens_BxT: what each position read (the mixer's APM stage takes it as its context).
    """
    B, T = x_BxTxD.shape[:2]
    if n_real_B is None:
      n_real_B = jnp.full((B,), T, jnp.int32)
    new_state = []
    # With an online mixer the state's last item is its online part (mixer.OnlineMix).
    online = state[self.cfg.n_layers] if len(state) > self.cfg.n_layers else None
    for recurrent, mlp, layer_state in zip(self.recurrent, self.mlp, state):
      x_BxTxD, layer_state = recurrent(x_BxTxD, layer_state, n_real_B)
      x_BxTxD = mlp(x_BxTxD)
      new_state.append(layer_state)
    x_BxTxD = self.final_norm(x_BxTxD)
    # Tied head; 1/sqrt(D) keeps initial logits O(1) with unit-variance embeddings.
    logits_BxTxV = self.embed.attend(x_BxTxD) / math.sqrt(self.cfg.d_model)
    if match is not None:
      # Orders that agree add up; an order with no match adds nothing.
      order_1x1xO = jnp.arange(self.match_orders)[None, None]
      trust_BxTxO = jnp.where(match.length_BxTxO > 0,
                              self.match_trust[order_1x1xO, match.length_BxTxO], 0.0)
      logits_BxTxV = logits_BxTxV + jnp.einsum(
          "bto,btov->btv", trust_BxTxO,
          jax.nn.one_hot(match.token_BxTxO, self.vocab_size, dtype=logits_BxTxV.dtype))
    if online is not None:
      logits_BxTxV, online = self.mixer(logits_BxTxV, counts, match, tokens_BxT, online,
                                        n_real_B)
      new_state.append(online)
    elif self.mixer_cfg is not None:
      logits_BxTxV = self.mixer(logits_BxTxV, counts, match, tokens_BxT)
    if with_hidden:
      return logits_BxTxV, tuple(new_state), x_BxTxD
    return logits_BxTxV, tuple(new_state)


@dataclasses.dataclass(frozen=True)
class LM:
  """The µLM as pure functions: init(key), init_state(batch), apply(params, tokens, state)."""

  cfg: ModelConfig
  vocab_size: int
  match_len: int = 0     # > 0: apply takes the match model's features (MatchFeatures)
  match_orders: int = 0
  forecast_channel: bool = False  # apply takes a ForecastInput (absent: the channel reads nothing)
  surprise_head: bool = False
  mixer_cfg: MixerConfig | None = None  # the mixer makes the final logits
  count_orders: int = 0           # > 0: apply takes the count models' features (CountFeatures)
  gate_orders: int = 0            # of which n-gram orders (the rest: word, column contexts)

  @property
  def module(self) -> MicroLM:
    return MicroLM(self.cfg, self.vocab_size, self.match_len, self.match_orders,
                   self.forecast_channel, self.surprise_head, self.mixer_cfg, self.count_orders,
                   self.gate_orders)

  def init_state(self, batch: int) -> tuple[LayerState, ...]:
    """The state before any token: zeros."""
    W, K = self.cfg.lru_width, self.cfg.conv_width
    layers = tuple(LayerState(jnp.zeros((batch, W), jnp.float32),
                              jnp.zeros((batch, K - 1, W), jnp.float32))
                   for _ in range(self.cfg.n_layers))
    if self.mixer_cfg is None or not self.mixer_cfg.online_lr:
      return layers
    mixer = Mixer(self.mixer_cfg, self.count_orders, self.match_len > 0, self.gate_orders,
                  parent=None)
    return layers + (init_online(batch, *mixer.online_shape(self.vocab_size), mixer.n_inputs,
                                 self.vocab_size),)

  def init(self, key: jax.Array) -> dict:
    """Fresh parameters."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    none_1x1xO = jnp.zeros((1, 1, self.match_orders), jnp.int32)
    match = MatchFeatures(none_1x1xO, none_1x1xO) if self.match_len else None
    counts = (CountFeatures(jnp.zeros((1, 1, self.count_orders, self.vocab_size)))
              if self.count_orders else None)
    return self.module.init(key, tokens, self.init_state(1), None, match, counts=counts,
                            line_position_BxT=tokens)["params"]

  def apply(self, params, tokens_BxT, state, n_real_B=None, match: MatchFeatures | None = None,
            forecast: ForecastInput | None = None, counts: CountFeatures | None = None,
            line_position_BxT: jax.Array | None = None
            ) -> tuple[jax.Array, tuple[LayerState, ...]]:
    """(logits [B, T, V] float32, the state after the last real token).

    line_position_BxT (with `model.line_position`): how many tokens precede each position's
    target on its line (`streamlearn.learn.chunk.line_positions`), at most LINE_POSITIONS - 1.
    """
    return self.module.apply({"params": params}, tokens_BxT, state, n_real_B, match, forecast,
                             counts=counts, line_position_BxT=line_position_BxT)

  def apply_with_hidden(self, params, tokens_BxT, state, n_real_B=None,
                        match: MatchFeatures | None = None,
                        forecast: ForecastInput | None = None):
    """(logits, state, final hidden [B, T, D]): apply, plus what the logits are read from."""
    return self.module.apply({"params": params}, tokens_BxT, state, n_real_B, match, forecast,
                             True)


def count_params(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))

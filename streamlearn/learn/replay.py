"""Prioritized surprise replay: a fixed-capacity, device-resident buffer of past chunk openings.

Each entry is the first R tokens of a chunk the learner has learned from, with
everything needed to replay them exactly as they were first read: the token
before them, the recurrent state they started from and the match model's
features. Its priority is its surprise (bits/token when it was scored, then
its replay loss each time it is replayed); sampling draws entry i with
probability P(i) ∝ surprise_i^alpha, and the loss is importance-weighted by
(N P(i))^-beta / max, as in prioritized experience replay (Schaul et al. 2016).

When full, a new entry replaces the least surprising one (when it is more
surprising itself): the buffer keeps the most surprising past, and memory
stays bounded however long the stream runs.

Dimension letters: C = capacity, B = streams, R = tokens per entry, S = samples.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from streamlearn.nn.match import MatchFeatures

_EMPTY = -jnp.inf  # an empty slot's surprise: below anything real, never sampled


@flax.struct.dataclass
class ReplayEntry:
  """What replaying one chunk opening needs (leaves [B, ...]; stacked [C, B, ...] in the buffer)."""

  tokens_BxR: jax.Array      # int32
  mask_BxR: jax.Array        # float32: 0 on padding
  last_token_B: jax.Array    # int32: the token before the first one
  rec_state: Any             # the recurrent state before the first token
  match: MatchFeatures | None  # the match model's features for the R tokens


@flax.struct.dataclass
class ReplayBuffer:
  entries: ReplayEntry       # every leaf [C, ...]
  surprise_C: jax.Array      # float32 bits/token; -inf where empty


def init_replay(capacity: int, example: ReplayEntry) -> ReplayBuffer:
  """An empty buffer whose entries look like `example`."""
  entries = jax.tree.map(lambda x: jnp.zeros((capacity,) + x.shape, x.dtype), example)
  return ReplayBuffer(entries, jnp.full((capacity,), _EMPTY, jnp.float32))


def insert(buffer: ReplayBuffer, entry: ReplayEntry, surprise, enabled=True) -> ReplayBuffer:
  """The buffer with `entry` in an empty slot, or instead of the least surprising one.

  A full buffer whose least surprising entry is still more surprising than
  `entry` stays as it is; so does any buffer when `enabled` is False.
  """
  slot = jnp.argmin(buffer.surprise_C)
  take = enabled & (surprise > buffer.surprise_C[slot])
  entries = jax.tree.map(lambda all_, x: all_.at[slot].set(jnp.where(take, x, all_[slot])),
                         buffer.entries, entry)
  surprise_C = buffer.surprise_C.at[slot].set(jnp.where(take, surprise, buffer.surprise_C[slot]))
  return ReplayBuffer(entries, surprise_C)


def probabilities(buffer: ReplayBuffer, alpha: float) -> jax.Array:
  """P(i) ∝ surprise_i^alpha over the filled slots (0 for empty ones; all 0 when none is filled)."""
  filled_C = jnp.isfinite(buffer.surprise_C)
  # A floor keeps a perfectly predicted entry drawable (surprise 0 -> P > 0).
  weight_C = jnp.where(filled_C, jnp.maximum(buffer.surprise_C, 1e-3) ** alpha, 0.0)
  return weight_C / jnp.maximum(jnp.sum(weight_C), 1e-30)


def sample(buffer: ReplayBuffer, key, n: int, alpha: float, beta: float):
  """(indices [n], importance weights [n]) drawn with replacement; weights are 0 when empty."""
  p_C = probabilities(buffer, alpha)
  index_S = jax.random.choice(key, p_C.shape[0], (n,), replace=True, p=p_C)
  filled = jnp.sum(jnp.isfinite(buffer.surprise_C))
  # (N P)^-beta, divided by its largest possible value (the least likely filled entry's).
  p_min = jnp.min(jnp.where(p_C > 0, p_C, jnp.inf))
  weight_S = (p_C[index_S] / p_min) ** -beta
  return index_S, jnp.where(filled > 0, weight_S, 0.0)


def gather(buffer: ReplayBuffer, index_S) -> ReplayEntry:
  """The sampled entries as one batch: leaves [S * B, ...] (every stream row its own sequence)."""
  return jax.tree.map(lambda x: x[index_S].reshape((-1,) + x.shape[2:]), buffer.entries)


def reprioritize(buffer: ReplayBuffer, index_S, surprise_S, enabled=True) -> ReplayBuffer:
  """The sampled entries' priorities set to their surprise now (an empty slot stays empty)."""
  old_S = buffer.surprise_C[index_S]
  new_S = jnp.where(enabled & jnp.isfinite(old_S), surprise_S, old_S)
  return buffer.replace(surprise_C=buffer.surprise_C.at[index_S].set(new_S))

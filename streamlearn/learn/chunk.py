"""A chunk of the stream as a step takes it, and the index arithmetic every step shares.

Dimension letters: B = streams, T = tokens per chunk.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Chunk(NamedTuple):
  tokens_BxT: jax.Array    # int32
  mask_BxT: jax.Array      # float32: 0 on padding after the end of the stream
  n_bytes_B: jax.Array     # float32: bytes the chunk's real tokens stand for


def n_real(mask_BxT) -> jax.Array:
  """Real (unpadded) tokens per row, int32 [B]."""
  return jnp.sum(mask_BxT > 0, axis=1).astype(jnp.int32)


def shift_in(last_token_B, tokens_BxT) -> jax.Array:
  """What the model reads to predict a chunk: each token's predecessor, [B, T]."""
  return jnp.concatenate([last_token_B[:, None], tokens_BxT[:, :-1]], axis=1)


def last_real_token(tokens_BxT, n_real_B, before_B) -> jax.Array:
  """Each row's last real token: the next chunk's first input (`before_B` if none is real)."""
  last_B = jnp.take_along_axis(tokens_BxT, jnp.maximum(n_real_B - 1, 0)[:, None], 1)[:, 0]
  return jnp.where(n_real_B > 0, last_B, before_B)

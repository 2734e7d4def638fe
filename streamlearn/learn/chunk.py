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


NEWLINE = 10  # the byte tokenizer's line break; on a BPE vocabulary, whichever token has id 10


def line_positions(before_B, tokens_BxT, n_real_B, cap: int) -> tuple[jax.Array, jax.Array]:
  """(how many tokens precede each token on its line [B, T], the same for the token after
  the chunk's real ones [B]), both at most `cap`; before_B: the chunk's first token's.

  Position t's line position counts the tokens after the latest line break before it, in
  this chunk or, if there is none, from `before_B` on. Padding moves nothing.
  """
  T = tokens_BxT.shape[1]
  t_T = jnp.arange(T, dtype=jnp.int32)
  real_BxT = t_T[None] < n_real_B[:, None]
  # The latest line break at or before each index (-1: none in the chunk yet).
  latest_BxT = jax.lax.cummax(jnp.where((tokens_BxT == NEWLINE) & real_BxT, t_T[None], -1),
                              axis=1)
  # Position t reads breaks before it; the token after the chunk, those before n_real.
  before_BxT = jnp.concatenate([jnp.full_like(latest_BxT[:, :1], -1), latest_BxT[:, :-1]],
                               axis=1)
  at = lambda latest, t: jnp.minimum(jnp.where(latest >= 0, t - latest - 1,
                                               before_B[:, None] + t), cap)
  last_B = jnp.take_along_axis(latest_BxT, jnp.maximum(n_real_B - 1, 0)[:, None], 1)[:, 0]
  last_B = jnp.where(n_real_B > 0, last_B, -1)
  return at(before_BxT, t_T[None]), at(last_B[:, None], n_real_B[:, None])[:, 0]

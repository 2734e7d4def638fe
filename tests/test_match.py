"""The match model against brute force: exact features, causality, fixed memory."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from streamlearn.config import MatchConfig
from streamlearn.nn.match import _hash_slots, init_match, match_update, reference_features

CFG = MatchConfig(orders=(3, 6), max_len=8, history_log2=10, table_log2=20)


@functools.cache
def _jitted_update(cfg: MatchConfig):
  """One jitted update per config, so each chunk shape compiles once per module.

  The state is donated: the loop below never reads it again, and CFG's 2^20-slot
  tables would otherwise be copied at every one-token step.
  """
  return jax.jit(lambda s, tok, n: match_update(cfg, s, tok, n), donate_argnums=0)


def _run(cfg: MatchConfig, stream: np.ndarray, T: int):
  """Features over a whole stream fed in chunks of T (the last one padded)."""
  state = init_match(cfg, 1)
  update = _jitted_update(cfg)
  tokens, lengths = [], []
  for lo in range(0, len(stream), T):
    piece = stream[lo:lo + T]
    padded = np.zeros(T, np.int32)
    padded[:len(piece)] = piece
    features, state = update(state, jnp.asarray(padded[None]), jnp.asarray([len(piece)]))
    tokens.append(np.asarray(features.token_BxTxO[0, :len(piece)]))
    lengths.append(np.asarray(features.length_BxTxO[0, :len(piece)]))
  return np.concatenate(tokens), np.concatenate(lengths), state


def _collision_free(cfg: MatchConfig, stream: np.ndarray) -> bool:
  """No two different contexts of one order share a table slot."""
  back = max(cfg.orders)
  ext = jnp.asarray(np.concatenate([np.full(back, -1), stream]).astype(np.int32))
  all_slots = _hash_slots(ext, back, len(stream), cfg.orders, cfg.table_log2)
  for order, slots in zip(cfg.orders, map(np.asarray, all_slots)):
    seen = {}
    for p in range(order, len(stream)):
      ctx = tuple(stream[p - order:p])
      if seen.setdefault(slots[p], ctx) != ctx:
        return False
  return True


def _random_stream(rng, n: int, alphabet: int) -> np.ndarray:
  # Repeats on purpose: copies of earlier stretches, as in real text.
  out = list(rng.integers(0, alphabet, 20))
  while len(out) < n:
    if rng.random() < 0.5:
      start = int(rng.integers(0, len(out)))
      out.extend(out[start:start + int(rng.integers(3, 30))])
    else:
      out.extend(rng.integers(0, alphabet, int(rng.integers(1, 10))))
  return np.asarray(out[:n], np.int32)


def _collision_free_stream(rng, n: int, alphabet: int) -> np.ndarray:
  while True:
    stream = _random_stream(rng, n, alphabet)
    if _collision_free(CFG, stream):
      return stream


@pytest.mark.parametrize("T", [1, 16, 57])
def test_features_equal_brute_force(rng, T):
  stream = _collision_free_stream(rng, 300, alphabet=5)
  token, length, state = _run(CFG, stream, T)
  want_token, want_length = reference_features(CFG, stream)
  np.testing.assert_array_equal(length, want_length)
  has = want_length > 0
  np.testing.assert_array_equal(token[has], want_token[has])
  assert has.mean() > 0.25  # the test stream does exercise matching (~half its positions)
  assert int(state.pos_B[0]) == len(stream)


def test_every_reported_match_is_real_after_the_ring_wraps(rng):
  # A ring of 64 tokens and a small table: collisions and overwrites happen;
  # whatever is reported must still be an earlier stretch that truly agrees.
  cfg = MatchConfig(orders=(2, 5), max_len=8, history_log2=6, table_log2=6)
  stream = _random_stream(rng, 600, alphabet=4)
  token, length, _ = _run(cfg, stream, 16)
  H = 1 << cfg.history_log2
  assert (length > 0).mean() > 0.5
  for p, o in zip(*np.nonzero(length)):
    k = int(length[p, o])
    oldest = p // 16 * 16 + 16 - H  # what the ring still held when p's chunk came
    ok = [q for q in range(max(k, oldest + k), p)
          if np.array_equal(stream[q - k:q], stream[p - k:p]) and stream[q] == token[p, o]]
    assert ok, f"position {p}: no earlier match of length {k} predicting {token[p, o]}"


def test_features_never_see_the_token_they_predict(rng):
  stream = _random_stream(rng, 200, alphabet=4)
  token, length, _ = _run(CFG, stream, 16)  # chunks of 16: a shape compiled above
  p = 150  # not on a chunk boundary: the change starts mid-chunk
  changed = stream.copy()
  changed[p:] = (changed[p:] + 1) % 4
  token2, length2, _ = _run(CFG, changed, 16)
  np.testing.assert_array_equal(length[:p + 1], length2[:p + 1])
  np.testing.assert_array_equal(token[:p + 1], token2[:p + 1])


def test_memory_is_fixed_and_padding_is_not_recorded(rng):
  stream = _random_stream(rng, 100, alphabet=4)
  _, _, state = _run(CFG, stream, 57)  # 100 = 57 + 43 real + 14 padding
  shapes = jax.tree.map(lambda x: x.shape, state)
  assert shapes == jax.tree.map(lambda x: x.shape, init_match(CFG, 1))
  assert int(state.pos_B[0]) == 100
  # Padding leaves no entry: no table slot points past the last real token.
  assert int(state.table_BxOxS.max()) <= 100


def test_too_short_a_history_is_a_clear_error():
  cfg = MatchConfig(history_log2=8)
  with pytest.raises(ValueError, match="match.history_log2"):
    match_update(cfg, init_match(cfg, 1), jnp.zeros((1, 256), jnp.int32), jnp.array([256]))

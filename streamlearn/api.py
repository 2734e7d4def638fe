"""The Python API: a µLM you feed text to, that learns as it reads.

    from streamlearn import Learner

    learner = Learner.from_config("configs/default.toml")
    learner.feed(open("notes.txt").read())      # scores, then learns, chunk by chunk
    probs = learner.next_token_probs()          # [vocab]: what it expects next
    print(learner.generate("The ", max_tokens=80, temperature=0.8))
    learner = Learner.load("checkpoints/default")   # a run's latest version (a swarm's leader)

Text is learned in whole chunks of `data.chunk_tokens` tokens, like the CLI;
what is left over waits for the next `feed`, but already counts for
`next_token_probs` and `generate`, which read the state after every fed token
without learning from it.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from streamlearn.config import Config, ConfigError, config_from_dict, load_config
from streamlearn.data.tokenizer import Tokenizer, make_tokenizer, tokenizer_from_json
from streamlearn.learn.build import build
from streamlearn.learn.chunk import Chunk
from streamlearn.learn.state import Carry, Predictor, init_learner
from streamlearn.store.artifact import ArtifactError, read_artifact
from streamlearn.store.checkpoint import Checkpointer, VersionError
from streamlearn.store.rundir import RunError, read_config, run_tokenizer
from streamlearn.swarm.swarm import restore_member


def _as_bytes(text: str | bytes) -> bytes:
  return text.encode("utf-8") if isinstance(text, str) else bytes(text)


@functools.cache
def _walk(predictor: Predictor):
  """Jitted: the carry after the first n of T tokens, and the logits for the token after them."""

  def walk(params, carry: Carry, tokens_1xT, n):
    _, carry = predictor.advance(params, carry, tokens_1xT, jnp.reshape(n, (1,)))
    return carry, _next_logits(predictor, params, carry)

  return jax.jit(walk)


def _next_logits(predictor: Predictor, params, carry: Carry) -> jax.Array:
  # A chunk with no real token: its first logits are the prediction for what
  # comes next, and the carry does not move.
  logits_1x1xV, _ = predictor.advance(params, carry, jnp.zeros((1, 1), jnp.int32),
                                      jnp.zeros((1,), jnp.int32))
  return logits_1x1xV[:, 0]


@functools.cache
def _sampler(predictor: Predictor, max_tokens: int):
  def sample(params, carry: Carry, key, temperature):
    def one(carry, key):
      logits_1xV = _next_logits(predictor, params, carry) / jnp.maximum(temperature, 1e-6)
      greedy = jnp.argmax(logits_1xV, axis=-1)
      drawn = jax.random.categorical(key, logits_1xV, axis=-1)
      token_1 = jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)
      _, carry = predictor.advance(params, carry, token_1[:, None], jnp.ones((1,), jnp.int32))
      return carry, token_1[0]

    _, tokens = jax.lax.scan(one, carry, jax.random.split(key, max_tokens))
    return tokens

  return jax.jit(sample)


class Learner:
  """A µLM that learns from the text it is fed (score first, then learn)."""

  def __init__(self, config: Config, tokenizer: Tokenizer, state=None):
    self.config, self.tokenizer = config, tokenizer
    self.predictor, self.optimizer, self._step = build(config, tokenizer.vocab_size)
    self.state = state if state is not None else init_learner(
        self.predictor, self.optimizer, seed=config.seed, bos_id=tokenizer.bos_id)
    self._pending = np.zeros((0,), np.int32)
    self.bytes_learned = 0
    self.bits_learned = 0.0

  @classmethod
  def from_config(cls, config: Config | str | Path | dict | None = None,
                  overrides: list[str] = (), *, warmup: str | bytes = b"") -> "Learner":
    """A fresh learner. A BPE config trains its vocabulary on `warmup`."""
    if isinstance(config, Config):
      cfg = config
    elif isinstance(config, dict):
      cfg = config_from_dict(config, list(overrides))
    else:
      cfg = load_config(config, list(overrides))
    tokenizer = make_tokenizer(cfg.tokenizer.kind, vocab_size=cfg.tokenizer.vocab_size,
                               warmup=_as_bytes(warmup))
    return cls(cfg, tokenizer)

  @classmethod
  def load(cls, run_dir: str | Path, step: int | None = None,
           member: str | int = "best") -> "Learner":
    """The learner of a run directory, at its latest version (or `step`).

    A swarm's run gives one member: `best` (the leader, lowest rolling
    bits/byte when the version was saved) or a member id alive in that version.
    """
    run_dir = Path(run_dir)
    config = read_config(run_dir)  # VersionError (one line) if it is not a run directory
    checkpointer = Checkpointer(run_dir, config.checkpoint)
    try:
      try:
        tokenizer = run_tokenizer(run_dir, checkpointer, checkpointer.all_steps(), repair=False)
      except RunError as err:
        raise VersionError(str(err)) from None
      state, _, _ = restore_member(checkpointer, config, tokenizer.vocab_size, tokenizer.bos_id,
                                   step, member)
    finally:
      checkpointer.close()
    return cls(config, tokenizer, state)

  # --- learning -------------------------------------------------------------------------

  def feed(self, text: str | bytes) -> dict:
    """Learns from text: every whole chunk is scored, then learned. Returns their totals."""
    tokens = self.tokenizer.encode(_as_bytes(text))
    self._pending = np.concatenate([self._pending, tokens]).astype(np.int32)
    T = self.config.data.chunk_tokens
    bits, n_bytes, chunks = 0.0, 0, 0
    in_flight = []
    while len(self._pending) >= T:
      chunk, self._pending = self._pending[:T], self._pending[T:]
      b = int(self.tokenizer.token_bytes[chunk].sum())
      self.state, metrics = self._step(self.state, Chunk(
          jnp.asarray(chunk[None]), jnp.ones((1, T), jnp.float32),
          jnp.full((1,), float(b), jnp.float32)))
      in_flight.append(metrics["bits"])
      n_bytes += b
      chunks += 1
    bits = float(sum(jax.device_get(in_flight))) if in_flight else 0.0
    self.bytes_learned += n_bytes
    self.bits_learned += bits
    return {"chunks": chunks, "bytes": n_bytes,
            "bits_per_byte": bits / n_bytes if n_bytes else float("nan"),
            "pending_tokens": len(self._pending)}

  # --- reading ----------------------------------------------------------------------------

  def _current(self):
    """(carry, next-token logits) after every token fed so far."""
    return self._walk_from(self.state.carry, self._pending)

  def _walk_from(self, carry: Carry, tokens: np.ndarray):
    T = self.config.data.chunk_tokens
    walk = _walk(self.predictor)
    logits = _next_logits(self.predictor, self.state.params, carry) if not len(tokens) else None
    for lo in range(0, len(tokens), T):
      piece = tokens[lo:lo + T]
      padded = np.full((1, T), self.tokenizer.pad_id, np.int32)
      padded[0, :len(piece)] = piece
      carry, logits = walk(self.state.params, carry, jnp.asarray(padded), len(piece))
    return carry, logits

  def next_token_probs(self) -> np.ndarray:
    """Probabilities [vocab] of the next token, given everything fed so far."""
    _, logits = self._current()
    return np.asarray(jax.nn.softmax(logits[0]))

  def generate(self, prompt: str | bytes = b"", *, max_tokens: int = 200,
               temperature: float = 1.0, seed: int = 0) -> str:
    """Continues the stream (plus `prompt`) without learning; decoded as UTF-8 (lenient)."""
    carry, _ = self._current()
    carry, _ = self._walk_from(carry, self.tokenizer.encode(_as_bytes(prompt)))
    tokens = _sampler(self.predictor, max_tokens)(self.state.params, carry,
                                                  jax.random.PRNGKey(seed), float(temperature))
    return self.tokenizer.decode(np.asarray(tokens)).decode("utf-8", errors="replace")


def load_artifact(path: str | Path):
  """A `streamlearn.Learner` with the artifact's (dequantized) parameters."""
  blob = read_artifact(path)
  try:
    config = config_from_dict(blob["config"])
    tokenizer = tokenizer_from_json(blob["tokenizer"], f"{path} tokenizer")
  except (ConfigError, ValueError, KeyError) as err:
    raise ArtifactError(f"{path}: {err}") from None
  learner = Learner(config, tokenizer)
  params = jax.tree.map(jnp.asarray, blob["params"])
  shapes = lambda tree: jax.tree.map(lambda x: x.shape, tree)
  if (jax.tree.structure(params) != jax.tree.structure(learner.state.params)
      or shapes(params) != shapes(learner.state.params)):
    raise ArtifactError(f"{path}: its parameters do not fit its config's model")
  learner.state = learner.state.replace(params=params)
  return learner

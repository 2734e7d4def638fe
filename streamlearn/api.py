"""The Python API: a µLM you feed text to, that learns as it reads.

    from streamlearn import Learner

    learner = Learner.from_config("configs/default.toml")
    learner.feed(open("notes.txt").read())      # scores, then learns, chunk by chunk
    probs = learner.next_token_probs()          # [vocab]: what it expects next
    print(learner.generate("The ", max_tokens=80, temperature=0.8))
    learner = Learner.load("checkpoints/default")   # a run's latest version

Text is learned in whole chunks of `data.chunk_tokens` tokens, like the CLI;
what is left over waits for the next `feed`, but already counts for
`next_token_probs` and `generate`, which read the state after every fed token
without learning from it.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from streamlearn.checkpoint import Checkpointer, abstract_like
from streamlearn.config import Config, config_from_dict, load_config
from streamlearn.learner import Chunk, build, init_learner
from streamlearn.model import LM
from streamlearn.tokenizer import Tokenizer, load_tokenizer, make_tokenizer


def _as_bytes(text: str | bytes) -> bytes:
  return text.encode("utf-8") if isinstance(text, str) else bytes(text)


@functools.cache
def _token_walk(lm: LM, T: int):
  """Jitted: the state after the first n of T tokens (one at a time), and the next-token logits."""

  def walk(params, rec_state, last_token_B, tokens_T, n):
    # The learner's convention: rec_state has seen every token before last_token.
    def one(carry, i):
      rec, prev = carry
      _, new_rec = lm.apply(params, prev[:, None], rec)
      keep = i < n
      rec = jax.tree.map(lambda new, old: jnp.where(keep, new, old), new_rec, rec)
      prev = jnp.where(keep, tokens_T[i][None], prev)
      return (rec, prev), None

    (rec, prev), _ = jax.lax.scan(one, (rec_state, last_token_B), jnp.arange(T))
    # The logits for the token after the last fed one come from feeding that token.
    logits_1x1xV, _ = lm.apply(params, prev[:, None], rec)
    return rec, prev, logits_1x1xV[:, 0]

  return jax.jit(walk)


@functools.cache
def _sampler(lm: LM, max_tokens: int):
  def sample(params, rec_state, last_token_B, key, temperature):
    def one(carry, key):
      rec, prev = carry
      logits_1x1xV, rec = lm.apply(params, prev[:, None], rec)
      logits_1xV = logits_1x1xV[:, 0] / jnp.maximum(temperature, 1e-6)
      greedy = jnp.argmax(logits_1xV, axis=-1)
      drawn = jax.random.categorical(key, logits_1xV, axis=-1)
      token = jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)
      return (rec, token), token[0]

    _, tokens = jax.lax.scan(one, (rec_state, last_token_B), jax.random.split(key, max_tokens))
    return tokens

  return jax.jit(sample)


class Learner:
  """A µLM that learns from the text it is fed (score first, then learn)."""

  def __init__(self, config: Config, tokenizer: Tokenizer, state=None):
    self.config, self.tokenizer = config, tokenizer
    self.lm, self.optimizer, self._step = build(config, tokenizer.vocab_size)
    self.state = state if state is not None else init_learner(
        self.lm, self.optimizer, seed=config.seed, bos_id=tokenizer.bos_id)
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
  def load(cls, run_dir: str | Path, step: int | None = None) -> "Learner":
    """The learner of a run directory, at its latest version (or `step`)."""
    run_dir = Path(run_dir)
    config = config_from_dict(json.loads((run_dir / "config.json").read_text()))
    tokenizer = load_tokenizer(run_dir)
    learner = cls(config, tokenizer)
    checkpointer = Checkpointer(run_dir, config.checkpoint)
    learner.state, _, _ = checkpointer.restore(step, abstract_like(learner.state))
    checkpointer.close()
    return learner

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
    """(recurrent state, last token, next-token logits) after every token fed so far."""
    T = self.config.data.chunk_tokens
    padded = np.full(T, self.tokenizer.pad_id, np.int32)
    padded[:len(self._pending)] = self._pending
    return _token_walk(self.lm, T)(self.state.params, self.state.rec_state,
                                   self.state.last_token_B, jnp.asarray(padded),
                                   len(self._pending))

  def next_token_probs(self) -> np.ndarray:
    """Probabilities [vocab] of the next token, given everything fed so far."""
    _, _, logits = self._current()
    return np.asarray(jax.nn.softmax(logits[0]))

  def generate(self, prompt: str | bytes = b"", *, max_tokens: int = 200,
               temperature: float = 1.0, seed: int = 0) -> str:
    """Continues the stream (plus `prompt`) without learning; decoded as UTF-8 (lenient)."""
    rec, last, _ = self._current()
    prompt_tokens = self.tokenizer.encode(_as_bytes(prompt))
    T = self.config.data.chunk_tokens
    walk = _token_walk(self.lm, T)
    for lo in range(0, len(prompt_tokens), T):
      piece = prompt_tokens[lo:lo + T]
      padded = np.full(T, self.tokenizer.pad_id, np.int32)
      padded[:len(piece)] = piece
      rec, last, _ = walk(self.state.params, rec, last, jnp.asarray(padded), len(piece))
    tokens = _sampler(self.lm, max_tokens)(self.state.params, rec, last,
                                           jax.random.PRNGKey(seed), float(temperature))
    return self.tokenizer.decode(np.asarray(tokens)).decode("utf-8", errors="replace")

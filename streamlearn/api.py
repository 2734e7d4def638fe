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

from collections.abc import Generator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from streamlearn.config import Config, ConfigError, config_from_dict, load_config
from streamlearn.data.tokenizer import Tokenizer, make_tokenizer, tokenizer_from_json
from streamlearn.learn import sample as sample_lib
from streamlearn.learn.build import build
from streamlearn.learn.chunk import Chunk
from streamlearn.learn.state import Carry, init_learner
from streamlearn.store.artifact import ArtifactError, carry_leaves, read_artifact
from streamlearn.store.checkpoint import Checkpointer, VersionError
from streamlearn.store.rundir import RunError, read_config, run_tokenizer
from streamlearn.swarm.swarm import restore_member


def _as_bytes(text: str | bytes) -> bytes:
  return text.encode("utf-8") if isinstance(text, str) else bytes(text)


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

  def _forecast(self):
    """(forecast tokens [K], whether it is on): the delta learner's forecast of the next chunk,
    which the step reads beside the chunk's first K tokens."""
    delta = self.state.delta
    if delta is None or delta.pending is None:
      return jnp.zeros((1,), jnp.int32), jnp.bool_(False)
    return delta.pending.token_BxK[0], delta.pending.made_at >= 0

  def _read(self, tokens: np.ndarray, carry: Carry | None = None, start: int = 0):
    """The carry after reading `tokens` from `carry` (default: the state's), as the step would
    read them at chunk position `start`; returns (carry, the chunk position after them)."""
    T = self.config.data.chunk_tokens
    carry = self.state.carry if carry is None else carry
    walk, (forecast_K, forecast_on) = sample_lib.walker(self.predictor), self._forecast()
    for lo in range(0, len(tokens), T):
      piece = tokens[lo:lo + T]
      padded = np.full((1, T), self.tokenizer.pad_id, np.int32)
      padded[0, :len(piece)] = piece
      carry = walk(self.state.params, carry, jnp.asarray(padded), len(piece), start + lo,
                   forecast_K, forecast_on)
    return carry, start + len(tokens)

  def next_token_logits(self, text: str | bytes = b"") -> np.ndarray:
    """Logits [vocab] of the next token after everything fed (and `text`, not learned):
    exactly what the step will score that token with."""
    carry, position = self._read(np.concatenate(
        [self._pending, self.tokenizer.encode(_as_bytes(text))]).astype(np.int32))
    logits = sample_lib.next_logits(self.predictor)(self.state.params, carry, position,
                                                    *self._forecast())
    return np.asarray(logits[0], np.float32)

  def next_token_probs(self, text: str | bytes = b"") -> np.ndarray:
    """Probabilities [vocab] of the next token, given everything fed so far (and `text`)."""
    return np.asarray(jax.nn.softmax(self.next_token_logits(text)))

  def generate(self, prompt: str | bytes = b"", *, max_tokens: int = 200,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               repetition_penalty: float = 1.0, stop: Sequence[str] = (), seed: int = 0) -> str:
    """Continues the stream (plus `prompt`) without learning; decoded as UTF-8 (lenient).

    temperature 0 is greedy; top_k, top_p and repetition_penalty shape the draw
    (streamlearn/learn/sample.py); generation ends after max_tokens, at the first
    of the `stop` strings (left out of the text) or at a document separator.
    """
    return "".join(self.stream(prompt, max_tokens=max_tokens, temperature=temperature,
                               top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                               stop=stop, seed=seed))

  def stream(self, prompt: str | bytes = b"", *, max_tokens: int = 200,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             repetition_penalty: float = 1.0, stop: Sequence[str] = (),
             seed: int = 0) -> Generator[str, None, int]:
    """`generate` as it is drawn: pieces of text (one per block of tokens sampled) that join
    into what `generate` returns. A piece never ends inside a character or inside a text
    that may still become a stop string. Returns (as StopIteration.value) the number of
    tokens the text holds: max_tokens when it ran to its length."""
    options = sample_lib.Sampling(temperature, top_k, top_p, repetition_penalty)
    tokens = np.concatenate([self._pending, self.tokenizer.encode(_as_bytes(prompt))])
    carry, position = self._read(tokens.astype(np.int32))
    recent = np.full(sample_lib.WINDOW, -1, np.int32)
    context = tokens[-sample_lib.WINDOW:]
    recent[len(recent) - len(context):] = context
    never = np.zeros(self.tokenizer.vocab_size, bool)
    never[[self.tokenizer.bos_id, self.tokenizer.pad_id]] = True
    sampler, key = sample_lib.block_sampler(self.predictor), jax.random.PRNGKey(seed)
    hold = max((len(s) for s in stop if s), default=1) - 1  # what may start a stop string
    out, recent, sent = [], jnp.asarray(recent), 0
    while sum(map(len, out)) < max_tokens:
      key, block_key = jax.random.split(key)
      block, carry, position, recent = sampler(
          self.state.params, carry, jnp.int32(position), recent, block_key, jnp.asarray(never),
          options.arrays(), *self._forecast())
      out.append(np.asarray(block))
      drawn = np.concatenate(out)[:max_tokens]
      text, done = self._until_stop(drawn, stop)
      if done or len(drawn) >= max_tokens:
        break
      # Held back: the last characters (a stop string may begin there) and a character
      # whose bytes are not all drawn yet (decoded as U+FFFD until they are).
      ready = len(text.rstrip("\ufffd")) - hold
      if ready > sent:
        yield text[sent:ready]
        sent = ready
    else:
      text, done, drawn = "", False, np.zeros(0, np.int32)
    if len(text) > sent:
      yield text[sent:]
    return len(self.tokenizer.encode(text.encode("utf-8"))) if done else len(drawn)

  def _until_stop(self, tokens: np.ndarray, stop: Sequence[str]) -> tuple[str, bool]:
    """(the text of `tokens` up to a document separator or a stop string, whether it ended)."""
    ended = np.flatnonzero(tokens == self.tokenizer.doc_id)
    if len(ended):
      tokens = tokens[:ended[0]]
    text = self.tokenizer.decode(tokens).decode("utf-8", errors="replace")
    cuts = [text.find(s) for s in stop if s and s in text]
    if cuts:
      return text[:min(cuts)], True
    return text, bool(len(ended))


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
  if blob.get("carry") is not None:  # the stream as the version left it
    fresh = carry_leaves(learner.state.carry)
    spec = lambda leaves: {k: (x.shape, x.dtype) for k, x in leaves.items()}
    if spec(blob["carry"]) != spec(fresh):
      raise ArtifactError(f"{path}: its stream state does not fit its config's model")
    leaves = [jnp.asarray(blob["carry"][k]) for k in fresh]
    learner.state = learner.state.replace(carry=jax.tree.unflatten(
        jax.tree.structure(learner.state.carry), leaves))
  return learner

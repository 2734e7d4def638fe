"""What a run directory holds besides its versions, and how a run reads it back.

The one-line error a run that cannot start raises (`RunError`); the lock on a
live run's directory; `config.json`, written whole; the run's tokenizer, with
a fallback to a version's copy; a stream's prefix read for BPE warm-up and
streamed again; and another run's parameters as a frozen base (`delta.base`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp

from streamlearn.checkpoint import Checkpointer, RunLock, VersionError
from streamlearn.distributed import is_primary
from streamlearn.sources import Block, Source
from streamlearn.tokenizer import Tokenizer, load_tokenizer, tokenizer_from_json

log = logging.getLogger("streamlearn.run")

CONFIG_FILE = "config.json"


class RunError(RuntimeError):
  """A run that cannot start or continue; the message is one line."""


class _ReplaySource(Source):
  """A source whose first blocks were already read (for BPE warm-up); replays them."""

  def __init__(self, inner: Source, first_blocks: list[Block], rest):
    super().__init__(inner.name, block_bytes=inner.block_bytes)
    self.inner, self.first_blocks, self.rest = inner, first_blocks, rest
    self.skipped = inner.skipped

  def blocks(self, start=None):
    if start is not None:
      return self.inner.blocks(start)
    return self._replay()

  def _replay(self):
    yield from self.first_blocks
    yield from self.rest


def read_prefix(source: Source, n_bytes: int) -> tuple[bytes, Source]:
  """The first n_bytes of a source, and a source that still yields them first."""
  blocks, total = [], 0
  iterator = source.blocks()
  for block in iterator:
    blocks.append(block)
    total += len(block.data)
    if total >= n_bytes:
      break
  data = b"".join(b.data for b in blocks)[:n_bytes]
  return data, _ReplaySource(source, blocks, iterator)


def check_same(saved: dict, current: dict, key: str) -> None:
  node_s, node_c = saved, current
  for part in key.split("."):
    node_s, node_c = node_s.get(part), node_c.get(part)
  if node_s != node_c:
    raise RunError(f"{key}: this run was made with {node_s!r}, the config says {node_c!r}; "
                   f"resume with the run's own config or start a new --run-dir")


class _Unlocked:
  """The lock of a process that is not process 0: that one holds the run's."""

  def release(self) -> None:
    pass


def lock_run(run_dir: Path) -> RunLock | _Unlocked:
  if not is_primary():
    return _Unlocked()
  try:
    return RunLock(run_dir)
  except VersionError as err:
    raise RunError(str(err)) from None


def named_base(spec: str, like_params):
  """The parameters of version STEP (default: the newest) of run RUN_DIR, for `delta.base`
  (a swarm's: its leader's).

  Parameters the named run lacks (the forecast channel, when it learned
  without one) keep this run's start values: the base never reads a forecast.
  """
  from streamlearn.swarm import restore_member  # they import this module
  from streamlearn.versions import open_run

  run_dir, _, step = spec.partition("@")
  try:
    run = open_run(run_dir)
  except VersionError as err:
    raise RunError(f"delta.base: {err}") from None
  try:
    if step and not step.isdigit():
      raise VersionError(f"{spec}: expected RUN_DIR or RUN_DIR@STEP")
    _, tokenizer_json = run.checkpointer.read_record(
        int(step) if step else run.checkpointer.latest_step())
    tokenizer = tokenizer_from_json(tokenizer_json, spec)
    state, _, _ = restore_member(run.checkpointer, run.config, tokenizer.vocab_size,
                                 tokenizer.bos_id, int(step) if step else None, "best")
  except (VersionError, ValueError, TypeError) as err:
    raise RunError(f"delta.base: {err}") from None
  finally:
    run.checkpointer.close()
  named = dict(state.params)
  for key, value in like_params.items():
    got = named.get(key)
    if got is None:
      named[key] = value
    elif jax.tree.map(jnp.shape, got) != jax.tree.map(jnp.shape, value):
      raise RunError(f"delta.base: {spec} has a different model ({key} differs in shape)")
  extra = set(named) - set(like_params)
  return {k: v for k, v in named.items() if k not in extra}


def write_atomic(path: Path, text: str) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text, encoding="utf-8")
  os.replace(tmp, path)


def run_tokenizer(run_dir: Path, checkpointer: Checkpointer, steps: list[int]) -> Tokenizer:
  """The run's tokenizer: tokenizer.json, or the newest version's copy if that file is lost."""
  try:
    return load_tokenizer(run_dir)
  except (OSError, ValueError) as err:
    problem = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
  for step in reversed(steps):
    try:
      tokenizer = tokenizer_from_json(checkpointer.read_record(step)[1], f"version {step}")
    except (VersionError, ValueError, KeyError):
      continue
    log.warning(f"warning: {run_dir / 'tokenizer.json'} is unreadable ({problem}); "
                f"restored it from version {step}")
    if is_primary():
      tokenizer.save(run_dir)
    return tokenizer
  raise RunError(f"{run_dir / 'tokenizer.json'}: unreadable ({problem}) and no version has a copy")

"""A short swarm trajectory, shared by the in-process tests and the sharded subprocess.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/swarm_runs.py OUT.npz

runs it with the member axis over 4 CPU devices and writes the result for the
test to compare with the same trajectory on one device.

    python tests/swarm_runs.py --poisoned K RUN_ARGS...

is the run command with its Kth step fed NaN parameters (see `poisoned_run`).
"""

import itertools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from streamlearn.config import load_config
from streamlearn.learn.chunk import Chunk
from streamlearn.swarm.swarm import Swarm, initial_state

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.toml")
VOCAB, BOS = 259, 256
# A replacement event every 2 chunks (of 64 bytes), half of them fresh members.
SWARM = ["swarm.size=4", "swarm.interval_bytes=128", "swarm.grace_bytes=0",
         "swarm.fresh_prob=0.5", "swarm.score_chunks=4"]


def swarm_config(*more: str):
  return load_config(TINY, SWARM + list(more))


def random_chunk(rng: np.random.Generator) -> Chunk:
  T = 64
  tokens = rng.integers(32, 127, (1, T))  # printable bytes: one byte per token
  return Chunk(jnp.asarray(tokens, jnp.int32), jnp.ones((1, T), jnp.float32),
               jnp.full((1,), float(T), jnp.float32))


def close(a, b, **tol):
  """Every leaf of two pytrees equal within the tolerance (np.testing.assert_allclose's)."""
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


def trajectory(n_chunks: int, data_seed: int = 7):
  """(final host state, bits_KxN, population json, plans) of a swarm of 4 over random chunks."""
  config = swarm_config()
  swarm = Swarm(config, VOCAB, BOS)
  state = initial_state(config, VOCAB, BOS)
  rng = np.random.default_rng(data_seed)
  bits, plans, total = [], [], 0
  for k in range(n_chunks):
    state, metrics = swarm.step(state, random_chunk(rng))
    m = jax.device_get(metrics)
    swarm.observe(m, 64.0)
    bits.append(m["bits"])
    total += 64
    if swarm.due(total):
      state, plan = swarm.evolve(state, total, k + 1)
      plans.append(plan)
  devices = len(jax.tree.leaves(state)[0].sharding.device_set)
  return jax.device_get(state), np.stack(bits), swarm.population.to_json(), plans, devices


def poisoned_run(nth: int, args: list[str]) -> int:
  """`python -m streamlearn.run ARGS` with NaN parameters fed to this invocation's nth step:
  its update and every one after is non-finite (skipped) until a rollback restores a
  version. A fault injected in every process alike, as the in-process safety tests do."""
  from streamlearn.cli.run import main
  from streamlearn.run import session as opening

  real_open = opening.open_session

  def open_poisoned(*a, **kw):
    session, progress = real_open(*a, **kw)
    real_step, calls = session.step_fn, itertools.count(1)

    def step(state, chunk):
      if next(calls) == nth:
        state = state.replace(params=jax.tree.map(lambda x: x * jnp.nan, state.params))
      return real_step(state, chunk)

    session.step_fn = step
    return session, progress

  opening.open_session = open_poisoned  # the command imports it when it runs
  return main(args)


if __name__ == "__main__":
  if sys.argv[1] == "--poisoned":
    sys.exit(poisoned_run(int(sys.argv[2]), sys.argv[3:]))
  state, bits_KxN, _, plans, devices = trajectory(6)
  leaves = {f"leaf{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(state))}
  np.savez(sys.argv[1], bits=bits_KxN, devices=devices,
           fresh=sum(int(p.fresh_N.sum()) for p in plans),
           copied=sum(int(p.copied_N.sum()) for p in plans), **leaves)

"""Time the swarm step for several swarm sizes, and what population-based training buys.

    python scripts/bench_swarm.py speed --sizes 1 4 8 --chunks 30 --rounds 5
    python scripts/bench_swarm.py learn --size 8 --max-bytes 100000 [--data PATH]

speed: the same chunks (the first of --data) go through each size's jitted step
in turn, round after round, so machine noise hits all sizes alike; the table
gives the median ms per chunk of the rounds after the first (compilation), the
stream's bytes/s and the aggregate bytes/s (every member learns every byte).
Size 1 is the plain learner, as `swarm.size = 1` runs it.

learn: a PBT swarm and the same swarm with replacement off (the same members:
seeds and initial hyperparameters) over the same bytes. For each: the run's
prequential bits/byte (each chunk scored by the member that led before it, as
`python -m streamlearn.run` counts it) and, for the fixed swarm, its best
member's bits/byte over the whole stream (chosen after the fact: a bound no
run can reach).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import numpy as np

from streamlearn.config import load_config
from streamlearn.data.sources import open_source
from streamlearn.data.stream import TokenStream
from streamlearn.data.tokenizer import make_tokenizer
from streamlearn.learn.build import build
from streamlearn.learn.prequential import step_chunk
from streamlearn.swarm.swarm import Swarm, initial_state

_NEVER = 1 << 60  # interval_bytes of a swarm that never replaces anyone


def _chunks(config, tokenizer, data: str | None, max_bytes: int | None, n: int | None = None):
  source = open_source(data, max_file_bytes=config.data.max_file_bytes,
                       block_bytes=config.data.block_bytes)
  stream = TokenStream(source, tokenizer, config.data.chunk_tokens, max_bytes=max_bytes)
  chunks = []
  for chunk in stream:
    chunks.append(chunk)
    if n is not None and len(chunks) == n:
      break
  return chunks


def _tokenizer(config):
  if config.tokenizer.kind != "bytes":
    raise SystemExit("error: bench_swarm.py times the byte tokenizer only")
  return make_tokenizer("bytes", vocab_size=config.tokenizer.vocab_size, warmup=b"")


def speed(args) -> int:
  runners = {}
  for size in args.sizes:
    config = load_config(args.config, args.set + [f"swarm.size={size}"])
    tokenizer = _tokenizer(config)
    host_chunks = _chunks(config, tokenizer, args.data, None, args.chunks)
    chunks = [step_chunk(c) for c in host_chunks]
    state = initial_state(config, tokenizer.vocab_size, tokenizer.bos_id)
    if size == 1:
      step = build(config, tokenizer.vocab_size)[2]
    else:
      swarm = Swarm(config, tokenizer.vocab_size, tokenizer.bos_id)
      step, state = swarm.step, swarm.place(state)
    n_bytes = sum(c.n_bytes for c in host_chunks) / len(host_chunks)
    runners[size] = [step, state, chunks, [], n_bytes]

  for _ in range(args.rounds):
    for runner in runners.values():
      step, state, chunks, times, _ = runner
      start = time.perf_counter()
      for chunk in chunks:
        state, metrics = step(state, chunk)
      jax.block_until_ready(metrics)
      times.append((time.perf_counter() - start) / len(chunks))
      runner[1] = state

  devices = jax.devices()
  print(f"devices: {len(devices)} x {devices[0].platform}; {args.chunks} chunks per round")
  print(f"| members | ms/chunk (median of {args.rounds - 1} rounds) | stream bytes/s | "
        f"aggregate bytes/s | per member vs 1 |")
  print("| ---: | ---: | ---: | ---: | ---: |")
  base = None
  for size, (_, _, _, times, n_bytes) in runners.items():
    seconds = statistics.median(times[1:] if len(times) > 1 else times)
    per_member = seconds / size
    base = base or per_member
    print(f"| {size} | {1e3 * seconds:.2f} | {n_bytes / seconds:,.0f} | "
          f"{size * n_bytes / seconds:,.0f} | {per_member / base:.2f} |")
  return 0


def _learn_one(config, tokenizer, chunks) -> dict:
  """Prequential bits/byte of a swarm over the chunks, and every slot's own."""
  swarm = Swarm(config, tokenizer.vocab_size, tokenizer.bos_id)
  state = swarm.place(initial_state(config, tokenizer.vocab_size, tokenizer.bos_id))
  bits = n_bytes = 0.0
  bits_N = np.zeros(config.swarm.size)
  replaced = 0
  start = time.perf_counter()
  for k, chunk in enumerate(chunks, 1):
    state, metrics = swarm.step(state, step_chunk(chunk))
    m = jax.device_get(metrics)
    leader = swarm.observe(m, chunk.n_bytes)  # the member chosen before this chunk
    bits += float(leader["leader_bits"])
    bits_N += m["bits"]
    n_bytes += chunk.n_bytes
    if swarm.due(int(n_bytes)):
      state, plan = swarm.evolve(state, int(n_bytes), k)
      replaced += int(plan.copied_N.sum() + plan.fresh_N.sum())
  pop = swarm.population
  return {"bpb": bits / n_bytes, "slot_bpb": bits_N / n_bytes, "replaced": replaced,
          "members": pop.next_id, "leader": pop.leader,
          "leader_hp": pop.members[pop.leader]["hp"], "seconds": time.perf_counter() - start}


def learn(args) -> int:
  common = args.set + [f"swarm.size={args.size}"]
  pbt = load_config(args.config, common)
  fixed = load_config(args.config, common + [f"swarm.interval_bytes={_NEVER}"])
  tokenizer = _tokenizer(pbt)
  chunks = _chunks(pbt, tokenizer, args.data, args.max_bytes)
  n_bytes = sum(c.n_bytes for c in chunks)
  print(f"{n_bytes:,} bytes of {args.data or 'the stdlib stream'}, swarm of {args.size}")
  results = {"pbt": _learn_one(pbt, tokenizer, chunks), "fixed": _learn_one(fixed, tokenizer,
                                                                             chunks)}
  print("| swarm | prequential bits/byte (leader) | best member, after the fact | "
        "members ever | replacements | seconds |")
  print("| --- | ---: | ---: | ---: | ---: | ---: |")
  for name, r in results.items():
    best = f"{r['slot_bpb'].min():.4f}" if name == "fixed" else "-"
    print(f"| {name} | {r['bpb']:.4f} | {best} | {r['members']} | {r['replaced']} | "
          f"{r['seconds']:.0f} |")
  r = results["pbt"]
  print(f"PBT leader at the end: member {r['leader']}, hyperparameters {r['leader_hp']}")
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("mode", choices=["speed", "learn"])
  parser.add_argument("--config", default=None, help="base config (default: built-in defaults)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  parser.add_argument("--data", default=None, help="file or directory (default: the stdlib stream)")
  parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 8], help="speed: swarm sizes")
  parser.add_argument("--chunks", type=int, default=30, help="speed: chunks per round")
  parser.add_argument("--rounds", type=int, default=5, help="speed: rounds (the first compiles)")
  parser.add_argument("--size", type=int, default=8, help="learn: the swarm size")
  parser.add_argument("--max-bytes", type=int, default=1_000_000, help="learn: bytes streamed")
  args = parser.parse_args(argv)
  return speed(args) if args.mode == "speed" else learn(args)


if __name__ == "__main__":
  sys.exit(main())

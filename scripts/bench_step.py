"""Time the learner step for config variants in one process: the cost of a feature as a ratio.

    python scripts/bench_step.py --variant off match.enabled=false --variant default

Each variant is a name and `--set` overrides on top of --config. The same
chunks (the first of --data) go through every variant's jitted step in turn,
round after round, so machine noise hits all variants alike; the table gives
the median ms per chunk of the rounds after the first (compilation) and each
variant's ratio to the first.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax

from streamlearn.config import ConfigError, load_config
from streamlearn.data.sources import open_source
from streamlearn.data.stream import TokenStream
from streamlearn.data.tokenizer import make_tokenizer
from streamlearn.learn.build import build
from streamlearn.learn.prequential import step_chunk
from streamlearn.learn.state import init_learner


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variant", nargs="+", action="append", required=True,
                      metavar=("NAME", "KEY=VALUE"), help="a name, then its overrides")
  parser.add_argument("--config", default=None, help="base config (default: built-in defaults)")
  parser.add_argument("--data", default=None, help="file or directory (default: the stdlib stream)")
  parser.add_argument("--chunks", type=int, default=40, help="chunks per round")
  parser.add_argument("--rounds", type=int, default=5)
  args = parser.parse_args(argv)

  runners = {}
  for name, *overrides in args.variant:
    try:
      config = load_config(args.config, overrides)
    except ConfigError as err:
      print(f"error: variant {name}: {err}", file=sys.stderr)
      return 2
    if config.tokenizer.kind != "bytes":
      raise SystemExit("error: bench_step.py times the byte tokenizer only")
    tokenizer = make_tokenizer("bytes", vocab_size=config.tokenizer.vocab_size, warmup=b"")
    predictor, optimizer, step = build(config, tokenizer.vocab_size)
    source = open_source(args.data, max_file_bytes=config.data.max_file_bytes,
                         block_bytes=config.data.block_bytes)
    stream = iter(TokenStream(source, tokenizer, config.data.chunk_tokens))
    chunks = [step_chunk(next(stream)) for _ in range(args.chunks)]
    state = init_learner(predictor, optimizer, seed=config.seed, bos_id=tokenizer.bos_id)
    runners[name] = [step, state, chunks, []]

  for _ in range(args.rounds):
    for runner in runners.values():
      step, state, chunks, times = runner
      start = time.perf_counter()
      for chunk in chunks:
        state, metrics = step(state, chunk)
      jax.block_until_ready(metrics)
      times.append((time.perf_counter() - start) / len(chunks))
      runner[1] = state

  print(f"| variant | ms/chunk (median of {args.rounds - 1} rounds) | vs {args.variant[0][0]} |")
  print("| --- | ---: | ---: |")
  base = None
  for name, (_, _, _, times) in runners.items():
    ms = 1e3 * statistics.median(times[1:] if len(times) > 1 else times)
    base = base or ms
    print(f"| {name} | {ms:.2f} | {ms / base:.2f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())

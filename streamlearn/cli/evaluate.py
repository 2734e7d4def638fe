"""Runs scored on a file or directory: frozen, and with online adaptation.

    streamlearn evaluate checkpoints/default --data notes/ --max-bytes 200000
    streamlearn evaluate runs/a runs/b@2000 --data held_out.txt --prompt "The "

Each RUN_DIR is scored at its latest version, or at RUN_DIR@STEP; a swarm's run
by its leader, or by the member --member names. For each:
  frozen    bits/byte with the version's parameters fixed (the recurrent state
            still carries through the data, as in use);
  adaptive  prequential bits/byte while learning online from the data, score
            first, from the version's full learner state (nothing is saved);
and, with --prompt, samples continuing the prompt. All runs land in one table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax

from streamlearn.api import Learner
from streamlearn.cli.common import error, standalone
from streamlearn.data.sources import SourceError, open_source
from streamlearn.data.stream import TokenStream
from streamlearn.learn.prequential import learn_through, score_through
from streamlearn.learn.step import make_score


def parse_target(text: str) -> tuple[Path, int | None]:
  path, _, step = text.partition("@")
  if step and not step.isdigit():
    raise SourceError(f"{text}: expected RUN_DIR or RUN_DIR@STEP")
  return Path(path), int(step) if step else None


def evaluate(target: str, data: str, max_bytes: int | None, prompt: str | None,
             samples: int, sample_tokens: int, member: str = "best") -> dict:
  run_dir, step = parse_target(target)
  if not (run_dir / "config.json").exists():
    raise SourceError(f"{run_dir}: not a run directory (no config.json)")
  learner = Learner.load(run_dir, step, member)
  config, tokenizer = learner.config, learner.tokenizer

  def chunks():
    source = open_source(data, max_file_bytes=config.data.max_file_bytes,
                         block_bytes=config.data.block_bytes)
    return TokenStream(source, tokenizer, config.data.chunk_tokens, max_bytes=max_bytes)

  state = learner.state
  frozen = score_through(make_score(learner.predictor), state.params, state.carry, chunks())
  # The step donates its input: adapt a copy so `learner` stays usable for samples.
  _, adaptive = learn_through(learner._step, jax.tree.map(lambda x: x.copy(), state), chunks())
  row = {"run": target, "step": int(state.step), "bytes": frozen.bytes,
         "frozen_bpb": frozen.bits_per_byte, "adaptive_bpb": adaptive.bits_per_byte,
         "samples": []}
  if prompt is not None:
    row["samples"] = [learner.generate(prompt, max_tokens=sample_tokens, temperature=0.8,
                                       seed=i) for i in range(samples)]
  return row


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("runs", nargs="+", metavar="RUN_DIR[@STEP]")
  parser.add_argument("--data", required=True, help="file or directory to score on")
  parser.add_argument("--max-bytes", type=int, default=None)
  parser.add_argument("--prompt", default=None, help="print samples continuing this prompt")
  parser.add_argument("--samples", type=int, default=2)
  parser.add_argument("--sample-tokens", type=int, default=120)
  parser.add_argument("--member", default="best", metavar="best|ID",
                      help="which learner of a swarm (default: the leader)")


def command(args: argparse.Namespace) -> int:
  rows = []
  for target in args.runs:
    try:
      rows.append(evaluate(target, args.data, args.max_bytes, args.prompt, args.samples,
                           args.sample_tokens, args.member))
    except (SourceError, FileNotFoundError) as err:
      return error(str(err))
  print("| run | version (step) | bytes | frozen bits/byte | adaptive bits/byte |")
  print("| --- | ---: | ---: | ---: | ---: |")
  for r in rows:
    print(f"| {r['run']} | {r['step']} | {r['bytes']:,} | {r['frozen_bpb']:.4f} | "
          f"{r['adaptive_bpb']:.4f} |")
  for r in rows:
    for i, text in enumerate(r["samples"]):
      print(f"\n--- {r['run']} sample {i + 1} ---\n{args.prompt}{text}")
  return 0


main = standalone(add_arguments, command, "streamlearn evaluate", __doc__.splitlines()[0])

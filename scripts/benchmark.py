"""Prequential bits/byte and speed of the learner against classical compressors.

    python scripts/benchmark.py --data /tmp/austen.txt --bytes 1000000 --json out.json
    python scripts/benchmark.py --data stdlib --bytes 1000000     # the embedded default stream

Streams the first N bytes of the data through the learner with a config
(default: configs/default.toml's values), score first, then learn, exactly as
`python -m streamlearn.run` does, and compresses exactly the same bytes with
gzip -9, bzip2 -9, xz -9e and zstd -19 (a missing tool is skipped and said so).
Directory streams (stdlib) put a document token between files, which the
learner must predict and pay for; the compressors get the plain concatenation.

bytes/s counts from the second chunk on (the first pays for compilation).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from streamlearn.config import ConfigError, load_config
from streamlearn.learner import build, init_learner
from streamlearn.prequential import learn_through
from streamlearn.sources import SourceError, open_source
from streamlearn.stream import TokenStream
from streamlearn.tokenizer import make_tokenizer

COMPRESSORS = {"gzip": ["gzip", "-9", "-c"], "bzip2": ["bzip2", "-9", "-c"],
               "xz": ["xz", "-9e", "-c"], "zstd": ["zstd", "-19", "-c", "-q"]}


def first_bytes(spec: str | None, n: int, config) -> bytes:
  """The first n bytes the learner will see, as the compressors get them."""
  source = open_source(spec, max_file_bytes=config.data.max_file_bytes,
                       block_bytes=config.data.block_bytes)
  parts, total = [], 0
  for block in source.blocks():
    parts.append(block.data[:n - total])
    total += len(parts[-1])
    if total >= n:
      break
  return b"".join(parts)


def classical(data: bytes) -> tuple[dict, list[str]]:
  """bits/byte of each available compressor on data, and the names of missing ones."""
  results, missing = {}, []
  with tempfile.NamedTemporaryFile() as f:
    f.write(data)
    f.flush()
    for name, cmd in COMPRESSORS.items():
      if shutil.which(cmd[0]) is None:
        missing.append(name)
        continue
      out = subprocess.run(cmd + [f.name], capture_output=True, check=True).stdout
      results[name] = 8 * len(out) / len(data)
  return results, missing


def run_config(config_path: str | None, overrides: list[str], spec: str | None, n: int) -> dict:
  config = load_config(config_path, overrides)
  tokenizer = make_tokenizer(config.tokenizer.kind, vocab_size=config.tokenizer.vocab_size,
                             warmup=first_bytes(spec, config.tokenizer.warmup_bytes, config)
                             if config.tokenizer.kind == "bpe" else b"")
  predictor, optimizer, step = build(config, tokenizer.vocab_size)
  state = init_learner(predictor, optimizer, seed=config.seed, bos_id=tokenizer.bos_id)
  source = open_source(spec, max_file_bytes=config.data.max_file_bytes,
                       block_bytes=config.data.block_bytes)
  stream = TokenStream(source, tokenizer, config.data.chunk_tokens, max_bytes=n)
  _, result = learn_through(step, state, stream)
  return {"config": Path(config_path).stem if config_path else "default",
          "overrides": overrides, "bpb": result.bits_per_byte,
          "bytes_per_s": result.bytes_per_s, "seconds": result.seconds,
          "bytes": result.bytes, "tokens": result.tokens, "chunks": result.chunks}


def markdown(report: dict) -> str:
  lines = ["| stream | bytes | method | bits/byte | bytes/s |", "| --- | ---: | --- | ---: | ---: |"]
  for run in report["runs"]:
    label = run["config"] + (f" ({' '.join(run['overrides'])})" if run["overrides"] else "")
    lines.append(f"| {report['data']} | {report['bytes']:,} | streamlearn {label} | "
                 f"{run['bpb']:.3f} | {run['bytes_per_s']:,.0f} |")
  for name, bpb in report["classical"].items():
    lines.append(f"| {report['data']} | {report['bytes']:,} | {' '.join(COMPRESSORS[name][:2])} | "
                 f"{bpb:.3f} | |")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data", required=True, help="a file, a directory, or 'stdlib'")
  parser.add_argument("--bytes", type=int, default=1_000_000, help="how many bytes to stream")
  parser.add_argument("--config", default=None, help="run config (default: built-in defaults)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  parser.add_argument("--json", metavar="OUT", help="write the report as JSON")
  args = parser.parse_args(argv)
  spec = None if args.data == "stdlib" else args.data
  try:
    config = load_config(args.config, args.set)
    data = first_bytes(spec, args.bytes, config)
    if not data:
      raise SourceError(f"{args.data}: no bytes to stream")
    run = run_config(args.config, args.set, spec, len(data))
  except (ConfigError, SourceError) as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  scores, missing = classical(data)
  report = {"date": str(datetime.date.today()), "machine": platform.machine(),
            "data": args.data, "bytes": len(data), "classical": scores,
            "classical_missing": missing, "runs": [run],
            "command": "python scripts/benchmark.py " + " ".join(argv or sys.argv[1:])}
  print(markdown(report))
  if missing:
    print(f"(not installed, skipped: {', '.join(missing)})")
  if args.json:
    Path(args.json).write_text(json.dumps(report, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())

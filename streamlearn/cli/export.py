"""A run's version as an int8 inference artifact, and what int8 costs.

    streamlearn export --run-dir checkpoints/default --out model.slm
    streamlearn export --run-dir DIR --step 3000 --out model.slm --eval-data held_out.txt

--step: a version number, or `best` (by score); the latest by default.
--member: which learner of a swarm: `best` (the leader: lowest rolling
bits/byte when the version was saved) or a member id alive in that version; a
single learner's run has member 0 (also `best`). Prints the artifact's size against the version's full
checkpoint and, with --eval-data, the bits/byte of the float and the int8
parameters on that data (frozen, from a fresh recurrent state: as the
artifact is used). `streamlearn generate FILE --prompt ...` generates.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import jax

from streamlearn.cli.common import error, standalone
from streamlearn.data.sources import SourceError, open_source
from streamlearn.data.stream import TokenStream
from streamlearn.data.tokenizer import tokenizer_from_json
from streamlearn.learn.build import build
from streamlearn.learn.prequential import score_through
from streamlearn.learn.step import make_score
from streamlearn.store.artifact import ArtifactError, pack, unpack
from streamlearn.store.checkpoint import VERSIONS_DIR, VersionError
from streamlearn.store.rundir import open_run
from streamlearn.swarm.swarm import restore_member


def _version(run, step: str | None) -> int:
  if step is None:
    latest = run.checkpointer.latest_step()
    if latest is None:
      raise VersionError(f"{run.path}: no complete version to export")
    return latest
  if step == "best":
    best = run.registry.best_step()
    if best is None:
      raise VersionError(f"{run.path}: no version has a score yet")
    return best
  if not step.isdigit():
    raise VersionError(f"--step {step}: expected a version number or best")
  return int(step)


def _dir_bytes(path: Path) -> int:
  return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def frozen_bpb(config, tokenizer, params, data: str, max_bytes: int | None) -> float:
  """Bits/byte of `params` on `data`, learning nothing, from a fresh recurrent state."""
  predictor, _, _ = build(config, tokenizer.vocab_size)
  source = open_source(data, max_file_bytes=config.data.max_file_bytes,
                       block_bytes=config.data.block_bytes)
  chunks = TokenStream(source, tokenizer, config.data.chunk_tokens, max_bytes=max_bytes)
  carry = predictor.init_carry(1, tokenizer.bos_id)
  return score_through(make_score(predictor), params, carry, chunks).bits_per_byte


def export(run_dir: str, step: str | None, out: str, eval_data: str | None,
           eval_bytes: int | None, member: str = "best") -> dict:
  """Writes the artifact; returns what was measured."""
  run = open_run(run_dir)
  try:
    version = _version(run, step)
    record, tokenizer_json = run.checkpointer.read_record(version)
    tokenizer = tokenizer_from_json(tokenizer_json, f"version {version}")
    state, _, _ = restore_member(run.checkpointer, run.config, tokenizer.vocab_size,
                                 tokenizer.bos_id, version, member)
  finally:
    run.checkpointer.close()
  config_json = json.loads((run.path / "config.json").read_text(encoding="utf-8"))
  params = jax.device_get(state.params)
  blob = pack(params, config_json, tokenizer_json,
              {"run_dir": str(run.path), "step": version, "bytes": record["totals"]["bytes"]},
              jax.device_get(state.carry))
  tmp = Path(out).with_name(Path(out).name + ".tmp")
  tmp.write_bytes(blob)
  os.replace(tmp, out)
  report = {"step": version, "artifact_bytes": len(blob),
            "checkpoint_bytes": _dir_bytes(run.path / VERSIONS_DIR / str(version))}
  if eval_data is not None:
    int8 = unpack(blob)["params"]  # exactly what the loader will see
    report["eval_bytes"] = eval_bytes
    report["float_bpb"] = frozen_bpb(run.config, tokenizer, params, eval_data, eval_bytes)
    report["int8_bpb"] = frozen_bpb(run.config, tokenizer, int8, eval_data, eval_bytes)
  return report




def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--run-dir", required=True, metavar="DIR")
  parser.add_argument("--step", default=None, metavar="N|best")
  parser.add_argument("--member", default="best", metavar="best|ID")
  parser.add_argument("--out", required=True, metavar="FILE")
  parser.add_argument("--eval-data", default=None, metavar="PATH",
                      help="also score float and int8 parameters on this file or directory")
  parser.add_argument("--eval-bytes", type=int, default=None, metavar="N")
  parser.add_argument("--json", default=None, metavar="FILE", help="write the numbers here too")


def command(args: argparse.Namespace) -> int:
  try:
    report = export(args.run_dir, args.step, args.out, args.eval_data, args.eval_bytes,
                    args.member)
  except (VersionError, ArtifactError, SourceError) as err:
    return error(str(err))
  print(f"version {report['step']} -> {args.out}: {report['artifact_bytes']:,} bytes "
        f"(its checkpoint: {report['checkpoint_bytes']:,} bytes, "
        f"{report['checkpoint_bytes'] / report['artifact_bytes']:.1f}x larger)")
  if "float_bpb" in report:
    worse = report["int8_bpb"] / report["float_bpb"] - 1
    print(f"bits/byte on {args.eval_data}: float {report['float_bpb']:.4f}, "
          f"int8 {report['int8_bpb']:.4f} ({worse:+.2%})")
  if args.json:
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
  return 0


main = standalone(add_arguments, command, "streamlearn export", __doc__.splitlines()[0])

"""Prequential bits/byte and speed of the learner against classical compressors.

    python scripts/benchmark.py --data /tmp/austen.txt --bytes 1000000 --json out.json
    python scripts/benchmark.py --data stdlib --bytes 1000000     # the embedded default stream
    python scripts/benchmark.py --data stdlib --configs static,vanilla,full,full-minus-gate \
        --plot curves.png --forgetting /tmp/austen.txt stdlib

`--configs` runs several learners on the same bytes in one invocation:
`static` (no learning: the starting parameters score the stream, the match
model still reads it), `vanilla` (score-first online learning, nothing else),
`full` (configs/full.toml's [delta] and [replay]: everything on) and
`full-minus-X` for X in channel, ema, kl, gate, replay, lag (lag 2 -> 1),
arrival (the delta update only, no plain update as each chunk is scored),
`vanilla-twice` (the control for arrival: two plain updates per chunk), `mix`
(vanilla with the count models and the mixer on, every part configs/default.toml
turns on: what the default learner is) and `mix-minus-X` for X in counts (the
mixer alone: network and match model), gate (one weight set), learning (the
mixer's weights fixed where they start), token (no weight sets by the previous
token), countmap (the fixed count formula), online (no per-token weights) and
lineposition (the network not told how far into its line each token is).
`vanilla`, `full` and its variants have no count models, no mixer and no line
positions (the delta learner cannot take them).
`--plot` draws running bits/byte against bytes for each (needs matplotlib:
pip install -e '.[bench]'). `--forgetting A B` streams --forgetting-bytes of
A then of B with vanilla and full and scores held-out A (the --canary-bytes
of A after the streamed ones) without adaptation before and after B;
`--forgetting-kl 0.3,1` adds full with the KL guard's weight raised to each
value while B streams (what `--resume --set delta.kl=X` does).

Streams the first N bytes of the data through the learner with a config
(default: configs/default.toml's values), score first, then learn, exactly as
`python -m streamlearn.run` does, and compresses exactly the same bytes with
gzip -9, bzip2 -9, xz -9e and zstd -19, and the strong anchors zpaq -m5 (context
mixing) and 7-Zip's PPMd at orders 6, 8, 12 and 16 (the best reported), when
installed (`apt-get install zpaq p7zip-full`; a missing tool is skipped and said
so). Every row also gives running bits/byte at 64, 256 and 512 KiB: the
learner's running total there, a compressor's size on that prefix alone.
Directory streams (stdlib) put a document token between files, which the
learner must predict and pay for; the compressors get the plain concatenation.

A config with `swarm.size` > 1 (e.g. `--set swarm.size=4`) runs the swarm as the
run does (population-based training included): its row is the run's score (the
members' mixture, with `swarm.mix`), and rows below it give the leader's score
(each chunk by the member leading before it) and each slot's over the whole stream.

bytes/s counts from the second chunk on (the first pays for compilation).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from streamlearn.config import ConfigError, config_to_dict, load_config
from streamlearn.data.sources import SourceError, open_source
from streamlearn.data.stream import TokenStream
from streamlearn.data.tokenizer import make_tokenizer, trained_on
from streamlearn.learn.build import build
from streamlearn.learn.prequential import PassResult, learn_through, score_through, step_chunk
from streamlearn.learn.state import init_learner
from streamlearn.learn.step import make_score
from streamlearn.swarm.swarm import Swarm, initial_state

sys.path.insert(0, str(Path(__file__).resolve().parent))  # a sibling, also when loaded by path
from compressors import MARKS, classical, marks  # noqa: E402

_FULL_TOML = Path(__file__).resolve().parent.parent / "configs" / "full.toml"
_PLAIN = ["delta.lag=0", "delta.consistency=0", "delta.kl=0", "delta.gate=false",
          "delta.residual=0", "replay.capacity=0"]
_MINUS = {"channel": ["delta.forecast_channel=false"], "ema": ["delta.consistency=0"],
          "kl": ["delta.kl=0"], "gate": ["delta.gate=false"], "replay": ["replay.capacity=0"],
          "lag": ["delta.lag=1"], "arrival": ["delta.arrival=false"]}
# The control for `arrival`: vanilla's update, then a second one on the same chunk
# from where the first left off, and nothing else (its 1-token forecast unused):
# what a second step per chunk buys without any delta part.
_TWICE = _PLAIN[1:] + ["delta.lag=1", "delta.arrival=true", "delta.forecast_channel=false",
                       "delta.forecast_tokens=1"]


# The count models and the mixer with every part configs/default.toml turns on
# (streamlearn/nn/counts.py, mixer.py), and each part off; `vanilla` and `full` have neither.
_MIX = ["counts.enabled=true", "mixer.enabled=true", "mixer.gate_token=true",
        "mixer.count_map=true", "mixer.online_lr=0.0015", "mixer.online_boost=16",
        "mixer.online_pairs=true", "counts.survive_from=2", "counts.word=true",
        "counts.word3=true", "counts.column=true", "model.line_position=true"]
_NO_MIX = ["counts.enabled=false", "mixer.enabled=false", "model.line_position=false"]
_MIX_MINUS = {"counts": ["counts.enabled=false"], "gate": ["mixer.gate=false"],
              "learning": ["mixer.lr_mult=0"], "token": ["mixer.gate_token=false"],
              "countmap": ["mixer.count_map=false"],
              "online": ["mixer.online_lr=0", "mixer.online_pairs=false"],
              "boost": ["mixer.online_boost=0"], "pairs": ["mixer.online_pairs=false"],
              "survive": ["counts.survive_from=0"], "word": ["counts.word=false"],
              "word3": ["counts.word3=false"], "column": ["counts.column=false"],
              "lineposition": ["model.line_position=false"]}


def full_overrides(full_toml: str | Path = _FULL_TOML) -> list[str]:
  """A config file's [delta] and [replay] (configs/full.toml's), as overrides on any config."""
  table = config_to_dict(load_config(full_toml))
  return [f"{section}.{key}={json.dumps(value)}" for section in ("delta", "replay")
          for key, value in table[section].items()]


def ablation(name: str, full_toml: str | Path = _FULL_TOML) -> list[str] | None:
  """The overrides a named --configs entry adds (None: static, no learning)."""
  if name == "static":
    return None
  if name == "vanilla":
    return _PLAIN + _NO_MIX
  if name == "full":
    return full_overrides(full_toml) + _NO_MIX
  if name == "vanilla-twice":
    return _TWICE + _NO_MIX
  if name == "mix":
    return _PLAIN + _MIX
  if name.startswith("mix-minus-") and name[len("mix-minus-"):] in _MIX_MINUS:
    return _PLAIN + _MIX + _MIX_MINUS[name[len("mix-minus-"):]]
  if name.startswith("full-minus-") and name[len("full-minus-"):] in _MINUS:
    return full_overrides(full_toml) + _NO_MIX + _MINUS[name[len("full-minus-"):]]
  raise ConfigError(f"--configs: unknown entry {name!r} (known: static, vanilla, "
                    "vanilla-twice, full, " + ", ".join(f"full-minus-{x}" for x in _MINUS)
                    + ", mix, " + ", ".join(f"mix-minus-{x}" for x in _MIX_MINUS) + ")")


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



def running_at(curve: list[tuple[int, float]], at: list[int]) -> dict[int, float]:
  """Running bits/byte at each mark: the first chunk boundary at or past it (a per-chunk curve)."""
  out = {}
  for m in at:
    point = next((bpb for seen, bpb in curve if seen >= m), None)
    if point is not None:
      out[m] = point
  return out


def _tokenizer(config, spec):
  return make_tokenizer(config.tokenizer.kind, vocab_size=config.tokenizer.vocab_size,
                        warmup=first_bytes(spec, config.tokenizer.warmup_bytes, config)
                        if config.tokenizer.kind == "bpe" else b"")


def _stream(config, tokenizer, spec, n: int, skip: int = 0) -> TokenStream:
  """Tokens of bytes [skip, skip + n) of a source (a file slice when skip > 0)."""
  source = open_source(spec, max_file_bytes=config.data.max_file_bytes,
                       block_bytes=config.data.block_bytes)
  if skip:
    source = _SliceSource(source, skip)
  return TokenStream(source, tokenizer, config.data.chunk_tokens, max_bytes=n)


class _SliceSource:
  """A source's blocks from byte `skip` on (for held-out slices of a file)."""

  def __init__(self, inner, skip: int):
    self.inner, self.skip, self.name = inner, skip, inner.name
    self.block_bytes, self.skipped = inner.block_bytes, inner.skipped

  def blocks(self, start=None):
    left = self.skip
    for block in self.inner.blocks():
      if left >= len(block.data):
        left -= len(block.data)
        continue
      yield dataclasses.replace(block, data=block.data[left:]) if left else block
      left = 0


def run_config(config_path: str | None, overrides: list[str] | None, spec: str | None, n: int,
               name: str | None = None, curve_every: int = 0) -> dict:
  """One learner (or, with overrides None, the static model) over the first n bytes."""
  config = load_config(config_path, overrides or [])
  tokenizer = _tokenizer(config, spec)
  predictor, optimizer, step = build(config, tokenizer.vocab_size)
  state = init_learner(predictor, optimizer, seed=config.seed, bos_id=tokenizer.bos_id)
  stream = _stream(config, tokenizer, spec, n)
  # A BPE vocabulary was trained on the stream's first bytes: those are learned from
  # (or read), never scored.
  unscored = trained_on(config.tokenizer.kind, config.tokenizer.warmup_bytes)
  # A point every chunk, for the running values at the marks; the report keeps every curve_every-th.
  swarm = None
  if overrides is None:
    result = score_through(make_score(predictor), state.params, state.carry, stream, 1, unscored)
  elif config.swarm.size > 1:
    result, swarm = swarm_through(config, tokenizer, stream, unscored)
  else:
    _, result = learn_through(step, state, stream, 1, unscored)
  return {"config": name or (Path(config_path).stem if config_path else "default"),
          "overrides": overrides or [], "bpb": result.bits_per_byte,
          "bytes_per_s": result.bytes_per_s, "seconds": result.seconds,
          "bytes": result.bytes, "tokens": result.tokens, "chunks": result.chunks,
          "unscored_bytes": result.vocab_bytes, "scope": result.scope(),
          "running": running_at(result.curve, marks(result.bytes)),
          "curve": result.curve[curve_every - 1::curve_every] if curve_every else [],
          "swarm": swarm}


def swarm_through(config, tokenizer, chunks, unscored: int = 0) -> tuple[PassResult, dict]:
  """A swarm over the chunks as `python -m streamlearn.run` drives it (step k+1 dispatched
  before step k is booked; replacement events after the chunk that crosses their interval):
  the run's PassResult, and the leader's, the mixture's and each slot's bits/byte."""
  swarm = Swarm(config, tokenizer.vocab_size, tokenizer.bos_id)
  state = swarm.place(initial_state(config, tokenizer.vocab_size, tokenizer.bos_id))
  result, slot_bits_N, replaced = PassResult(curve_every=1), np.zeros(config.swarm.size), 0

  def book(metrics, chunk):
    m = jax.device_get(metrics)
    slot_bits_N[:] += np.where(np.isfinite(m["bits"]), m["bits"], 0.0)
    run = swarm.observe(m, chunk.n_bytes, chunk.n_tokens, unscored)
    if result.chunks:  # the first chunk paid for compilation: keep it out of the rate
      result.steady_bytes += chunk.n_bytes
    result.add(chunk.n_bytes, chunk.n_tokens, float(run["bits"]), bool(run["skipped"]), unscored)
    result.curve.append((result.bytes, result.bits_per_byte))

  start, first_done, in_flight = time.perf_counter(), None, None
  for chunk in chunks:
    state, metrics = swarm.step(state, step_chunk(chunk))
    if in_flight is not None:
      book(*in_flight)
    in_flight = (metrics, chunk)
    if first_done is None:
      jax.block_until_ready(metrics)
      first_done = time.perf_counter()
    if swarm.due(result.bytes + chunk.n_bytes):
      book(*in_flight)
      in_flight = None
      state, plan = swarm.evolve(state, result.bytes, result.chunks)
      replaced += int(plan.copied_N.sum() + plan.fresh_N.sum())
  if in_flight is not None:
    book(*in_flight)
  end = time.perf_counter()
  result.seconds, result.steady_seconds = end - start, end - (first_done or end)
  scored = max(result.bytes - result.vocab_bytes - result.skipped_bytes, 1)
  return result, {"size": config.swarm.size, "mix": config.swarm.mix,
                  "mix_eta": config.swarm.mix_eta, "mix_share": config.swarm.mix_share,
                  "mixture": swarm.scores["mixture"].bits_per_byte,
                  "leader": swarm.scores["leader"].bits_per_byte,
                  "slots": (slot_bits_N / scored).tolist(), "replaced": replaced,
                  "members": swarm.population.next_id}


def forgetting(config_path: str | None, base_overrides: list[str], a_spec: str, b_spec: str,
               n: int, canary_bytes: int, names: list[str],
               kl_on_b: tuple[float, ...] = (), full_toml: str | Path = _FULL_TOML) -> list[dict]:
  """Canary bits/byte on held-out A after streaming A, and again after B, per config.

  With a KL guard, the anchor becomes the model as A left it, as a run resumed
  on new data with `delta.anchor` naming its own checkpoint would have it; each
  of `kl_on_b` adds a row that also sets the guard's weight to it for B (as
  `--resume --set delta.kl=X` would), from the same state after A.
  """
  rows = []
  for name in names:
    overrides = base_overrides + ablation(name, full_toml)
    config = load_config(config_path, overrides)
    tokenizer = _tokenizer(config, a_spec)
    predictor, optimizer, step = build(config, tokenizer.vocab_size)
    score = make_score(predictor)
    state = init_learner(predictor, optimizer, seed=config.seed, bos_id=tokenizer.bos_id)

    def canary(params):
      carry = predictor.init_carry(1, tokenizer.bos_id)
      return score_through(score, params, carry,
                           _stream(config, tokenizer, a_spec, canary_bytes, skip=n)).bits_per_byte

    state, on_a = learn_through(step, state, _stream(config, tokenizer, a_spec, n))
    before = canary(state.params)
    guarded = state.delta is not None and state.delta.anchor is not None
    if guarded:
      state = state.replace(delta=state.delta.replace(
          anchor=jax.tree.map(lambda x: x.copy(), state.params),
          anchor_rec=jax.tree.map(lambda x: x.copy(), state.carry.rec_state)))
    for kl in [None] + (list(kl_on_b) if guarded else []):
      # Each B starts from its own copy of the state after A: the step donates it.
      b_state = jax.tree.map(jnp.copy, state)
      if kl is not None:
        b_state = b_state.replace(hp={**b_state.hp, "kl": jnp.asarray(kl, jnp.float32)})
      b_state, on_b = learn_through(step, b_state, _stream(config, tokenizer, b_spec, n))
      after = canary(b_state.params)
      rows.append({"config": name if kl is None else f"{name}, delta.kl={kl:g} on B",
                   "a_bpb": on_a.bits_per_byte, "b_bpb": on_b.bits_per_byte,
                   "canary_before": before, "canary_after": after,
                   "rise_pct": 100 * (after - before) / before})
  return rows


def plot(report: dict, out: str) -> None:
  try:
    import matplotlib
  except ImportError:
    print("(no plot: matplotlib is not installed; pip install -e '.[bench]')")
    return
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(8, 5))
  for run in report["runs"]:
    if run["curve"]:
      x, y = zip(*run["curve"])
      ax.plot(x, y, label=f"{run['config']} ({run['bpb']:.3f})")
  for name, bpb in report["classical"].items():
    ax.axhline(bpb, linestyle=":", color="grey")
    ax.text(report["bytes"], bpb, f" {name}", va="center", fontsize=8, color="grey")
  ax.set_xlabel("bytes streamed")
  ax.set_ylabel("running prequential bits/byte")
  ax.set_title(f"{report['data']}, first {report['bytes']:,} bytes ({report['date']})")
  ax.set_ylim(top=min(ax.get_ylim()[1], 4.0))
  ax.legend()
  fig.tight_layout()
  fig.savefig(out, dpi=110)


def _mark_name(m: int) -> str:
  return f"{m // 1024} KiB" if m % 1024 == 0 else f"{m:,} B"


def _running_cells(running: dict, at: list[int]) -> str:
  # JSON turns the marks into strings: look up either.
  values = [running.get(m, running.get(str(m))) for m in at]
  return "".join(f" {v:.3f} |" if v is not None else " |" for v in values)


def markdown(report: dict) -> str:
  vanilla = next((r for r in report["runs"] if r["config"] == "vanilla"), None)
  # Running bits/byte at each mark before the end; the end is the bits/byte column.
  at = [m for m in MARKS if m < report["bytes"]]
  heads = "".join(f" at {_mark_name(m)} |" for m in at)
  lines = [f"| stream | bytes | method |{heads} bits/byte | vs vanilla | bytes/s | speed vs vanilla |",
           "| --- | ---: | --- |" + " ---: |" * len(at) + " ---: | ---: | ---: | ---: |"]
  for run in report["runs"]:
    label = run["config"]
    if run["overrides"] and not report.get("ablation"):
      label += f" ({' '.join(run['overrides'])})"
    rel = speed = ""
    if vanilla is not None:
      rel = f"{100 * (run['bpb'] / vanilla['bpb'] - 1):+.1f}%"
      speed = f"{run['bytes_per_s'] / vanilla['bytes_per_s']:.2f}x"
    lines.append(f"| {report['data']} | {report['bytes']:,} | streamlearn {label} |"
                 f"{_running_cells(run.get('running', {}), at)} "
                 f"{run['bpb']:.3f} | {rel} | {run['bytes_per_s']:,.0f} | {speed} |")
    for what, bpb in _swarm_rows(run.get("swarm")):
      rel = f"{100 * (bpb / vanilla['bpb'] - 1):+.1f}%" if vanilla is not None else ""
      lines.append(f"| {report['data']} | {report['bytes']:,} | streamlearn {label}: {what} |"
                   f"{' |' * len(at)} {bpb:.3f} | {rel} | | |")
  details = report.get("classical_details", {})
  for name, bpb in report["classical"].items():
    detail = details.get(name, {"label": name, "running": {}})
    rel = f"{100 * (bpb / vanilla['bpb'] - 1):+.1f}%" if vanilla is not None else ""
    lines.append(f"| {report['data']} | {report['bytes']:,} | {detail['label']} |"
                 f"{_running_cells(detail['running'], at)} {bpb:.3f} | {rel} | | |")
  if report.get("forgetting"):
    lines += ["", "| forgetting: config | bits/byte on A | on B | canary A before B | after B | rise |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in report["forgetting"]:
      lines.append(f"| {row['config']} | {row['a_bpb']:.3f} | {row['b_bpb']:.3f} | "
                   f"{row['canary_before']:.3f} | {row['canary_after']:.3f} | "
                   f"{row['rise_pct']:+.1f}% |")
  return "\n".join(lines)


def _swarm_rows(swarm: dict | None) -> list[tuple[str, float]]:
  """A swarm run's rows beside its own: the score it does not go by, and each slot's."""
  if not swarm:
    return []
  other = "leader" if swarm["mix"] else "mixture"
  rows = [(f"the {other} (each chunk by the member leading before it)" if other == "leader"
           else "the members' mixture", swarm[other])]
  return rows + [(f"slot {i} (its members in turn; after the fact)", bpb)
                 for i, bpb in enumerate(swarm["slots"])]


def _floats(text: str) -> tuple[float, ...]:
  try:
    values = tuple(float(x) for x in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
  if any(not math.isfinite(v) or v <= 0 for v in values):
    raise argparse.ArgumentTypeError(f"weights must be positive, got {text!r}")
  return values


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data", required=True, help="a file, a directory, or 'stdlib'")
  parser.add_argument("--bytes", type=int, default=1_000_000, help="how many bytes to stream")
  parser.add_argument("--config", default=None, help="run config (default: built-in defaults)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  parser.add_argument("--json", metavar="OUT", help="write the report as JSON")
  parser.add_argument("--configs", help="comma-separated: static, vanilla, full, full-minus-X")
  parser.add_argument("--full", default=str(_FULL_TOML), metavar="TOML",
                      help="whose [delta] and [replay] 'full' means (default: configs/full.toml)")
  parser.add_argument("--plot", metavar="PNG", help="running bits/byte against bytes, per config")
  parser.add_argument("--forgetting", nargs=2, metavar=("A", "B"),
                      help="stream A then B (vanilla, full); canary = held-out A")
  parser.add_argument("--forgetting-bytes", type=int, default=300_000,
                      help="bytes of A, then of B, in the forgetting check")
  parser.add_argument("--forgetting-kl", type=_floats, default=(), metavar="X,Y",
                      help="also full with delta.kl set to each of these while B streams")
  parser.add_argument("--canary-bytes", type=int, default=50_000,
                      help="held-out A: this many bytes of A after the streamed ones")
  args = parser.parse_args(argv)
  spec = None if args.data == "stdlib" else args.data
  names = args.configs.split(",") if args.configs else []
  curve_every = max(1, args.bytes // 256 // 200)  # ~200 points per curve
  try:
    config = load_config(args.config, args.set)
    ablations = {name: ablation(name, args.full) for name in names}
    data = first_bytes(spec, args.bytes, config)
    if not data:
      raise SourceError(f"{args.data}: no bytes to stream")
    if names:
      runs = []
      for name, extra in ablations.items():
        runs.append(run_config(args.config, None if extra is None else args.set + extra, spec,
                               len(data), name, curve_every))
        print(f"{name}: {runs[-1]['bpb']:.4f} bits/byte, {runs[-1]['bytes_per_s']:,.0f} B/s",
              file=sys.stderr, flush=True)
    else:
      runs = [run_config(args.config, args.set, spec, len(data), curve_every=curve_every)]
    rows = []
    if args.forgetting:
      a, b = (None if x == "stdlib" else x for x in args.forgetting)
      rows = forgetting(args.config, args.set, a, b, args.forgetting_bytes, args.canary_bytes,
                        ["vanilla", "full"], args.forgetting_kl, args.full)
  except (ConfigError, SourceError) as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  scores, details, missing = classical(data)
  report = {"date": str(datetime.date.today()), "machine": platform.machine(),
            "data": args.data, "bytes": len(data), "classical": scores,
            "classical_details": details,
            "classical_missing": missing, "runs": runs, "ablation": bool(names),
            "forgetting": rows,
            "command": "python scripts/benchmark.py " + " ".join(argv or sys.argv[1:])}
  print(markdown(report))
  for run in runs:
    if run["scope"]:
      print(f"streamlearn {run['config']}: bits/byte{run['scope']}; the compressors' rows "
            "cover every byte")
  if args.plot:
    plot(report, args.plot)
  if missing:
    print(f"(not installed, skipped: {', '.join(missing)}; zpaq and 7z PPMd: "
          "apt-get install zpaq p7zip-full)")
  if args.json:
    Path(args.json).write_text(json.dumps(report, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())

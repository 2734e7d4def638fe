"""The Python API, scripts/evaluate.py and scripts/benchmark.py on tiny runs."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from streamlearn import Learner
from streamlearn.config import config_to_dict, load_config

from safety_runs import FULL_DELTA

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.toml")


def load_script(name):
  spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
  import email
  path = tmp_path_factory.mktemp("data") / "text.txt"
  path.write_bytes(b"".join(p.read_bytes() for p in sorted(Path(email.__file__).parent.glob("*.py")))[:8000])
  return path


@pytest.fixture
def run_dir(finished_run):
  return finished_run.run_dir


def test_learner_feeds_reads_and_generates(text_file):
  learner = Learner.from_config(TINY)
  data = text_file.read_bytes()
  out = learner.feed(data[:1000])
  assert out["chunks"] == 1000 // 64 and out["bytes"] == 64 * out["chunks"]
  assert out["pending_tokens"] == 1000 % 64
  # Fed text that is not learned yet (pending) counts for the prediction exactly as text
  # given to next_token_probs does.
  with_text = learner.next_token_probs(data[1000:1010])
  learner.feed(data[1000:1010])
  np.testing.assert_allclose(learner.next_token_probs(), with_text, rtol=1e-6, atol=1e-7)
  probs = learner.next_token_probs()
  assert probs.shape == (259,) and abs(probs.sum() - 1) < 1e-5 and np.all(probs >= 0)
  # What it predicts is what the step scores: the next chunk's bits, token by token from
  # next_token_probs, equal the bits feed() reports for that chunk.
  learner = Learner.from_config(TINY)
  learner.feed(data[:960])                              # 15 whole chunks, nothing pending
  chunk = data[960:1024]
  bits = -sum(np.log2(learner.next_token_probs(chunk[:t])[chunk[t]]) for t in range(64))
  fed = learner.feed(chunk)
  assert fed["chunks"] == 1 and fed["bits_per_byte"] * 64 == pytest.approx(bits, rel=1e-5)
  sample = learner.generate("def ", max_tokens=20, seed=1)
  assert learner.generate("def ", max_tokens=20, seed=1) == sample  # reads, never learns


@pytest.mark.e2e
def test_learner_loads_a_cli_run(run_dir):
  learner = Learner.load(run_dir)
  assert int(learner.state.step) == 47
  assert learner.next_token_probs().shape == (259,)


@pytest.mark.e2e
def test_evaluate_scores_frozen_and_adaptive(run_dir, text_file, capsys):
  evaluate = load_script("evaluate")
  assert evaluate.main([str(run_dir), f"{run_dir}@20", "--data", str(text_file),
                        "--max-bytes", "1280", "--prompt", "import ", "--samples", "1",
                        "--sample-tokens", "10"]) == 0
  out = capsys.readouterr().out
  assert out.count("| 1,280 |") == 2 and "sample 1" in out
  # The numbers: adaptive is the version's learner fed the same bytes; frozen is the same
  # with every update scaled to nothing (the step's own scores, parameters fixed).
  from streamlearn.cli.evaluate import evaluate as evaluate_one
  row = evaluate_one(f"{run_dir}@20", str(text_file), 1280, None, 0, 0)
  data = text_file.read_bytes()[:1280]
  adaptive = Learner.load(run_dir, 20).feed(data)["bits_per_byte"]
  assert row["adaptive_bpb"] == pytest.approx(adaptive, rel=1e-6)
  frozen = Learner.load(run_dir, 20)
  frozen.state = frozen.state.replace(lr_scale=frozen.state.lr_scale * 0)
  assert row["frozen_bpb"] == pytest.approx(frozen.feed(data)["bits_per_byte"], rel=1e-5)
  assert row["frozen_bpb"] != pytest.approx(adaptive, rel=1e-3)


@pytest.mark.e2e
def test_benchmark_reports_the_schema(tmp_path, text_file, capsys):
  benchmark = load_script("benchmark")
  out_json = tmp_path / "b.json"
  assert benchmark.main(["--data", str(text_file), "--bytes", "1500", "--config", TINY,
                         "--json", str(out_json)]) == 0
  report = json.loads(out_json.read_text())
  assert report["bytes"] == 1500
  assert "gzip" in report["classical"] and report["classical"]["gzip"] > 0
  assert report["classical_details"]["gzip"]["running"] == {"1500": report["classical"]["gzip"]}
  run = report["runs"][0]
  assert run["config"] == "tiny" and run["bpb"] > 0 and run["bytes"] == 1500
  assert run["running"] == {"1500": run["bpb"]}
  assert "| streamlearn tiny |" in capsys.readouterr().out


def test_benchmark_running_values_at_the_marks():
  benchmark = load_script("benchmark")
  assert benchmark.marks(70_000) == [65_536, 70_000] and benchmark.marks(100) == [100]
  curve = [(60_000, 3.0), (65_600, 2.5), (70_000, 2.0)]  # (bytes seen, running bits/byte)
  assert benchmark.running_at(curve, [65_536, 70_000]) == {65_536: 2.5, 70_000: 2.0}


@pytest.mark.e2e
@pytest.mark.xdist_group("delta")
def test_benchmark_forgetting_check_with_a_stronger_guard_on_b(text_file, tmp_path, capsys):
  benchmark = load_script("benchmark")
  # 'full' from a file: the tests' small delta learner (one compiled step for all of them).
  sets = FULL_DELTA[:2]  # chunk length, warm-up
  table = config_to_dict(load_config(TINY, FULL_DELTA))
  full = tmp_path / "full.toml"
  full.write_text("\n".join(f"[{section}]\n" + "\n".join(
      f"{key} = {json.dumps(value)}" for key, value in table[section].items())
      for section in ("delta", "replay")) + "\n")
  assert benchmark.main(["--data", str(text_file), "--bytes", "300", "--config", TINY,
                         *[x for o in sets for x in ("--set", o)], "--full", str(full),
                         "--forgetting", str(text_file), "stdlib", "--forgetting-bytes", "600",
                         "--canary-bytes", "300", "--forgetting-kl", "1"]) == 0
  rows = [line.split("|")[1].strip() for line in capsys.readouterr().out.splitlines()
          if line.startswith("| vanilla") or line.startswith("| full")]
  assert rows == ["vanilla", "full", "full, delta.kl=1 on B"]
  with pytest.raises(SystemExit):
    benchmark.main(["--data", str(text_file), "--forgetting-kl", "1,x"])
  assert "--forgetting-kl: expected comma-separated numbers" in capsys.readouterr().err


@pytest.mark.e2e
def test_bench_step_times_variants_as_ratios(text_file, capsys):
  bench_step = load_script("bench_step")
  assert bench_step.main(["--config", TINY, "--data", str(text_file), "--chunks", "2",
                          "--rounds", "2", "--variant", "with", "--variant", "without",
                          "match.enabled=false"]) == 0
  rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| with")
          or line.startswith("| without")]
  assert len(rows) == 2 and rows[0].endswith("| 1.00 |")
  # A variant the config refuses: one line, before anything compiles.
  assert bench_step.main(["--config", TINY, "--variant", "bad", "mixer.online_lr=-1"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: variant bad: mixer.") and err.count("\n") == 1


def test_benchmark_ablations_each_turn_exactly_one_part_off():
  from streamlearn.config import ConfigError, config_to_dict, load_config
  benchmark = load_script("benchmark")
  flat = lambda name: {(s, k): v for s, table in config_to_dict(
      load_config(None, benchmark.ablation(name))).items() if isinstance(table, dict)
      for k, v in table.items()}
  full = flat("full")
  assert full[("delta", "arrival")] and full[("delta", "lag")] == 2 and full[("delta", "gate")]
  for part in benchmark._MINUS:
    changed = {key for key, value in flat(f"full-minus-{part}").items() if full[key] != value}
    assert len(changed) == 1, (part, changed)
  assert flat("vanilla")[("delta", "lag")] == 0 and benchmark.ablation("static") is None
  mix = flat("mix")
  assert mix[("counts", "enabled")] and mix[("mixer", "enabled")] and mix[("mixer", "online_lr")]
  assert not flat("vanilla")[("mixer", "enabled")] and not full[("mixer", "enabled")]
  for part, overrides in benchmark._MIX_MINUS.items():
    changed = {key for key, value in flat(f"mix-minus-{part}").items() if mix[key] != value}
    assert changed == {tuple(o.split("=")[0].split(".")) for o in overrides}, (part, changed)
  with pytest.raises(ConfigError, match="full-minus-arrival"):
    benchmark.ablation("full-minus-everything")

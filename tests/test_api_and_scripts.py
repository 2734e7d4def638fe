"""The Python API, scripts/evaluate.py and scripts/benchmark.py on tiny runs."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from streamlearn import Learner

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
  text = text_file.read_text()[:1000]
  out = learner.feed(text)
  assert out["chunks"] == 1000 // 64 and out["bytes"] == 64 * out["chunks"]
  assert out["pending_tokens"] == 1000 % 64
  probs = learner.next_token_probs()
  assert probs.shape == (259,) and abs(probs.sum() - 1) < 1e-5 and np.all(probs >= 0)
  # Pending (not yet learned) text still moves the prediction.
  learner.feed("x")
  assert not np.allclose(learner.next_token_probs(), probs)
  sample = learner.generate("def ", max_tokens=20, seed=1)
  assert isinstance(sample, str) and len(sample.encode("utf-8", "replace")) >= 1
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


@pytest.mark.e2e
def test_benchmark_reports_the_schema(tmp_path, text_file, capsys):
  benchmark = load_script("benchmark")
  out_json = tmp_path / "b.json"
  assert benchmark.main(["--data", str(text_file), "--bytes", "1500", "--config", TINY,
                         "--json", str(out_json)]) == 0
  report = json.loads(out_json.read_text())
  assert report["bytes"] == 1500
  assert "gzip" in report["classical"] and report["classical"]["gzip"] > 0
  run = report["runs"][0]
  assert run["config"] == "tiny" and run["bpb"] > 0 and run["bytes"] == 1500
  assert "| streamlearn tiny |" in capsys.readouterr().out


@pytest.mark.e2e
def test_benchmark_forgetting_check_with_a_stronger_guard_on_b(text_file, capsys):
  benchmark = load_script("benchmark")
  assert benchmark.main(["--data", str(text_file), "--bytes", "300", "--config", TINY,
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
  with pytest.raises(ConfigError, match="full-minus-arrival"):
    benchmark.ablation("full-minus-everything")

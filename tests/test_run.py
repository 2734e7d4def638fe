"""The main command end to end: python -m streamlearn.run on configs/tiny.toml."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from streamlearn.cli.run import main
from streamlearn.config import load_config
from streamlearn.learn.build import build
from streamlearn.learn.state import init_learner
from streamlearn.store.checkpoint import Checkpointer, abstract_like

from safety_runs import MIXER

TINY = str(Path(__file__).resolve().parent.parent / "configs" / "tiny.toml")

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
  # Real text from this machine's stdlib, never from a benchmark corpus.
  import json as json_module
  path = tmp_path_factory.mktemp("data") / "text.txt"
  path.write_bytes(Path(json_module.__file__).read_bytes()[:6000])
  return path


def final_state(run_dir, overrides=()):
  config = load_config(TINY, list(overrides))
  predictor, optimizer, _ = build(config, 259)
  fresh = init_learner(predictor, optimizer, seed=config.seed, bos_id=256)
  checkpointer = Checkpointer(Path(run_dir), config.checkpoint)
  state, stream, _ = checkpointer.restore(None, abstract_like(fresh))
  checkpointer.close()
  return state, stream


@pytest.fixture(autouse=True)
def info_logs(caplog):
  caplog.set_level("INFO", logger="streamlearn")


def test_smoke_writes_tensorboard_and_versions(tmp_path, text_file, caplog):
  run_dir = tmp_path / "run"
  assert main(["--config", TINY, "--data", str(text_file), "--max-bytes", "3000",
               "--run-dir", str(run_dir)]) == 0
  assert list((run_dir / "tb").glob("events.out.tfevents.*"))
  assert (run_dir / "config.json").exists() and (run_dir / "tokenizer.json").exists()
  state, stream = final_state(run_dir)
  assert stream["totals"]["bytes"] == 3000
  assert int(state.step) == stream["totals"]["chunks"] == -(-3000 // 64)
  assert "3,000 bytes" in caplog.text


@pytest.mark.parametrize("overrides", [[], MIXER], ids=["plain", "counts-and-mixer"])
def test_resume_continues_bitwise_like_an_uninterrupted_run(tmp_path, text_file, overrides):
  straight, split = tmp_path / "straight", tmp_path / "split"
  args = ["--config", TINY, "--data", str(text_file)] + [x for o in overrides for x in ("--set", o)]
  assert main(args + ["--max-bytes", "2560", "--run-dir", str(straight)]) == 0
  assert main(args + ["--max-bytes", "1280", "--run-dir", str(split)]) == 0
  assert main(args + ["--max-bytes", "1280", "--run-dir", str(split), "--resume"]) == 0
  (a, stream_a), (b, stream_b) = final_state(straight, overrides), final_state(split, overrides)
  assert stream_a["totals"] == stream_b["totals"]
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_resuming_onto_new_data_learns_all_of_it(tmp_path, text_file, monkeypatch, caplog):
  # More text pushed through a pipe, then another file: each from its start, none skipped.
  import io
  run_dir, data = tmp_path / "run", text_file.read_bytes()
  args = ["--config", TINY, "--run-dir", str(run_dir)]
  monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data[:700])))
  assert main(args + ["--data", "-"]) == 0
  monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data[700:1500])))
  assert main(args + ["--data", "-", "--resume"]) == 0
  assert "resuming onto new data: stdin streams from its start" in caplog.text
  assert final_state(run_dir)[1]["totals"]["bytes"] == 1500
  other = tmp_path / "other.txt"
  other.write_bytes(data[1500:2000])
  assert main(args + ["--data", str(other), "--resume", "--max-bytes", "200"]) == 0
  caplog.clear()  # the same file again, named another way: it goes on where it stopped
  assert main(args + ["--data", f"{tmp_path}/./other.txt", "--resume"]) == 0
  assert "new data" not in caplog.text
  assert final_state(run_dir)[1]["totals"]["bytes"] == 2000


def test_bpe_run_trains_its_tokenizer_once_and_resumes_with_it(tmp_path, text_file, caplog):
  run_dir = tmp_path / "bpe"
  args = ["--config", TINY, "--data", str(text_file), "--run-dir", str(run_dir),
          "--set", "tokenizer.kind=bpe", "--set", "tokenizer.vocab_size=300",
          "--set", "tokenizer.warmup_bytes=2000"]
  assert main(args + ["--max-bytes", "1000"]) == 0
  saved = json.loads((run_dir / "tokenizer.json").read_text())
  assert saved["kind"] == "bpe"
  # The vocabulary was trained on the first 2000 bytes: none of them is scored, and a
  # version saved among them has no score to be ranked by.
  assert "no byte scored yet: all 1,000 so far are the BPE vocabulary's warm-up" in caplog.text
  registry = json.loads((run_dir / "registry.json").read_text())
  assert [v["scores"].get("score") for v in registry["versions"]] == [None, None]
  assert main(args + ["--max-bytes", "1500", "--resume"]) == 0
  assert json.loads((run_dir / "tokenizer.json").read_text()) == saved
  checkpointer = Checkpointer(run_dir, load_config(TINY).checkpoint)
  totals = checkpointer.read_record(checkpointer.latest_step())[0]["totals"]
  checkpointer.close()
  # Scored: the bytes of the chunks that began after the warm-up (one chunk < 500 bytes).
  assert 2000 <= totals["vocab_bytes"] < 2500 and totals["bytes"] == 2500
  assert totals["bits"] > 0 and "after the BPE vocabulary's warm-up" in caplog.text


@pytest.mark.parametrize("extra,message", [
    (["--data", "/no/such/file"], "/no/such/file: no such file or directory"),
    (["--set", "model.d_modle=3"], "model.d_modle: unknown key"),
    (["--resume"], "no run to resume"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, extra, message):
  code = main(["--config", TINY, "--run-dir", str(tmp_path / "r")] + extra)
  err = capsys.readouterr().err
  assert code == 2 and message in err and "Traceback" not in err


def test_an_existing_run_is_never_overwritten(tmp_path, text_file, capsys):
  run_dir = tmp_path / "run"
  args = ["--config", TINY, "--data", str(text_file), "--run-dir", str(run_dir)]
  assert main(args + ["--max-bytes", "100"]) == 0
  assert main(args + ["--max-bytes", "100"]) == 2
  assert "already holds a run" in capsys.readouterr().err


def test_empty_stream_is_reported_not_a_crash(tmp_path, caplog):
  empty = tmp_path / "empty.txt"
  empty.write_bytes(b"")
  assert main(["--config", TINY, "--data", str(empty), "--run-dir", str(tmp_path / "r")]) == 0
  assert "stream was empty" in caplog.text


def test_the_module_entry_point_streams_a_pipe_and_ctrl_c_saves(tmp_path, text_file):
  # The README's form of the command, as a user types it, fed through a pipe that stays
  # open; Ctrl-C while it waits for more.
  run_dir = tmp_path / "r"
  proc = subprocess.Popen(
      [sys.executable, "-m", "streamlearn.run", "--config", TINY, "--data", "-",
       "--run-dir", str(run_dir), "--set", "checkpoint.every_chunks=5"],
      stdin=subprocess.PIPE, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
  proc.stdin.write(text_file.read_bytes()[:640])  # 10 chunks of 64
  proc.stdin.flush()
  deadline = time.monotonic() + 240  # version 10 is on disk once all 10 are learned
  while not (run_dir / "versions" / "10").exists() and proc.poll() is None:
    assert time.monotonic() < deadline, "no version 10 in 240 s"
    time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err.decode()
  assert b"interrupted: 640 bytes" in err and b"Traceback" not in err
  state, stream = final_state(run_dir)
  assert int(state.step) == stream["totals"]["chunks"] == 10


def test_ctrl_c_in_a_step_stops_after_it_with_a_usable_checkpoint(tmp_path, monkeypatch, caplog):
  # No --data: the embedded default (this interpreter's stdlib), far longer than the test.
  # SIGINT arrives while the 5th step runs: the loop stops after it and saves.
  from streamlearn.run import loop

  real_step, calls = None, []

  def step_then_ctrl_c(state, chunk):
    calls.append(1)
    if len(calls) == 5:
      signal.raise_signal(signal.SIGINT)
    return real_step(state, chunk)

  real_open = loop.Streams.open

  def opened(streams, position):  # the session's step, wrapped, once the loop holds it
    nonlocal real_step
    if real_step is None:
      real_step, streams.session.step_fn = streams.session.step_fn, step_then_ctrl_c
    return real_open(streams, position)

  monkeypatch.setattr(loop.Streams, "open", opened)
  run_dir = tmp_path / "r"
  assert main(["--config", TINY, "--run-dir", str(run_dir)]) == 0
  assert "interrupted: 320 bytes" in caplog.text
  state, stream = final_state(run_dir)
  assert int(state.step) == stream["totals"]["chunks"] == 5

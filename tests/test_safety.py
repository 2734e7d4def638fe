"""The safety net: NaN/Inf skips, rollbacks, versions, the registry, restore, corrupt versions."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from streamlearn import Learner
from streamlearn.cli.run import main as run_main
from streamlearn.cli.versions import main as versions_main
from streamlearn.config import SafetyConfig, config_from_dict, load_config
from streamlearn.data.stream import HostChunk
from streamlearn.learn.build import build
from streamlearn.learn.prequential import step_chunk
from streamlearn.learn.state import init_learner
from streamlearn.run.loop import run
from streamlearn.run.safety import (Guard, SpikeDetector, lowered_lr_scale, rollback_candidates,
                                    spike_confirmed)
from streamlearn.run.session import open_session
from streamlearn.store.checkpoint import Checkpointer
from streamlearn.store.registry import REGISTRY_FILE

from safety_runs import (FULL_DELTA, SAFE, TINY, assert_same_state, final, load_script,
                         stdlib_text)


def registry(run_dir):
  return json.loads((Path(run_dir) / REGISTRY_FILE).read_text())


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("data") / "text.txt"
  path.write_bytes(stdlib_text(3000))
  return path


# --- the guard, on its own -------------------------------------------------------------------

def test_spike_detector_needs_a_full_window_and_flags_only_spikes():
  detector = SpikeDetector(0.5, window=4)
  assert [detector.update(x) for x in (2.0, 2.2, 1.8, 2.1)] == [None] * 4
  assert detector.update(3.0) is None          # 3.0 <= median 2.05 * 1.5
  assert detector.update(3.3) == pytest.approx(2.15)   # median of 2.2, 1.8, 2.1, 3.0


def test_guard_alarms_and_their_rollback_bound():
  cfg = SafetyConfig(max_skips=3, signal_chunks=2, median_chunks=3)
  chunk = lambda c: HostChunk(np.full(64, c, np.int32), 64, 64, {})
  guard = Guard(cfg)
  assert guard.observe(1, float("nan"), chunk(1), True) is None
  assert guard.observe(2, 100.0, chunk(2), False) is None   # a good chunk breaks the run of skips
  alarms = [guard.observe(c, float("nan"), chunk(c), True) for c in (3, 4, 5)]
  assert alarms[:2] == [None, None]
  assert alarms[2].reason == "non-finite" and alarms[2].before == 3 - 2
  guard = Guard(cfg)
  for c in range(1, 6):
    assert guard.observe(c, 128.0, chunk(c), False) is None   # 2 bits/byte, steady
  alarm = guard.observe(6, 640.0, chunk(6), False)            # 10 bits/byte: the window's is 6
  assert alarm.reason == "spike" and alarm.before == 6 - 2
  assert [c.tokens_T[0] for c in alarm.window] == [5, 6]     # the chunks to confirm it on
  restored = Guard.from_json(cfg, json.loads(json.dumps(guard.to_json())))
  assert restored.to_json() == guard.to_json() and restored.score() == guard.score()


def test_the_decisions_at_their_thresholds():
  # A spike: strictly above median x (1 + fraction). Confirmed: the version does better by
  # more than half the fraction. The learning rate: x lr_factor a rollback, down to a floor.
  cfg = SafetyConfig(spike_fraction=0.5, lr_factor=0.5, min_lr_scale=0.1)
  detector = SpikeDetector(0.5, window=4)
  for x in (2.0, 2.0, 2.0, 2.0):
    detector.update(x)
  assert detector.update(3.0) is None and detector.update(3.0001) == 2.0
  assert not spike_confirmed(now_bpb=1.25, version_bpb=1.0, cfg=cfg)   # exactly x1.25
  assert spike_confirmed(now_bpb=1.2501, version_bpb=1.0, cfg=cfg)
  scales = [1.0]
  for _ in range(5):
    scales.append(lowered_lr_scale(scales[-1], cfg))
  assert scales == [1.0, 0.5, 0.25, 0.125, 0.1, 0.1]


def test_rollback_candidates_skip_discarded_but_always_keep_the_base():
  assert rollback_candidates([0, 10, 20, 30], before=25, discarded={20}) == [0, 10]
  assert rollback_candidates([0, 10], before=-1, discarded=set()) == [0]


# --- the step's guard ------------------------------------------------------------------------

@pytest.mark.parametrize("learner", ["plain", pytest.param("delta",
                                                           marks=pytest.mark.xdist_group("delta"))])
def test_nan_update_is_skipped_and_counted(learner):
  # The tests' small configs (their steps are compiled for other tests too).
  config = load_config(TINY, FULL_DELTA if learner == "delta" else FULL_DELTA[:2])
  predictor, optimizer, step = build(config, 259)
  assert (predictor.delta is None) == (learner == "plain")
  state = init_learner(predictor, optimizer, seed=0, bos_id=256)
  chunk = step_chunk(HostChunk(np.arange(16, dtype=np.int32), 16, 16, {}))
  state, _ = step(state, chunk)  # (the delta learner: a forecast to learn beside, made)
  poisoned = state.replace(params=jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan),
                                               state.params))
  before = jax.device_get(poisoned)
  after, metrics = step(jax.tree.map(jnp.copy, poisoned), chunk)
  assert float(metrics["skipped"]) == 1.0 and not np.isfinite(float(metrics["bits"]))
  # NaN == NaN here: nothing the network holds moved at all (nor the delta learner's ring,
  # forecast, teacher or replay); the match model's history (tokens only) took the chunk in.
  without_match = lambda s: s.replace(carry=s.carry.replace(match=None))
  assert_same_state(without_match(jax.device_get(after)), without_match(before))
  assert int(after.carry.match.pos_B[0]) == 32
  good, metrics = step(state, chunk)
  assert float(metrics["skipped"]) == 0.0 and int(good.step) == 2


# --- rollbacks in a run ----------------------------------------------------------------------

@pytest.mark.e2e
def test_a_spike_from_harder_data_is_not_rolled_back(tmp_path):
  # Text, then random bytes: the spike is the data's. The version a rollback would restore
  # pays as much on those chunks, so nothing is rolled back and the learning rate stays.
  noise = np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes()
  data = tmp_path / "noise.txt"
  data.write_bytes(stdlib_text(140 * 64) + noise + stdlib_text(2000))
  run_dir = tmp_path / "run"
  assert run_main(SAFE + ["--data", str(data), "--run-dir", str(run_dir)]) == 0
  events = registry(run_dir)["events"]
  assert events and {e["kind"] for e in events} == {"spike_ignored"}
  assert 141 <= events[0]["chunk"] <= 150 and events[0]["checked"] == 130
  state, record = final(run_dir)
  assert float(state.lr_scale) == 1.0 and int(state.step) == record["totals"]["chunks"]


@pytest.fixture(scope="module")
def before_damage(tmp_path_factory, text_file):
  """A run over 140 chunks of text: versions 0, 10, ..., 140."""
  data = text_file.parent / "long.txt"
  data.write_bytes(stdlib_text(200 * 64))
  run_dir = tmp_path_factory.mktemp("runs") / "before_damage"
  assert run_main(SAFE + ["--data", str(data), "--run-dir", str(run_dir),
                          "--max-bytes", str(140 * 64)]) == 0
  return run_dir, data


def damaged_session(run_dir, data, overrides=()):
  """The run resumed with its embedding wiped out: from chunk 141 on, it predicts nothing."""
  config = config_from_dict(json.loads((run_dir / "config.json").read_text()), list(overrides))
  session, progress = open_session(config, run_dir=str(run_dir), data=str(data), resume=True)
  params = dict(progress.state.params)
  params["embed"] = {"embedding": params["embed"]["embedding"] * 0.0}
  progress.state = progress.state.replace(params=params)
  return session, progress


@pytest.mark.e2e
def test_a_spike_from_bad_learning_rolls_back_to_the_last_good_version(tmp_path, before_damage):
  run_dir = copy_run(before_damage[0], tmp_path / "run")
  session, progress = damaged_session(run_dir, before_damage[1])
  assert run(session, progress, max_bytes=30 * 64) == 0
  events = registry(run_dir)["events"]
  # The onset is chunk 141, so the last good version is the newest older than the update
  # before it (<= 139): 130.
  assert [e["kind"] for e in events] == ["rollback"]
  assert events[0]["reason"] == "spike" and events[0]["to"] == 130
  assert 141 <= events[0]["chunk"] <= 150 and events[0]["lr_scale"] == 0.5
  assert events[0]["discarded"] == [140]
  state, record = final(run_dir)
  assert float(state.lr_scale) == 0.5
  # The stream went on from where it was: every byte seen once, fewer chunks learned.
  assert record["totals"]["bytes"] == 170 * 64
  assert int(state.step) < record["totals"]["chunks"]
  # The version saved right after the rollback descends from the restored one.
  after = [v for v in registry(run_dir)["versions"] if v["step"] >= events[0]["chunk"]]
  assert after[0]["parent"] == 130 and after[0]["lr_scale"] == 0.5
  assert [v["rolled_back"] for v in registry(run_dir)["versions"] if v["step"] == 140] == [True]
  tb = b"".join(p.read_bytes() for p in (run_dir / "tb").glob("events.*"))
  assert b"safety/rollback_to" in tb


@pytest.mark.e2e
def test_restream_streams_again_from_the_restored_version(tmp_path, before_damage):
  run_dir = copy_run(before_damage[0], tmp_path / "run")
  session, progress = damaged_session(run_dir, before_damage[1], ["safety.restream=true"])
  assert run(session, progress) == 0             # to the end of the file
  event = registry(run_dir)["events"][0]
  assert event["restream"] and event["to"] == 130 and event["discarded"] == [140]
  # The versions after the target moved aside; the stream and totals went back to it.
  assert [int(p.name) for p in (run_dir / "aside").glob("*-rolled-back-from-*/*")] == [140]
  state, record = final(run_dir)
  assert record["totals"]["bytes"] == 200 * 64
  assert int(state.step) == record["totals"]["chunks"] == 200   # every chunk learned once
  entries = [v for v in registry(run_dir)["versions"] if v["step"] == 140]
  assert entries[0]["status"] == "aside" and entries[1]["lr_scale"] == 0.5   # 140 again, anew


@pytest.mark.e2e
def test_repeated_nan_updates_roll_back(tmp_path, text_file, caplog):
  run_dir = tmp_path / "run"
  args = SAFE + ["--data", str(text_file), "--run-dir", str(run_dir)]
  assert run_main(args + ["--max-bytes", "1280"]) == 0          # versions 0, 10, 20
  config = config_from_dict(json.loads((run_dir / "config.json").read_text()))
  session, progress = open_session(config, run_dir=str(run_dir), data=str(text_file),
                                   resume=True)
  # Poison it: every update from chunk 21 on is non-finite, until the rollback.
  progress.state = progress.state.replace(
      params=jax.tree.map(lambda x: x * jnp.nan, progress.state.params))
  assert run(session, progress, max_bytes=640) == 0
  event = registry(run_dir)["events"][-1]
  assert event["reason"] == "non-finite" and event["chunk"] == 23
  assert event["to"] == 10                          # newest version <= first skip (21) - 2
  state, record = final(run_dir)
  # The step in flight when the alarm rang ran on the poisoned state too: 4 skips in all.
  assert record["totals"]["skipped"] == 4 and float(state.lr_scale) == 0.5
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))
  assert "4 updates skipped" in caplog.text and "1 rollback" in caplog.text


def resumed_on_new_data(finished_run, tmp_path, overrides=()):
  """A copy of the finished run, resumed (in process) onto 20 chunks of other text."""
  run_dir = copy_run(finished_run.run_dir, tmp_path / "run")
  data = tmp_path / "more.txt"
  data.write_bytes(stdlib_text(6000)[3000:4280])
  config = config_from_dict(json.loads((run_dir / "config.json").read_text()), list(overrides))
  session, progress = open_session(config, run_dir=str(run_dir), data=str(data), resume=True)
  return run_dir, session, progress


def poisoned(session):
  """The session's step, fed parameters with a NaN every time: every update is skipped."""
  real = session.step_fn
  nan = lambda state: state.replace(params=jax.tree.map(lambda x: x * jnp.nan, state.params))
  session.step_fn = lambda state, chunk: real(nan(state), chunk)


@pytest.mark.e2e
def test_repeated_rollbacks_lower_the_learning_rate_to_its_floor(finished_run, tmp_path,
                                                                 caplog):
  run_dir, session, progress = resumed_on_new_data(finished_run, tmp_path,
                                                   ["safety.min_lr_scale=0.2"])
  poisoned(session)
  assert run(session, progress) == 0
  events = [e for e in registry(run_dir)["events"] if e["kind"] == "rollback"]
  # Three skips in a row roll back, each time: 20 chunks give 5 (the last at the end).
  assert [e["lr_scale"] for e in events] == [0.5, 0.25, 0.2, 0.2, 0.2]
  assert all(e["reason"] == "non-finite" for e in events)
  assert final(run_dir)[0].lr_scale == np.float32(0.2)


@pytest.mark.e2e
def test_a_rollback_with_no_version_to_restore_stops_the_run_with_one_line(finished_run,
                                                                          tmp_path, caplog):
  run_dir, session, progress = resumed_on_new_data(finished_run, tmp_path)
  for version in (run_dir / "versions").iterdir():  # every version damaged after the resume
    corrupt_state(version)
  poisoned(session)
  assert run(session, progress) == 1
  errors = [r.message for r in caplog.records if r.message.startswith("error:")]
  assert len(errors) == 1 and "impossible" in errors[0] and "no readable version" in errors[0]
  assert "Traceback" not in caplog.text


# --- versions, registry, restore -------------------------------------------------------------

@pytest.fixture
def straight(finished_run):
  """An uninterrupted run over its whole file: versions 0, 10, ..., 40, 47 (read-only)."""
  return finished_run.run_dir


def version_rows(out: str) -> dict[str, str]:
  """The listing's rows by step."""
  return {line.split()[0]: line for line in out.splitlines()
          if line.split() and line.split()[0].isdigit()}


def copy_run(src, dst):
  shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
  return dst


@pytest.mark.e2e
def test_versions_lists_original_latest_best(straight, capsys):
  assert versions_main(["--run-dir", str(straight)]) == 0
  out = capsys.readouterr().out
  rows = version_rows(out)
  assert "original" in rows["0"] and "latest" in rows["47"]
  assert "best" in out and "3,000" in rows["47"]
  best = min((v for v in registry(straight)["versions"] if v["status"] == "kept"
              and v["scores"]["score"] is not None), key=lambda v: v["scores"]["score"])
  assert "best" in rows[str(best["step"])]


@pytest.mark.e2e
@pytest.mark.parametrize("damage", ["missing", "garbage"])
def test_registry_is_rebuilt_from_the_checkpoints(straight, tmp_path, damage, capsys, caplog):
  run_dir = copy_run(straight, tmp_path / "run")
  path = run_dir / REGISTRY_FILE
  expected = {v["step"] for v in registry(run_dir)["versions"] if v["status"] == "kept"}
  path.unlink() if damage == "missing" else path.write_text("{not json")
  assert versions_main(["--run-dir", str(run_dir)]) == 0
  assert f"{path} is" in caplog.text and "rebuilding it from 6 versions" in caplog.text
  assert set(map(int, version_rows(capsys.readouterr().out))) == expected


@pytest.mark.e2e
def test_restore_and_back_to_the_original_round_trip(straight, tmp_path, finished_run, capsys):
  restore = load_script("restore").main
  end_state, end_record = final(straight)
  run_dir = copy_run(straight, tmp_path / "run")
  resume = SAFE + ["--data", str(finished_run.data), "--run-dir", str(run_dir), "--resume"]
  for target, flag in ((20, ["--step", "20"]), (0, ["--original"])):
    later = [s for s in steps(run_dir) if s > target]
    assert restore(["--run-dir", str(run_dir)] + flag) == 0
    assert f"back at version {target}" in capsys.readouterr().out
    assert steps(run_dir)[-1] == target
    aside = sorted(int(p.name) for p in (run_dir / "aside").glob(f"*-restored-to-{target}/*"))
    assert aside == later                         # kept aside, never deleted
    assert registry(run_dir)["events"][-1]["kind"] == ("restore" if target else "reset_to_original")
    # Resuming replays the stream from the version on, exactly as the first time.
    assert run_main(resume) == 0
    state, record = final(run_dir)
    assert record["totals"] == end_record["totals"]
    assert_same_state(state, end_state)


def steps(run_dir):
  config = config_from_dict(json.loads((Path(run_dir) / "config.json").read_text()))
  checkpointer = Checkpointer(run_dir, config.checkpoint)
  try:
    return checkpointer.all_steps()
  finally:
    checkpointer.close()


@pytest.mark.e2e
@pytest.mark.parametrize("target", ["--step=999", "--step=40"])
def test_restore_refuses_a_missing_or_corrupt_version_and_changes_nothing(
    straight, tmp_path, capsys, target):
  run_dir = copy_run(straight, tmp_path / "run")
  corrupt_state(run_dir / "versions" / "40")
  before = sorted(p.name for p in (run_dir / "versions").iterdir())
  assert load_script("restore").main(["--run-dir", str(run_dir), target]) == 2
  err = capsys.readouterr().err
  assert "nothing changed" in err and "Traceback" not in err and len(err.splitlines()) == 1
  assert ("no complete version 999" in err) if "999" in target else ("version 40 is" in err)
  assert sorted(p.name for p in (run_dir / "versions").iterdir()) == before
  assert not (run_dir / "aside").exists()


def corrupt_state(version_dir):
  """Truncates every array file of a version, as a power cut before the flush might."""
  files = [f for f in (version_dir / "state").rglob("*") if f.is_file() and "/d/" in str(f)]
  assert files
  for f in files:
    f.write_bytes(f.read_bytes()[:7])


@pytest.mark.e2e
def test_corrupt_latest_falls_back_to_the_previous_version(straight, tmp_path, finished_run,
                                                           caplog):
  end_state, end_record = final(straight)
  run_dir = copy_run(straight, tmp_path / "run")
  corrupt_state(run_dir / "versions" / "47")
  # Reading: the one before, with one line saying so.
  state = Learner.load(run_dir).state
  assert int(state.step) == 40
  assert "version 47 is unreadable" in caplog.text and "falling back to version 40" in caplog.text
  # Resuming: the damaged version moves aside, the run goes on and ends where it would have.
  assert run_main(SAFE + ["--data", str(finished_run.data), "--run-dir", str(run_dir),
                          "--resume"]) == 0
  assert list((run_dir / "aside").glob("*-unreadable/47"))
  state, record = final(run_dir)
  assert record["totals"] == end_record["totals"]
  assert_same_state(state, end_state)


@pytest.mark.e2e
def test_a_run_in_use_is_not_restored(straight, tmp_path, capsys):
  from streamlearn.store.rundir import RunLock
  run_dir = copy_run(straight, tmp_path / "run")
  lock = RunLock(run_dir)
  try:
    assert load_script("restore").main(["--run-dir", str(run_dir), "--step", "20"]) == 2
  finally:
    lock.release()
  assert "in use by pid" in capsys.readouterr().err


@pytest.mark.e2e
def test_a_version_of_another_layout_is_one_line_before_any_read(straight, tmp_path, capsys):
  # What an older streamlearn's run looks like to a resume: the same config, but a table of
  # another shape in its versions (here the run's config says a larger one). Every version
  # has it, so none is tried after the newest.
  run_dir = copy_run(straight, tmp_path / "run")
  config = json.loads((run_dir / "config.json").read_text())
  config["match"]["table_log2"] += 1
  (run_dir / "config.json").write_text(json.dumps(config))
  data = tmp_path / "text.txt"
  data.write_bytes(stdlib_text(3000))
  assert run_main(SAFE + ["--data", str(data), "--run-dir", str(run_dir), "--resume",
                          "--set", f"match.table_log2={config['match']['table_log2']}"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "warning" not in err, err
  assert err.startswith(f"error: {run_dir}: version 47 holds a state of another layout "
                        "(carry.match."), err
  assert "another config or an older streamlearn saved it" in err

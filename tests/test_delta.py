"""Two-stream delta learning: buffer pairing, causality, EMA, KL, gate, replay, switches."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import json as json_module
import pathlib as pathlib_module

from streamlearn.cli.run import main
from streamlearn.config import load_config
from streamlearn.learn import delta as dl
from streamlearn.learn import replay as replay_lib
from streamlearn.learn.build import _build, build, step_shaping
from streamlearn.learn.chunk import Chunk
from streamlearn.learn.state import init_learner
from streamlearn.nn.model import LM

from safety_runs import DELTA_K, DELTA_LAG, DELTA_T, FULL_DELTA

TINY = str(Path(__file__).resolve().parent.parent / "configs" / "tiny.toml")
# One worker runs every test that compiles the delta step: it compiles once.
pytestmark = pytest.mark.xdist_group("delta")

VOCAB, BOS, T, K, LAG = 259, 256, DELTA_T, DELTA_K, DELTA_LAG
FULL = FULL_DELTA


def config(*overrides):
  return load_config(TINY, FULL + list(overrides))


@pytest.fixture(scope="module")
def full():
  """The full delta step, compiled once for the module."""
  predictor, optimizer, step = build(config(), VOCAB)
  return predictor, optimizer, step


def chunk_of(tokens):
  tokens = jnp.asarray(tokens, jnp.int32)[None]
  return Chunk(tokens, jnp.ones(tokens.shape, jnp.float32), jnp.full((1,), tokens.shape[1], jnp.float32))


def fresh(full):
  predictor, optimizer, _ = full
  return init_learner(predictor, optimizer, seed=0, bos_id=BOS)


def copy(tree):
  return jax.tree.map(jnp.copy, tree)


def test_the_learner_pairs_each_chunk_with_the_forecast_made_lag_ticks_before(full):
  step = full[2]
  state = fresh(full)
  # Chunk j is the token j repeated: any mix-up of chunks or ticks shows.
  for t in range(7):
    state, metrics = step(state, chunk_of(np.full(T, 10 + t)))
    assert float(metrics["learned"]) == float(t >= LAG - 1)
    if t < LAG - 1:
      continue
    assert int(metrics["learned_tick"]) == t - LAG + 1
    learned = dl.ring_get(state.delta.ring, (t + 1) % LAG)   # not overwritten until tick t + 1
    assert int(learned.tick) == t - LAG + 1
    assert np.all(np.asarray(learned.tokens_BxT) == 10 + t - LAG + 1)
    assert int(learned.forecast.made_at) == t - LAG            # made before that chunk came
    assert int(metrics["forecast_made_at"]) == t - 1           # the chunk just scored: last tick's


def test_each_chunk_is_scored_before_any_update_that_saw_it(full, rng):
  # Prequential, as the plain learner is: each chunk's score is the one the same step gives
  # it with every update scaled to nothing (so no update on it came first), and changing
  # chunk k changes no score before it.
  step = full[2]

  def scores(chunks):
    state, bits, frozen = fresh(full), [], []
    for tokens in chunks:
      still = copy(state).replace(lr_scale=state.lr_scale * 0)
      frozen.append(float(step(still, chunk_of(tokens))[1]["bits"]))
      state, metrics = step(state, chunk_of(tokens))
      bits.append(float(metrics["bits"]))
    return bits, frozen

  chunks = [rng.integers(0, 256, T) for _ in range(6)]
  bits, frozen = scores(chunks)
  assert bits == frozen
  changed = list(chunks)
  changed[3] = rng.integers(0, 256, T)
  again, _ = scores(changed)
  assert again[:3] == bits[:3] and again[3] != bits[3]


def test_a_forecast_never_sees_the_chunk_it_forecasts(full, rng):
  step = full[2]
  prefix = [rng.integers(0, 256, T) for _ in range(3)]
  forecasts, tokens = [], []
  for last in (rng.integers(0, 256, T), rng.integers(0, 256, T)):
    state = fresh(full)
    for c in prefix + [last]:
      state, _ = step(state, chunk_of(c))
    got = dl.ring_get(state.delta.ring, 3 % LAG)               # chunk 3, filed at tick 3
    forecasts.append(jax.device_get(got.forecast))
    tokens.append(np.asarray(got.tokens_BxT))
  assert not np.array_equal(*tokens)
  assert int(forecasts[0].made_at) == 2
  np.testing.assert_array_equal(forecasts[0].token_BxK, forecasts[1].token_BxK)
  np.testing.assert_array_equal(forecasts[0].logp_BxKxV, forecasts[1].logp_BxKxV)


def test_the_teacher_follows_the_ema_formula_and_kl_starts_at_zero(full, rng):
  step = full[2]
  state = fresh(full)
  state, metrics = step(state, chunk_of(rng.integers(0, 256, T)))   # tick 0: nothing learned
  state, metrics = step(state, chunk_of(rng.integers(0, 256, T)))   # tick 1: learns chunk 0
  assert float(metrics["learned"]) == 1.0
  # Nothing was learned before this step, so the student was the anchor: KL 0.
  assert abs(float(metrics["loss_kl"])) < 1e-6
  before = copy(state)   # (the warm-up made that first update 0: check the second)
  state, metrics = step(state, chunk_of(rng.integers(0, 256, T)))
  decay = float(before.hp["ema_decay"])
  expected = jax.tree.map(lambda t, p: decay * t + (1 - decay) * p, before.delta.teacher,
                          state.params)
  for got, want in zip(jax.tree.leaves(state.delta.teacher), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  assert float(metrics["teacher_distance"]) > 0


def test_kl_is_zero_for_the_same_distribution_and_positive_otherwise(rng):
  logits = jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32)
  logp, mask = jax.nn.log_softmax(logits), jnp.ones((2, 5))
  assert abs(float(dl.kl_to_anchor(logp, logp, mask))) < 1e-7
  other = jax.nn.log_softmax(logits + jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32))
  assert float(dl.kl_to_anchor(logp, other, mask)) > 1e-3


def test_the_gate_shrinks_as_the_forecast_grows_uncertain():
  entropy = jnp.linspace(0.0, 8.0, 200)
  g = np.asarray(dl.gate(entropy, 3.0, 0.7, 0.25))
  assert np.all(np.diff(g) <= 0) and np.all(np.diff(g)[g[1:] > 0.25] < 0)
  assert g.max() <= 2.0 and g.min() == pytest.approx(0.25)
  assert float(dl.gate(3.0, 3.0, 0.7, 0.25)) == pytest.approx(1.0)


def _buffer_with(surprise_C):
  example = replay_lib.ReplayEntry(jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 2)),
                                   jnp.zeros((1,), jnp.int32), (jnp.zeros((1, 3)),), None)
  buffer = replay_lib.init_replay(len(surprise_C), example)
  return buffer.replace(surprise_C=jnp.asarray(surprise_C, jnp.float32))


def test_replay_draws_entries_as_often_as_their_priorities_say(rng):
  surprise = np.array([0.5, 4.0, 1.0, 8.0, -np.inf, 2.0], np.float32)   # slot 4 empty
  buffer, alpha, beta, n = _buffer_with(surprise), 0.6, 0.4, 40_000
  index, weight = replay_lib.sample(buffer, jax.random.PRNGKey(int(rng.integers(1 << 30))), n,
                                    alpha, beta)
  p = np.where(np.isfinite(surprise), np.maximum(surprise, 1e-3), 0.0) ** alpha
  p /= p.sum()
  counts = np.bincount(np.asarray(index), minlength=len(surprise))
  # Each count is binomial(n, p_i): a fair draw breaks 5 standard deviations with
  # probability < 6e-7 per count (normal tail), < 4e-6 for the six: fresh keys are safe.
  assert np.all(np.abs(counts - n * p) <= 5 * np.sqrt(n * p * (1 - p)) + 1)
  assert counts[4] == 0
  expected_w = (p[np.asarray(index)] / p[p > 0].min()) ** -beta
  np.testing.assert_allclose(weight, expected_w, rtol=1e-5)
  assert float(jnp.max(weight)) <= 1.0


def test_replay_keeps_the_most_surprising_entries(rng):
  buffer = _buffer_with(np.full(3, -np.inf))
  entry = lambda v: replay_lib.ReplayEntry(jnp.full((1, 2), v, jnp.int32), jnp.ones((1, 2)),
                                           jnp.zeros((1,), jnp.int32), (jnp.zeros((1, 3)),), None)
  for v, s in [(1, 5.0), (2, 1.0), (3, 3.0), (4, 0.5), (5, 4.0)]:
    buffer = replay_lib.insert(buffer, entry(v), jnp.float32(s))
  # Full after three; 0.5 is below all and is not taken; 4.0 replaces the 1.0.
  assert sorted(np.asarray(buffer.surprise_C).tolist()) == [3.0, 4.0, 5.0]
  assert sorted(np.asarray(buffer.entries.tokens_BxR)[:, 0, 0].tolist()) == [1, 3, 5]
  empty = _buffer_with(np.full(3, -np.inf))
  _, weight = replay_lib.sample(empty, jax.random.PRNGKey(0), 4, 0.6, 0.4)
  assert np.all(np.asarray(weight) == 0)


def test_state_memory_stays_constant_over_a_thousand_steps(full, rng):
  step = full[2]
  state = fresh(full)
  shapes = jax.tree.map(lambda x: (x.shape, x.dtype), state)
  nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
  stream = rng.integers(0, 256, (1000, T))
  for tokens in stream:
    state, metrics = step(state, chunk_of(tokens))
  assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == shapes
  assert sum(x.nbytes for x in jax.tree.leaves(state)) == nbytes
  assert float(metrics["replay_fill"]) == 8 and int(state.step) == 1000
  assert np.isfinite(float(metrics["bits"]))


def test_on_arrival_the_first_two_scores_are_the_plain_learners_then_it_learns_twice(rng):
  # No forecast channel, no residual: the delta learner's network is the plain one's.
  same_net = ["delta.forecast_channel=false", "delta.residual=0"]
  _, _, arrival = build(config(*same_net, "delta.arrival=true"), VOCAB)
  predictor, optimizer, plain = build(config(*same_net, "delta.lag=0", "delta.gate=false",
                                             "delta.consistency=0", "delta.kl=0",
                                             "replay.capacity=0"), VOCAB)
  assert predictor.delta is None
  a = init_learner(*build(config(*same_net, "delta.arrival=true"), VOCAB)[:2], seed=0, bos_id=BOS)
  p = init_learner(predictor, optimizer, seed=0, bos_id=BOS)
  bits = []
  for t in range(3):
    tokens = rng.integers(0, 256, T)
    a, ma = arrival(a, chunk_of(tokens))
    p, mp = plain(p, chunk_of(tokens))
    bits.append((float(ma["bits"]), float(mp["bits"])))
    if t == 0:  # nothing to pair yet: the arrival update is exactly the plain learner's
      assert float(ma["learned"]) == 0.0
      for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(p.params), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  # Scored first, by the same parameters, until chunk 0's second (delta) update at tick 1.
  np.testing.assert_allclose(bits[0][0], bits[0][1], rtol=1e-6)
  np.testing.assert_allclose(bits[1][0], bits[1][1], rtol=1e-5)
  assert abs(bits[2][0] - bits[2][1]) > 1e-4 * bits[2][1]


def _traced(overrides, monkeypatch):
  """(model passes per step, metric names, state) of a config's step, traced, not compiled."""
  calls = {"apply": 0, "apply_with_hidden": 0, "gate": 0}
  for name in ("apply", "apply_with_hidden"):
    original = getattr(LM, name)

    def counted(self, *args, _name=name, _original=original, **kwargs):
      calls[_name] += 1
      return _original(self, *args, **kwargs)

    monkeypatch.setattr(LM, name, counted)
  original_gate = dl.gate
  monkeypatch.setattr(dl, "gate", lambda *a: (calls.__setitem__("gate", calls["gate"] + 1),
                                              original_gate(*a))[1])
  # Built afresh (traced with the counters in), not through build's cache: the cache keeps
  # the steps the other tests compiled (clearing it made each of them trace and lower again).
  predictor, optimizer, step = _build.__wrapped__(step_shaping(config(*overrides)), VOCAB)
  state = jax.eval_shape(lambda: init_learner(predictor, optimizer, seed=0, bos_id=BOS))
  chunk = jax.eval_shape(lambda: chunk_of(np.zeros(T)))
  calls.update(apply=0, apply_with_hidden=0, gate=0)
  _, metrics = jax.eval_shape(step, state, chunk)
  return calls, set(metrics), state


def test_each_switch_removes_its_component(monkeypatch):
  calls, metrics, state = _traced([], monkeypatch)
  # score, anchor, replay, forecast rollout; learning pass and teacher read hidden states.
  assert calls == {"apply": 4, "apply_with_hidden": 2, "gate": 1}
  assert {"loss_consistency", "loss_kl", "loss_residual", "replay_bits"} <= metrics
  assert "forecast_embed" in state.params and "surprise_w" in state.params

  assert "arrival_grad_norm" not in metrics
  calls, metrics, state = _traced(["delta.arrival=true"], monkeypatch)
  # On arrival the scoring pass is differentiated: the same passes, one more update.
  assert calls == {"apply": 4, "apply_with_hidden": 2, "gate": 1}
  assert "arrival_grad_norm" in metrics

  calls, metrics, state = _traced(["delta.consistency=0"], monkeypatch)
  assert calls["apply_with_hidden"] == 1 and state.delta.teacher is None
  assert "loss_consistency" not in metrics and "teacher_distance" not in metrics

  calls, metrics, state = _traced(["delta.kl=0"], monkeypatch)
  assert calls["apply"] == 3 and state.delta.anchor is None and "loss_kl" not in metrics

  calls, metrics, state = _traced(["replay.capacity=0"], monkeypatch)
  assert calls["apply"] == 3 and state.delta.replay is None and "replay_bits" not in metrics

  calls, metrics, state = _traced(["delta.gate=false"], monkeypatch)
  assert calls["gate"] == 0

  calls, metrics, state = _traced(["delta.residual=0"], monkeypatch)
  assert "loss_residual" not in metrics and "surprise_w" not in state.params

  calls, metrics, state = _traced(["delta.forecast_channel=false"], monkeypatch)
  assert "forecast_embed" not in state.params and "forecast_gate" not in state.params

  calls, metrics, state = _traced(["delta.lag=0", "delta.gate=false", "delta.residual=0"],
                                  monkeypatch)
  # lag 0: no forecast, no separate scoring pass (the learning pass scores).
  assert calls == {"apply": 2, "apply_with_hidden": 2, "gate": 0}
  assert state.delta.ring is None and state.delta.pending is None
  assert "forecast_bits" not in metrics and "forecast_embed" not in state.params

  calls, metrics, state = _traced(["delta.lag=0", "delta.gate=false", "delta.residual=0",
                                   "delta.consistency=0", "delta.kl=0", "replay.capacity=0"],
                                  monkeypatch)
  assert state.delta is None  # everything off: the plain learner's step


def _tags(run_dir: Path) -> bytes:
  return b"".join(f.read_bytes() for f in (run_dir / "tb").glob("events.out.tfevents.*"))


@pytest.mark.e2e
def test_the_main_command_runs_the_delta_learner_with_canaries_and_a_named_anchor(tmp_path, caplog,
                                                                               capsys):
  caplog.set_level("INFO", logger="streamlearn")
  text = b"".join(Path(m.__file__).read_bytes()[:1500] for m in (json_module, pathlib_module))
  (tmp_path / "text.txt").write_bytes(text)
  sets = [x for o in FULL for x in ("--set", o)] + [
      "--set", f'canary.paths=["{tmp_path / "text.txt"}@0:600"]', "--set",
      "canary.every_chunks=10"]
  first = tmp_path / "first"
  args = ["--config", TINY, "--data", str(tmp_path / "text.txt"), *sets]
  assert main(args + ["--run-dir", str(first), "--max-bytes", "1000"]) == 0
  assert main(args + ["--run-dir", str(first), "--resume", "--max-bytes", "600"]) == 0
  assert "resuming" in caplog.text
  tags = _tags(first)
  for tag in (b"delta/forecast_bits_per_token", b"delta/agreement", b"delta/gate",
              b"guard/kl_to_anchor", b"guard/ema_student_distance", b"replay/priority_mean",
              b"loss/consistency", b"canary/text.txt"):
    assert tag in tags, tag
  # A new run guarded by the first one's model.
  second = tmp_path / "second"
  assert main(args + ["--run-dir", str(second), "--max-bytes", "300",
                      "--set", f"delta.anchor={first}"]) == 0
  _resume_with_a_stronger_guard(args, first, second, caplog, capsys)
  capsys.readouterr()
  assert main(args + ["--run-dir", str(tmp_path / "third"), "--set",
                      f"delta.anchor={tmp_path / 'nowhere'}"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: delta.anchor:")
  assert main(args + ["--run-dir", str(tmp_path / "fourth"), "--set",
                      'canary.paths=["/no/such/canary.txt"]']) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: canary.paths: /no/such/canary.txt")


def _newest_state(run_dir: Path):
  from streamlearn.store.rundir import run_tokenizer
  from streamlearn.swarm.swarm import restore_member
  from streamlearn.store.rundir import open_run
  run = open_run(run_dir)
  try:
    tokenizer = run_tokenizer(run_dir, run.checkpointer, run.checkpointer.all_steps())
    state, record, _ = restore_member(run.checkpointer, run.config, tokenizer.vocab_size,
                                      tokenizer.bos_id, None)
  finally:
    run.checkpointer.close()
  return state, record


def _resume_with_a_stronger_guard(args, first: Path, second: Path, caplog, capsys):
  """Resuming may change the weights and the anchor; not what fixes the state's shapes."""
  from streamlearn.run.retune import named_anchor
  resume = args + ["--run-dir", str(first), "--resume", "--max-bytes", "600"]
  stronger = ["--set", "delta.kl=0.5", "--set", f"delta.anchor={second}"]
  caplog.clear()
  assert main(resume + stronger) == 0
  assert "delta.kl: 0.01 -> 0.5" in caplog.text and f"now holds to {second}" in caplog.text
  state, record = _newest_state(first)
  assert float(state.hp["kl"]) == 0.5 and record["anchor"] == str(second)
  np.testing.assert_allclose(float(state.hp["consistency"]), 0.1, rtol=1e-6)
  for x, y in zip(jax.tree.leaves(state.delta.anchor),
                  jax.tree.leaves(named_anchor(str(second), state.params)), strict=True):
    np.testing.assert_array_equal(x, y)
  caplog.clear()  # applied once: the version now holds it
  assert main(resume[:-2] + ["--max-bytes", "200"] + stronger) == 0
  assert "delta.kl:" not in caplog.text and "now holds to" not in caplog.text
  capsys.readouterr()
  for change, message in ((["--set", "delta.lag=1"], "error: delta.lag: this run was made with 2"),
                          (["--set", "delta.kl=0"], "error: delta.kl: this run was made with")):
    assert main(resume + change) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message), err

"""The µLM swarm in one process: the vmapped step, PBT replacement, lineage, compilations,
the mixture, a rollback of the whole swarm."""

import functools
import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from streamlearn.cli.run import main
from streamlearn.config import SwarmConfig, config_from_dict
from streamlearn.data.stream import chunk_bytes
from streamlearn.data.tokenizer import ByteTokenizer
from streamlearn.learn.build import build
from streamlearn.learn.state import init_learner
from streamlearn.learn.step import make_score
from streamlearn.run.loop import run
from streamlearn.run.rollback import _confirmed
from streamlearn.run.safety import Alarm
from streamlearn.run.session import Session, open_session
from streamlearn.run.tags import NoWriter
from streamlearn.store.checkpoint import Checkpointer, Restored
from streamlearn.swarm.pbt import Population
from streamlearn.swarm.mix import mix_chunk, uniform_logw
from streamlearn.swarm.swarm import Swarm, initial_state, member_state
from swarm_runs import BOS, TINY, VOCAB, close, random_chunk, swarm_config, trajectory
from safety_runs import assert_same_state, load_script, stdlib_text

# One worker runs them all (here and in test_swarm_processes.py): the swarm functions
# compile once, and the one-device trajectory (`swarm_one_device`, in conftest) once.
pytestmark = [pytest.mark.filterwarnings("ignore:Some donated buffers were not usable"),
              pytest.mark.xdist_group("swarm")]


def test_member_zero_is_the_plain_learner_and_the_vmapped_step_is_n_steps(rng):
  config = swarm_config()
  predictor, optimizer, step = build(config, VOCAB)
  swarm = initial_state(config, VOCAB, BOS)
  # Member 0 is exactly what a run of one learner starts from: the run's seed, base values.
  assert_same_state(jax.device_get(member_state(swarm, 0)),
                    jax.device_get(init_learner(predictor, optimizer, seed=config.seed,
                                                bos_id=BOS)))
  assert len(set(np.asarray(swarm.hp["lr"]).tolist())) == 4  # each member its own lr
  singles = [member_state(swarm, i) for i in range(4)]
  mixed = Swarm(config, VOCAB, BOS)
  logw_N = uniform_logw(4)
  for _ in range(3):
    chunk = random_chunk(rng)
    swarm, metrics = mixed.step(swarm, chunk)
    nll_NxT = []
    for i in range(4):
      singles[i], single_metrics = step(singles[i], chunk)
      for key in ("bits", "grad_norm", "learning_rate"):
        np.testing.assert_allclose(metrics[key][i], single_metrics[key], rtol=2e-5)
      nll_NxT.append(single_metrics["token_nll"][0])
    # The step's mixture is mix_chunk's over the members' own per-token losses.
    cfg = config.swarm
    logw_N, mix_nll_T = mix_chunk(logw_N, jnp.stack(nll_NxT), chunk.mask_BxT[0], cfg.mix_eta,
                                  cfg.mix_share)
    np.testing.assert_allclose(metrics["mix_bits"], np.sum(mix_nll_T) / np.log(2), rtol=2e-5)
    np.testing.assert_allclose(metrics["mix_logw_N"], logw_N, rtol=1e-4, atol=1e-5)
  for i in range(4):
    close(member_state(swarm, i), singles[i], rtol=2e-4, atol=2e-6)


def test_replacement_copies_exactly_and_perturbs_by_the_factors(rng):
  # No resampling here (a host test below covers it): each copy's value is its parent's
  # times exactly one of swarm.perturb.
  config = swarm_config("swarm.fresh_prob=0.3", "swarm.resample_prob=0")
  swarm = Swarm(config, VOCAB, BOS)
  state = initial_state(config, VOCAB, BOS)
  state, metrics = swarm.step(state, random_chunk(rng))
  swarm.observe(jax.device_get(metrics), 64.0, 64)
  pop = swarm.population
  seen, factors = {"copy": 0, "fresh": 0}, set()
  for event in range(1, 7):
    # Made-up scores with a known order, so the test knows who must go and who may be copied.
    order_N = rng.permutation(4)
    pop.bits_WxN = np.tile(100.0 + order_N, (4, 1))
    pop.bytes_WxN = np.full((4, 4), 100.0)
    before = jax.device_get(state)
    old_hp = pop.hp_N()
    old_slots = list(pop.slots)
    old_logw = swarm.logw_N.copy()
    state, plan = swarm.evolve(state, 128 * event, 10 * event)
    after = jax.device_get(state)
    worst, best = int(np.argmax(order_N)), int(np.argmin(order_N))
    assert pop.slots[worst] != old_slots[worst] and pop.slots[best] == old_slots[best]
    for slot in range(4):
      got = member_state(after, slot)
      if pop.slots[slot] == old_slots[slot]:  # kept: untouched
        assert_same_state(got, member_state(before, slot))
        assert swarm.logw_N[slot] == old_logw[slot]
        continue
      entry = pop.members[pop.slots[slot]]
      seen[entry["kind"]] += 1
      assert np.array_equal(got.rng, jax.random.PRNGKey(entry["seed"]))
      if entry["kind"] == "copy":
        src = int(plan.src_N[slot])
        assert src == best and entry["parent"] == old_slots[src]
        assert swarm.logw_N[slot] == old_logw[src]  # its mixture weight: its source's
        assert_same_state(got.replace(rng=None, hp=None),
                          member_state(before, src).replace(rng=None, hp=None))
        ratio = entry["hp"]["lr"] / pop.members[entry["parent"]]["hp"]["lr"]
        factor = min((0.8, 1.2), key=lambda f: abs(ratio - f))
        assert abs(ratio - factor) < 1e-12, ratio
        factors.add(factor)
        np.testing.assert_allclose(entry["hp"]["lr"], old_hp["lr"][src] * factor, rtol=1e-6)
      else:  # fresh: exactly a new learner from the base with the member's seed
        # (fns.init is init_learner itself, jitted: the first test holds it to that)
        new = swarm.fns.init(np.int32(entry["seed"]))
        assert_same_state(got.replace(hp=None), jax.device_get(new).replace(hp=None))
        assert swarm.logw_N[slot] == swarm.logw_N.min()  # enters the mixture at the bottom
      assert got.hp["lr"] == np.float32(entry["hp"]["lr"])
  assert seen["copy"] and seen["fresh"] and factors == {0.8, 1.2}  # (PBT's draws are seeded)


def test_a_resampled_copy_draws_from_the_initial_range():
  # resample_prob 1: every hyperparameter of a copy is drawn afresh, log-uniform in
  # centre x [1/spread, spread] (for a *_decay, its distance to 1), never parent x factor.
  cfg = SwarmConfig(size=4, grace_bytes=0, fresh_prob=0.0, resample_prob=1.0, init_spread=2.0)
  pop = Population(cfg, seed=5, centre_hp={"lr": 1.0, "ema_decay": 0.99})
  for event in range(1, 40):
    pop.bits_WxN = np.tile(100.0 + np.arange(4), (4, 1))
    pop.bytes_WxN = np.full((4, 4), 100.0)
    plan = pop.plan(1000 * event, event)
    child = pop.members[pop.slots[int(np.flatnonzero(plan.copied_N)[0])]]
    parent = pop.members[child["parent"]]
    assert 0.5 <= child["hp"]["lr"] <= 2.0 and 0.005 <= 1 - child["hp"]["ema_decay"] <= 0.02
    assert all(abs(child["hp"]["lr"] / parent["hp"]["lr"] - f) > 1e-9 for f in (0.8, 1.2))


@pytest.mark.parametrize("version_leader, confirmed", [(1, True), (2, False)])
def test_a_spike_is_confirmed_on_each_swarms_own_leader(version_leader, confirmed):
  # The leader path of the spike confirmation (rollback._confirmed): the run now is judged
  # by today's leader (slot 2), the version to restore by the leader its own record names.
  # Every member but slot 1 of the version predicts wildly (parameters x10): the version
  # does clearly better only when its leader is slot 1.
  config = swarm_config()
  swarm = Swarm(config, VOCAB, BOS)
  swarm.population.leader = 2
  saved = {**swarm.population.to_json(), "leader": version_leader}
  state = initial_state(config, VOCAB, BOS)
  wild = lambda keep: jax.tree.map(lambda x: x.at[np.arange(4) != keep].multiply(10.0),
                                   state.params)
  predictor = build(config, VOCAB)[0]
  events = []
  session = SimpleNamespace(
      config=config, swarm=swarm, predictor=predictor, tokenizer=SimpleNamespace(bos_id=BOS),
      score_fn=make_score(predictor),
      registry=SimpleNamespace(add_event=events.append, write=lambda: None))
  session.leader_params = functools.partial(Session.leader_params, session)
  window = tuple(chunk_bytes(stdlib_text(256), ByteTokenizer(), 64))
  got = Restored(20, state.replace(params=wild(keep=1)), {"swarm": saved}, {}, [])
  now = SimpleNamespace(state=state.replace(params=wild(keep=-1)))
  alarm = Alarm("spike", 30, 28, "a test spike", window)
  result = _confirmed(session, now, alarm, got, NoWriter())
  assert result is confirmed
  assert [e["kind"] for e in events] == ([] if confirmed else ["spike_ignored"])


def test_lineage_stays_consistent_over_many_replacements(rng):
  cfg = SwarmConfig(size=8, interval_bytes=1000, grace_bytes=1500, fresh_prob=0.2,
                    score_chunks=5)
  # Any hyperparameter the learner grows is handled alike; *_decay stays in (0, 1), 0 stays 0.
  pop = Population(cfg, seed=3, centre_hp={"lr": 1.0, "ema_decay": 0.99, "kl": 0.0})
  total = 0
  for chunk in range(1, 400):
    bits_N = rng.uniform(100, 200, 8)
    bits_N[rng.integers(8)] = np.nan if rng.random() < 0.05 else bits_N[0]
    pop.observe(bits_N, 100.0, rng.random(8) < 0.02)
    total += 100
    if pop.due(total):
      pop.plan(total, chunk)
      pop = Population(cfg, 3, saved=json.loads(json.dumps(pop.to_json())))
  assert pop.events == 39
  members = pop.members
  assert sorted(members) == list(range(pop.next_id)) and pop.next_id > 40
  alive = [m for m, e in members.items() if e["died_chunk"] is None]
  assert sorted(alive) == sorted(pop.slots) and pop.leader in pop.slots
  for e in members.values():
    assert 0 < e["hp"]["ema_decay"] < 1 and e["hp"]["kl"] == 0.0 and e["hp"]["lr"] > 0
    assert e["died_chunk"] is None or e["died_chunk"] > e["born_chunk"]
    if e["kind"] == "copy":  # the parent was alive at the child's birth, and older
      parent = members[e["parent"]]
      assert parent["born_chunk"] < e["born_chunk"]
      assert parent["died_chunk"] is None or parent["died_chunk"] > e["born_chunk"]
    else:
      assert e["parent"] is None and e["kind"] in ("centre", "initial", "fresh")
  # The grace period: nobody died younger than grace_bytes (15 chunks of 100 bytes).
  assert all(e["died_chunk"] - e["born_chunk"] >= 15 for e in members.values()
             if e["died_chunk"] is not None)


def test_a_resume_sets_every_living_members_hparams_and_keeps_the_dead_ones():
  cfg = SwarmConfig(size=3, interval_bytes=100, grace_bytes=0, fresh_prob=0.0, score_chunks=2)
  pop = Population(cfg, seed=1, centre_hp={"lr": 1.0, "kl": 0.01})
  pop.observe(np.array([3.0, 1.0, 2.0]), 100.0, np.zeros(3, bool))
  pop.plan(100, 1)
  dead = {m: dict(e["hp"]) for m, e in pop.members.items() if m not in pop.slots}
  assert dead
  pop.set_hparams({"kl": 0.5})
  assert pop.centre_hp == {"lr": 1.0, "kl": 0.5}
  assert all(pop.members[m]["hp"]["kl"] == 0.5 for m in pop.slots)
  assert {m: pop.members[m]["hp"] for m in dead} == dead
  assert list(pop.hp_N()["kl"]) == [0.5] * 3


def test_replacements_never_recompile(swarm_one_device):
  compiles = []
  listener = lambda event, duration, **_: compiles.append(event) if "backend_compile" in event \
      else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    _, _, population, plans, _ = trajectory(16, data_seed=11)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  replaced = {int(s) for p in plans for s in np.flatnonzero(p.copied_N | p.fresh_N)}
  assert len(plans) == 8 and len(replaced) >= 2
  assert any(p.fresh_N.any() for p in plans) and any(p.copied_N.any() for p in plans)
  assert compiles == []


def test_the_benchmark_scores_a_swarm_by_its_mixture_with_the_leader_beside(tmp_path):
  # The run loop's order (step k+1 dispatched before step k is booked, events after the
  # chunk that crosses their interval), on the compiled steps the tests above built.
  benchmark = load_script("benchmark")
  config = swarm_config()
  chunks = chunk_bytes(stdlib_text(1280), ByteTokenizer(), config.data.chunk_tokens)
  result, swarm = benchmark.swarm_through(config, ByteTokenizer(), chunks)
  assert result.bytes == 1280 and swarm["replaced"] > 0 and len(swarm["slots"]) == 4
  assert result.bits_per_byte == swarm["mixture"] != swarm["leader"]
  rows = benchmark._swarm_rows(swarm)
  assert rows[0] == ("the leader (each chunk by the member leading before it)", swarm["leader"])
  assert len(rows) == 5


@pytest.mark.e2e
def test_nan_updates_in_a_swarm_roll_the_whole_swarm_back(tmp_path):
  data = tmp_path / "text.txt"
  data.write_bytes(stdlib_text(2600))
  run_dir = tmp_path / "run"
  args = ["--config", TINY, "--data", str(data), "--run-dir", str(run_dir),
          "--set", "swarm.size=4", "--set", "swarm.interval_bytes=640",
          "--set", "swarm.grace_bytes=0"]
  assert main(args + ["--max-bytes", "1280"]) == 0          # versions 0 and 20, members born
  config = config_from_dict(json.loads((run_dir / "config.json").read_text()))
  born = json.loads((run_dir / "registry.json").read_text())["members"]["lineage"]
  session, progress = open_session(config, run_dir=str(run_dir), data=str(data), resume=True)
  # Every member's updates are non-finite from chunk 21 on, until the rollback.
  progress.state = progress.state.replace(
      params=jax.tree.map(lambda x: x * jnp.nan, progress.state.params))
  assert run(session, progress, max_bytes=640) == 0
  registry = json.loads((run_dir / "registry.json").read_text())
  event = registry["events"][-1]
  assert event["reason"] == "non-finite" and event["to"] == 0   # the original: newest <= 21 - 2
  members = registry["members"]
  after = {e["id"]: e for e in members["lineage"]}
  # The swarm is the original's again; the members born since stay in the lineage, marked.
  assert all(after[e["id"]].get("rolled_back") for e in born if e["born_chunk"] > 0)
  assert len(after) >= len(born) and sorted(after) == list(range(len(after)))
  checkpointer = Checkpointer(run_dir, config.checkpoint)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          initial_state(config, VOCAB, BOS))
  state = checkpointer.restore(None, abstract)[0]
  checkpointer.close()
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))
  np.testing.assert_array_equal(state.lr_scale, np.full(4, 0.5, np.float32))

"""Export: int8 per-channel quantization, the msgpack artifact, its loader."""

import pickle

import jax
import jax.numpy as jnp
import msgpack
import numpy as np
import pytest
from flax import traverse_util

from streamlearn import Learner
from streamlearn.api import load_artifact
from streamlearn.cli.export import export as export_version
from streamlearn.cli.export import main as export_cli
from streamlearn.cli.generate import main as export_main
from streamlearn.store.artifact import (ArtifactError, channel_axis, dequantize, pack, quantize,
                                        read_artifact, unpack)

from safety_runs import stdlib_text


def test_int8_is_per_channel_and_within_half_a_step(rng):
  x = rng.normal(size=(48, 16)).astype(np.float32) * rng.uniform(0.01, 10, size=16)
  x[:, 3] = 0.0                                          # an all-zero channel stays exact
  q, scale = quantize(x, axis=1)
  assert q.dtype == np.int8 and scale.shape == (16,) and np.abs(q).max() <= 127
  amax = np.abs(x).max(axis=0)
  np.testing.assert_allclose(scale, np.where(amax > 0, amax / 127, 1.0), rtol=1e-6)  # float32
  err = np.abs(dequantize(q, scale, 1) - x)
  assert np.all(err <= scale[None] / 2 + 1e-7) and np.all(dequantize(q, scale, 1)[:, 3] == 0)


def test_the_embedding_is_scaled_per_token_everything_else_per_output():
  assert channel_axis("embed/embedding", 2) == 0
  assert channel_axis("mlp_0/down/kernel", 2) == 1
  assert channel_axis("recurrent_0/conv/kernel", 2) == 1


def test_the_mixers_weights_stay_float32(rng):
  weights = rng.normal(size=(168, 8)).astype(np.float32)   # above the int8 size
  kernel = rng.normal(size=(64, 64)).astype(np.float32)
  got = unpack(pack({"mixer": {"weights": weights}, "down": {"kernel": kernel}}, {}, {}, {}))
  np.testing.assert_array_equal(got["params"]["mixer"]["weights"], weights)
  assert not np.array_equal(got["params"]["down"]["kernel"], kernel)  # int8, as before


@pytest.fixture(scope="module")
def exported(tmp_path_factory, finished_run):
  tmp = tmp_path_factory.mktemp("export")
  held_out = tmp / "held_out.txt"
  held_out.write_bytes(stdlib_text(9000)[6000:9000])   # text the run never saw
  run_dir = finished_run.run_dir
  out = tmp / "model.slm"
  report = export_version(str(run_dir), None, str(out), str(held_out), None)
  return run_dir, out, report


@pytest.mark.e2e
def test_export_round_trip_is_small_and_close(exported):
  run_dir, out, report = exported
  assert report["artifact_bytes"] == out.stat().st_size
  assert report["checkpoint_bytes"] > 3 * report["artifact_bytes"]   # no optimizer, int8
  assert report["int8_bpb"] <= report["float_bpb"] * 1.01
  blob = read_artifact(out)
  assert blob["source"]["step"] == report["step"] and blob["config"]["name"] == "tiny"
  floats = traverse_util.flatten_dict(jax.device_get(Learner.load(run_dir).state.params), sep="/")
  int8s = traverse_util.flatten_dict(blob["params"], sep="/")
  assert floats.keys() == int8s.keys()
  for path, a in floats.items():
    b = int8s[path]
    if a.ndim == 1 or a.size < 1024:
      np.testing.assert_array_equal(a, b)                # vectors, small tables: float32, exact
    else:                                                # half a step of the channel's scale
      axis = channel_axis(path, a.ndim)
      amax = np.abs(a).max(axis=tuple(i for i in range(a.ndim) if i != axis), keepdims=True)
      assert np.all(np.abs(a - b) <= amax / 254 * (1 + 1e-5) + 1e-9), path


@pytest.mark.e2e
def test_loader_generates_without_pickle(exported, monkeypatch, capsys):
  run_dir, out, _ = exported

  def no_pickle(*args, **kwargs):
    raise AssertionError("pickle used while loading")

  for name in ("load", "loads", "Unpickler"):
    monkeypatch.setattr(pickle, name, no_pickle)
  learner = load_artifact(out)
  # Its parameters are the artifact's int8 values, dequantized, and its stream the version's,
  # bitwise (the count models' tables, the match model's history, the recurrent state): a
  # fresh learner of the run's config holding them predicts exactly alike, and close to the
  # version's float parameters.
  version = Learner.load(run_dir)
  for x, y in zip(jax.tree.leaves(learner.state.carry), jax.tree.leaves(version.state.carry),
                  strict=True):
    np.testing.assert_array_equal(x, y)
  assert any(np.any(np.asarray(x)) for x in jax.tree.leaves(version.state.carry.match))
  same = Learner.from_config(learner.config)
  same.state = same.state.replace(params=jax.tree.map(jnp.asarray, read_artifact(out)["params"]),
                                  carry=version.state.carry)
  for prompt in (b"def ", b"import json\n"):
    np.testing.assert_array_equal(learner.next_token_probs(prompt), same.next_token_probs(prompt))
    np.testing.assert_allclose(learner.next_token_probs(prompt),
                               version.next_token_probs(prompt), atol=0.05)
  sample = learner.generate("def ", max_tokens=30, temperature=0, seed=0)
  assert sample == same.generate("def ", max_tokens=30, temperature=0, seed=0)
  # The command prints the prompt and exactly the API's continuation.
  assert export_main([str(out), "--prompt", "def ", "--tokens", "20", "--seed", "3"]) == 0
  assert capsys.readouterr().out == "def " + learner.generate(
      "def ", max_tokens=20, temperature=0.8, seed=3) + "\n"


@pytest.mark.parametrize("content,message", [
    (b"not msgpack at all", "not a msgpack file"),
    (msgpack.packb({"format": "other"}), "not a streamlearn artifact"),
    (msgpack.packb({"format": "streamlearn.artifact", "version": 99}), "artifact version 99"),
    (msgpack.packb({"format": "streamlearn.artifact", "version": 1, "config": {}, "tokenizer": {},
                    "source": {}, "params": {},
                    "carry": {"x": {"dtype": "int32", "shape": [2], "data": b"not zlib"}}}),
     "carry x: malformed"),
])
def test_bad_artifacts_get_one_line(tmp_path, capsys, content, message):
  path = tmp_path / "bad.slm"
  path.write_bytes(content)
  with pytest.raises(ArtifactError, match=message):
    load_artifact(path)
  assert export_main([str(path)]) == 2
  err = capsys.readouterr().err
  assert message in err and len(err.splitlines()) == 1


@pytest.mark.e2e
def test_export_script_errors_are_one_line(exported, tmp_path, capsys):
  run_dir, _, _ = exported
  script = export_cli
  for args, message in ((["--step", "999"], "no complete version 999"),
                        (["--member", "3"], "one learner"),
                        (["--step", "soon"], "expected a version number or best")):
    assert script(["--run-dir", str(run_dir), "--out", str(tmp_path / "x.slm")] + args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.splitlines()) == 1
  out = str(tmp_path / "b.slm")
  assert script(["--run-dir", str(run_dir), "--out", out, "--step", "best"]) == 0
  assert "version" in capsys.readouterr().out

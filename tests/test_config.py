"""Config loading: typed, strict, one-line errors that name the key."""

import dataclasses
from pathlib import Path

import pytest

from streamlearn.config import (Config, ConfigError, config_from_dict, config_to_dict,
                                load_config, parse_override)
from streamlearn.config import PRESETS

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name", ["default", "full", "tiny", "gpu"])
def test_shipped_configs_load(name):
  config = load_config(CONFIGS / f"{name}.toml")
  assert config.name == name


def test_builtin_defaults_are_configs_default_toml():
  # `python -m streamlearn.run` with no --config runs exactly configs/default.toml.
  assert load_config(CONFIGS / "default.toml") == Config()


def test_overrides_parse_toml_values_and_bare_words():
  config = load_config(CONFIGS / "tiny.toml", ["optim.learning_rate=1e-4", "tokenizer.kind=bpe",
                                               "model.preset=micro", "data.chunk_tokens=32"])
  assert config.optim.learning_rate == 1e-4
  assert config.tokenizer.kind == "bpe"
  # The preset replaced; tiny.toml's own [model] keys beside it still override it.
  assert config.model == dataclasses.replace(PRESETS["micro"], n_layers=1, scan_impl="lax",
                                             line_position=False)
  assert config.data.chunk_tokens == 32
  assert parse_override("a.b = true") == (["a", "b"], True)


def test_preset_keys_can_be_overridden(tmp_path):
  path = tmp_path / "c.toml"
  path.write_text('[model]\npreset = "nano"\nn_layers = 5\n')
  model = load_config(path).model
  assert model.d_model == PRESETS["nano"].d_model and model.n_layers == 5


def test_lists_load_as_tuples_and_save_as_lists():
  config = load_config(None, ["match.orders=[3, 9]"])
  assert config.match.orders == (3, 9)
  assert config_to_dict(config)["match"]["orders"] == [3, 9]  # JSON-shaped, as saved
  assert config_from_dict(config_to_dict(config)) == config


def test_ints_are_accepted_for_floats():
  assert load_config(None, ["optim.learning_rate=1"]).optim.learning_rate == 1.0


@pytest.mark.parametrize("overrides,message", [
    (["model.d_modle=3"], r"^model\.d_modle: unknown key \(known: d_model, "),
    (["nope=1"], r"^nope: unknown key"),
    (["model.d_model=1.5"], r"^model\.d_model: expected an integer, got 1\.5 \(float\)$"),
    (["model.d_model=true"], r"^model\.d_model: expected an integer"),
    (["optim.learning_rate=fast"], r"^optim\.learning_rate: expected a number, got 'fast'"),
    (["optim.learning_rate=-1"], r"^optim\.learning_rate: must be > 0"),
    (["tokenizer.kind=words"], r"^tokenizer\.kind: must be one of bytes, bpe"),
    (["model.preset=huge"], r"^model\.preset: unknown preset 'huge'"),
    (["model=3"], r"^model: expected a table"),
    (["learning_rate"], r"expected key=value"),
    (["match.orders=4"], r"^match\.orders: expected a list of integers, got 4$"),
    (["match.orders=[4, 2.5]"], r"^match\.orders\[1\]: expected an integer"),
    (["match.orders=[4, 4]"], r"^match\.orders: must be a non-empty list of distinct positive"),
    (["match.history_log2=9"], r"^match\.history_log2: 2\^9 tokens of history is too short "
                               r"for data\.chunk_tokens = 256"),
    (["mixer.enabled=false"], r"^counts\.enabled: the counts reach the prediction through the "
                              r"mixer \(set mixer\.enabled = true\)$"),
    (["counts.orders=[2, 1]"], r"^counts\.orders: must be a non-empty, ascending list"),
    (["counts.limit=20000"], r"^counts\.limit: must be in \[1, 16383\]"),
    (["counts.survive_from=-1"], r"^counts\.survive_from: must be >= 0"),
    (["mixer.online_lr=0"], r"^mixer\.online_pairs: weight sets by the two tokens before are "
                            r"online only"),
    (["mixer.online_boost=-1"], r"^mixer\.online_boost: must be >= 0"),
    (["swarm.size=0"], r"^swarm\.size: must be > 0"),
    (["swarm.top_quantile=0.6"], r"^swarm\.top_quantile: must be in \(0, 0\.5\]"),
    (["swarm.perturb=[]"], r"^swarm\.perturb: must be a non-empty list of positive numbers"),
    (["swarm.fresh_prob=1.5"], r"^swarm\.fresh_prob: must be in \[0, 1\]"),
    (["delta.ema_decay=1"], r"^delta\.ema_decay: must be in \(0, 1\)"),
    (["delta.gate=true"], r"^delta\.gate: needs a forecast, and delta\.lag = 0 makes none"),
    (["delta.arrival=true"], r"^delta\.arrival: delta\.lag = 0 learns each chunk on arrival"),
    (["replay.capacity=8", "replay.tokens=300"],
     r"^replay\.tokens: 300 is more than data\.chunk_tokens = 256$"),
    (["delta.lag=1", "data.chunk_tokens=16"],
     r"^delta\.forecast_tokens: 32 is more than data\.chunk_tokens = 16$"),
])
def test_bad_values_name_the_key(overrides, message):
  with pytest.raises(ConfigError, match=message) as info:
    load_config(None, overrides)
  assert "\n" not in str(info.value)


def test_bad_files_get_one_line(tmp_path):
  with pytest.raises(ConfigError, match="no such config file"):
    load_config(tmp_path / "missing.toml")
  bad = tmp_path / "bad.toml"
  bad.write_text("name = \n")
  with pytest.raises(ConfigError, match="not valid TOML"):
    load_config(bad)

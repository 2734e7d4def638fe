"""Typed run configuration: TOML files in configs/ -> frozen dataclasses.

    config = load_config("configs/default.toml", overrides=["optim.learning_rate=1e-3"])

Every field is declared once, with its type and a comment, in sections.py. Loading is
strict: an unknown key, a wrong type or an out-of-range value stops with one
line that names the key (`ConfigError`). `--set key=value` overrides use TOML
syntax for the value (`3e-3`, `true`, `"text"`); a bare word that is not valid
TOML is taken as a string, so `--set tokenizer.kind=bpe` needs no quotes.

`[model] preset = "micro"` starts the model from a named size in
`PRESETS` (sections.py); keys given beside it override the preset's.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from pathlib import Path
from typing import Any

from streamlearn.config.sections import (  # noqa: F401  (importers use streamlearn.config)
    PRESETS, CanaryConfig, CaptureConfig, CheckpointConfig, Config, ConfigError, CountsConfig,
    DaemonConfig, DataConfig, DeltaConfig, LogConfig, MatchConfig, MixerConfig, ModelConfig,
    OptimConfig, ReplayConfig, SafetyConfig, ServeConfig, SwarmConfig, TokenizerConfig,
    parse_duration)


def _is_duration(text: str) -> bool:
  try:
    return parse_duration(text) > 0
  except ValueError:
    return False


# Value checks beyond the type: key -> (predicate, what it must be).
_POSITIVE = (lambda v: v > 0, "> 0")
_NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
_SCAN_IMPLS = ("auto", "lax", "associative", "blocked", "pallas")

_CHECKS: dict[str, tuple[Any, str]] = {
    "model.d_model": _POSITIVE, "model.n_layers": _POSITIVE, "model.lru_width": _POSITIVE,
    "model.mlp_mult": _POSITIVE, "model.conv_width": _POSITIVE,
    "model.scan_impl": (lambda v: v in _SCAN_IMPLS, f"one of {', '.join(_SCAN_IMPLS)}"),
    "match.orders": (lambda v: len(v) > 0 and all(o > 0 for o in v) and len(set(v)) == len(v),
                     "a non-empty list of distinct positive integers"),
    "match.max_len": _POSITIVE,
    "match.history_log2": (lambda v: 8 <= v <= 28, "in [8, 28]"),
    "match.table_log2": (lambda v: 4 <= v <= 28, "in [4, 28]"),
    "match.lr_mult": _POSITIVE,
    "counts.orders": (lambda v: len(v) > 0 and all(0 < o <= 64 for o in v)
                      and all(a < b for a, b in zip(v, v[1:])),
                      "a non-empty, ascending list of distinct integers in [1, 64]"),
    "counts.dense_below": _NON_NEGATIVE, "counts.dense_log2": (lambda v: 4 <= v <= 20, "in [4, 20]"),
    "counts.table_log2": (lambda v: 4 <= v <= 24, "in [4, 24]"),
    "counts.keep": (lambda v: 1 <= v <= 64, "in [1, 64]"),
    "counts.recent": (lambda v: 1 <= v <= 64, "in [1, 64]"),
    "counts.limit": (lambda v: 1 <= v <= 16383, "in [1, 16383]"),
    "counts.survive_from": _NON_NEGATIVE,
    "mixer.lr_mult": _NON_NEGATIVE, "mixer.prior": _POSITIVE,
    "mixer.online_lr": _NON_NEGATIVE, "mixer.online_boost": _NON_NEGATIVE,
    "tokenizer.kind": (lambda v: v in ("bytes", "bpe"), "one of bytes, bpe"),
    "tokenizer.vocab_size": (lambda v: v >= 259, ">= 259 (256 bytes + 3 specials)"),
    "tokenizer.warmup_bytes": _POSITIVE,
    "data.chunk_tokens": _POSITIVE, "data.max_file_bytes": _POSITIVE,
    "data.block_bytes": _POSITIVE,
    "optim.learning_rate": _POSITIVE, "optim.warmup_steps": _NON_NEGATIVE,
    "optim.decay_steps": _NON_NEGATIVE,
    "optim.b1": (lambda v: 0 <= v < 1, "in [0, 1)"), "optim.b2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "optim.eps": _POSITIVE, "optim.weight_decay": _NON_NEGATIVE, "optim.grad_clip": _POSITIVE,
    "checkpoint.every_chunks": _POSITIVE, "checkpoint.max_to_keep": _POSITIVE,
    "checkpoint.keep_period": _NON_NEGATIVE, "checkpoint.keep_best": _NON_NEGATIVE,
    "checkpoint.max_failed_saves": _POSITIVE, "checkpoint.idle_seconds": _NON_NEGATIVE,
    "log.tensorboard_every": _POSITIVE, "log.progress_seconds": _POSITIVE,
    "safety.max_skips": _POSITIVE, "safety.spike_fraction": _NON_NEGATIVE,
    "safety.signal_chunks": _POSITIVE, "safety.median_chunks": _POSITIVE,
    "safety.lr_factor": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "safety.min_lr_scale": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "delta.lag": (lambda v: 0 <= v <= 8, "in [0, 8]"),
    "delta.forecast_tokens": _POSITIVE, "delta.temperature": _NON_NEGATIVE,
    "delta.reality_drop": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "delta.consistency": _NON_NEGATIVE, "delta.ema_decay": (lambda v: 0 < v < 1, "in (0, 1)"),
    "delta.residual": _NON_NEGATIVE, "delta.kl": _NON_NEGATIVE,
    "delta.gate_temperature": _POSITIVE, "delta.gate_min": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "replay.capacity": _NON_NEGATIVE, "replay.tokens": _POSITIVE, "replay.batch": _POSITIVE,
    "replay.alpha": _NON_NEGATIVE, "replay.beta": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "replay.weight": _NON_NEGATIVE,
    "canary.every_chunks": _POSITIVE, "canary.max_bytes": _POSITIVE,
    "swarm.size": _POSITIVE, "swarm.interval_bytes": _POSITIVE, "swarm.score_chunks": _POSITIVE,
    "swarm.bottom_quantile": (lambda v: 0 < v <= 0.5, "in (0, 0.5]"),
    "swarm.top_quantile": (lambda v: 0 < v <= 0.5, "in (0, 0.5]"),
    "swarm.perturb": (lambda v: len(v) > 0 and all(f > 0 for f in v),
                      "a non-empty list of positive numbers"),
    "swarm.resample_prob": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "swarm.init_spread": (lambda v: v >= 1, ">= 1"),
    "swarm.fresh_prob": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "swarm.grace_bytes": _NON_NEGATIVE, "swarm.mix_eta": _POSITIVE,
    "swarm.mix_share": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "serve.port": (lambda v: 0 <= v <= 65535, "in [0, 65535]"), "serve.pool": _POSITIVE,
    "serve.keep_best": _NON_NEGATIVE,
    "serve.policy": (lambda v: v in ("thompson", "ucb1", "egreedy"),
                     "one of thompson, ucb1, egreedy"),
    "serve.explore": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "serve.discount": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "serve.reload_seconds": _POSITIVE, "serve.max_body_bytes": _POSITIVE,
    "serve.max_prompt_chars": _POSITIVE, "serve.default_tokens": _POSITIVE,
    "serve.max_tokens": _POSITIVE, "serve.max_concurrent": _POSITIVE,
    "serve.queue_seconds": _NON_NEGATIVE, "serve.remember_answers": _POSITIVE,
    "capture.max_file_bytes": _POSITIVE, "capture.max_item_bytes": _POSITIVE,
    "capture.max_push_bytes": _POSITIVE, "capture.segment_bytes": _POSITIVE,
    "capture.poll_seconds": _POSITIVE, "capture.settle_seconds": _NON_NEGATIVE,
    "capture.screen_seconds": _NON_NEGATIVE, "capture.max_bytes": _NON_NEGATIVE,
    "capture.max_age_days": _NON_NEGATIVE, "capture.seal_seconds": _NON_NEGATIVE,
    "capture.min_free_mb": _NON_NEGATIVE,
    "daemon.backup_every": (_is_duration, "a duration such as 90s, 10m, 6h, 7d or 2w"),
    "daemon.keep_backups": _POSITIVE, "daemon.nice": (lambda v: 0 <= v <= 19, "in [0, 19]"),
    "daemon.max_load": _NON_NEGATIVE, "daemon.load_seconds": _NON_NEGATIVE,
    "daemon.stop_seconds": _POSITIVE, "daemon.log_bytes": _POSITIVE,
    "daemon.log_files": _NON_NEGATIVE,
}


def _type_name(tp) -> str:
  if typing.get_origin(tp) is tuple:
    return "a list of " + {int: "integers", float: "numbers", str: "strings"}.get(
        typing.get_args(tp)[0], str(tp))
  return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
      tp, getattr(tp, "__name__", str(tp)))


def _coerce(key: str, value: Any, tp) -> Any:
  """Checks value against a field type; ints are accepted where floats are expected."""
  if typing.get_origin(tp) is tuple:  # tuple[X, ...]: a TOML array of X
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    item = typing.get_args(tp)[0]
    return tuple(_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value))
  if tp is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if (tp is int and isinstance(value, bool)) or not isinstance(value, tp):
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} "
                      f"({type(value).__name__})")
  return value


def _build(cls, table: Any, prefix: str):
  """Builds dataclass `cls` from a TOML table, strictly."""
  if not isinstance(table, dict):
    raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a table, got {table!r}")
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  if cls is ModelConfig and "preset" in table:
    table = _apply_preset(table, prefix)
  values = {}
  for key, value in table.items():
    full = prefix + key
    if key not in fields:
      raise ConfigError(f"{full}: unknown key (known: {', '.join(fields)})")
    tp = hints[key]
    if dataclasses.is_dataclass(tp):
      values[key] = _build(tp, value, full + ".")
    else:
      values[key] = _coerce(full, value, tp)
      check = _CHECKS.get(full)
      if check and not check[0](values[key]):
        raise ConfigError(f"{full}: must be {check[1]}, got {value!r}")
  return cls(**values)


def _apply_preset(table: dict, prefix: str) -> dict:
  table = dict(table)
  name = table.pop("preset")
  if name not in PRESETS:
    raise ConfigError(f"{prefix}preset: unknown preset {name!r} (known: {', '.join(PRESETS)})")
  return {**dataclasses.asdict(PRESETS[name]), **table}


def parse_override(text: str) -> tuple[list[str], Any]:
  """'a.b=value' -> (['a', 'b'], parsed value)."""
  key, sep, raw = text.partition("=")
  key = key.strip()
  if not sep or not key:
    raise ConfigError(f"--set {text!r}: expected key=value, e.g. optim.learning_rate=1e-3")
  try:
    value = tomllib.loads(f"v = {raw.strip()}")["v"]
  except tomllib.TOMLDecodeError:
    value = raw.strip()
  return key.split("."), value


def _set_nested(table: dict, path: list[str], value: Any, text: str) -> None:
  for part in path[:-1]:
    node = table.setdefault(part, {})
    if not isinstance(node, dict):
      raise ConfigError(f"--set {text}: {part} is not a table")
    table = node
  table[path[-1]] = value


# Keys that were renamed, so a run directory's config.json (or a habit) from before still works.
RENAMED = {"delta.base": "delta.anchor", "safety.replay": "safety.restream"}


def _renamed(table: dict) -> dict:
  for old, new in RENAMED.items():
    (section, key), (_, new_key) = old.split("."), new.split(".")
    part = table.get(section)
    if isinstance(part, dict) and key in part:
      part.setdefault(new_key, part.pop(key))
  return table


def config_from_dict(table: dict, overrides: list[str] = ()) -> Config:
  """A Config from an already-parsed TOML table plus `key=value` overrides."""
  table = _renamed(_deep_copy(table))
  for text in overrides:
    path, value = parse_override(text)
    path = RENAMED.get(".".join(path), ".".join(path)).split(".")
    _set_nested(table, path, value, text)
  config = _build(Config, table, "")
  _check_across(config)
  return config


def _check_across(config: Config) -> None:
  """Checks that involve more than one key."""
  match, T = config.match, config.data.chunk_tokens
  # Only parts that are on: a smaller chunk must not need the defaults of parts that are off.
  for key, value, on in (("delta.forecast_tokens", config.delta.forecast_tokens,
                          config.delta.lag >= 1),
                         ("replay.tokens", config.replay.tokens, config.replay.capacity > 0)):
    if on and value > T:
      raise ConfigError(f"{key}: {value} is more than data.chunk_tokens = {T}")
  delta = config.delta
  if delta.lag == 0 and delta.arrival:
    raise ConfigError("delta.arrival: delta.lag = 0 learns each chunk on arrival already "
                      "(and only then); set delta.lag >= 1 for a second, delta update")
  if delta.lag == 0 and (delta.gate or delta.residual):
    key = "delta.gate" if delta.gate else "delta.residual"
    raise ConfigError(f"{key}: needs a forecast, and delta.lag = 0 makes none (set delta.lag >= 1)")
  if config.counts.enabled and not config.mixer.enabled:
    raise ConfigError("counts.enabled: the counts reach the prediction through the mixer "
                      "(set mixer.enabled = true)")
  mixer = config.mixer
  if mixer.enabled and mixer.online_pairs and not mixer.online_lr:
    raise ConfigError("mixer.online_pairs: weight sets by the two tokens before are online only "
                      "(set mixer.online_lr > 0, or mixer.online_pairs = false)")
  need = 2 * T + max(max(match.orders), match.max_len)
  if match.enabled and (1 << match.history_log2) < need:
    raise ConfigError(f"match.history_log2: 2^{match.history_log2} tokens of history is too "
                      f"short for data.chunk_tokens = {T} (needs >= {need})")


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
  """Reads a TOML config (defaults when path is None) and applies overrides."""
  table: dict = {}
  if path is not None:
    try:
      table = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
      raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as err:
      raise ConfigError(f"{path}: cannot read: {err}") from None
    except tomllib.TOMLDecodeError as err:
      raise ConfigError(f"{path}: not valid TOML: {err}") from None
  return config_from_dict(table, overrides)


def config_to_dict(config: Config) -> dict:
  """Plain nested dict (for saving beside checkpoints and for TensorBoard): JSON types only."""
  return _lists(dataclasses.asdict(config))


def _lists(table: Any) -> Any:
  if isinstance(table, dict):
    return {k: _lists(v) for k, v in table.items()}
  return list(table) if isinstance(table, tuple) else table


def _deep_copy(table: Any) -> Any:
  if isinstance(table, dict):
    return {k: _deep_copy(v) for k, v in table.items()}
  return table

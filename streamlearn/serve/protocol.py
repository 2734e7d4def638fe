"""What the two APIs send, checked field by field into one `Request`.

Ollama's `POST /api/generate` and OpenAI's `POST /v1/completions` ask for the same
thing with different names and defaults (Ollama: `options.num_predict`, streamed by
default, temperature 0.8; OpenAI: `max_tokens`, one object by default, temperature 1).
A field of the wrong type or out of its range is a `BadRequest` with a 4xx and one
line that names the field.
"""

from __future__ import annotations

import dataclasses

from streamlearn.config import ServeConfig

AUTO = ("", "auto")  # model names that leave the choice to the bandit


class BadRequest(Exception):
  """A request the server refuses: the status and one line for the client."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status


@dataclasses.dataclass(frozen=True)
class Request:
  """A completion request, whichever API it came through."""
  model: str
  prompt: str
  stream: bool
  max_tokens: int
  temperature: float
  top_k: int
  top_p: float
  repetition_penalty: float
  stop: tuple[str, ...]
  seed: int


def _number(body: dict, key: str, default, kind=float, lo=None, hi=None):
  value = body.get(key, default)
  if value is None:
    value = default
  if isinstance(value, bool) or not isinstance(value, (int, float)) or (
      kind is int and isinstance(value, float) and not value.is_integer()):
    raise BadRequest(400, f"{key}: expected {'an integer' if kind is int else 'a number'}")
  value = kind(value)
  if (lo is not None and value < lo) or (hi is not None and value > hi):
    raise BadRequest(400, f"{key}: {value} is out of range [{lo}, {hi}]")
  return value


def _stops(value) -> tuple[str, ...]:
  if value is None:
    return ()
  if isinstance(value, str):
    return (value,)
  if isinstance(value, list) and all(isinstance(s, str) for s in value) and len(value) <= 8:
    return tuple(value)
  raise BadRequest(400, "stop: expected a string or a list of at most 8 strings")


def _prompt(value, limit: int) -> str:
  if isinstance(value, list) and len(value) == 1:  # OpenAI clients may send [prompt]
    value = value[0]
  if value is None:
    value = ""
  if not isinstance(value, str):
    raise BadRequest(400, "prompt: expected a string")
  if len(value) > limit:
    raise BadRequest(413, f"prompt: {len(value)} characters, at most {limit}")
  return value


def _model_name(value) -> str:
  if value is None:
    return ""
  if not isinstance(value, str):
    raise BadRequest(400, "model: expected a string")
  return value


def ollama_request(body: dict, cfg: ServeConfig) -> Request:
  options = body.get("options") or {}
  if not isinstance(options, dict):
    raise BadRequest(400, "options: expected an object")
  stream = body.get("stream", True)
  if not isinstance(stream, bool):
    raise BadRequest(400, "stream: expected true or false")
  return Request(
      model=_model_name(body.get("model")), prompt=_prompt(body.get("prompt"), cfg.max_prompt_chars),
      stream=stream,
      max_tokens=_number(options, "num_predict", cfg.default_tokens, int, 1, cfg.max_tokens),
      temperature=_number(options, "temperature", 0.8, float, 0.0, 10.0),
      top_k=_number(options, "top_k", 0, int, 0, 1 << 20),
      top_p=_number(options, "top_p", 1.0, float, 1e-6, 1.0),
      repetition_penalty=_number(options, "repeat_penalty", 1.0, float, 0.1, 10.0),
      stop=_stops(options.get("stop")), seed=_number(options, "seed", 0, int, 0, 2**31 - 1))


def openai_request(body: dict, cfg: ServeConfig) -> Request:
  stream = body.get("stream", False)
  if not isinstance(stream, bool):
    raise BadRequest(400, "stream: expected true or false")
  seed = body.get("seed")
  return Request(
      model=_model_name(body.get("model")), prompt=_prompt(body.get("prompt"), cfg.max_prompt_chars),
      stream=stream,
      max_tokens=_number(body, "max_tokens", cfg.default_tokens, int, 1, cfg.max_tokens),
      temperature=_number(body, "temperature", 1.0, float, 0.0, 10.0),
      top_k=0, top_p=_number(body, "top_p", 1.0, float, 1e-6, 1.0),
      repetition_penalty=1.0, stop=_stops(body.get("stop")),
      seed=_number(body, "seed", 0, int, 0, 2**31 - 1) if seed is not None else 0)

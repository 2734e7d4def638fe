"""Inference artifacts: one version's parameters in int8, with its config and tokenizer.

One msgpack map (no pickle, no msgpack extension types):
  format, version   "streamlearn.artifact", 1
  config            the run's config (as in config.json)
  tokenizer         the run's tokenizer.json
  source            {run_dir, step, bytes}: where the parameters came from
  params            {"embed/embedding": leaf, ...}, each leaf
                    {dtype, shape, data (raw little-endian bytes), and for int8:
                     scale (float32 bytes, one per channel), axis (the channel axis)}
  carry             (optional) the stream as the version left it: the recurrent state,
                    the match model's history, the count models' tables, the mixer's
                    online weights; {key path: {dtype, shape, data (zlib, raw bytes)}}.
                    With the count models and the mixer, the network alone is not a
                    language model (the mix leans on the counts), so an artifact carries
                    them; a loader without it starts from a fresh stream.

Matrices (the embeddings included) are int8, symmetric, one scale per output
channel: a Dense kernel's columns (last axis), an embedding's rows (axis 0:
each token's vector, and its logit through the tied head). Vectors (norm
scales, biases, LRU decay logits), matrices under 1,024 entries (the match
model's trust table) and the mixer's weights (each scales a whole prediction)
stay float32: they are few and sensitive.
`read_artifact` dequantizes to float32; `streamlearn.api.load_artifact` hands
back a `streamlearn.Learner`, which generates text (and can even keep learning).
"""

from __future__ import annotations

from pathlib import Path

import zlib

import jax
import msgpack
import numpy as np
from flax import traverse_util

FORMAT, VERSION = "streamlearn.artifact", 1
_SEP = "/"
_MIN_INT8 = 1024  # smaller matrices (the match model's trust table) stay float32


class ArtifactError(ValueError):
  """An artifact that cannot be written or read; the message is one line."""


def channel_axis(path: str, ndim: int) -> int:
  """The axis that holds one scale per entry: rows of the embedding, else the last."""
  return 0 if path.rsplit(_SEP, 1)[-1] == "embedding" else ndim - 1


def quantize(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
  """(int8 values, float32 scales along `axis`): x ≈ values * scale, |values| <= 127."""
  x = np.asarray(x, np.float32)
  others = tuple(a for a in range(x.ndim) if a != axis)
  amax = np.max(np.abs(x), axis=others, keepdims=True)
  scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
  q = np.clip(np.rint(x / scale), -127, 127).astype(np.int8)
  return q, scale.reshape(-1)


def dequantize(q: np.ndarray, scale: np.ndarray, axis: int) -> np.ndarray:
  shape = [1] * q.ndim
  shape[axis] = -1
  return q.astype(np.float32) * scale.reshape(shape)


def _leaf(path: str, x: np.ndarray) -> dict:
  x = np.asarray(x)
  if x.ndim >= 2 and x.size >= _MIN_INT8 and not path.startswith("mixer" + _SEP):
    axis = channel_axis(path, x.ndim)
    q, scale = quantize(x, axis)
    return {"dtype": "int8", "shape": list(x.shape), "data": q.tobytes(),
            "scale": scale.astype("<f4").tobytes(), "axis": axis}
  return {"dtype": "float32", "shape": list(x.shape), "data": x.astype("<f4").tobytes()}


def _array(path: str, leaf: dict) -> np.ndarray:
  try:
    shape = tuple(int(n) for n in leaf["shape"])
    if leaf["dtype"] == "int8":
      q = np.frombuffer(leaf["data"], np.int8).reshape(shape)
      return dequantize(q, np.frombuffer(leaf["scale"], "<f4"), int(leaf["axis"]))
    if leaf["dtype"] == "float32":
      return np.frombuffer(leaf["data"], "<f4").reshape(shape).astype(np.float32)
  except (KeyError, TypeError, ValueError) as err:
    raise ArtifactError(f"params {path}: malformed ({type(err).__name__}: {err})") from None
  raise ArtifactError(f"params {path}: unknown dtype {leaf.get('dtype')!r}")


_CARRY_DTYPES = ("int32", "uint32", "float32", "bool")


def carry_leaves(carry) -> dict[str, np.ndarray]:
  """A carry's arrays by key path (the artifact's names for them)."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(carry)
  return {jax.tree_util.keystr(path): np.asarray(x) for path, x in leaves}


def _carry_leaf(path: str, x: np.ndarray) -> dict:
  if x.dtype.name not in _CARRY_DTYPES:
    raise ArtifactError(f"carry {path}: dtype {x.dtype} is not one of {_CARRY_DTYPES}")
  return {"dtype": x.dtype.name, "shape": list(x.shape),
          "data": zlib.compress(x.astype(x.dtype.newbyteorder("<")).tobytes(), 1)}


def _carry_array(path: str, leaf: dict) -> np.ndarray:
  try:
    if leaf["dtype"] not in _CARRY_DTYPES:
      raise ValueError(f"unknown dtype {leaf['dtype']!r}")
    dtype = np.dtype(leaf["dtype"]).newbyteorder("<")
    shape = tuple(int(n) for n in leaf["shape"])
    return np.frombuffer(zlib.decompress(leaf["data"]), dtype).reshape(shape).astype(
        dtype.newbyteorder("="))
  except (KeyError, TypeError, ValueError, zlib.error) as err:
    raise ArtifactError(f"carry {path}: malformed ({type(err).__name__}: {err})") from None


def pack(params, config: dict, tokenizer: dict, source: dict, carry=None) -> bytes:
  """The artifact's bytes for float parameters `params` (a nested dict of arrays), and the
  stream's `carry` where given."""
  flat = traverse_util.flatten_dict(params, sep=_SEP)
  blob = {"format": FORMAT, "version": VERSION, "config": config, "tokenizer": tokenizer,
          "source": source,
          "params": {k: _leaf(k, np.asarray(v)) for k, v in sorted(flat.items())}}
  if carry is not None:
    blob["carry"] = {k: _carry_leaf(k, x) for k, x in carry_leaves(carry).items()}
  return msgpack.packb(blob, use_bin_type=True)


def unpack(data: bytes) -> dict:
  """{config, tokenizer, source, params (float32, nested)} from an artifact's bytes."""
  try:
    # Plain msgpack: no ext_hook, no object_hook, so nothing in the file can run code.
    blob = msgpack.unpackb(data, raw=False, strict_map_key=True)
  except (ValueError, msgpack.UnpackException) as err:
    raise ArtifactError(f"not a msgpack file ({type(err).__name__})") from None
  found = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
  if found != FORMAT:
    raise ArtifactError(f"not a streamlearn artifact (format {found!r})")
  if blob.get("version") != VERSION:
    raise ArtifactError(f"artifact version {blob.get('version')!r}; this one reads {VERSION}")
  params = {k: _array(k, leaf) for k, leaf in blob["params"].items()}
  carry = blob.get("carry")
  if carry is not None:
    carry = {k: _carry_array(k, leaf) for k, leaf in carry.items()}
  return {"config": blob["config"], "tokenizer": blob["tokenizer"], "source": blob["source"],
          "params": traverse_util.unflatten_dict(params, sep=_SEP), "carry": carry}


def read_artifact(path: str | Path) -> dict:
  try:
    data = Path(path).read_bytes()
  except OSError as err:
    raise ArtifactError(f"{path}: {err.strerror or err}") from None
  try:
    return unpack(data)
  except ArtifactError as err:
    raise ArtifactError(f"{path}: {err}") from None

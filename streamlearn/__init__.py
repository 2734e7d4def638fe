"""streamlearn: tiny recurrent language models that learn while they predict on a live stream."""

from importlib import metadata as _metadata

try:
  __version__ = _metadata.version("streamlearn")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
  __version__ = "0.0.0+unknown"

__all__ = ["Learner", "__version__"]


def __getattr__(name):
  # `import streamlearn` stays light (no JAX) until the API is asked for.
  if name == "Learner":
    from streamlearn.api import Learner
    return Learner
  raise AttributeError(f"module 'streamlearn' has no attribute {name!r}")

"""streamlearn: tiny recurrent language models that learn while they predict on a live stream."""

from importlib import metadata as _metadata

try:
  __version__ = _metadata.version("streamlearn")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
  __version__ = "0.0.0+unknown"

"""What the capture tests share: prepared captures over a temporary spool, reading it back."""

from pathlib import Path

from streamlearn.capture.collect import Capture
from streamlearn.capture.spool import Item, Spool
from streamlearn.config import load_config


def small_capture(root: Path) -> Capture:
  """Files up to 2,000 bytes, pushes up to 500, no settling time."""
  cfg = load_config(None, ["capture.max_file_bytes=2000", "capture.max_push_bytes=500",
                           "capture.settle_seconds=0"]).capture
  return Capture(cfg, Spool(root, cfg.segment_bytes))


def media_at(root: Path) -> Capture:
  """Files up to the default 1 MiB: images and recordings are larger."""
  cfg = load_config(None, ["capture.settle_seconds=0"]).capture
  return Capture(cfg, Spool(root, cfg.segment_bytes))


def spooled(capture: Capture) -> str:
  """Everything in the spool's files (segments and manifests), once closed."""
  capture.spool.close()
  return "".join(p.read_text() for p in sorted(capture.spool.directory.glob("segment-*")))


def words(text: str) -> list[str]:
  return [w.strip(".,;:!?").lower() for w in text.split() if w.strip(".,;:!?")]


def filled_spool(root: Path, n: int = 30) -> tuple[Spool, list[str]]:
  """A spool of n items in segments of 600 bytes: several sealed, one open."""
  capture = Capture(load_config(None, []).capture, Spool(root, segment_bytes=600))
  texts = [f"item {i}: the quick brown fox {i * 7} jumps\n" * (1 + i % 3) for i in range(n)]
  for i, text in enumerate(texts):
    capture.offer(Item(text, "push", f"client {i}"))
  capture.spool.close()
  return capture.spool, texts

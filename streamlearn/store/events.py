"""A run's TensorBoard events, written so that a full disk costs events, never the run.

tensorboardX's `SummaryWriter` writes from a background thread: when a write
fails (no space left) that thread dies, its queue fills, and the next
`add_scalar` blocks the run for good. `EventWriter` keeps tensorboardX's
protocol buffers and file format but writes in the run's own thread, every few
seconds, each batch of records whole or not at all (`disk.append_whole`): a
failed write is one warning and a count of dropped events, and TensorBoard
never reads half a record.
"""

from __future__ import annotations

import itertools
import logging
import socket
import struct
import time
from pathlib import Path

from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c
from tensorboardX.summary import scalar, text

from streamlearn.disk import append_whole, why

log = logging.getLogger("streamlearn.store")


def _record(event: event_pb2.Event) -> bytes:
  """One TFRecord: length, its checksum, the event, its checksum."""
  data = event.SerializeToString()
  header = struct.pack("<Q", len(data))
  return (header + struct.pack("<I", masked_crc32c(header)) + data
          + struct.pack("<I", masked_crc32c(data)))


class EventWriter:
  """`add_scalar` and `add_text` as tensorboardX has them, into one new events file."""

  def __init__(self, logdir: str | Path, flush_every_s: float = 10.0):
    self.logdir = Path(logdir)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
    self.path = self.logdir / name
    for n in itertools.count(1):  # a resume in the same second starts a file of its own
      if not self.path.exists():
        break
      self.path = self.logdir / f"{name}.{n}"
    self.dropped = 0        # events lost to write errors
    self._flush_every_s = flush_every_s
    self._next_flush = 0.0  # the first batch goes out at once: the file exists from the start
    self._failing = False   # the last write failed: said once until one succeeds
    self._pending = [_record(event_pb2.Event(wall_time=time.time(),
                                             file_version="brain.Event:2"))]

  def add_scalar(self, tag: str, value: float, step: int) -> None:
    self._add(scalar(tag, value), step)

  def add_text(self, tag: str, text_string: str, step: int) -> None:
    self._add(text(tag, text_string), step)

  def _add(self, summary, step: int) -> None:
    self._pending.append(_record(event_pb2.Event(wall_time=time.time(), step=int(step),
                                                 summary=summary)))
    if time.monotonic() >= self._next_flush:
      self.flush()

  def flush(self) -> None:
    """Writes what is pending; on an error drops it (counted) and says so once."""
    self._next_flush = time.monotonic() + self._flush_every_s
    if not self._pending:
      return
    batch, self._pending = self._pending, []
    try:
      self.logdir.mkdir(parents=True, exist_ok=True)
      append_whole(self.path, b"".join(batch))
    except OSError as err:
      self.dropped += len(batch)
      if not self._failing:
        log.warning(f"warning: TensorBoard events not written: {why(err)} ({self.logdir}); "
                    f"the run goes on and counts what it drops")
      self._failing = True
    else:
      if self._failing:
        log.warning(f"TensorBoard events written again ({self.dropped} dropped)")
      self._failing = False

  def close(self) -> None:
    self.flush()

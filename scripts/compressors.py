"""The classical compressors `benchmark.py` compares the learner with: each one's size on the
same bytes, as bits/byte, at the end and at the running marks (each prefix compressed alone,
as a compressor would meet a file that short). Tools missing here are skipped and named.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

COMPRESSORS = {"gzip": ["gzip", "-9", "-c"], "bzip2": ["bzip2", "-9", "-c"],
               "xz": ["xz", "-9e", "-c"], "zstd": ["zstd", "-19", "-c", "-q"]}
# The strong anchors (Debian `zpaq`, `p7zip-full`): a context-mixing compressor and
# PPMd, which write archives, not streams. Each is run on a file in its own folder.
ANCHORS = {"zpaq": "zpaq", "ppmd": "7z"}
PPMD_ORDERS = (6, 8, 12, 16)  # 7-Zip's PPMd at each; the table reports the best
# Running bits/byte at these prefixes (and at the end), so cold start is visible.
MARKS = (65_536, 262_144, 524_288)


def marks(n: int) -> list[int]:
  """The prefix lengths running bits/byte is reported at: MARKS below n, then n."""
  return [m for m in MARKS if m < n] + [n]


def _archive_bytes(argv: list[str], archive: str, data: bytes) -> int:
  """Size of the archive `argv` writes (as `archive`) for data, stored as the file `data`.

  In a fresh folder, with short relative names, so no path inflates the header.
  """
  with tempfile.TemporaryDirectory() as tmp:
    (Path(tmp) / "data").write_bytes(data)
    subprocess.run(argv, capture_output=True, check=True, cwd=tmp)
    return (Path(tmp) / archive).stat().st_size


def _zpaq(data: bytes) -> int:
  return _archive_bytes(["zpaq", "a", "out.zpaq", "data", "-m5", "-t1"], "out.zpaq", data)


def _ppmd(order: int):
  def size(data: bytes) -> int:
    return _archive_bytes(["7z", "a", "-t7z", f"-m0=PPMd:o={order}:mem=256m", "-mmt=1",
                           "out.7z", "data"], "out.7z", data)
  return size


def _stream_bytes(cmd: list[str]):
  def size(data: bytes) -> int:
    return len(subprocess.run(cmd, input=data, capture_output=True, check=True).stdout)
  return size


def classical(data: bytes) -> tuple[dict, dict, list[str]]:
  """Each available compressor on data: (name -> bits/byte, name -> {"label", "running"},
  names of missing tools). `running` maps each of `marks` to the bits/byte of that prefix
  compressed alone (a compressor sees a prefix as a whole file: its cold start)."""
  tools = {name: (" ".join(cmd[:2]), [_stream_bytes(cmd)]) for name, cmd in COMPRESSORS.items()}
  tools["zpaq"] = ("zpaq -m5", [_zpaq])
  tools["ppmd"] = ("7z PPMd", [_ppmd(order) for order in PPMD_ORDERS])
  results, details, missing = {}, {}, []
  for name, (label, sizers) in tools.items():
    if shutil.which(ANCHORS.get(name) or COMPRESSORS[name][0]) is None:
      missing.append(name)
      continue
    # Several settings (PPMd's orders): the best on the whole data, its running values.
    runs = [{m: 8 * size(data[:m]) / m for m in marks(len(data))} for size in sizers]
    best = min(range(len(runs)), key=lambda i: runs[i][len(data)])
    if name == "ppmd":
      label += f" o={PPMD_ORDERS[best]} (best of o={','.join(map(str, PPMD_ORDERS))})"
    results[name] = runs[best][len(data)]
    details[name] = {"label": label, "running": runs[best],
                     "all": {str(PPMD_ORDERS[i]): r[len(data)] for i, r in enumerate(runs)}
                     if name == "ppmd" else {}}
  return results, details, missing

"""Benchmark every `linear_scan` implementation, forward and forward+backward.

    python scripts/bench_scan.py                       # the standard sizes, float32
    python scripts/bench_scan.py --sizes 8x1024x512 --dtype bfloat16 --repeats 20
    python scripts/bench_scan.py --impls pallas --block-d 32 --block-t 32   # GPU tuning

Each cell is the median wall time of `--repeats` runs after compilation and
warm-up, each run synchronised with `block_until_ready`. GB/s counts the
minimum memory traffic of the recurrence:
  forward           a, b read; h written                         (3 arrays)
  forward+backward  forward, then a, g, h read; da, db written   (8 arrays)
The same run measures an in-place elementwise pass over one array (read +
write, buffer donated so no allocation is timed), the device-to-device copy
bandwidth this memory system delivers here and now; "% copy" is each row's
GB/s as a fraction of it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from streamlearn.kernels.linear_scan import default_config, pallas_linear_scan
from streamlearn.nn.scan import ScanImpl, auto_impl, linear_scan

DEFAULT_SIZES = ("1x256x256", "8x1024x512", "16x4096x1024")
IMPLS = (ScanImpl.LAX, ScanImpl.ASSOCIATIVE, ScanImpl.PALLAS)


def parse_size(text: str) -> tuple[int, int, int]:
  try:
    B, T, D = (int(x) for x in text.lower().split("x"))
  except ValueError:
    raise argparse.ArgumentTypeError(f"size must look like BxTxD, e.g. 8x1024x512; got {text!r}")
  return B, T, D


def median_ms(fn, args, repeats: int, warmup: int = 2) -> float:
  """Median milliseconds of fn(*args), compiled and warmed up first."""
  for _ in range(1 + warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def copy_gb_s(x: jax.Array, repeats: int) -> float:
  """Read+write bandwidth of an in-place elementwise pass over x (donated: no fresh allocation)."""
  negate = jax.jit(lambda x: -x, donate_argnums=0)
  x = x + 0  # a private buffer the loop may donate
  times = []
  for i in range(3 + repeats):
    start = time.perf_counter()
    x = jax.block_until_ready(negate(x))
    if i >= 3:
      times.append(time.perf_counter() - start)
  return 2 * x.size * x.dtype.itemsize / statistics.median(times) / 1e9


def make_inputs(size, dtype, seed: int = 0):
  B, T, D = size
  ka, kb, kh, kg, kl = jax.random.split(jax.random.key(seed), 5)
  a = jax.random.uniform(ka, (B, T, D), jnp.float32).astype(dtype)
  b = jax.random.normal(kb, (B, T, D), jnp.float32).astype(dtype)
  h0 = jax.random.normal(kh, (B, D), jnp.float32)
  g = jax.random.normal(kg, (B, T, D), jnp.float32).astype(dtype)
  g_last = jax.random.normal(kl, (B, D), jnp.float32)
  return a, b, h0, g, g_last


def scan_fn(impl: ScanImpl, kernel_overrides: dict):
  """linear_scan with `impl`; PALLAS with its tiling overridden when asked (for tuning)."""
  if impl is ScanImpl.PALLAS and kernel_overrides:
    def pallas(a, b, h0):
      config = dataclasses.replace(default_config(a.shape[0], a.shape[2]), **kernel_overrides)
      return pallas_linear_scan(a, b, h0, config=config)
    return pallas
  return functools.partial(linear_scan, impl=impl)


def bench_size(size, dtype, repeats: int, impls, kernel_overrides: dict) -> list[dict]:
  """Rows for one size; each is printed as soon as it is measured."""
  a, b, h0, g, g_last = make_inputs(size, dtype)
  array_bytes = a.size * a.dtype.itemsize
  copy_gbs = copy_gb_s(a, repeats)
  rows = []
  for impl in impls:
    scan = scan_fn(impl, kernel_overrides)
    fwd = jax.jit(scan)

    def fwd_bwd(a, b, h0, g, g_last, scan=scan):
      _, vjp = jax.vjp(scan, a, b, h0)
      return vjp((g, g_last))

    for mode, fn, args, n_arrays in (("fwd", fwd, (a, b, h0), 3),
                                     ("fwd+bwd", jax.jit(fwd_bwd), (a, b, h0, g, g_last), 8)):
      try:
        ms = median_ms(fn, args, repeats)
      except Exception as err:  # e.g. out of memory at the largest size: report, go on
        print(f"  {impl.value} {mode} {size}: failed: {type(err).__name__}: {err}"[:300],
              file=sys.stderr)
        continue
      gbs = n_arrays * array_bytes / ms / 1e6
      row = dict(size="x".join(map(str, size)), dtype=jnp.dtype(dtype).name,
                 impl=impl.value, mode=mode, ms=ms, gb_s=gbs,
                 copy_gb_s=copy_gbs, pct_copy=100 * gbs / copy_gbs)
      print(table_row(row), flush=True)
      rows.append(row)
  return rows


TABLE_HEADER = ("| size BxTxD | dtype | impl | mode | ms (median) | GB/s | % copy | copy GB/s |\n"
                "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |")


def table_row(r: dict) -> str:
  return (f"| {r['size']} | {r['dtype']} | {r['impl']} | {r['mode']} | {r['ms']:.3f} | "
          f"{r['gb_s']:.2f} | {r['pct_copy']:.1f} | {r['copy_gb_s']:.1f} |")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", nargs="+", type=parse_size,
                      default=[parse_size(s) for s in DEFAULT_SIZES], metavar="BxTxD")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--impls", nargs="+", default=[i.value for i in IMPLS],
                      choices=[i.value for i in IMPLS])
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
  tuning = parser.add_argument_group("PALLAS tiling overrides (for tuning on a GPU)")
  tuning.add_argument("--block-d", type=int, help="width lanes per program (power of two)")
  tuning.add_argument("--block-t", type=int, help="time steps unrolled per loop iteration")
  tuning.add_argument("--num-warps", type=int, help="Triton warps per program")
  args = parser.parse_args(argv)
  kernel_overrides = {k: v for k, v in (("block_d", args.block_d), ("block_t", args.block_t),
                                        ("num_warps", args.num_warps)) if v is not None}

  device = jax.devices()[0]
  print(f"# bench_scan {datetime.date.today()} | jax {jax.__version__} | backend "
        f"{jax.default_backend()} | device {device.device_kind} | host {platform.machine()} "
        f"| auto -> {auto_impl().value}")
  print(f"# command: python scripts/bench_scan.py {' '.join(sys.argv[1:])}".rstrip())
  print(TABLE_HEADER, flush=True)
  rows = []
  for size in args.sizes:
    rows += bench_size(size, jnp.dtype(args.dtype), args.repeats,
                       [ScanImpl(i) for i in args.impls], kernel_overrides)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(date=str(datetime.date.today()), jax=jax.__version__,
                     backend=jax.default_backend(), device=device.device_kind,
                     rows=rows), f, indent=2)
  # Fastest forward per size, the evidence behind AUTO.
  for size in sorted({r["size"] for r in rows}):
    fwd = [r for r in rows if r["size"] == size and r["mode"] == "fwd"]
    if fwd:
      best = min(fwd, key=lambda r: r["ms"])
      print(f"# fastest fwd at {size}: {best['impl']} ({best['ms']:.3f} ms)")
  return 0


if __name__ == "__main__":
  np.set_printoptions(precision=3)
  sys.exit(main())

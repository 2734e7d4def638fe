"""Serving speed: tokens/s for one client and for N at once, time to first token, latency.

    python scripts/bench_serve.py --run-dir checkpoints/default [--clients 8] [--seconds 60]
        [--tokens 64] [--pool 1]

Starts the server in this process on a free loopback port, then:
1. one client, streamed: time to first token and tokens/s (median of 5 requests);
2. `--clients` clients in threads, each sending `POST /api/generate` (`num_predict`
   `--tokens`, not streamed) back to back for `--seconds`: requests done, tokens/s in all,
   p50 / p99 latency;
3. memory per model: the bytes of its state (parameters, optimizer moments, carry) and the
   growth of this process's resident memory while the pool loaded.
Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import threading
import time
from pathlib import Path


def rss_bytes() -> int:
  for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmRSS:"):
      return int(line.split()[1]) * 1024
  return 0


def generate(port: int, prompt: str, tokens: int, stream: bool, seed: int):
  """(seconds to the first piece, seconds in all, tokens) of one request."""
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
  body = json.dumps({"prompt": prompt, "stream": stream,
                     "options": {"num_predict": tokens, "seed": seed}})
  start = time.perf_counter()
  conn.request("POST", "/api/generate", body=body)
  response = conn.getresponse()
  first, last = None, None
  if stream:
    while True:
      line = response.readline()
      if not line:
        break
      part = json.loads(line)
      first = first or time.perf_counter() - start
      if part["done"]:
        last = part
  else:
    last = json.loads(response.read())
    first = time.perf_counter() - start
  conn.close()
  if response.status != 200:
    raise SystemExit(f"error: the server answered {response.status}: {last}")
  return first, time.perf_counter() - start, last["eval_count"]


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--run-dir", action="append", required=True)
  parser.add_argument("--clients", type=int, default=8)
  parser.add_argument("--seconds", type=float, default=60.0)
  parser.add_argument("--tokens", type=int, default=64)
  parser.add_argument("--pool", type=int, default=1)
  parser.add_argument("--prompt", default="It is a truth universally acknowledged")
  args = parser.parse_args(argv)

  from streamlearn.config import load_config
  from streamlearn.serve.bandit import Bandit
  from streamlearn.serve.pool import Pool
  from streamlearn.serve.server import make_server
  from streamlearn.serve.service import Service
  import jax

  cfg = load_config(None, [f"serve.pool={args.pool}",
                           f"serve.max_concurrent={args.clients}"]).serve
  bandit = Bandit(cfg.policy, cfg.explore, cfg.discount, seed=0)
  before = rss_bytes()
  pool = Pool(args.run_dir, cfg.pool, bandit, cfg.keep_best)
  pool.refresh()
  if not pool.ids():
    print("error: no model to serve in " + ", ".join(args.run_dir), file=sys.stderr)
    return 2
  models = [pool.get(i) for i in pool.ids()]
  state_bytes = statistics.mean(sum(x.nbytes for x in jax.tree.leaves(m.learner.state))
                                for m in models)
  server = make_server(Service(pool, bandit, cfg, None), "127.0.0.1", 0)
  port = server.server_address[1]
  threading.Thread(target=server.serve_forever, daemon=True).start()
  generate(port, args.prompt, args.tokens, True, 0)  # compiles the sampler of each shape
  loaded = rss_bytes() - before

  single = [generate(port, args.prompt, args.tokens, True, seed) for seed in range(1, 6)]
  ttft = statistics.median(s[0] for s in single)
  one_rate = statistics.median(s[2] / s[1] for s in single)

  latencies, tokens, lock = [], [0], threading.Lock()
  deadline = time.perf_counter() + args.seconds

  def client(k: int):
    seed = 1000 * k
    while time.perf_counter() < deadline:
      seed += 1
      _, took, n = generate(port, args.prompt, args.tokens, False, seed)
      with lock:
        latencies.append(took)
        tokens[0] += n

  started = time.perf_counter()
  threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  elapsed = time.perf_counter() - started
  server.shutdown()
  latencies.sort()
  p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]
  print(f"| models | clients | requests | tokens/s (1 client) | time to first token | "
        f"tokens/s ({args.clients} clients) | p50 | p99 | state per model | RSS per model |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  print(f"| {len(models)} | {args.clients} | {len(latencies)} | {one_rate:.0f} | "
        f"{ttft * 1000:.0f} ms | {tokens[0] / elapsed:.0f} | {p(0.5) * 1000:.0f} ms | "
        f"{p(0.99) * 1000:.0f} ms | {state_bytes / 2**20:.1f} MiB | "
        f"{loaded / len(models) / 2**20:.0f} MiB |")
  return 0


if __name__ == "__main__":
  sys.exit(main())

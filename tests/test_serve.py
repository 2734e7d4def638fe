"""Serving the pool: the bandit on simulated arms, every endpoint (through the official
`ollama` and `openai` clients too), feedback, bad requests, limits, reload, the CLI."""

import http.client
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from streamlearn import Learner
from streamlearn.config import load_config
from streamlearn.serve.bandit import Bandit
from streamlearn.serve.pool import Pool
from streamlearn.serve.server import make_server
from streamlearn.serve.service import Service

from safety_runs import ROOT, SAFE, stdlib_text

ARMS = {"a": .2, "b": .4, "c": .5, "d": .6, "e": .8}


# --- the bandit ---------------------------------------------------------------------------

def simulate(bandit: Bandit, n: int, seed: int = 100) -> list[str]:
  world, picks = random.Random(seed), []
  for _ in range(n):
    model = bandit.choose(list(ARMS))
    picks.append(model)
    bandit.rate(model, float(world.random() < ARMS[model]))
  return picks


@pytest.mark.parametrize("policy,least", [("thompson", 0.7), ("egreedy", 0.7), ("ucb1", 0.5)])
def test_the_bandit_finds_the_best_arm_and_still_explores(policy, least):
  last = simulate(Bandit(policy, explore=0.1, seed=0), 3000)[-1000:]
  share = {m: last.count(m) / len(last) for m in ARMS}
  assert share["e"] >= least, share
  assert max(share, key=share.get) == "e" and all(share[m] > 0.005 for m in ARMS), share


def test_old_ratings_fade_so_a_model_that_got_worse_loses_its_lead():
  bandit = Bandit("egreedy", explore=0.0, discount=0.99, seed=1)
  for _ in range(200):
    bandit.rate("x", 1.0)
    bandit.rate("y", 0.6)
  assert bandit.choose(["x", "y"]) == "x"
  for _ in range(100):  # x's answers turn bad
    bandit.rate("x", 0.0)
    bandit.rate("y", 0.6)
  assert bandit.arms["x"].mean < 0.2 and bandit.choose(["x", "y"]) == "y"
  undiscounted = Bandit("egreedy", explore=0.0, discount=1.0)
  for _ in range(200):
    undiscounted.rate("x", 1.0)
  for _ in range(100):
    undiscounted.rate("x", 0.0)
  assert undiscounted.arms["x"].alpha == 201 and undiscounted.arms["x"].beta == 101


def test_the_bandit_state_survives_a_restart(tmp_path):
  bandit = Bandit(seed=0)
  simulate(bandit, 50)
  bandit.save(tmp_path / "serve.json")
  again = Bandit()
  assert again.load(tmp_path / "serve.json") and again.arms == bandit.arms
  assert not Bandit().load(tmp_path / "missing.json")
  (tmp_path / "bad.json").write_text("{")
  assert not Bandit().load(tmp_path / "bad.json")
  with pytest.raises(ValueError, match="policy"):
    Bandit("softmax")


# --- the server ------------------------------------------------------------------------------

class Served:
  def __init__(self, run_dir: Path, cfg, tmp: Path, use=None):
    self.run_dir, self.cfg = run_dir, cfg
    self.bandit = Bandit(cfg.policy, cfg.explore, cfg.discount, seed=0)
    self.pool = Pool([run_dir], cfg.pool, self.bandit, cfg.keep_best)
    self.pool.refresh()
    self.state = tmp / "serve.json"
    self.service = Service(self.pool, self.bandit, cfg, self.state, use)
    self.server = make_server(self.service, "127.0.0.1", 0)
    self.port = self.server.server_address[1]
    self.url = f"http://127.0.0.1:{self.port}"
    threading.Thread(target=self.server.serve_forever, daemon=True).start()

  def call(self, method: str, path: str, body=None, headers=None, raw: bytes | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers=headers or {})
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    return response.status, payload

  def json(self, method: str, path: str, body=None, **kw):
    status, payload = self.call(method, path, body, **kw)
    return status, json.loads(payload)


@pytest.fixture(scope="module")
def served(finished_run, tmp_path_factory):
  from streamlearn.daemon.status import Layout, gather

  tmp = tmp_path_factory.mktemp("serve")
  # As under the daemon: its status.json, shown at /api/status and on the page.
  layout = Layout(load_config(None, [f'daemon.dir="{tmp / "daemon"}"']))
  layout.root.mkdir()
  layout.status.write_text(json.dumps(gather(layout, {"children": {"learner": {
      "state": "paused", "since": 0, "restarts": 2, "paused_for": "on battery"}}})))
  cfg = load_config(None, ["serve.max_concurrent=1", "serve.queue_seconds=20",
                           "serve.max_tokens=300", "serve.max_body_bytes=4096",
                           f'serve.status_file="{layout.status}"']).serve
  s = Served(finished_run.run_dir, cfg, tmp)
  yield s
  s.server.shutdown()
  s.server.server_close()


def test_the_daemons_status_is_served(served):
  status, body = served.json("GET", "/api/status")
  assert status == 200 and body["children"]["learner"]["paused_for"] == "on battery"
  assert body["captured_bytes"] == 0 and body["latest_version"] is None


def test_the_pool_is_the_newest_and_the_best_versions(served, finished_run):
  registry = json.loads((finished_run.run_dir / "registry.json").read_text())
  scored = sorted((e["scores"]["score"], e["step"]) for e in registry["versions"]
                  if e["status"] == "kept" and e["step"] > 0 and e["scores"].get("score"))
  want = {f"run:{s}:0" for s in {47} | {step for _, step in scored[:2]}}
  assert set(served.pool.ids()) == want
  status, tags = served.json("GET", "/api/tags")
  assert status == 200 and {m["name"] for m in tags["models"]} == want
  status, models = served.json("GET", "/v1/models")
  assert status == 200 and {m["id"] for m in models["data"]} == want


def learner_of(served, model_id: str) -> Learner:
  _, step, member = model_id.split(":")
  return Learner.load(served.run_dir, int(step), member)


def test_ollama_generate_streams_what_the_model_writes(served):
  body = {"model": "run:47:0", "prompt": "def ",
          "options": {"num_predict": 80, "temperature": 0.7, "seed": 3, "top_k": 20}}
  status, payload = served.call("POST", "/api/generate", body)
  lines = [json.loads(line) for line in payload.splitlines()]
  assert status == 200 and len(lines) >= 3 and lines[-1]["done"] and not lines[0]["done"]
  text = "".join(line["response"] for line in lines)
  want = learner_of(served, "run:47:0").generate("def ", max_tokens=80, temperature=0.7,
                                                 seed=3, top_k=20)
  assert text == want and len(want) > 40
  assert {line["model"] for line in lines} == {"run:47:0"}
  assert len({line["id"] for line in lines}) == 1
  assert lines[-1]["eval_count"] == 80 and lines[-1]["done_reason"] == "length"
  status, one = served.json("POST", "/api/generate", {**body, "stream": False})
  assert status == 200 and one["response"] == want and one["done"]


def test_openai_completions_plain_and_as_events(served):
  body = {"model": "run:47:0", "prompt": "import ", "max_tokens": 60, "temperature": 0,
          "stop": ["\n\n"]}
  want = learner_of(served, "run:47:0").generate("import ", max_tokens=60, temperature=0,
                                                 stop=["\n\n"])
  status, one = served.json("POST", "/v1/completions", body)
  assert status == 200 and one["choices"][0]["text"] == want and one["model"] == "run:47:0"
  assert one["usage"]["completion_tokens"] == len(want.encode())
  status, payload = served.call("POST", "/v1/completions", {**body, "stream": True})
  events = [e[len("data: "):] for e in payload.decode().split("\n\n") if e]
  assert status == 200 and events[-1] == "[DONE]"
  parts = [json.loads(e) for e in events[:-1]]
  assert "".join(p["choices"][0]["text"] for p in parts) == want
  assert parts[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_official_clients_list_and_complete(served):
  ollama = pytest.importorskip("ollama")
  openai = pytest.importorskip("openai")
  client = ollama.Client(host=served.url)
  assert {m.model for m in client.list().models} == set(served.pool.ids())
  answer = client.generate(model="run:47:0", prompt="def ", options={"num_predict": 30,
                                                                     "seed": 1})
  streamed = "".join(part.response for part in client.generate(
      model="run:47:0", prompt="def ", options={"num_predict": 30, "seed": 1}, stream=True))
  assert answer.response == streamed and answer.done and len(streamed) > 10
  oai = openai.OpenAI(base_url=served.url + "/v1", api_key="unused")
  assert {m.id for m in oai.models.list()} == set(served.pool.ids())
  completion = oai.completions.create(model="auto", prompt="class ", max_tokens=30, seed=2)
  assert completion.model in served.pool.ids() and completion.choices[0].text
  chunks = list(oai.completions.create(model=completion.model, prompt="class ", max_tokens=30,
                                       seed=2, stream=True))
  assert "".join(c.choices[0].text for c in chunks) == completion.choices[0].text


def test_feedback_moves_the_posterior_and_is_kept(served):
  status, one = served.json("POST", "/api/generate", {"prompt": "x", "stream": False,
                                                      "options": {"num_predict": 5}})
  model = one["model"]
  _, before = served.json("GET", "/api/pool")
  status, rated = served.json("POST", "/api/feedback", {"id": one["id"], "score": 1})
  assert status == 200 and rated["model"] == model
  _, after = served.json("GET", "/api/pool")
  row = {m["id"]: m for m in after["models"]}[model]
  old = {m["id"]: m for m in before["models"]}[model]
  assert row["ratings"] == old["ratings"] + 1 and row["posterior"] > old["posterior"]
  assert served.json("POST", "/api/feedback", {"id": one["id"], "score": -1})[0] == 409
  assert served.json("POST", "/api/feedback", {"id": "cmpl-none", "score": 1})[0] == 404
  assert served.json("POST", "/api/feedback", {"id": one["id"], "score": 3})[0] == 400
  saved = json.loads(served.state.read_text())
  assert saved["arms"][model]["ratings"] == row["ratings"]


@pytest.mark.parametrize("path,body,status,says", [
    ("/api/generate", b"{not json", 400, "not JSON"),
    ("/api/generate", b"[1, 2]", 400, "JSON object"),
    ("/api/generate", {"model": "nope:1:0", "prompt": "a"}, 404, "not found"),
    ("/api/generate", {"prompt": "a", "options": {"num_predict": -1}}, 400, "num_predict"),
    ("/api/generate", {"prompt": "a", "options": {"num_predict": 10**9}}, 400, "num_predict"),
    ("/api/generate", {"prompt": "a", "options": {"num_predict": "ten"}}, 400, "num_predict"),
    ("/api/generate", {"prompt": 7}, 400, "prompt"),
    ("/api/generate", {"prompt": "a", "stream": "yes"}, 400, "stream"),
    ("/api/generate", {"prompt": "a", "options": {"stop": 5}}, 400, "stop"),
    ("/api/generate", {"prompt": "a", "options": {"temperature": -1}}, 400, "temperature"),
    ("/api/generate", {"prompt": "a" * 5000}, 413, "body"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("/api/feedback", {"id": 5, "score": 1}, 400, "id"),
    ("/api/nothing", {}, 404, "no such path"),
    ("/api/tags", {}, 405, "GET"),
])
def test_bad_requests_are_one_error_and_the_server_stays_up(served, path, body, status, says):
  raw = body if isinstance(body, bytes) else json.dumps(body).encode()
  got, payload = served.call("POST", path, raw=raw, headers={"Content-Type": "application/json"})
  error = json.loads(payload)
  assert got == status and list(error) == ["error"] and says in error["error"], error
  assert served.call("GET", "/api/tags")[0] == 200


def test_a_client_that_leaves_mid_stream_frees_its_slot(served):
  # One generation slot (serve.max_concurrent=1): a client that reads one line and leaves...
  sock = socket.create_connection(("127.0.0.1", served.port))
  body = json.dumps({"model": "run:47:0", "prompt": "a", "options": {"num_predict": 300}})
  sock.sendall(f"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
               f"\r\n{body}".encode())
  assert b"200 OK" in sock.recv(4096)
  sock.close()
  # ...and the next request gets the slot (it would wait serve.queue_seconds, then 503).
  started = time.monotonic()
  status, one = served.json("POST", "/api/generate", {"prompt": "b", "stream": False,
                                                      "options": {"num_predict": 3}})
  assert status == 200 and time.monotonic() - started < 15


def test_a_token_is_required_when_set(finished_run, tmp_path):
  cfg = load_config(None, ['serve.token="s3cret"']).serve
  s = Served(finished_run.run_dir, cfg, tmp_path)
  try:
    status, error = s.json("GET", "/api/tags")
    assert status == 401 and "token" in error["error"]
    assert s.call("GET", "/api/tags", headers={"Authorization": "Bearer s3cret"})[0] == 200
    assert s.call("GET", "/")[0] == 200  # the page itself; its requests send the token
  finally:
    s.server.shutdown()
    s.server.server_close()


def test_prompts_and_liked_answers_flow_back_redacted_into_a_spool(finished_run, tmp_path):
  from streamlearn.capture.collect import Capture
  from streamlearn.capture.spool import Spool, read_segment
  config = load_config(None, ["serve.learn_from_use=true"])
  use = Capture(config.capture, Spool(tmp_path / "spool", config.capture.segment_bytes))
  s = Served(finished_run.run_dir, config.serve, tmp_path, use)
  try:
    answers = [s.json("POST", "/api/generate", {
        "prompt": f"note {i}: mail ann@example.com ", "stream": False,
        "options": {"num_predict": 20, "seed": i}})[1] for i in range(2)]
    assert s.json("POST", "/api/feedback", {"id": answers[0]["id"], "score": 1})[0] == 200
    assert s.json("POST", "/api/feedback", {"id": answers[1]["id"], "score": -1})[0] == 200
  finally:
    s.server.shutdown()
    s.server.server_close()
  texts = [text for _, text in read_segment(use.spool.segment_path(1))]
  assert texts[:2] == ["note 0: mail <EMAIL> ", "note 1: mail <EMAIL> "]
  liked = "note 0: mail <EMAIL> " + answers[0]["response"]
  assert texts[2:] == [liked] and "ann@example.com" not in "".join(texts)


# --- the command, with a learner saving in another process ------------------------------------

@pytest.mark.e2e
def test_the_command_serves_and_picks_up_versions_a_learner_saves(finished_run, tmp_path):
  run_dir = tmp_path / "run"
  shutil.copytree(finished_run.run_dir, run_dir, ignore=shutil.ignore_patterns(".lock"))
  more = tmp_path / "more.txt"
  more.write_bytes(finished_run.data.read_bytes() + stdlib_text(6000)[3000:])
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  assert subprocess.run([sys.executable, "-m", "streamlearn.serve", "--run-dir", str(run_dir),
                         "--host", "0.0.0.0"], capture_output=True, text=True,
                        env=env).stderr.startswith("error: --host 0.0.0.0 is not loopback")
  server = subprocess.Popen(
      [sys.executable, "-m", "streamlearn.serve", "--run-dir", str(run_dir), "--port", "0",
       "--set", "serve.reload_seconds=0.5"], stderr=subprocess.PIPE, text=True, env=env)
  try:
    line = server.stderr.readline()
    while "serving" not in line and line:
      line = server.stderr.readline()
    url = line.split("http://")[1].split("/")[0]
    host, port = url.split(":")

    def tags() -> set[str]:
      conn = http.client.HTTPConnection(host, int(port), timeout=30)
      conn.request("GET", "/api/tags")
      names = {m["name"] for m in json.loads(conn.getresponse().read())["models"]}
      conn.close()
      return names

    assert "run:47:0" in tags()
    # A learner goes on with the run in another process, saving versions as it goes.
    learner = subprocess.run([sys.executable, "-m", "streamlearn.run", *SAFE, "--data",
                              str(more), "--run-dir", str(run_dir), "--resume"],
                             capture_output=True, text=True, env=env, timeout=300)
    assert learner.returncode == 0, learner.stderr[-2000:]
    newest = max(int(p.name) for p in (run_dir / "versions").iterdir() if p.name.isdigit())
    deadline = time.monotonic() + 60
    while f"run:{newest}:0" not in tags():
      assert time.monotonic() < deadline, tags()
      time.sleep(0.5)
    server.send_signal(15)
    assert server.wait(timeout=30) == 0
  finally:
    if server.poll() is None:
      server.kill()
      server.wait()


# --- the page, in a real browser ----------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.e2e
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (Debian: apt-get install chromium)")
def test_the_page_asks_streams_rates_and_shows_the_pool(served):
  sync_api = pytest.importorskip("playwright.sync_api")
  with sync_api.sync_playwright() as p:
    browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
        "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"])
    try:
      page = browser.new_page()
      page.goto(served.url + "/")
      sync_api.expect(page.locator("#pool tr")).to_have_count(len(served.pool.ids()))
      page.fill("#prompt", "def ")
      page.fill("#tokens", "40")
      page.click("#send")
      sync_api.expect(page.locator("#model")).to_contain_text("answered by run:", timeout=30_000)
      sync_api.expect(page.locator("#up")).to_be_visible()
      answer = page.inner_text("#answer")
      assert answer.startswith("def ") and len(answer) > len("def ") + 10, answer
      model = page.inner_text("#model").removeprefix("answered by ")
      row = page.locator(f'#pool tr[data-model="{model}"] td')
      ratings = int(row.nth(3).inner_text())
      page.click("#up")
      sync_api.expect(page.locator("#rated")).to_have_text("thanks: liked")
      sync_api.expect(row.nth(3)).to_have_text(str(ratings + 1))
      assert not page.inner_text("#error")
      # Under the daemon the page shows what `streamlearn status` does.
      sync_api.expect(page.locator("#daemon-status")).to_contain_text(
          "learner: paused, 2 restart(s) (on battery)")
      sync_api.expect(page.locator("#daemon-status")).to_contain_text(
          "0.0 KB captured, 0.0 KB learned")
    finally:
      browser.close()

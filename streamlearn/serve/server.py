"""The HTTP server: Ollama- and OpenAI-style completions over the pool, feedback, a page.

    GET  /                 the page (streamlearn/serve/page.html)
    GET  /api/tags         the pool, as Ollama lists models
    GET  /api/version
    POST /api/generate     {model?, prompt, stream?, options{temperature, num_predict, seed,
                            stop, top_k, top_p, repeat_penalty}}: NDJSON lines (or one object)
    GET  /v1/models        the pool, as OpenAI lists models
    POST /v1/completions   {model?, prompt, max_tokens?, temperature?, top_p?, stop?, seed?,
                            stream?}: one object, or server-sent events ending in [DONE]
    POST /api/feedback     {id, score}: +1 / -1, or a number in [0, 1]
    GET  /api/pool         each model's pulls, ratings, posterior and bits/byte
    GET  /api/status       under the daemon: what it runs, bytes captured / learned, backups

Every answer names its model and carries a request id, which feedback sends
back. A request that names no model (or "auto") is routed by the bandit. Every
error is `{"error": "..."}` with a 4xx (5xx only when the server cannot
answer now). Bounded: body size, prompt length, tokens per answer, and
generations at once (a client that leaves mid-stream frees its slot).
`ThreadingHTTPServer` from the standard library: one thread per connection is
plenty on loopback, and generation itself runs in JAX.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import metadata, resources

from streamlearn.serve.protocol import BadRequest, Request, ollama_request, openai_request
from streamlearn.serve.service import Service, iso

log = logging.getLogger("streamlearn.serve")


class Handler(BaseHTTPRequestHandler):
  protocol_version = "HTTP/1.1"  # keep-alive for the clients; streams are chunked
  server_version = "streamlearn"
  service: Service  # set on the subclass that `make_server` builds

  # --- plumbing ------------------------------------------------------------------------

  def log_message(self, format, *args):  # one debug line per request, not stderr noise
    log.debug("%s %s", self.address_string(), format % args)

  def _send_json(self, status: int, payload: dict) -> None:
    data = json.dumps(payload).encode()
    self.send_response(status)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    self.wfile.write(data)

  def _error(self, status: int, message: str) -> None:
    self._send_json(status, {"error": message})

  def _body(self) -> dict:
    length = self.headers.get("Content-Length")
    if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
      raise BadRequest(411, "send the body with a Content-Length")
    try:
      n = int(length or 0)
    except ValueError:
      raise BadRequest(400, "Content-Length: not a number") from None
    if n > self.service.cfg.max_body_bytes:
      self.close_connection = True  # the body stays unread
      raise BadRequest(413, f"body of {n} bytes, at most {self.service.cfg.max_body_bytes}")
    raw = self.rfile.read(n) if n else b""
    try:
      body = json.loads(raw or b"{}")
    except ValueError:
      raise BadRequest(400, "body: not JSON") from None
    if not isinstance(body, dict):
      raise BadRequest(400, "body: expected a JSON object")
    return body

  def _authorized(self) -> bool:
    token = self.service.cfg.token
    return not token or secrets.compare_digest(
        self.headers.get("Authorization", ""), f"Bearer {token}")

  def _route(self, method: str) -> None:
    path = self.path.split("?", 1)[0]
    routes = ROUTES.get(path)
    try:
      if routes is None:
        raise BadRequest(404, f"no such path: {path}")
      if method not in routes:
        raise BadRequest(405, f"{path} takes {' or '.join(sorted(routes))}")
      if path != "/" and not self._authorized():
        raise BadRequest(401, "a bearer token is required (Authorization: Bearer ...)")
      getattr(self, routes[method])()
    except BadRequest as err:
      self._error(err.status, str(err))
    except (BrokenPipeError, ConnectionResetError):
      self.close_connection = True  # the client left
    except Exception as err:  # one line for the client and the log, and the server goes on
      log.exception("request failed")
      try:
        self._error(500, f"internal error: {type(err).__name__}")
      except OSError:
        pass

  def do_GET(self):
    self._route("GET")

  def do_POST(self):
    self._route("POST")

  # --- streaming -----------------------------------------------------------------------

  def _start_stream(self, content_type: str) -> None:
    self.send_response(200)
    self.send_header("Content-Type", content_type)
    self.send_header("Cache-Control", "no-cache")
    self.send_header("Transfer-Encoding", "chunked")
    self.end_headers()

  def _chunk(self, data: bytes) -> None:
    self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
    self.wfile.flush()

  def _end_stream(self) -> None:
    self.wfile.write(b"0\r\n\r\n")
    self.wfile.flush()

  def _generate(self, request: Request):
    """(model, request id, pieces): pieces is drawn inside `with pieces:`, which holds a
    generation slot until the answer is drawn or the client has left."""
    model = self.service.pick(request.model)
    if not self.service.slots.acquire(timeout=self.service.cfg.queue_seconds):
      raise BadRequest(503, "busy: every generation slot is taken; try again")
    request_id = "cmpl-" + secrets.token_hex(12)
    self.service.remember(request_id, model.id, request.prompt)
    return model, request_id, _Drawing(model.learner.stream(
        request.prompt, max_tokens=request.max_tokens, temperature=request.temperature,
        top_k=request.top_k, top_p=request.top_p,
        repetition_penalty=request.repetition_penalty, stop=request.stop, seed=request.seed),
        self.service.slots)

  # --- Ollama ------------------------------------------------------------------------

  def api_generate(self):
    request = ollama_request(self._body(), self.service.cfg)
    start = time.time()
    model, request_id, pieces = self._generate(request)
    n_prompt = len(model.learner.tokenizer.encode(request.prompt.encode()))

    def line(**fields) -> dict:
      return {"model": model.id, "created_at": iso(time.time()), "id": request_id, **fields}

    def last(text: str) -> dict:
      n = pieces.tokens
      took = int((time.time() - start) * 1e9)
      return line(response="" if request.stream else text, done=True,
                  done_reason="length" if n >= request.max_tokens else "stop",
                  total_duration=took, load_duration=0, prompt_eval_count=n_prompt,
                  prompt_eval_duration=0, eval_count=n, eval_duration=took)

    with pieces as drawn:
      if not request.stream:
        text = "".join(drawn)
        self.service.answered(request_id, text)
        self._send_json(200, last(text))
        return
      self._start_stream("application/x-ndjson")
      text = []
      for piece in drawn:
        text.append(piece)
        self._chunk(json.dumps(line(response=piece, done=False)).encode() + b"\n")
    self.service.answered(request_id, "".join(text))
    self._chunk(json.dumps(last("".join(text))).encode() + b"\n")
    self._end_stream()

  def api_tags(self):
    models = []
    for model_id in self.service.pool.ids():
      model = self.service.pool.get(model_id)
      if model is None:
        continue
      models.append({
          "name": model_id, "model": model_id, "modified_at": iso(model.loaded_at),
          "size": model.n_params * 4,
          "digest": hashlib.sha256(model_id.encode()).hexdigest(),
          "details": {"format": "streamlearn", "family": "streamlearn", "families": ["streamlearn"],
                      "parameter_size": f"{model.n_params / 1e6:.2f}M",
                      "quantization_level": "F32", "parent_model": ""}})
    self._send_json(200, {"models": models})

  def api_version(self):
    try:
      version = metadata.version("streamlearn")
    except metadata.PackageNotFoundError:  # a source tree that is not installed
      version = "0.0.0+unknown"
    self._send_json(200, {"version": version})

  def api_feedback(self):
    self._send_json(200, self.service.rate(self._body()))

  def api_pool(self):
    self._send_json(200, self.service.pool_table())

  def api_status(self):
    """The daemon's status.json (serve.status_file), as `streamlearn status --json` shows it."""
    path = self.service.cfg.status_file
    if not path:
      raise BadRequest(404, "no daemon status here (serve.status_file is not set)")
    try:
      with open(path, encoding="utf-8") as f:
        status = json.load(f)
    except (OSError, ValueError):
      raise BadRequest(503, "the daemon's status is not readable yet; try again") from None
    self._send_json(200, status)

  # --- OpenAI ------------------------------------------------------------------------

  def v1_models(self):
    self._send_json(200, {"object": "list", "data": [
        {"id": i, "object": "model", "created": int(self.service.started),
         "owned_by": "streamlearn"} for i in self.service.pool.ids()]})

  def v1_completions(self):
    request = openai_request(self._body(), self.service.cfg)
    model, request_id, pieces = self._generate(request)
    created = int(time.time())
    n_prompt = len(model.learner.tokenizer.encode(request.prompt.encode()))

    def completion(text: str, finish: str | None, usage: dict | None = None) -> dict:
      out = {"id": request_id, "object": "text_completion", "created": created,
             "model": model.id,
             "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}
      if usage is not None:
        out["usage"] = usage
      return out

    def finish(text: str) -> tuple[str, dict]:
      n = pieces.tokens
      return ("length" if n >= request.max_tokens else "stop",
              {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n})

    with pieces as drawn:
      if not request.stream:
        text = "".join(drawn)
        self.service.answered(request_id, text)
        self._send_json(200, completion(text, *finish(text)))
        return
      self._start_stream("text/event-stream")
      text = []
      for piece in drawn:
        text.append(piece)
        self._chunk(b"data: " + json.dumps(completion(piece, None)).encode() + b"\n\n")
    self.service.answered(request_id, "".join(text))
    reason, usage = finish("".join(text))
    self._chunk(b"data: " + json.dumps(completion("", reason, usage)).encode() + b"\n\n")
    self._chunk(b"data: [DONE]\n\n")
    self._end_stream()

  # --- the page ----------------------------------------------------------------------

  def page(self):
    data = resources.files("streamlearn.serve").joinpath("page.html").read_bytes()
    self.send_response(200)
    self.send_header("Content-Type", "text/html; charset=utf-8")
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    self.wfile.write(data)


class _Drawing:
  """An answer being drawn, and the generation slot it holds: `with` it; leaving the block
  (answer done, client gone, error) stops drawing and frees the slot."""

  def __init__(self, pieces, slots: threading.BoundedSemaphore):
    self.pieces, self.slots, self.held = pieces, slots, True
    self.tokens = 0  # once drawn: the answer's length in tokens

  def __enter__(self):
    return self._counted()

  def _counted(self):
    self.tokens = yield from self.pieces

  def __exit__(self, *exc):
    self.pieces.close()
    if self.held:
      self.held = False
      self.slots.release()
    return False


ROUTES = {
    "/": {"GET": "page"},
    "/api/generate": {"POST": "api_generate"},
    "/api/tags": {"GET": "api_tags"},
    "/api/version": {"GET": "api_version"},
    "/api/feedback": {"POST": "api_feedback"},
    "/api/pool": {"GET": "api_pool"},
    "/api/status": {"GET": "api_status"},
    "/v1/models": {"GET": "v1_models"},
    "/v1/completions": {"POST": "v1_completions"},
}


def make_server(service: Service, host: str, port: int) -> ThreadingHTTPServer:
  """A server bound to (host, port) (port 0: any free one; see `server.server_address`)."""
  handler = type("BoundHandler", (Handler,), {"service": service})
  server = ThreadingHTTPServer((host, port), handler)
  server.daemon_threads = True
  return server

"""The push endpoint: text sent to capture over HTTP on loopback.

    POST /ingest   a text body (text/plain), or JSON {"text": "...", "source": "..."}
    POST /pause    stop every collector (the process stays); POST /resume starts them again
    GET  /status   what was captured, duplicates, skipped, whether paused

Every answer is JSON; every refusal `{"error": "..."}` with a 4xx: a body over
`capture.max_push_bytes` (413), not UTF-8, malformed JSON, no text; a full disk (507: below
`capture.min_free_mb`). Text goes
through the same prep as every collector's before it is spooled.
"""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from streamlearn.capture.collect import Capture
from streamlearn.capture.spool import Item


class _Refused(Exception):
  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status


class PushHandler(BaseHTTPRequestHandler):
  protocol_version = "HTTP/1.1"
  capture: Capture  # set on the subclass `make_push_server` builds

  def log_message(self, format, *args):
    pass

  def _send(self, status: int, payload: dict) -> None:
    data = json.dumps(payload).encode()
    self.send_response(status)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    self.wfile.write(data)

  def do_GET(self):
    if self.path.split("?")[0] != "/status":
      return self._send(404, {"error": f"no such path: {self.path}"})
    self._send(200, {**dict(self.capture.totals), "paused": self.capture.paused.is_set(),
                     "segment": self.capture.spool.manifest.segment})

  def do_POST(self):
    path = self.path.split("?")[0]
    try:
      if path == "/pause":
        self.capture.paused.set()
        return self._send(200, {"paused": True})
      if path == "/resume":
        self.capture.paused.clear()
        return self._send(200, {"paused": False})
      if path != "/ingest":
        raise _Refused(404, f"no such path: {path}")
      text, source = self._item()
      if self.capture.paused.is_set():
        raise _Refused(409, "capture is paused (POST /resume)")
      if self.capture.disk_low():
        raise _Refused(507, f"capture is paused: less free disk than capture.min_free_mb "
                            f"({self.capture.cfg.min_free_mb:g} MB)")
      written = self.capture.offer(Item(text, "push", source))
      self._send(200, {"captured": written, "duplicate": written == 0})
    except _Refused as err:
      self.capture.skip(str(err), "a push")
      self._send(err.status, {"error": str(err)})

  def _item(self) -> tuple[str, str]:
    try:
      n = int(self.headers.get("Content-Length") or 0)
    except ValueError:
      raise _Refused(400, "Content-Length: not a number") from None
    if n > self.capture.cfg.max_push_bytes:
      self.close_connection = True
      raise _Refused(413, f"push of {n} bytes, at most {self.capture.cfg.max_push_bytes}")
    raw = self.rfile.read(n)
    try:
      body = raw.decode("utf-8")
    except UnicodeDecodeError:
      raise _Refused(400, "body: not UTF-8") from None
    client = f"{self.client_address[0]}"
    if (self.headers.get("Content-Type") or "").startswith("application/json"):
      try:
        data = json.loads(body)
      except ValueError:
        raise _Refused(400, "body: not JSON") from None
      if not isinstance(data, dict) or not isinstance(data.get("text"), str):
        raise _Refused(400, 'body: expected {"text": "...", "source": "..."}')
      source = data.get("source") if isinstance(data.get("source"), str) else client
      body = data["text"]
    else:
      source = client
    if not body.strip():
      raise _Refused(400, "no text")
    return body, source[:200]


def make_push_server(capture: Capture, host: str, port: int) -> ThreadingHTTPServer:
  handler = type("BoundPushHandler", (PushHandler,), {"capture": capture})
  server = ThreadingHTTPServer((host, port), handler)
  server.daemon_threads = True
  return server

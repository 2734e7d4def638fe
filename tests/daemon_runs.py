"""What the daemon's tests share: fake power supplies, a notify socket, waiting, HTTP."""

import json
import shutil
import socket
import time
import urllib.request
from pathlib import Path


def power(root: Path, **supplies: dict) -> Path:
  shutil.rmtree(root, ignore_errors=True)
  for name, files in supplies.items():
    (root / name).mkdir(parents=True)
    for key, value in files.items():
      (root / name / key).write_text(value + "\n")
  return root


def listen(tmp_path: Path) -> socket.socket:
  sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
  sock.bind(str(tmp_path / "notify"))
  sock.settimeout(0.5)
  return sock


def heard(sock: socket.socket) -> list[str]:
  messages = []
  try:
    while True:
      messages.append(sock.recv(4096).decode())
  except (TimeoutError, socket.timeout):
    return messages


def wait_until(what: str, check, timeout_s: float = 90.0, every_s: float = 0.25):
  deadline = time.monotonic() + timeout_s
  while True:
    value = check()
    if value:
      return value
    if time.monotonic() > deadline:
      raise AssertionError(f"timed out waiting for {what}")
    time.sleep(every_s)


def http(address: str, path: str, data: bytes | None = None, content_type="text/plain"):
  request = urllib.request.Request(f"http://{address}{path}", data=data,
                                   headers={"Content-Type": content_type})
  with urllib.request.urlopen(request, timeout=60) as response:
    return json.loads(response.read())

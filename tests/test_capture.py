"""Capture: collectors (folders, push, the command), prep before the disk."""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from streamlearn.capture.collect import Folders, split_text
from streamlearn.capture.push import make_push_server
from streamlearn.config import load_config

from capture_runs import small_capture, spooled


@pytest.fixture
def capture(tmp_path):
  return small_capture(tmp_path / "spool")


def test_long_text_is_split_at_line_ends_within_the_limit():
  text = "".join(f"line {i} " + "é" * 30 + "\n" for i in range(100)) + "x" * 500
  pieces = split_text(text, 256)
  assert "".join(pieces) == text and all(len(p.encode()) <= 256 for p in pieces)
  assert all(p.endswith("\n") for p in pieces[:-3])


def test_folders_take_small_text_files_once_and_nothing_sensitive(capture, tmp_path, caplog):
  home = tmp_path / "home"
  (home / ".ssh").mkdir(parents=True)
  (home / ".ssh" / "config").write_text("Host secret-host")
  (home / "project" / ".git").mkdir(parents=True)
  (home / "project" / ".git" / "HEAD").write_text("ref: refs/heads/secret-branch")
  (home / "project" / ".env").write_text("DB=secret-env")
  (home / "project" / "server.pem").write_text("secret-pem")
  (home / "notes.txt").write_text("Meet Ann at noon. Her mail: ann@example.com.\n")
  (home / "to bo@example.org.txt").write_text("A file named after an address.\n")
  (home / "a cy@example.org.bin").write_bytes(b"\x00skipped, and said")
  (home / "copy.txt").write_text("Meet Ann at noon. Her mail: ann@example.com.\n")
  (home / "big.txt").write_text("x" * 3000)
  (home / "blob.bin").write_bytes(b"\x00\x01binary")
  (home / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
  (home / "picture.png").write_bytes(b"\x89PNG")
  os.mkfifo(home / "pipe")
  (home / "loop").symlink_to(home, target_is_directory=True)
  (home / "link.txt").symlink_to(home / "notes.txt")
  folders = Folders(capture, [str(home)])
  assert folders.scan() == 2
  assert folders.scan() == 0  # nothing changed: nothing read again
  (home / "notes.txt").write_text("Meet Ann at one, not noon.\n")
  assert folders.scan() == 1
  text = spooled(capture)
  # A path holds PII too: redacted in the item's header and in the log.
  assert "home/to <EMAIL>" in text and "bo@example.org" not in text
  assert "cy@example.org" not in caplog.text and "home/a <EMAIL>: binary" in caplog.text
  assert "Meet Ann at noon. Her mail: <EMAIL>." in text and "Meet Ann at one" in text
  assert "ann@example.com" not in text and "secret" not in text
  manifest = json.loads(capture.spool.manifest_path(1).read_text())
  assert manifest["duplicates"] == 1 and manifest["redactions"] == {"EMAIL": 1}
  assert manifest["skipped"] == {"too large": 1, "binary": 2, "not UTF-8": 1,
                                 "not an image it can read (UnidentifiedImageError)": 1,
                                 "not a regular file": 2}  # the FIFO, the file link
  # (the directory link is never followed: os.walk without followlinks)
  assert "ann@example.com" not in json.dumps(manifest)


def test_push_takes_text_and_json_and_refuses_bad_input(capture):
  server = make_push_server(capture, "127.0.0.1", 0)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  port = server.server_address[1]

  def post(path, body: bytes, content_type="text/plain"):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", path, body=body, headers={"Content-Type": content_type})
    r = conn.getresponse()
    out = r.status, json.loads(r.read())
    conn.close()
    return out

  try:
    assert post("/ingest", b"plain text from curl, ssn 123-45-6789") == (
        200, {"captured": 1, "duplicate": False})
    assert post("/ingest", json.dumps({"text": "json text", "source": "editor"}).encode(),
                "application/json")[0] == 200
    assert post("/ingest", b"plain text from curl, ssn 123-45-6789")[1]["duplicate"]
    assert post("/ingest", b"x" * 600)[0] == 413
    assert post("/ingest", b"{bad", "application/json")[0] == 400
    assert post("/ingest", json.dumps({"txt": "no"}).encode(), "application/json")[0] == 400
    assert post("/ingest", b"\xff\xfe")[0] == 400
    assert post("/nowhere", b"")[0] == 404
    assert post("/pause", b"") == (200, {"paused": True})
    assert post("/ingest", b"while paused")[0] == 409
    assert post("/resume", b"")[1] == {"paused": False}
  finally:
    server.shutdown()
    server.server_close()
  text = spooled(capture)
  assert "ssn <SSN>" in text and "123-45-6789" not in text and "json text" in text
  assert " push 10 editor\n" in text and "while paused" not in text


@pytest.mark.e2e
def test_the_command_captures_until_sigterm_and_once(tmp_path):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  folder = tmp_path / "watched"
  folder.mkdir()
  (folder / "a.txt").write_text("first file, mail bo@example.net\n")
  spool = tmp_path / "spool"
  args = [sys.executable, "-m", "streamlearn.capture", "--spool", str(spool), "--set",
          f'capture.folders=["{folder}"]', "--set", f'capture.push="127.0.0.1:{port}"',
          "--set", "capture.poll_seconds=0.2", "--set", "capture.settle_seconds=0"]
  refused = subprocess.run(args[:5] + ["--set", 'capture.push="0.0.0.0:1"'], capture_output=True,
                           text=True)
  assert refused.returncode == 2 and "not loopback" in refused.stderr
  running = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
  try:
    line = running.stderr.readline()
    while "capturing into" not in line and line:
      line = running.stderr.readline()
    (folder / "b.txt").write_text("second file, written while it runs\n")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/ingest", body=b"pushed text")
    assert conn.getresponse().status == 200
    deadline = time.monotonic() + 20
    while "second file" not in "".join(p.read_text() for p in spool.glob("segment-*.txt")):
      assert time.monotonic() < deadline
      time.sleep(0.1)
    running.send_signal(signal.SIGTERM)
    assert running.wait(timeout=20) == 0
  finally:
    if running.poll() is None:
      running.kill()
  text = "".join(p.read_text() for p in spool.glob("segment-*.txt"))
  assert "bo@example.net" not in text and "<EMAIL>" in text and "pushed text" in text
  once = subprocess.run([sys.executable, "-m", "streamlearn.capture", "--once", "--stdin",
                         "--spool", str(spool)], input="from stdin\n", capture_output=True,
                        text=True)
  assert once.returncode == 0 and "captured 1 item(s)" in once.stderr


def test_paused_time_goes_into_the_open_segments_manifest(tmp_path):
  from streamlearn.capture.runner import Running
  capture = small_capture(tmp_path / "spool")
  cfg = load_config(None, ["capture.poll_seconds=0.05"]).capture
  capture.cfg = cfg
  running, stop = Running(capture, Folders(capture, [])), threading.Event()
  loop = threading.Thread(target=running.until, args=(stop,))
  loop.start()
  capture.paused.set()
  time.sleep(0.5)
  capture.paused.clear()
  time.sleep(0.2)
  stop.set()
  loop.join(timeout=5)
  running.close()
  manifest = json.loads(capture.spool.manifest_path(1).read_text())
  assert 0.4 <= manifest["paused_seconds"] < 2.0

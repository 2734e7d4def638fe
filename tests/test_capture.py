"""Capture: redaction before the disk, the spool's segments and seal, folders, push, the CLI."""

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from streamlearn.capture.collect import Capture, Folders, split_text
from streamlearn.capture.push import make_push_server
from streamlearn.capture.redact import redact
from streamlearn.capture.spool import SEAL_FRACTION, Item, Spool, read_segment
from streamlearn.config import load_config

# Every kind, several shapes each: (text, kind, the value that must not survive).
PLANTED = [
    ("write to jane.doe+news@example.co.uk today", "EMAIL", "jane.doe+news@example.co.uk"),
    ("from: a_b@mail.example.org", "EMAIL", "a_b@mail.example.org"),
    ("call +44 20 7946 0958 now", "PHONE", "7946 0958"),
    ("office (555) 123-4567.", "PHONE", "123-4567"),
    ("cell 555.123.4567", "PHONE", "555.123.4567"),
    ("card 4111 1111 1111 1111 exp 12/29", "CARD", "4111 1111 1111 1111"),
    ("amex 3782-822463-10005", "CARD", "3782-822463-10005"),
    ("mc 5500000000000004", "CARD", "5500000000000004"),
    ("ssn 123-45-6789", "SSN", "123-45-6789"),
    ("host 192.168.1.20 is up", "IP", "192.168.1.20"),
    ("via 2001:db8::8a2e:370:7334", "IP", "2001:db8::8a2e:370:7334"),
    ("pay to GB82 WEST 1234 5698 7654 32", "IBAN", "GB82 WEST 1234 5698 7654 32"),
    ("iban DE89370400440532013000", "IBAN", "DE89370400440532013000"),
    ("aws AKIAIOSFODNN7EXAMPLE", "TOKEN", "AKIAIOSFODNN7EXAMPLE"),
    ("gh ghp_" + "aB3" * 12, "TOKEN", "ghp_" + "aB3" * 12),
    ("key sk-proj-abcdefghijklmnopqrstuvwx1234", "TOKEN", "abcdefghijklmnopqrstuvwx1234"),
    ("slack xoxb-123456789012-abcdefghijkl", "TOKEN", "xoxb-123456789012"),
    ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXk\n-----END OPENSSH PRIVATE KEY-----",
     "PRIVATE_KEY", "b3BlbnNzaC1rZXk"),
    ("jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9P",
     "JWT", "dozjgNryP4J3jVmNHl0w5N"),
    ("password: hunter2!", "SECRET", "hunter2!"),
    ('api_key = "q8Zr3LmN0pX7"', "SECRET", "q8Zr3LmN0pX7"),
    ("the token is Zx9Qw8Er7Ty6Ui5Op4As3Df2", "SECRET", "Zx9Qw8Er7Ty6Ui5Op4As3Df2"),
    ("db postgres://admin:s3cr3t@db.example.com/prod", "CREDENTIALS", "s3cr3t"),
]


@pytest.mark.parametrize("text,kind,value", PLANTED, ids=[f"{k}-{i}" for i, (_, k, _) in
                                                          enumerate(PLANTED)])
def test_every_kind_is_replaced_by_its_placeholder_and_the_rest_stays(text, kind, value):
  out, counts = redact(f"Dear Ann, {text} -- thanks, Bo")
  assert value not in out and f"<{kind}>" in out and counts[kind] >= 1, (out, counts)
  assert out.startswith("Dear Ann, ") and out.endswith(" -- thanks, Bo")


def test_numbers_that_only_look_like_pii_stay():
  text = ("Version 3.11.7 shipped 2026-12-02; 4111 1111 1111 1112 fails Luhn; order "
          "#1234567; pi is 3.14159; x[1::2] slices; GB00 NOTA REAL IBAN; token = self[0]; "
          "password = getpass(); token_type = 'word'")
  out, counts = redact(text)
  assert out == text and not counts
  prose = Path(json.__file__).parent.joinpath("decoder.py").read_text()
  assert not redact(prose)[1]


def test_long_text_is_split_at_line_ends_within_the_limit():
  text = "".join(f"line {i} " + "é" * 30 + "\n" for i in range(100)) + "x" * 500
  pieces = split_text(text, 256)
  assert "".join(pieces) == text and all(len(p.encode()) <= 256 for p in pieces)
  assert all(p.endswith("\n") for p in pieces[:-3])


def test_the_spool_seals_at_ninety_percent_and_goes_on(tmp_path):
  spool = Spool(tmp_path / "spool", segment_bytes=1000)
  cfg = load_config(None, []).capture
  capture = Capture(cfg, spool)
  for i in range(40):
    capture.offer(Item(f"item {i}: " + "w" * 60, "push", "test"))
  first = json.loads(spool.manifest_path(1).read_text())
  assert first["sealed"] and SEAL_FRACTION * 1000 <= first["bytes"] < SEAL_FRACTION * 1000 + 100
  items = read_segment(spool.segment_path(1))
  assert len(items) == first["samples"] and items[0][1] == "item 0: " + "w" * 60
  assert spool.manifest.segment >= 3 and spool.sealed_events >= 2
  # A reader of segment 1 meanwhile; capture goes on into the open segment; a torn item (a
  # kill -9 mid-write) at its end is left out, never misread.
  open_segment = spool.segment_path(spool.manifest.segment)
  whole = read_segment(open_segment)
  with open(open_segment, "ab") as f:
    f.write(b"\x1e2026-12-02T00:00:00Z push 500 test\nhalf an it")
  assert read_segment(open_segment) == whole
  # Duplicates are dropped (after a restart too) and counted.
  again = Capture(cfg, Spool(tmp_path / "spool", 1000))
  assert again.offer(Item("item 3: " + "w" * 60, "push", "test")) == 0
  assert again.spool.manifest.duplicates == 1


@pytest.fixture
def capture(tmp_path):
  cfg = load_config(None, ["capture.max_file_bytes=2000", "capture.max_push_bytes=500",
                           "capture.settle_seconds=0"]).capture
  return Capture(cfg, Spool(tmp_path / "spool", cfg.segment_bytes))


@pytest.fixture
def media_capture(tmp_path):  # files up to the default 1 MiB: images and recordings are larger
  cfg = load_config(None, ["capture.settle_seconds=0"]).capture
  return Capture(cfg, Spool(tmp_path / "spool", cfg.segment_bytes))


def spooled(capture) -> str:
  capture.spool.close()
  return "".join(p.read_text() for p in sorted(capture.spool.directory.glob("segment-*")))


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


# --- images and speech ------------------------------------------------------------------------

def words(text: str) -> list[str]:
  return [w.strip(".,;:!?").lower() for w in text.split() if w.strip(".,;:!?")]


@pytest.mark.skipif(shutil.which("tesseract") is None,
                    reason="no tesseract (Debian: apt-get install tesseract-ocr)")
def test_an_image_in_a_watched_folder_is_read_and_redacted(media_capture, tmp_path):
  capture = media_capture
  from PIL import Image, ImageDraw, ImageFont
  sentence = "The quarterly report is due on Friday; mail it to bob@example.com please."
  image = Image.new("RGB", (1200, 100), "white")
  try:
    font = ImageFont.truetype("DejaVuSans.ttf", 28)
  except OSError:
    font = ImageFont.load_default(size=28)
  ImageDraw.Draw(image).text((20, 30), sentence, fill="black", font=font)
  folder = tmp_path / "shots"
  folder.mkdir()
  image.save(folder / "note.png")
  Image.new("RGB", (200, 100), "white").save(folder / "blank.png")
  assert Folders(capture, [str(folder)]).scan() == 1
  text = spooled(capture)
  read = words(text.split("ocr ", 1)[1])
  want = words(sentence.replace("bob@example.com", ""))
  assert sum(w in read for w in want) >= 0.9 * len(want), text
  assert "bob@example.com" not in text and "<EMAIL>" in text
  manifest = json.loads(capture.spool.manifest_path(1).read_text())
  assert manifest["skipped"] == {"no text in the image": 1}


@pytest.mark.skipif(shutil.which("flite") is None, reason="no flite (Debian: apt-get install flite)")
def test_speech_in_a_watched_folder_is_heard(media_capture, tmp_path):
  capture = media_capture
  sentence = "the weather is nice today and i want to go home"
  folder = tmp_path / "voice"
  folder.mkdir()
  subprocess.run(["flite", "-t", sentence, "-o", str(folder / "memo.wav")], check=True)
  with open(folder / "silence.wav", "wb") as f:
    import wave
    with wave.open(f, "wb") as w:
      w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
      w.writeframes(b"\0\0" * 16000)
  assert Folders(capture, [str(folder)]).scan() == 1
  text = spooled(capture)
  heard = words(text.split("speech ", 1)[1])
  assert sum(w in heard for w in words(sentence)) >= 0.7 * len(words(sentence)), text
  assert json.loads(capture.spool.manifest_path(1).read_text())["skipped"] == {
      "no speech heard": 1}


@pytest.fixture
def screen_with_text(monkeypatch):
  """A virtual display (Xvfb) showing a real xterm window with a known sentence."""
  if shutil.which("Xvfb") is None or shutil.which("xterm") is None:
    pytest.skip("no Xvfb or xterm (Debian: apt-get install xvfb xterm)")
  display = subprocess.Popen(["Xvfb", "-displayfd", "1", "-screen", "0", "900x200x24",
                              "-nolisten", "tcp"], stdout=subprocess.PIPE, text=True)
  number = display.stdout.readline().strip()
  monkeypatch.setenv("DISPLAY", f":{number}")
  sentence = "The meeting moved to Thursday at noon in room four"
  window = subprocess.Popen(["xterm", "-geometry", "80x4+0+0", "-fa", "DejaVuSansMono",
                             "-fs", "14", "-e", "sh", "-c", f"echo {sentence}; sleep 60"])
  # Wait until the window has mapped and drawn its text (a slow machine takes longer).
  import mss
  from PIL import Image
  from streamlearn.capture.media import image_text
  deadline = time.monotonic() + 30
  while True:
    with mss.MSS() as screens:
      shot = screens.grab(screens.monitors[0])
    if "Thursday" in image_text(Image.frombytes("RGB", shot.size, shot.rgb)):
      break
    assert time.monotonic() < deadline, "the xterm window never showed its text"
    time.sleep(0.3)
  yield sentence
  window.kill()
  display.kill()
  window.wait()
  display.wait()


def test_the_screen_is_read_once_until_it_changes_and_blocked_windows_never(
    media_capture, screen_with_text, monkeypatch):
  from streamlearn.capture import screen as screen_module
  screen = screen_module.Screen(media_capture)
  assert screen.unavailable() is None
  assert screen.grab() == 1
  assert screen.grab() == 0  # the same screen: not read again
  text = spooled(media_capture)
  seen = words(text.split("screen ", 1)[1])
  want = words(screen_with_text)
  assert sum(w in seen for w in want) >= 0.9 * len(want), text
  monkeypatch.setattr(screen_module, "active_window_title", lambda: "Vault - KeePassXC")
  screen._last_pixels = None  # as if the screen changed: the title alone keeps it out
  assert screen.grab() == 0
  assert media_capture.spool.manifest.skipped == {"a blocked window": 1}


@pytest.mark.skipif(shutil.which("flite") is None, reason="no flite (Debian: apt-get install flite)")
def test_a_number_said_aloud_is_redacted(media_capture, tmp_path):
  folder = tmp_path / "voice"
  folder.mkdir()
  subprocess.run(["flite", "-t", "my phone number is five five five one two three four five "
                  "six seven", "-o", str(folder / "call.wav")], check=True)
  assert Folders(media_capture, [str(folder)]).scan() == 1
  text = spooled(media_capture).split("speech ", 1)[1]
  assert "<NUMBER>" in text and "phone number" in text and not any(
      w in text for w in ("five five", "one two three"))
  out, counts = redact("bob at example dot com, then one two three four five six seven eight",
                       spoken=True)
  assert out == "<EMAIL>, then <NUMBER>" and counts == {"EMAIL": 1, "NUMBER": 1}
  assert redact("I saw one or two of them at nine", spoken=True)[1] == {}


# --- the learner reads the spool ------------------------------------------------------------

def filled_spool(root: Path, n: int = 30) -> tuple[Spool, list[str]]:
  capture = Capture(load_config(None, []).capture, Spool(root, segment_bytes=600))
  texts = [f"item {i}: the quick brown fox {i * 7} jumps\n" * (1 + i % 3) for i in range(n)]
  for i, text in enumerate(texts):
    capture.offer(Item(text, "push", f"client {i}"))
  capture.spool.close()
  return capture.spool, texts


def test_a_spool_streams_its_items_text_and_resumes_at_every_position(tmp_path):
  from streamlearn.data.sources import SpoolSource, open_source
  spool, texts = filled_spool(tmp_path / "spool")
  assert spool.manifest.segment >= 3  # sealed segments and an open one
  source = open_source(str(tmp_path / "spool"), max_file_bytes=10**6, block_bytes=16)
  assert isinstance(source, SpoolSource)
  blocks = list(source.blocks())
  want = "".join(t + "\n" for t in texts).encode()
  assert b"".join(b.data for b in blocks) == want  # the texts, never a header
  assert sum(b.new_document for b in blocks) == len(texts)
  for k, block in enumerate(blocks):
    rest = b"".join(b.data for b in source.blocks(block.position))
    assert rest == b"".join(b.data for b in blocks[k + 1:]), k


def test_following_a_spool_waits_for_the_next_sealed_segment(tmp_path):
  from streamlearn.data.sources import SpoolSource
  spool, texts = filled_spool(tmp_path / "spool")
  source = SpoolSource(tmp_path / "spool", follow=True, poll_seconds=0.05)
  stream = source.blocks()
  seen = b""
  sealed_text = "".join(t + "\n" for t in texts[:-1]).encode()
  while len(seen) < len(sealed_text) - 200:  # the sealed segments, at once
    seen += next(stream).data
  later = threading.Timer(0.3, spool.seal)  # capture seals the open segment a moment later
  later.start()
  started = time.monotonic()
  want = "".join(t + "\n" for t in texts).encode()
  while len(seen) < len(want):
    seen += next(stream).data
  assert seen == want and time.monotonic() - started >= 0.25


@pytest.mark.e2e
def test_a_learner_follows_the_spool_is_killed_and_a_resume_learns_each_byte_once(tmp_path):
  from streamlearn.cli.run import main as run_main
  from safety_runs import SAFE
  spool, texts = filled_spool(tmp_path / "spool", n=60)
  spool.seal()
  total = sum(len((t + "\n").encode()) for t in texts)
  run_dir = tmp_path / "run"
  learner = subprocess.Popen(
      [sys.executable, "-m", "streamlearn.run", *SAFE, "--data", str(tmp_path / "spool"),
       "--follow", "--run-dir", str(run_dir)], stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.monotonic() + 120
    while True:  # it learns every sealed byte (a version every 10 chunks of 64), then waits
      registry = run_dir / "registry.json"
      versions = json.loads(registry.read_text())["versions"] if registry.exists() else []
      if versions and (versions[-1]["bytes"] or 0) >= total - 11 * 64:
        break
      assert time.monotonic() < deadline and learner.poll() is None
      time.sleep(0.3)
    time.sleep(1.0)
    assert learner.poll() is None  # following: still waiting for more
    learner.kill()  # kill -9, whatever it was doing
    learner.wait(timeout=60)
  finally:
    if learner.poll() is None:
      learner.kill()
  consumed = json.loads((tmp_path / "spool" / "consumed.json").read_text())
  assert 1 < consumed["segment"] <= spool.manifest.segment  # segments it no longer needs
  # The rest, without --follow, from its newest version: each byte learned once in all (the
  # totals restart from the version), the headers never.
  assert run_main(SAFE + ["--data", str(tmp_path / "spool"), "--run-dir", str(run_dir),
                          "--resume"]) == 0
  assert json.loads((run_dir / "registry.json").read_text())["versions"][-1]["bytes"] == total


def test_only_learned_segments_are_deleted_past_the_caps(tmp_path):
  from streamlearn.data.spoolfile import write_consumed
  from streamlearn.data.sources import SpoolSource
  spool, texts = filled_spool(tmp_path / "spool", n=60)
  numbers = sorted(int(p.name[8:14]) for p in spool.directory.glob("segment-*.txt"))
  assert len(numbers) >= 5
  assert spool.prune(max_bytes=1, max_age_s=0) == []  # no learner has said what it learned
  write_consumed(spool.directory, 3, tmp_path / "run")
  assert spool.prune(max_bytes=1, max_age_s=0) == [1, 2]  # never 3, which a version needs
  big = sum(p.stat().st_size for p in spool.directory.glob("segment-*.txt"))
  write_consumed(spool.directory, numbers[-1], tmp_path / "run")
  assert spool.prune(max_bytes=big * 2, max_age_s=0) == []  # under the cap: kept
  assert spool.prune(max_bytes=0, max_age_s=1e-9) == list(range(3, numbers[-1]))
  # A reader that was in a deleted segment goes on at the first one left.
  rest = b"".join(b.data for b in SpoolSource(spool.directory).blocks(
      {"kind": "spool", "root": str(spool.directory), "segment": 1, "offset": 10}))
  assert rest == b"".join(t.encode() + b"\n" for t in texts if t in
                          "".join(x for _, x in read_segment(spool.segment_path(numbers[-1]))))


@pytest.mark.e2e
def test_kill_9_mid_write_leaves_every_segment_readable(tmp_path):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  spool = tmp_path / "spool"
  running = subprocess.Popen(
      [sys.executable, "-m", "streamlearn.capture", "--spool", str(spool), "--set",
       f'capture.push="127.0.0.1:{port}"', "--set", "capture.segment_bytes=20000"],
      stderr=subprocess.PIPE, text=True)
  sent = []
  try:
    line = running.stderr.readline()
    while "capturing into" not in line and line:
      line = running.stderr.readline()

    def push_forever():
      for i in range(100_000):
        try:
          conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
          text = f"item {i} " + "lorem ipsum " * (i % 50 + 1)
          conn.request("POST", "/ingest", body=text.encode())
          if conn.getresponse().status == 200:
            sent.append(text)
        except OSError:
          return

    pusher = threading.Thread(target=push_forever, daemon=True)
    pusher.start()
    time.sleep(2.0)
    running.kill()  # kill -9 while items are being written
    running.wait()
    pusher.join(timeout=10)
  finally:
    if running.poll() is None:
      running.kill()
  assert len(sent) > 10
  # Every acknowledged item is on disk, whole (it was fsynced before the answer), and at most
  # one more: written, its answer cut by the kill.
  read = [text for p in sorted(spool.glob("segment-*.txt")) for _, text in read_segment(p)]
  assert read[:len(sent)] == sent and len(read) <= len(sent) + 1
  # Restarted, capture cuts a torn tail and goes on after whole items. (A kill mid-write
  # leaves one only by chance: one is made here, as a kill between two writes would.)
  last = sorted(spool.glob("segment-*.txt"))[-1]
  with open(last, "ab") as f:
    f.write(b"\x1e2026-12-02T00:00:00Z push 400 127.0.0.1\nitem 99999 lorem")
  again = Capture(load_config(None, []).capture, Spool(spool, 20000))
  again.offer(Item("after the crash", "push", "test"))
  again.spool.close()
  read = [text for p in sorted(spool.glob("segment-*.txt")) for _, text in read_segment(p)]
  assert read[-1] == "after the crash" and read[:len(sent)] == sent

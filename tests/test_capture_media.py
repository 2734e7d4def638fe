"""Capture of images (OCR), speech (ASR) and the screen (Xvfb), each redacted."""

import json
import shutil
import subprocess
import time

import pytest

from streamlearn.capture.collect import Folders
from streamlearn.capture.redact import redact

from capture_runs import media_at, spooled, words


@pytest.fixture
def media_capture(tmp_path):
  return media_at(tmp_path / "spool")


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

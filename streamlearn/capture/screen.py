"""Screen text: a screenshot when the screen changed, read by OCR, unless its window is blocked.

Every `capture.screen_seconds` (0: off) the whole screen is grabbed (`mss`); an
unchanged screen (the same pixels) is not read again, and text the same as the
last capture's (after whitespace) is merged into it, not captured again, as
ActivityWatch merges repeated events. Before anything is grabbed, the active
window's title (`xprop`, where the display gives titles) is checked against
`capture.window_blocklist` (password managers and private windows by default):
a blocked window is never grabbed. Without a display the collector says so once
and the others go on.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess

from streamlearn.capture import media
from streamlearn.capture.collect import Capture
from streamlearn.capture.spool import Item, normalise


def active_window_title() -> str | None:
  """The focused window's title, or None where the display does not say (no xprop, no
  window manager)."""
  if shutil.which("xprop") is None:
    return None
  try:
    root = subprocess.run(["xprop", "-root", "_NET_ACTIVE_WINDOW"], capture_output=True,
                          text=True, timeout=2).stdout
    window = re.search(r"window id # (0x[0-9a-f]+)", root)
    if window is None or int(window.group(1), 16) == 0:
      return None
    name = subprocess.run(["xprop", "-id", window.group(1), "_NET_WM_NAME", "WM_NAME"],
                          capture_output=True, text=True, timeout=2).stdout
  except (OSError, subprocess.TimeoutExpired):
    return None
  found = re.search(r'= "(.*)"', name)
  return found.group(1) if found else None


class Screen:
  def __init__(self, capture: Capture):
    self.capture = capture
    self.blocklist = [re.compile(p) for p in capture.cfg.window_blocklist]
    self._last_pixels: str | None = None
    self._last_text: str | None = None

  def unavailable(self) -> str | None:
    """Why the screen cannot be captured here, or None."""
    if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
      return "no display (DISPLAY is not set)"
    try:
      import mss  # noqa: F401
    except ImportError:
      return "screen capture needs the capture extra (mss is not installed)"
    return None

  def grab(self) -> int:
    """One look at the screen; returns the items captured (0 or 1)."""
    title = active_window_title()
    if title is not None and any(p.search(title) for p in self.blocklist):
      self.capture.skip("a blocked window", "the screen")
      return 0
    import mss
    from PIL import Image
    try:
      with mss.MSS() as screens:
        shot = screens.grab(screens.monitors[0])
    except Exception as err:  # mss raises its own ScreenShotError, and OSErrors
      self.capture.skip(f"screenshot failed ({type(err).__name__})", "the screen")
      return 0
    pixels = hashlib.sha256(shot.rgb).hexdigest()
    if pixels == self._last_pixels:
      return 0  # unchanged
    self._last_pixels = pixels
    try:
      text = media.image_text(Image.frombytes("RGB", shot.size, shot.rgb))
    except media.MediaError as err:
      self.capture.skip(str(err), "the screen")
      return 0
    if not text.strip() or normalise(text) == self._last_text:
      return 0  # nothing to read, or what was read last time: merged
    self._last_text = normalise(text)
    return self.capture.offer(Item(text, "screen", title or "screen"))

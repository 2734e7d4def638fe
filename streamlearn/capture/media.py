"""Text from images (OCR) and speech (ASR), offline, for the collectors.

- OCR: Tesseract (Debian's `tesseract-ocr`) through `pytesseract`.
- Speech: `pocketsphinx`, whose wheel carries its English acoustic model, language
  model and dictionary: nothing is downloaded. WAV files of any rate and width are
  mixed to mono and resampled to the 16 kHz, 16-bit samples it decodes.

Each reader returns the text, or raises `MediaError` with one line (a program or
library that is missing, a file it cannot read); the collector counts and skips.
The libraries are imported on first use: capture without images or audio never
needs them (they are the `capture` extra).
"""

from __future__ import annotations

import functools
import threading
import wave
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp")
AUDIO_SUFFIXES = (".wav",)
SPEECH_RATE = 16_000
SILENCE_RMS = 100.0  # int16 units: ~-50 dBFS


class MediaError(Exception):
  """An image or a recording that could not be read, in one line."""


def image_text(image) -> str:
  """The text Tesseract reads in an image (a path or a PIL image)."""
  try:
    import pytesseract
    from PIL import Image, UnidentifiedImageError
  except ImportError as err:
    raise MediaError(f"OCR needs the capture extra ({err.name} is not installed)") from None
  try:
    picture = Image.open(image) if isinstance(image, (str, Path)) else image
    return pytesseract.image_to_string(picture.convert("RGB"))
  except pytesseract.TesseractNotFoundError:
    raise MediaError("OCR needs tesseract (Debian: apt-get install tesseract-ocr)") from None
  except (UnidentifiedImageError, OSError) as err:
    raise MediaError(f"not an image it can read ({type(err).__name__})") from None


def _samples(path: str | Path) -> np.ndarray:
  """A WAV file as 16 kHz mono int16 samples."""
  try:
    with wave.open(str(path)) as w:
      rate, channels, width = w.getframerate(), w.getnchannels(), w.getsampwidth()
      raw = w.readframes(w.getnframes())
  except (wave.Error, EOFError, OSError) as err:
    raise MediaError(f"not a WAV file it can read ({err})") from None
  if width not in (1, 2, 4):
    raise MediaError(f"{8 * width}-bit samples: expected 8, 16 or 32")
  kind = {1: np.uint8, 2: np.int16, 4: np.int32}[width]
  x = np.frombuffer(raw, kind).astype(np.float64)
  if width == 1:
    x = (x - 128.0) * 256.0
  elif width == 4:
    x /= 65536.0
  x = x.reshape(-1, channels).mean(axis=1)
  if rate != SPEECH_RATE and len(x):
    n = int(len(x) * SPEECH_RATE / rate)
    x = np.interp(np.linspace(0, len(x) - 1, n), np.arange(len(x)), x)
  return np.clip(x, -32768, 32767).astype(np.int16)


_decoding = threading.Lock()  # one decoder, one utterance at a time


@functools.cache
def _decoder():
  try:
    from pocketsphinx import Decoder
  except ImportError:
    raise MediaError("speech needs the capture extra (pocketsphinx is not installed)") from None
  return Decoder(samprate=SPEECH_RATE, loglevel="FATAL")


def speech_text(path: str | Path) -> str:
  """The words pocketsphinx hears in a WAV file ('' for silence)."""
  samples = _samples(path)
  # Silence (below about -50 dBFS) is no speech: the decoder would still guess a word.
  if not len(samples) or np.sqrt(np.mean(samples.astype(np.float64) ** 2)) < SILENCE_RMS:
    return ""
  with _decoding:
    decoder = _decoder()
    decoder.start_utt()
    decoder.process_raw(samples.tobytes(), full_utt=True)
    decoder.end_utt()
    hypothesis = decoder.hyp()
  return hypothesis.hypstr if hypothesis is not None else ""

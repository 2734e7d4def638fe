"""Capture: throughput through redaction and dedup, OCR and speech speed, redaction recall.

    python scripts/bench_capture.py [--prose FILE] [--seed 1]

1. Throughput: ~2 KB items of stdlib source (with planted PII in every tenth) through
   `Capture.offer` into a spool on disk: items/s and MB/s.
2. OCR: a 1280x720 screen of rendered text through Tesseract, seconds per screen.
3. Speech: a flite sentence through pocketsphinx: the real-time factor (decode / audio).
4. Redaction: recall per kind on a generated planted-PII set (every kind, >= 200 cases,
   values drawn with --seed, never the tests' cases), and findings per MB on prose (--prose,
   default pydoc's topics) and on the standard library's source: false positives, apart from
   the real e-mail and IP addresses that code and docs hold.
Prints Markdown tables for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import collections
import random
import shutil
import string
import subprocess
import sys
import sysconfig
import tempfile
import time
import wave
from pathlib import Path


def luhn_complete(digits: str) -> str:
  for last in "0123456789":
    candidate = digits + last
    total = 0
    for i, d in enumerate(reversed(candidate)):
      n = int(d) * (2 if i % 2 else 1)
      total += n - 9 if n > 9 else n
    if total % 10 == 0:
      return candidate
  raise AssertionError


def iban(rng: random.Random, country: str, length: int) -> str:
  bank = "".join(rng.choice(string.ascii_uppercase) for _ in range(4)) if country == "GB" else ""
  bban = bank + "".join(rng.choice(string.digits) for _ in range(length - 4 - len(bank)))
  moved = bban + country + "00"
  check = 98 - int("".join(str(int(c, 36)) for c in moved)) % 97
  return f"{country}{check:02d}{bban}"


def planted(rng: random.Random) -> list[tuple[str, str, str]]:
  """(sentence, kind, value) cases: every kind, in several shapes."""
  word = lambda n: "".join(rng.choice(string.ascii_lowercase) for _ in range(n))
  mixed = lambda n: "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(n))
  digits = lambda n: "".join(rng.choice(string.digits) for _ in range(n))
  cases = []
  for _ in range(20):
    value = f"{word(5)}.{word(4)}@{word(6)}.{rng.choice(['com', 'org', 'de', 'co.uk'])}"
    cases.append((f"Please write to {value} soon.", "EMAIL", value))
    value = rng.choice([f"+1 {digits(3)} {digits(3)} {digits(4)}",
                        f"({digits(3)}) {digits(3)}-{digits(4)}",
                        f"+44 20 {digits(4)} {digits(4)}", f"{digits(3)}-{digits(3)}-{digits(4)}"])
    cases.append((f"Call me on {value} tomorrow.", "PHONE", value))
    card = luhn_complete(rng.choice(["4", "51", "37"]) + digits(14 if rng.random() < .5 else 13))
    value = " ".join(card[i:i + 4] for i in range(0, len(card), 4)) if rng.random() < .5 else card
    cases.append((f"My card is {value}, thanks.", "CARD", value))
    value = f"{rng.randint(100, 665)}-{rng.randint(10, 99)}-{rng.randint(1000, 9999)}"
    cases.append((f"SSN {value} on file.", "SSN", value))
    value = f"{rng.randint(11, 223)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
    cases.append((f"The host at {value} is down.", "IP", value))
    value = f"2001:db8:{rng.randint(1, 65535):x}::{rng.randint(1, 65535):x}"
    cases.append((f"Route via {value} now.", "IP", value))
    value = iban(rng, rng.choice(["DE", "GB", "FR", "NL"]), rng.choice([22, 22, 27, 18]))
    cases.append((f"Transfer to {value} please.", "IBAN", value))
    value = rng.choice([f"AKIA{''.join(rng.choice(string.ascii_uppercase + string.digits) for _ in range(16))}",
                        f"ghp_{mixed(36)}", f"sk-{mixed(40)}", f"xoxb-{digits(12)}-{mixed(16)}",
                        f"hf_{mixed(34)}", f"AIza{mixed(35)}"])
    cases.append((f"key: use {value} here", "TOKEN", value))
    value = mixed(rng.randint(8, 16)) + rng.choice("!#%&")
    cases.append((f"password: {value}", "SECRET", value))
    value = mixed(28)
    cases.append((f"the api token is {value}", "SECRET", value))
    value = f"{word(5)}:{mixed(10)}"
    cases.append((f"postgres://{value}@db.{word(5)}.com/app", "CREDENTIALS", value.split(":")[1]))
    value = f"eyJ{mixed(20)}.eyJ{mixed(30)}.{mixed(40)}"
    cases.append((f"Bearer {value}", "JWT", value))
    value = mixed(60)
    cases.append((f"-----BEGIN PRIVATE KEY-----\n{value}\n-----END PRIVATE KEY-----", "PRIVATE_KEY",
                  value))
  return cases


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--prose", default=None, help="a text file of prose (default: pydoc topics)")
  parser.add_argument("--seed", type=int, default=1)
  args = parser.parse_args(argv)

  from streamlearn.capture import media
  from streamlearn.capture.collect import Capture
  from streamlearn.capture.redact import redact
  from streamlearn.capture.spool import Item, Spool
  from streamlearn.config import load_config

  rng = random.Random(args.seed)
  cases = planted(rng)

  # 1. throughput
  stdlib = Path(sysconfig.get_paths()["stdlib"])
  source = "".join(p.read_text(errors="replace") for p in sorted(stdlib.glob("*.py"))[:120])
  items = [source[i:i + 2000] for i in range(0, len(source), 2000)]
  items = [t + (f"\n{cases[k % len(cases)][0]}\n" if k % 10 == 0 else "")
           for k, t in enumerate(items)]
  with tempfile.TemporaryDirectory() as tmp:
    cfg = load_config(None, []).capture
    capture = Capture(cfg, Spool(tmp, cfg.segment_bytes))
    started = time.perf_counter()
    for k, text in enumerate(items):
      capture.offer(Item(text, "bench", f"item {k}"))
    took = time.perf_counter() - started
    n_bytes = sum(len(t.encode()) for t in items)
  print("| items | MB | items/s | MB/s |\n|---|---|---|---|")
  print(f"| {len(items):,} | {n_bytes / 1e6:.2f} | {len(items) / took:,.0f} | "
        f"{n_bytes / 1e6 / took:.2f} |\n")

  # 2. OCR seconds per screen, 3. speech real-time factor
  from PIL import Image, ImageDraw, ImageFont
  screen = Image.new("RGB", (1280, 720), "white")
  draw = ImageDraw.Draw(screen)
  try:
    font = ImageFont.truetype("DejaVuSans.ttf", 18)
  except OSError:
    font = ImageFont.load_default(size=18)
  lines = [line for line in source.splitlines() if line.strip()][:30]
  for i, line in enumerate(lines):
    draw.text((10, 10 + 23 * i), line[:110], fill="black", font=font)
  times = []
  for _ in range(3):
    started = time.perf_counter()
    media.image_text(screen)
    times.append(time.perf_counter() - started)
  ocr = sorted(times)[1]
  rtf = None
  if shutil.which("flite"):
    with tempfile.TemporaryDirectory() as tmp:
      wav = Path(tmp) / "s.wav"
      subprocess.run(["flite", "-t", "the weather is nice today and i want to go home after "
                      "the meeting on thursday", "-o", str(wav)], check=True)
      with wave.open(str(wav)) as w:
        seconds = w.getnframes() / w.getframerate()
      media.speech_text(wav)  # the decoder loads its model once
      started = time.perf_counter()
      media.speech_text(wav)
      rtf = (time.perf_counter() - started) / seconds
  print("| OCR, 1280x720 screen of 30 text lines | speech real-time factor |\n|---|---|")
  print(f"| {ocr:.2f} s | {rtf:.2f} |\n" if rtf is not None else f"| {ocr:.2f} s | (no flite) |\n")

  # 4. redaction recall and findings on ordinary text
  found, by_kind = collections.Counter(), collections.Counter()
  for sentence, kind, value in cases:
    out, counts = redact(sentence)
    by_kind[kind] += 1
    if value not in out and counts[kind]:
      found[kind] += 1
  print("| kind | cases | redacted |\n|---|---|---|")
  for kind in sorted(by_kind):
    print(f"| {kind} | {by_kind[kind]} | {found[kind] / by_kind[kind]:.0%} |")
  print(f"| all | {sum(by_kind.values())} | {sum(found.values()) / sum(by_kind.values()):.1%} |\n")
  if args.prose:
    prose = Path(args.prose).read_text(errors="replace")
  else:
    from pydoc_data import topics
    prose = "\n\n".join(topics.topics.values())
  code = "".join(p.read_text(errors="replace") for p in sorted(stdlib.glob("*.py")))
  print("| text | MB | findings per MB, by kind |\n|---|---|---|")
  for name, text in (("prose", prose), ("stdlib source", code)):
    _, counts = redact(text)
    mb = len(text.encode()) / 1e6
    per = ", ".join(f"{k} {v / mb:.1f}" for k, v in sorted(counts.items())) or "none"
    print(f"| {name} | {mb:.1f} | {per} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())

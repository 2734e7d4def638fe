"""PII and secrets out of captured text, in memory, before anything is written.

`redact(text)` returns the text with each finding replaced by a typed
placeholder (`<EMAIL>`, `<CARD>`, ...) and the count per kind; the values
themselves are never kept. Patterns run from the most specific to the least
(a private-key block before the e-mail inside it; a URL's credentials before
its host name), each on the text the earlier ones left. Numbers that only look
like a kind are checked before they are replaced: cards by the Luhn sum, IBANs
by their mod-97 check, IP addresses by `ipaddress`, so version numbers, dates
and ordinary figures in prose and code stay as they are.

Why our own regexes: the notes in ../shared/notes list what the libraries do
offline (Presidio needs a spaCy model and fetches a suffix list; scrubadub
mangles e-mails and misses cards, IPs and keys); gitleaks' rules and
screenpipe's PII list are the model for what is covered here.
"""

from __future__ import annotations

import collections
import ipaddress
import math
import re

# --- secrets with a shape of their own -------------------------------------------------------

_PRIVATE_KEY = re.compile(
    r"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY( BLOCK)?-----.*?(-----END \1PRIVATE KEY( BLOCK)?-----|\Z)",
    re.S)
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")
_TOKEN = re.compile(
    r"\b(?:"
    r"(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{16}"  # AWS access key ids
    r"|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,}"  # GitHub
    r"|glpat-[A-Za-z0-9_-]{20,}"                               # GitLab
    r"|sk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}"                   # OpenAI, Anthropic
    r"|xox[abprse]-[A-Za-z0-9-]{10,}"                          # Slack
    r"|AIza[0-9A-Za-z_-]{35}"                                  # Google API keys
    r"|hf_[A-Za-z0-9]{30,}"                                    # Hugging Face
    r"|(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{20,}"            # Stripe
    r"|npm_[A-Za-z0-9]{36}"                                    # npm
    r")")
# scheme://user:password@host — the credentials go, the rest of the URL stays.
_URL_CREDENTIALS = re.compile(r"\b([a-z][a-z0-9+.-]{1,20}://)[^\s:/@]+:[^\s@/]+@", re.I)
# `password: hunter2`, `api_key = "..."`, `token=...`: the label stays, the value goes. The
# label ends in the secret word (`token_type = ...` is code, not a secret), and the value is a
# literal: quoted without spaces, or bare with a digit or a symbol and no brackets (`token =
# self[0]`, `password = getpass()` and `token = None` are code).
_LABELLED = re.compile(
    r"(?i)\b((?:[a-z0-9_-]*(?:password|passwd|pwd|passphrase|secret|token|api[_-]?key|"
    r"access[_-]?key|private[_-]?key))"
    r"[\"']?\s*(?::|=|:=|=>)\s*)"
    r"(\"[^\"\s]{4,}\"|'[^'\s]{4,}'|[^\s,;\"'()\[\]{}<>]{4,}(?![(\[.\w]))")
_SECRET_WORD = re.compile(r"(?i)(password|passwd|secret|token|api[_ -]?key|credential|bearer)")
_HIGH_ENTROPY = re.compile(r"\b[A-Za-z0-9+/_=-]{24,}\b")

# --- personal data -------------------------------------------------------------------------

_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b")
_CARD = re.compile(r"(?<![\d.-])\d(?:[ -]?\d){12,18}(?![\d-])")
_SSN = re.compile(r"\b(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}\b")
_PHONE = re.compile(
    r"(?<![\w+.-])(?:"
    r"\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){2,4}"  # +44 20 7946 0958
    r"|\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}"                                    # (555) 123-4567
    r"|\d{3}[.-]\d{3}[.-]\d{4}"                                            # 555-123-4567
    r"|0\d{2,4}[ -]\d{3,4}[ -]?\d{3,4}"                                    # 020 7946 0958
    r")(?![\w-])(?!\.\d)")
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w.])")
_IPV6 = re.compile(r"(?<![\w:])(?=[0-9A-Fa-f:]*:[0-9A-Fa-f:]*:)[0-9A-Fa-f:]{2,39}(?:%\w+)?(?![\w:])")

# Speech spells things out: "five five five one two three four", "bob at example dot com".
_NUMBER_WORD = r"(?:zero|oh|one|two|three|four|five|six|seven|eight|nine|double \w+)"
_SPOKEN_NUMBER = re.compile(rf"(?i)\b{_NUMBER_WORD}(?:[ ,-]+{_NUMBER_WORD}){{6,}}\b")
_SPOKEN_EMAIL = re.compile(
    r"(?i)\b[a-z0-9]+(?: (?:dot|underscore) [a-z0-9]+)* at [a-z0-9]+(?: dot [a-z0-9]+)*"
    r" dot (?:com|org|net|edu|gov|io|co|uk|de|fr|info|biz|me)\b")

KINDS = ("PRIVATE_KEY", "JWT", "TOKEN", "CREDENTIALS", "SECRET", "EMAIL", "IBAN", "CARD", "SSN",
         "PHONE", "IP", "NUMBER")


def _literal(value: str) -> bool:
  """Whether a labelled value is a secret's text rather than code or a placeholder."""
  if value[0] in "\"'":
    return not value[1:-1].startswith(("<", "${", "{{", "%("))
  return (bool(re.search(r"[\d!@#$%^&*+/=?~-]", value))
          and not re.fullmatch(r"[A-Za-z_][\w.]*", value))


def _luhn(digits: str) -> bool:
  total = 0
  for i, d in enumerate(reversed(digits)):
    n = int(d) * (2 if i % 2 else 1)
    total += n - 9 if n > 9 else n
  return total % 10 == 0


def _iban_ok(text: str) -> bool:
  s = text.replace(" ", "")
  if not 15 <= len(s) <= 34:
    return False
  moved = s[4:] + s[:4]
  return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def _entropy(s: str) -> float:
  counts = collections.Counter(s)
  return -sum(c / len(s) * math.log2(c / len(s)) for c in counts.values())


def _ipv6_ok(text: str) -> bool:
  bare = text.split("%")[0]
  if max(len(group) for group in bare.split(":")) < 3:  # slices (x[1::2]) and such
    return False
  try:
    address = ipaddress.IPv6Address(bare)
  except ValueError:
    return False
  return not (address.is_loopback or address.is_unspecified)  # ::1 and :: are no one's


def _ipv4_ok(text: str) -> bool:
  try:
    address = ipaddress.IPv4Address(text)
  except ValueError:
    return False
  return not (address.is_loopback or address.is_unspecified)  # 127.0.0.1 and 0.0.0.0


def redact(text: str, spoken: bool = False) -> tuple[str, collections.Counter]:
  """(the text with every finding replaced by <KIND>, the count per kind). `spoken`: the
  text is transcribed speech, where seven or more digits said one by one are a <NUMBER>
  (a phone, a card, an account) and "name at host dot com" is an <EMAIL>."""
  counts: collections.Counter = collections.Counter()
  if spoken:
    for pattern, kind in ((_SPOKEN_EMAIL, "EMAIL"), (_SPOKEN_NUMBER, "NUMBER")):
      text = pattern.sub(lambda m, kind=kind: (counts.update([kind]), f"<{kind}>")[1], text)

  def sub(pattern: re.Pattern, kind: str, s: str, check=None, group: int = 0,
          keep: str = "") -> str:
    def replace(m: re.Match) -> str:
      found = m.group(group)
      if check is not None and not check(found):
        return m.group(0)
      counts[kind] += 1
      prefix = m.group(keep) if keep else ""
      return prefix + f"<{kind}>"
    return pattern.sub(replace, s)

  text = sub(_PRIVATE_KEY, "PRIVATE_KEY", text)
  text = sub(_JWT, "JWT", text)
  text = sub(_TOKEN, "TOKEN", text)
  text = _URL_CREDENTIALS.sub(lambda m: (counts.update(["CREDENTIALS"]), m.group(1) + "<CREDENTIALS>@")[1], text)
  text = _LABELLED.sub(lambda m: (counts.update(["SECRET"]), m.group(1) + "<SECRET>")[1]
                       if _literal(m.group(2)) else m.group(0), text)
  text = _high_entropy_near_secret_words(text, counts)
  text = sub(_EMAIL, "EMAIL", text)
  text = sub(_IBAN, "IBAN", text, check=_iban_ok)
  text = sub(_CARD, "CARD", text,
             check=lambda s: 13 <= len(d := re.sub(r"\D", "", s)) <= 19 and _luhn(d))
  text = sub(_SSN, "SSN", text)
  text = sub(_IPV4, "IP", text, check=_ipv4_ok)
  text = sub(_IPV6, "IP", text, check=_ipv6_ok)
  text = sub(_PHONE, "PHONE", text, check=lambda s: 7 <= len(re.sub(r"\D", "", s)) <= 15)
  return text, counts


def _high_entropy_near_secret_words(text: str, counts: collections.Counter) -> str:
  """Long random-looking strings within a line of a word like 'token' or 'password'."""
  out = []
  for line in text.split("\n"):
    if _SECRET_WORD.search(line):
      def replace(m: re.Match) -> str:
        s = m.group(0)
        # Keys mix digits and letters; identifiers (initial_response_ok=True) do not.
        mixed = re.search(r"\d", s) and re.search(r"[A-Za-z]", s)
        if mixed and _entropy(s) >= 3.5 and "_" not in s.strip("_"):
          counts["SECRET"] += 1
          return "<SECRET>"
        return s
      line = _HIGH_ENTROPY.sub(replace, line)
    out.append(line)
  return "\n".join(out)

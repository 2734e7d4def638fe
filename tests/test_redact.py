"""Redaction: every kind of PII replaced by its placeholder, ordinary text left alone."""

import json
from pathlib import Path

import pytest

from streamlearn.capture.redact import redact

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

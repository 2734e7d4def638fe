"""Capture from the user's environment: collectors (collect.py, push.py), redaction and dedup in
memory (redact.py), and the spool of plain-text segments a learner reads (spool.py)."""

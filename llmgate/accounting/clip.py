# -*- test-case-name: tests.accounting.test_clip -*-
"""
Caps on the strings from clients that reach the ledger and the logs.

A model name is whatever the client put in its body (up to the body cap,
32 MB), a route whatever path it asked for; with a default provider an
unknown model is even passed upstream, and its name comes back in the
record. Each such field is cut to L{MAX_CHARS}, with a marker saying how
much was cut, so one request cannot write megabytes into the ledger or a
log line, and a cut value cannot be mistaken for a real name.
"""

from __future__ import annotations

import dataclasses
from typing import Any

MAX_CHARS = 256

# UsageRecord fields that can carry a client's (or an upstream's) string.
_FIELDS = ("key_name", "route", "model", "provider", "upstream_model", "upstream_id", "served_model")


def clip(value: str, limit: int = MAX_CHARS) -> str:
    """C{value}, or its first C{limit} characters and a marker."""
    if len(value) <= limit:
        return value
    return f"{value[:limit]}...[{len(value) - limit} more chars]"


def clip_record(rec: Any) -> Any:
    """C{rec}, or a copy of it with its long string fields clipped."""
    # Every request's record passes here: the common case (nothing long)
    # with no dict built.
    for name in _FIELDS:
        v = getattr(rec, name)
        if isinstance(v, str) and len(v) > MAX_CHARS:
            break
    else:
        return rec
    long = {
        name: clip(v)
        for name in _FIELDS
        if isinstance(v := getattr(rec, name), str) and len(v) > MAX_CHARS
    }
    return dataclasses.replace(rec, **long) if long else rec

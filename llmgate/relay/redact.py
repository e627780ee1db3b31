# -*- test-case-name: tests.relay.test_redact -*-
"""
Redaction of the provider's secrets from what an upstream sends back.

Providers quote what they were sent: an invalid or revoked key in a 400
("Incorrect API key provided: sk-proj-****abcd"), the organization in a 429
("Rate limit reached for ... in organization org-... on tokens"). Relayed
as is, those reach every client of the gateway. Error bodies and response
headers go through L{Redactor} before they are relayed.

What is replaced by C{[redacted]}:
  - the configured key itself (when at least 8 characters: a shorter one
    is not a real key, and replacing every occurrence of one letter would
    garble the body);
  - anything shaped like an OpenAI or Anthropic key, masked or not
    (C{sk-...}), so a partial quote of the key goes too;
  - OpenAI organization and project ids (C{org-...}, C{proj_...}).
The patterns need a word start, so C{task-1} or C{proj_name} in prose
are not touched (C{proj_} needs 8 id characters).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Iterable, Optional

REPLACEMENT = b"[redacted]"

_START = rb"(?<![A-Za-z0-9_\-])"
_PATTERNS = (
    _START + rb"sk-[A-Za-z0-9_\-*]{3,}",
    _START + rb"org-[A-Za-z0-9]+",
    _START + rb"proj_[A-Za-z0-9]{8,}",
)

_LITERALS = (b"sk-", b"org-", b"proj_")

MIN_EXACT_SECRET = 8


class Redactor:
    """Replaces the secrets it was built with, and key-shaped strings."""

    __slots__ = ("_rx", "_literals")

    def __init__(self, secrets: Iterable[Optional[str]] = ()) -> None:
        exact = sorted(
            {s.encode("utf-8") for s in secrets if s and len(s) >= MIN_EXACT_SECRET},
            key=len,
            reverse=True,
        )
        self._rx = re.compile(b"|".join([re.escape(s) for s in exact] + list(_PATTERNS)))
        # Every match contains one of these: substring tests (memchr speed)
        # spare the regex scan on the usual value, which has no secret. It
        # runs on every relayed header value.
        self._literals = tuple(exact) + _LITERALS

    def needed(self, data: bytes) -> bool:
        """Whether C{data} may hold something to redact (cheap; no false negatives)."""
        for lit in self._literals:
            if lit in data:
                return True
        return False

    def __call__(self, data: bytes) -> bytes:
        if not self.needed(data):
            return data
        return self._rx.sub(REPLACEMENT, data)


@lru_cache(maxsize=256)
def redactor_for(*secrets: Optional[str]) -> Redactor:
    """One compiled L{Redactor} per set of secrets (per provider)."""
    return Redactor(secrets)

# -*- test-case-name: tests.accounting.test_bigbody -*-
"""
The usage of a non-streaming JSON body too large to keep whole.

A 20 MB embeddings answer or a very long completion still carries its
C{"usage"} -- and C{id}, C{model}, C{error} -- as small top-level members,
which every provider puts at the start or at the end of the object.  So
only the first and last few tens of KiB are kept (L{HeadTail}), whatever
the body's size, and L{members} recovers the complete top-level members
found in them:

  - the head is read forward from the opening C{"{"}, member by member,
    until one is cut off by the head's end;
  - the tail is read backward from the closing C{"}"}, tracking string and
    bracket state (a string is known from its closing quote: inside a JSON
    string every quote is escaped), splitting at the commas of depth 1,
    until the tail's start; the member cut by the tail's start is dropped.

A C{"usage"} nested deeper, or inside a string, is never taken for the
top-level one.  Pure functions, no I/O: run them off the reactor thread.
"""

from __future__ import annotations

import json
import re
from collections import deque
from typing import Any, Deque

HEAD_BYTES = 64 * 1024
TAIL_BYTES = 64 * 1024

_WS = " \t\r\n"
_STRUCTURAL = re.compile(rb'[{}\[\],"]')
_QUOTE = re.compile(rb'"')


class HeadTail:
    """
    Keeps the first C{head} and the last C{tail} bytes of a body fed in
    pieces: O(1) per piece, at most C{head + tail} bytes plus one piece.
    """

    __slots__ = ("_head", "_head_len", "_head_cap", "_tail", "_tail_len", "_tail_cap")

    def __init__(self, head: int = HEAD_BYTES, tail: int = TAIL_BYTES) -> None:
        self._head: list[bytes] = []
        self._head_len = 0
        self._head_cap = head
        self._tail: Deque[bytes] = deque()
        self._tail_len = 0
        self._tail_cap = tail

    def feed(self, data: bytes) -> None:
        room = self._head_cap - self._head_len
        if room > 0:
            piece = data[:room]
            self._head.append(piece)
            self._head_len += len(piece)
        if len(data) > self._tail_cap:
            data = data[-self._tail_cap :]
        tail = self._tail
        tail.append(data)
        self._tail_len += len(data)
        while self._tail_len - len(tail[0]) >= self._tail_cap:
            self._tail_len -= len(tail.popleft())

    @property
    def kept(self) -> int:
        """Bytes held."""
        return self._head_len + self._tail_len

    def members(self) -> dict[str, Any]:
        """The complete top-level members found in the head and the tail."""
        return members(b"".join(self._head), b"".join(self._tail))


def members(head: bytes, tail: bytes) -> dict[str, Any]:
    """
    The complete top-level members of a JSON object whose first bytes are
    C{head} and last bytes C{tail}; tail members win over head ones.
    """
    found = head_members(head)
    found.update(tail_members(tail))
    return found


def _skip_ws(text: str, i: int) -> int:
    n = len(text)
    while i < n and text[i] in _WS:
        i += 1
    return i


def head_members(head: bytes) -> dict[str, Any]:
    """
    The top-level members of the object C{head} starts, up to the first
    one C{head} does not hold whole.
    """
    # A multi-byte character cut by the head's end only spoils the member
    # that is cut anyway.
    text = head.decode("utf-8", "replace")
    decoder = json.JSONDecoder()
    out: dict[str, Any] = {}
    i = _skip_ws(text, 0)
    if text[i : i + 1] != "{":
        return out
    i += 1
    while True:
        i = _skip_ws(text, i)
        if text[i : i + 1] != '"':
            return out
        try:
            key, i = decoder.raw_decode(text, i)
            i = _skip_ws(text, i)
            if text[i : i + 1] != ":":
                return out
            value, i = decoder.raw_decode(text, _skip_ws(text, i + 1))
        except ValueError:
            return out  # cut by the head's end (or not JSON)
        i = _skip_ws(text, i)
        # Only a following "," or "}" proves the value whole: a number or
        # literal cut by the head's end would parse as a shorter one.
        if text[i : i + 1] not in (",", "}"):
            return out
        out[key] = value
        if text[i] == "}":
            return out
        i += 1


def _escaped(rev: bytes, q: int) -> bool | None:
    """
    Whether the quote at C{rev[q]} (a reversed text) is escaped: an odd
    number of backslashes before it in the text.  None if those run to the
    edge of what is kept (undecidable).
    """
    j = q + 1
    n = len(rev)
    while j < n and rev[j] == 0x5C:
        j += 1
    if j == n:
        return None
    return (j - q - 1) % 2 == 1


def tail_members(tail: bytes) -> dict[str, Any]:
    """
    The top-level members of the object C{tail} ends, back to the first
    one C{tail} does not hold whole.
    """
    t = tail.rstrip(b" \t\r\n")
    if not t.endswith(b"}"):
        return {}
    n = len(t)
    rev = t[::-1]
    segments: list[tuple[int, int]] = []  # [start, end) in t, last first
    end = n - 1  # the closing brace: the last member ends before it
    depth = 1
    k = 1
    while True:
        m = _STRUCTURAL.search(rev, k)
        if m is None:
            break  # reached the tail's start inside a member: it is cut
        j = m.start()
        c = rev[j]
        if c == 0x22:  # '"': a string's closing quote; find its opening one
            q = j + 1
            while True:
                mq = _QUOTE.search(rev, q)
                if mq is None:
                    q = -1
                    break
                q = mq.start()
                escaped = _escaped(rev, q)
                if escaped is None:
                    q = -1
                    break
                if not escaped:
                    break
                q += 1
            if q < 0:
                break
            k = q + 1
            continue
        k = j + 1
        i = n - 1 - j  # index in t
        if c in (0x7D, 0x5D):  # } ]
            depth += 1
        elif c in (0x7B, 0x5B):  # { [
            depth -= 1
            if depth == 0:
                segments.append((i + 1, end))
                break
        elif depth == 1:  # ","
            segments.append((i + 1, end))
            end = i
    out: dict[str, Any] = {}
    for start, stop in reversed(segments):
        try:
            member = json.loads(b"{" + t[start:stop] + b"}")
        except ValueError:
            continue
        if isinstance(member, dict):
            out.update(member)
    return out


__all__ = ["HEAD_BYTES", "TAIL_BYTES", "HeadTail", "head_members", "members", "tail_members"]

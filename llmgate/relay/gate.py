# -*- test-case-name: tests.relay.test_gate -*-
"""
The first-content gate: what in the start of an event stream is content.

While routing may still act on an attempt whose 200 event-stream headers
came in (another attempt could follow, or a hedge runs), the relay holds
the status line and the first events (L{llmgate.relay.stream.GATED}) and
asks, for each run of whole events it reads, what L{scan} says:

 - C{CONTENT}: an event the client must see as this attempt's answer
   (OpenAI: a chunk whose delta has any non-empty field but C{role}, a
   completion's text, a finish reason, or any event that is not a known
   preamble; Anthropic: C{content_block_*}, C{message_delta},
   C{message_stop}): the attempt commits.
 - C{ERROR}: an Anthropic C{error} event before any content: the attempt
   failed before the first byte (like a 529), and may be retried.
 - C{WAIT}: only preamble (C{message_start}, C{ping}, a role-only chunk,
   C{response.created}, comments): keep holding.

Only the held prefix of a stream is scanned, and only until the commit:
the gate costs nothing once the stream flows.
"""

from __future__ import annotations

import json
from typing import Any

from llmgate.dialects.sse import EventStreamParser, EventTooLarge

WAIT = "wait"
CONTENT = "content"
ERROR = "error"

# Events held at most this many bytes: past it the attempt commits anyway
# (nothing a well-behaved provider sends before content comes near it).
MAX_HELD = 64 * 1024

# Anthropic events that are not content.
_ANTHROPIC_PREAMBLE = frozenset({"message_start", "ping"})
# OpenAI Responses API events that are not content.
_RESPONSES_PREAMBLE = frozenset({"response.created", "response.in_progress", "response.queued"})
# Fields of a chat delta / choice that say nothing yet.
_NOT_CONTENT = frozenset({"role", "index", "logprobs"})


def _empty(value: Any) -> bool:
    return value is None or value == "" or value == [] or value == {}


def _openai_content(doc: Any) -> bool:
    if not isinstance(doc, dict):
        return True
    kind = doc.get("type")
    if isinstance(kind, str):
        return kind not in _RESPONSES_PREAMBLE
    choices = doc.get("choices")
    if not isinstance(choices, list):
        # Not a chat/completions chunk (an error, a usage-only chunk...):
        # relay it as this attempt's.
        return True
    for choice in choices:
        if not isinstance(choice, dict):
            return True
        if not _empty(choice.get("finish_reason")) or not _empty(choice.get("text")):
            return True
        delta = choice.get("delta")
        if isinstance(delta, dict):
            for k, v in delta.items():
                if k not in _NOT_CONTENT and not _empty(v):
                    return True
    # Usage-only chunk (choices: []): the stream is ending; its end commits.
    return not choices and "usage" not in doc


class Gate:
    """
    Scans the held start of one event stream (L{scan}); C{anthropic}: the
    stream is in the Anthropic dialect.
    """

    __slots__ = ("_parser", "_anthropic")

    def __init__(self, anthropic: bool) -> None:
        self._parser = EventStreamParser(MAX_HELD)
        self._anthropic = anthropic

    def scan(self, data: bytes) -> str:
        """What the whole events in C{data} say (see the module docstring)."""
        try:
            events = self._parser.feed(data)
        except EventTooLarge:
            return CONTENT
        for name, payload in events:
            verdict = self._event(name, payload)
            if verdict is not WAIT:
                return verdict
        return WAIT

    def _event(self, name: Any, payload: bytes) -> str:
        if self._anthropic:
            kind = name.decode("latin-1") if name else None
            if kind is None:
                try:
                    doc = json.loads(payload)
                except ValueError:
                    return CONTENT
                kind = doc.get("type") if isinstance(doc, dict) else None
            if kind in _ANTHROPIC_PREAMBLE:
                return WAIT
            if kind == "error":
                return ERROR
            return CONTENT
        if payload.strip() == b"[DONE]":
            return CONTENT
        try:
            doc = json.loads(payload)
        except ValueError:
            return CONTENT
        return CONTENT if _openai_content(doc) else WAIT


def error_message(data: bytes) -> str:
    """The message of the first Anthropic C{error} event in C{data}."""
    for _, payload in EventStreamParser().feed(data):
        try:
            doc = json.loads(payload)
        except ValueError:
            continue
        if isinstance(doc, dict) and doc.get("type") == "error":
            err = doc.get("error")
            if isinstance(err, dict):
                return f"upstream stream began with an error event ({str(err.get('type', 'error'))[:60]})"
    return "upstream stream began with an error event"

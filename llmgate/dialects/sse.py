# -*- test-case-name: tests.dialects.test_sse -*-
"""
Incremental parser for ``text/event-stream`` bodies (WHATWG "event stream
interpretation" of the HTML standard, section 9.2.6).

The gateway relays upstream bytes verbatim and feeds a copy through this
parser only to count tokens, so the parser:

  - works on bytes and splits only on CR/LF bytes, so a multi-byte UTF-8
    character split across reads is reassembled byte-exactly;
  - accepts LF, CRLF and lone CR, including a CR at the end of one read
    followed by the LF at the start of the next (one line end, not two);
  - never rescans bytes it has already scanned (the unterminated last line is
    kept as a list of pieces), so cost is linear in the stream length;
  - caps a single event at ``max_event_bytes`` because a hostile or broken
    upstream could otherwise grow the buffer without bound;
  - drops a partial event at EOF (WHATWG: it is not dispatched).

It runs for every chunk of every stream, so the common case (no pending
partial data, no CR in the chunk, whole ``...\\n\\n`` events) takes a fast
path built on ``bytes.split``.

No reactor, no I/O: pure bookkeeping.
"""

__all__ = ["EventStreamParser", "EventTooLarge", "DEFAULT_MAX_EVENT_BYTES"]

DEFAULT_MAX_EVENT_BYTES = 1024 * 1024

_BOM = b"\xef\xbb\xbf"


class EventTooLarge(ValueError):
    """
    One event (all its lines up to the dispatching blank line) exceeded the
    parser's cap; the stream should be aborted because the parser's state is
    no longer meaningful.
    """

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"SSE event of at least {size} bytes exceeds the {limit} byte cap")
        self.size = size
        self.limit = limit


class EventStreamParser:
    """
    Turn a byte stream into ``(event_name or None, data)`` tuples.

    ``data`` is the event's data lines joined with ``b"\\n"``. Events with no
    ``data`` field are not dispatched (WHATWG). ``id`` and ``retry`` fields
    are kept in L{last_event_id} and L{retry} for completeness; the gateway
    does not need them. Comments (``:`` lines, used as keep-alives) and
    unknown fields are ignored.
    """

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self.max_event_bytes = max_event_bytes
        self.last_event_id: bytes = b""
        self.retry: int | None = None
        # Pieces of the current unterminated line, and their total length.
        self._tail: list[bytes] = []
        self._tail_len = 0
        # The previous chunk ended in CR: a leading LF in the next one is
        # the second half of a CRLF, not a blank line.
        self._cr_pending = False
        # Fields of the event being built.
        self._name: bytes | None = None
        self._data: list[bytes] = []
        # Bytes of complete lines since the last blank line; 0 means the
        # parser is between events.
        self._event_len = 0
        self._bom_check = True

    def feed(self, data: bytes) -> list[tuple[bytes | None, bytes]]:
        """
        Consume one chunk; return the events that it completed, in order.

        @raise EventTooLarge: the pending event is over the cap.
        """
        if self._bom_check:
            data = self._strip_bom(data)
            if data is None:
                return []
        if not data:
            return []
        if self._cr_pending:
            self._cr_pending = False
            if data[:1] == b"\n":
                data = data[1:]
                if not data:
                    return []
        events: list[tuple[bytes | None, bytes]] = []
        if b"\r" in data:
            # Normalise to LF; remember a trailing CR so that an LF at the
            # start of the next chunk is not read as a second line end.
            if data[-1:] == b"\r":
                self._cr_pending = True
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if not self._tail_len and not self._event_len:
            # Fast path: the parser is between events, so every b"\n\n"
            # in the chunk ends an event; only the remainder needs the
            # line state machine.
            blocks = data.split(b"\n\n")
            rest = blocks.pop()
            limit = self.max_event_bytes
            for block in blocks:
                if len(block) > limit:
                    raise EventTooLarge(len(block), limit)
                if block[:6] == b"data: " and b"\n" not in block:
                    events.append((None, block[6:]))
                elif block:
                    for line in block.split(b"\n"):
                        self._line(line, events)
                    self._dispatch(events)
            if not rest:
                return events
            data = rest
        self._lines(data, events)
        return events

    @property
    def between_events(self) -> bool:
        """
        Nothing of a partial event, line, CRLF or byte-order mark is
        pending: bytes of whole LF-terminated events could be skipped here
        (and parsed by another parser) without changing what this one
        makes of the bytes after them.
        """
        return not (self._tail_len or self._event_len or self._cr_pending or self._bom_check)

    def close(self) -> None:
        """
        End of stream: drop any partial line and undispatched event.
        """
        self._tail = []
        self._tail_len = 0
        self._cr_pending = False
        self._reset_event()

    # -- internals -------------------------------------------------------

    def _strip_bom(self, data: bytes) -> bytes | None:
        # WHATWG strips one leading U+FEFF. Hold back up to two bytes that
        # could still be the start of a BOM split across reads.
        head = b"".join(self._tail) + data
        if len(head) < 3 and _BOM.startswith(head):
            self._tail, self._tail_len = [head], len(head)
            return None
        self._tail, self._tail_len = [], 0
        self._bom_check = False
        return head[3:] if head.startswith(_BOM) else head

    def _lines(self, data: bytes, events: list) -> None:
        """Process an LF-only chunk through the line state machine."""
        lines = data.split(b"\n")
        last = lines.pop()
        if lines and self._tail_len:
            self._tail.append(lines[0])
            lines[0] = b"".join(self._tail)
            self._tail = []
            self._tail_len = 0
        limit = self.max_event_bytes
        for line in lines:
            if line:
                self._event_len += len(line) + 1
                if self._event_len > limit:
                    raise EventTooLarge(self._event_len, limit)
                self._line(line, events)
            else:
                self._dispatch(events)
        if last:
            self._tail.append(last)
            self._tail_len += len(last)
            if self._event_len + self._tail_len > limit:
                raise EventTooLarge(self._event_len + self._tail_len, limit)

    def _line(self, line: bytes, events: list) -> None:
        if not line:
            self._dispatch(events)
            return
        if line[0] == 0x3A:  # ":" comment / keep-alive
            return
        colon = line.find(b":")
        if colon < 0:
            field, value = line, b""
        else:
            field = line[:colon]
            value = line[colon + 1 :]
            if value[:1] == b" ":
                value = value[1:]
        if field == b"data":
            self._data.append(value)
        elif field == b"event":
            self._name = value or None
        elif field == b"id":
            if b"\0" not in value:
                self.last_event_id = value
        elif field == b"retry":
            if value.isdigit():  # bytes.isdigit is ASCII-only, as WHATWG wants
                self.retry = int(value)
        # Unknown fields are ignored.

    def _dispatch(self, events: list) -> None:
        if self._data:
            events.append((self._name, b"\n".join(self._data)))
        self._reset_event()

    def _reset_event(self) -> None:
        self._name = None
        self._data = []
        self._event_len = 0

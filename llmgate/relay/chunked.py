# -*- test-case-name: tests.relay.test_chunked -*-
"""
A decoder for upstream response bodies in the I{chunked} transfer coding,
built for event streams: one call per read, not per chunk.

An event-stream upstream writes one chunk per event and, under load, a read
brings one to several of them. Twisted's C{_ChunkedTransferDecoder} walks
each read through a state machine with a method call (found by name) per
state, copies every chunk out of its buffer, and hands each chunk on
separately: at S2's load about a seventh of the relay's CPU per event went
to decoding framing that is a few bytes long. This decoder finds the chunk
boundaries in the read with C{bytes.find}, slices the payloads out, and
hands all the payload of the read on in one call, so the relay (which
already frames events itself) sees one call per read.

It is a drop-in for Twisted's: the same constructor (C{dataCallback},
C{finishCallback}), the same errors (L{_MalformedChunkedDataError} for bad
framing, which makes the client protocol give the connection up;
L{_DataLoss} from C{noMoreData} when the body ended early) and the same
limits (a chunk-size line of at most 1,024 bytes, chunk extensions of legal
characters only, trailers of at most 64 KiB, which are read and dropped).
Payload found before bad framing in the same read is handed on before the
error is raised, as Twisted's decoder does chunk by chunk.
"""

from __future__ import annotations

from typing import Callable

from twisted.web.http import _chunkExtChars, _DataLoss, _MalformedChunkedDataError

# Twisted's limits (twisted.web.http.maxChunkSizeLineLength and the
# decoder's trailer cap), so a body is refused exactly when it would have
# been.
MAX_SIZE_LINE = 1024
MAX_TRAILERS = 2**16

_HEX = frozenset(b"0123456789abcdefABCDEF")
# The characters Twisted allows in a chunk extension.
_EXT_CHARS = frozenset(_chunkExtChars)

# States.
_SIZE, _BODY, _CRLF, _TRAILER, _DONE = range(5)


def _chunk_size(line: bytes) -> int:
    """The size on a chunk-size line (extensions checked and ignored)."""
    semi = line.find(b";")
    raw = line if semi < 0 else line[:semi]
    if semi >= 0 and not _EXT_CHARS.issuperset(line[semi + 1 :]):
        raise _MalformedChunkedDataError(f"Invalid characters in chunk extensions: {line[semi + 1:]!r}.")
    if not raw or not _HEX.issuperset(raw):
        raise _MalformedChunkedDataError("Chunk-size must be an integer.")
    return int(raw, 16)


class ChunkedDecoder:
    """
    Decodes a chunked body, handing each read's payload to C{dataCallback}
    in one call and the bytes after the last chunk to C{finishCallback}.
    """

    __slots__ = ("dataCallback", "finishCallback", "_state", "_left", "_pending", "_trailer_bytes", "__weakref__")

    def __init__(self, dataCallback: Callable[[bytes], None], finishCallback: Callable[[bytes], None]) -> None:
        self.dataCallback = dataCallback
        self.finishCallback = finishCallback
        self._state = _SIZE
        # Payload bytes still to come in the current chunk.
        self._left = 0
        # An incomplete size line, CRLF or trailer line carried to the next read.
        self._pending = b""
        self._trailer_bytes = 0

    def dataReceived(self, data: bytes) -> None:
        out: "list[bytes] | None" = None
        if self._state == _SIZE and not self._pending:
            # The common reads of an event stream: whole chunks (one event
            # each, most often one a read), size lines of hex digits only.
            # Taken here without the general walk; at the first anything
            # else (a part, an extension, the last chunk, bad framing) the
            # walk below goes on from there, and reports what is malformed.
            n = len(data)
            pos = 0
            while True:
                eol = data.find(b"\r\n", pos, pos + 18)
                if eol <= pos:
                    break
                raw = data[pos:eol]
                if not _HEX.issuperset(raw):
                    break
                start = eol + 2
                end = start + int(raw, 16)
                if end == start or data[end : end + 2] != b"\r\n":
                    break
                pos = end + 2
                if out is None:
                    if pos == n:
                        self.dataCallback(data[start:end])
                        return
                    out = [data[start:end]]
                else:
                    out.append(data[start:end])
                    if pos == n:
                        self.dataCallback(b"".join(out))
                        return
            if pos:
                data = data[pos:]
        elif self._state == _DONE:
            raise RuntimeError("ChunkedDecoder.dataReceived called after the last chunk")
        elif self._pending:
            data = self._pending + data
            self._pending = b""
        if out is None:
            out = []
        try:
            rest = self._decode(data, out)
        finally:
            if out:
                self.dataCallback(out[0] if len(out) == 1 else b"".join(out))
        if rest is not None:
            self.finishCallback(rest)

    def _decode(self, data: bytes, out: list[bytes]) -> "bytes | None":
        """
        Walk C{data}, appending payload slices to C{out}; return the bytes
        after the body once it ended, else L{None}.
        """
        pos = 0
        end = len(data)
        state = self._state
        while pos < end:
            if state == _BODY:
                take = self._left
                if end - pos <= take:
                    out.append(data[pos:] if pos else data)
                    self._left = take - (end - pos)
                    return None
                out.append(data[pos : pos + take])
                pos += take
                self._left = 0
                state = self._state = _CRLF
            elif state == _SIZE:
                eol = data.find(b"\r\n", pos, pos + MAX_SIZE_LINE + 1)
                if eol < 0:
                    if end - pos > MAX_SIZE_LINE:
                        raise _MalformedChunkedDataError(
                            f"Chunk size line exceeds maximum of {MAX_SIZE_LINE} bytes."
                        )
                    self._pending = data[pos:]
                    return None
                if eol - pos >= MAX_SIZE_LINE:
                    raise _MalformedChunkedDataError(f"Chunk size line exceeds maximum of {MAX_SIZE_LINE} bytes.")
                line = data[pos:eol]
                # Plain hex (the usual size line) is read as is; anything
                # else is checked (extensions, bad characters).
                size = int(line, 16) if line and _HEX.issuperset(line) else _chunk_size(line)
                pos = eol + 2
                if size:
                    self._left = size
                    state = self._state = _BODY
                else:
                    state = self._state = _TRAILER
            elif state == _CRLF:
                if end - pos < 2:
                    if data[pos:] != b"\r":
                        raise _MalformedChunkedDataError("Chunk did not end with CRLF")
                    self._pending = data[pos:]
                    return None
                if data[pos : pos + 2] != b"\r\n":
                    raise _MalformedChunkedDataError("Chunk did not end with CRLF")
                pos += 2
                state = self._state = _SIZE
            else:  # _TRAILER: header lines until an empty one; dropped
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    tail = end - pos
                    if self._trailer_bytes + tail + (1 if data.endswith(b"\r") else 2) > MAX_TRAILERS:
                        raise _MalformedChunkedDataError("Trailer headers data is too long.")
                    self._pending = data[pos:]
                    return None
                if eol == pos:
                    self._state = _DONE
                    return data[eol + 2 :]
                self._trailer_bytes += eol - pos + 2
                if self._trailer_bytes > MAX_TRAILERS:
                    raise _MalformedChunkedDataError("Trailer headers data is too long.")
                pos = eol + 2
        return None

    def noMoreData(self) -> None:
        if self._state != _DONE:
            raise _DataLoss("Chunked decoder: the body ended before its last chunk.")

# -*- test-case-name: tests.relay.test_decode -*-
"""
Decoding of an upstream body that came compressed although the gateway
asked for identity.

The client must get what the provider meant (plain events it can parse,
labelled as such) and the accounting must see the same bytes, or the
ledger counts no tokens. gzip and deflate are decoded with zlib as the
bytes arrive; anything else is refused by the relay (a 502), since
relaying it undecoded would hand the client bytes it cannot read.

Decoding is bounded: each upstream read may expand to at most
C{max_per_read} bytes (a compression bomb is cut, not held in memory), and
the output comes in pieces of at most C{piece} bytes. One read per stream
per reactor turn, and the client's backpressure pausing the upstream
between reads, keep a stream's decoded bytes in memory under that bound.
"""

from __future__ import annotations

import zlib
from typing import Optional

from twisted.web.http_headers import Headers

MAX_DECODED_PER_READ = 8 * 1024 * 1024
_PIECE = 64 * 1024

DECODABLE = frozenset({b"gzip", b"x-gzip", b"deflate"})


class DecodeError(Exception):
    """The body is not valid in its encoding, or expands past the limit."""


def content_encoding(headers: Headers) -> Optional[bytes]:
    """
    The response's content coding, lower-cased, or C{None} for identity.
    Several codings come back joined by commas (and are not decodable).
    """
    codings = [
        t.strip().lower()
        for v in headers.getRawHeaders(b"content-encoding", ())
        for t in v.split(b",")
    ]
    codings = [c for c in codings if c and c != b"identity"]
    if not codings:
        return None
    return b", ".join(codings)


class BodyDecoder:
    """Incremental, bounded gzip or deflate decoding of one body."""

    __slots__ = ("_encoding", "_z", "_max", "_piece", "_started", "_head")

    def __init__(self, encoding: bytes, max_per_read: int = MAX_DECODED_PER_READ, piece: int = _PIECE) -> None:
        if encoding not in DECODABLE:
            raise ValueError(encoding)
        self._encoding = encoding
        self._max = max_per_read
        self._piece = piece
        self._started = False
        self._head = b""
        self._z: "zlib._Decompress" = self._new(b"")

    def _new(self, head: bytes) -> "zlib._Decompress":
        if self._encoding != b"deflate":
            return zlib.decompressobj(16 + zlib.MAX_WBITS)
        # "deflate" is meant to be zlib-wrapped, but some servers send raw
        # deflate; browsers accept both, told apart by the zlib header.
        if len(head) >= 2 and head[0] & 0x0F == 8 and (head[0] << 8 | head[1]) % 31 == 0:
            return zlib.decompressobj(zlib.MAX_WBITS)
        return zlib.decompressobj(-zlib.MAX_WBITS)

    def decode(self, data: bytes) -> bytes:
        """The decoded bytes that C{data} (the next read) yields."""
        if not self._started:
            data = self._head + data
            if self._encoding == b"deflate" and len(data) < 2:
                # Two bytes tell a zlib header from raw deflate.
                self._head = data
                return b""
            self._head = b""
            self._started = True
            self._z = self._new(data)
        out: list[bytes] = []
        total = 0
        buf = data
        z = self._z
        try:
            while True:
                piece = z.decompress(buf, self._piece)
                total += len(piece)
                if total > self._max:
                    raise DecodeError(f"compressed body expands past {self._max} bytes in one read")
                if piece:
                    out.append(piece)
                buf = z.unconsumed_tail
                if z.eof:
                    rest = z.unused_data
                    if not rest or self._encoding == b"deflate":
                        # Bytes after a deflate stream's end are ignored,
                        # as zlib and browsers do.
                        break
                    # gzip allows several members back to back.
                    z = self._z = self._new(rest)
                    buf = rest
                    continue
                if not buf and len(piece) < self._piece:
                    break
        except zlib.error as e:
            raise DecodeError(f"invalid {self._encoding.decode()} body: {e}") from None
        return b"".join(out)

    @property
    def complete(self) -> bool:
        """
        Whether the compressed stream reached its end (not cut short). An
        empty body is complete: servers label empty bodies too.
        """
        if not self._started:
            return not self._head
        return self._z.eof

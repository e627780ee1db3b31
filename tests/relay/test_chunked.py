"""
The upstream chunked-body decoder: the same payload, end and errors as
Twisted's decoder for any framing and any split into reads, and one
payload call per read.
"""

from __future__ import annotations

import random
from typing import Any

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http import _ChunkedTransferDecoder, _DataLoss, _MalformedChunkedDataError

from llmgate.relay.chunked import ChunkedDecoder


def _run(cls: Any, reads: list[bytes]) -> tuple[bytes, Any, Any, int]:
    """Feed C{reads}; return (payload, rest after the body, error type, payload calls)."""
    got: list[bytes] = []
    rest: list[bytes] = []
    dec = cls(got.append, rest.append)
    error = None
    for data in reads:
        try:
            dec.dataReceived(data)
        except (_MalformedChunkedDataError, RuntimeError) as e:
            error = type(e)
            break
    if error is None:
        try:
            dec.noMoreData()
        except _DataLoss as e:
            error = type(e)
    return b"".join(got), (rest[0] if rest else None), error, len(got)


def _split(body: bytes, rnd: random.Random) -> list[bytes]:
    cuts = sorted(rnd.sample(range(1, len(body)), min(len(body) - 1, rnd.randint(0, 6)))) if len(body) > 1 else []
    return [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)])]


def _chunk(payload: bytes, ext: bytes = b"") -> bytes:
    return b"%x" % len(payload) + ext + b"\r\n" + payload + b"\r\n"


class SameAsTwistedTests(SynchronousTestCase):
    def assertSame(self, body: bytes, seeds: int = 40) -> None:
        rnd = random.Random(body)
        for _ in range(seeds):
            reads = _split(body, rnd)
            ours = _run(ChunkedDecoder, reads)
            theirs = _run(_ChunkedTransferDecoder, reads)
            self.assertEqual(ours[:3], theirs[:3], (body, reads))

    def test_event_stream_any_split(self) -> None:
        """An event stream (a chunk per event, a terminal chunk, bytes after it) decodes as Twisted's does, whatever the reads."""
        events = [b'data: {"choices":[{"delta":{"content":"w%d"}}]}\n\n' % i for i in range(12)]
        body = b"".join(_chunk(e) for e in events) + b"0\r\n\r\n" + b"HTTP/1.1 200 OK\r\n"
        self.assertSame(body)
        payload, rest, error, _ = _run(ChunkedDecoder, [body])
        self.assertEqual(payload, b"".join(events))
        self.assertEqual(rest, b"HTTP/1.1 200 OK\r\n")
        self.assertIsNone(error)

    def test_extensions_and_trailers(self) -> None:
        """Legal chunk extensions are ignored and trailers read and dropped, as by Twisted."""
        body = _chunk(b"abc", b";name=value;x") + _chunk(b"d" * 300, b';q="s p"') + b"0;end\r\nX-T: 1\r\nY: 2\r\n\r\n"
        self.assertSame(body)
        self.assertEqual(_run(ChunkedDecoder, [body])[:3], (b"abc" + b"d" * 300, b"", None))

    def test_malformed(self) -> None:
        """Every kind of bad framing is refused as Twisted refuses it (same error, same payload before it)."""
        cases = [
            b"zz\r\nab\r\n0\r\n\r\n",  # not hex
            b"0x2\r\nab\r\n0\r\n\r\n",  # prefix
            b"-2\r\nab\r\n0\r\n\r\n",
            b"\r\nab\r\n0\r\n\r\n",  # empty size
            b"2\r\nabXY0\r\n\r\n",  # no CRLF after the data
            b"2;\x01\r\nab\r\n0\r\n\r\n",  # bad extension character
            b"2;a\\b\r\nab\r\n0\r\n\r\n",
            _chunk(b"ok") + b"1" * 1100 + b"\r\n",  # size line too long
            _chunk(b"ok") + b"1" * 1030,  # too long, no CRLF yet
            _chunk(b"ok") + b"0\r\n" + b"X: " + b"y" * 70000 + b"\r\n\r\n",  # trailers too long
            _chunk(b"ok") + b"0\r\n" + (b"X: " + b"y" * 1000 + b"\r\n") * 70,
            _chunk(b"ok") + b"5\r\nab",  # body ends early
            _chunk(b"ok"),  # no last chunk
        ]
        for body in cases:
            self.assertSame(body, seeds=15)
            self.assertIsNotNone(_run(ChunkedDecoder, [body])[2], body[:40])

    def test_random_bodies(self) -> None:
        """Random chunk sizes (1 byte to 20 KiB) and random reads: identical to Twisted's decoder."""
        rnd = random.Random(7)
        for _ in range(60):
            body = b"".join(_chunk(rnd.randbytes(rnd.choice([1, 2, 15, 300, 20000])).replace(b"\r", b"r")) for _ in range(rnd.randint(0, 5)))
            body += b"0\r\n\r\n" + rnd.randbytes(rnd.randint(0, 3))
            self.assertSame(body, seeds=10)

    def test_one_call_per_read(self) -> None:
        """All the payload a read completes goes on in one call (a partial chunk is not held back)."""
        events = [_chunk(b"data: %d\n\n" % i) for i in range(5)]
        got: list[bytes] = []
        dec = ChunkedDecoder(got.append, lambda rest: None)
        dec.dataReceived(b"".join(events) + b"9\r\ndata: ")
        self.assertEqual(got, [b"".join(b"data: %d\n\n" % i for i in range(5)) + b"data: "])
        dec.dataReceived(b"5\n\n\r\n")
        self.assertEqual(got[1:], [b"5\n\n"])

    def test_data_after_end(self) -> None:
        """Bytes after the body ended are a programming error, as in Twisted."""
        dec = ChunkedDecoder(lambda d: None, lambda rest: None)
        dec.dataReceived(b"0\r\n\r\n")
        self.assertRaises(RuntimeError, dec.dataReceived, b"x")


class OneChunkReadTests(SynchronousTestCase):
    """
    Reads that hold exactly one chunk each (the common read of an event
    stream) decode as Twisted's decoder does them, whatever the chunk.
    """

    def assertSameReads(self, reads: list[bytes]) -> None:
        self.assertEqual(_run(ChunkedDecoder, reads)[:3], _run(_ChunkedTransferDecoder, reads)[:3], reads)

    def test_one_chunk_per_read(self) -> None:
        """Each read's one chunk is handed on whole, in one call per read."""
        events = [b'data: {"choices":[{"delta":{"content":"w%d"}}]}\n\n' % i for i in range(5)]
        reads = [_chunk(e) for e in events] + [b"0\r\n\r\n"]
        self.assertSameReads(reads)
        payload, rest, error, calls = _run(ChunkedDecoder, reads)
        self.assertEqual((payload, rest, error, calls), (b"".join(events), b"", None, 5))

    def test_size_spellings(self) -> None:
        """Upper-case hex, leading zeros, a 16-digit size line, a payload holding CRLFs."""
        payload = b"ab\r\ncd\r\n" * 40
        for size in (b"%X" % len(payload), b"%04x" % len(payload), b"%016x" % len(payload)):
            self.assertSameReads([size + b"\r\n" + payload + b"\r\n", b"0\r\n\r\n"])

    def test_not_one_whole_chunk(self) -> None:
        """A read that is nearly one chunk (bad end, extra bytes, size 0 with data, extension) is judged as Twisted judges it."""
        for read in (
            b"2\r\nabXY",
            b"2\r\nab\r\nX",
            b"2\r\nab\r\n0\r\n\r\n",
            b"2;x=1\r\nab\r\n",
            b"0\r\nab\r\n",
            b"00000000000000002\r\nab\r\n",
            b"g\r\nab\r\n",
        ):
            self.assertSameReads([read, b"0\r\n\r\n"])

    def test_whole_chunks_then_the_rest(self) -> None:
        """
        A read of several whole chunks, then a part, the last chunk, an
        extension or bad framing, decodes as Twisted's does, its payload
        in one call.
        """
        events = b"".join(_chunk(b"data: %d\n\n" % i) for i in range(3))
        for tail in (b"", b"9\r\ndata", b"0\r\n\r\n", b"3;x\r\nabc\r\n", b"zz\r\n", b"3\r\nabcXY"):
            self.assertSameReads([events + tail, b"9\r\n", b"0\r\n\r\n"])
        payload, _, _, calls = _run(ChunkedDecoder, [events + b"9\r\ndata", b": 3\n\n\r\n0\r\n\r\n"])
        self.assertEqual((payload, calls), (b"".join(b"data: %d\n\n" % i for i in range(4)), 2))

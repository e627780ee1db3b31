"""
Upstream bodies compressed although the gateway asked for identity:
decoded (gzip, deflate) before they reach the client and the accounting,
refused in the client's dialect otherwise, and never expanded without bound.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from typing import Any

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from llmgate.accounting.recorder import Accounting
from llmgate.relay.decode import BodyDecoder, DecodeError, content_encoding
from tests.fakes import FakeResponse, Gateway, parse_response

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "llmgate", "mock", "fixtures")


def fixture(name: str) -> bytes:
    with open(os.path.join(FIXTURES, name), "rb") as f:
        return f.read()


class ListLedger:
    def __init__(self) -> None:
        self.records: list[Any] = []

    def record(self, rec: Any) -> None:
        self.records.append(rec)


def ledger_gateway() -> tuple[Gateway, ListLedger]:
    gw = Gateway()
    ledger = ListLedger()
    gw.resource.accounting = Accounting(gw.clock, ledger=ledger)
    return gw, ledger


STREAM_CHAT = {"model": "gpt-4o", "stream": True, "stream_options": {"include_usage": True}, "messages": []}


class DecoderTests(SynchronousTestCase):
    def test_gzip_in_small_reads(self) -> None:
        """A gzip body fed a few bytes at a time decodes to the original."""
        data = fixture("openai_chat_stream.sse")
        z = gzip.compress(data)
        d = BodyDecoder(b"gzip")
        out = b"".join(d.decode(z[i : i + 7]) for i in range(0, len(z), 7))
        self.assertEqual(out, data)
        self.assertTrue(d.complete)

    def test_deflate_zlib_and_raw(self) -> None:
        """deflate is decoded whether zlib-wrapped (as specified) or raw (as some servers send it)."""
        data = b"data: x\n\n" * 100
        c = zlib.compressobj(wbits=-15)
        raw = c.compress(data) + c.flush()
        for body in (zlib.compress(data), raw):
            d = BodyDecoder(b"deflate")
            out = b"".join(d.decode(body[i : i + 1]) for i in range(len(body)))
            self.assertEqual(out, data)
            self.assertTrue(d.complete)

    def test_gzip_members_back_to_back(self) -> None:
        """A body of several gzip members decodes to all of them."""
        d = BodyDecoder(b"gzip")
        self.assertEqual(d.decode(gzip.compress(b"ab") + gzip.compress(b"cd")), b"abcd")

    def test_bomb_is_cut(self) -> None:
        """
        A read that expands past the per-read limit raises instead of
        building the whole expansion in memory.
        """
        bomb = gzip.compress(b"\0" * (64 << 20))
        d = BodyDecoder(b"gzip", max_per_read=1 << 20)
        self.assertRaises(DecodeError, d.decode, bomb)

    def test_garbage_is_an_error(self) -> None:
        """Bytes that are not gzip raise DecodeError, not zlib.error."""
        self.assertRaises(DecodeError, BodyDecoder(b"gzip").decode, b"this is not gzip at all")

    def test_cut_stream_is_not_complete(self) -> None:
        """A gzip body missing its end is not complete."""
        z = gzip.compress(b"hello world" * 50)
        d = BodyDecoder(b"gzip")
        d.decode(z[:-10])
        self.assertFalse(d.complete)

    def test_empty_body_is_complete(self) -> None:
        """An empty body labelled gzip is an empty body, not a cut one."""
        self.assertTrue(BodyDecoder(b"gzip").complete)
        d = BodyDecoder(b"deflate")
        d.decode(b"x")
        self.assertFalse(d.complete)

    def test_content_encoding(self) -> None:
        """identity or no header means none; codings are lower-cased and joined."""
        self.assertIsNone(content_encoding(Headers()))
        self.assertIsNone(content_encoding(Headers({b"content-encoding": [b"Identity"]})))
        self.assertEqual(content_encoding(Headers({b"content-encoding": [b"GZIP"]})), b"gzip")
        self.assertEqual(content_encoding(Headers({b"content-encoding": [b"gzip, br"]})), b"gzip, br")


class RelayDecodeTests(SynchronousTestCase):
    def respond(self, gw: Gateway, code: int, headers: dict[bytes, list[bytes]]) -> FakeResponse:
        r = FakeResponse(code, headers)
        gw.http.calls[-1]["deferred"].callback(r)
        return r

    def test_gzip_sse_is_relayed_plain_and_counted(self) -> None:
        """
        A gzipped event stream reaches the client as plain events without a
        Content-Encoding, and the ledger has the usage the stream reports.
        """
        gw, ledger = ledger_gateway()
        _, t = gw.post("/v1/chat/completions", STREAM_CHAT)
        data = fixture("openai_chat_stream.sse")
        z = gzip.compress(data)
        r = self.respond(gw, 200, {b"content-type": [b"text/event-stream"], b"content-encoding": [b"gzip"]})
        for i in range(0, len(z), 50):
            r.send(z[i : i + 50])
        r.end()
        status, headers, body, complete = parse_response(t.value())
        self.assertEqual((status, complete), (200, True))
        self.assertNotIn(b"content-encoding", headers)
        self.assertEqual(body, data)
        [rec] = ledger.records
        self.assertEqual((rec.outcome, rec.input_tokens, rec.output_tokens, rec.source), ("completed", 24, 17, "reported"))

    def test_gzip_json_error_is_decoded(self) -> None:
        """A gzipped upstream error body reaches the client decoded, with its length."""
        gw = Gateway()
        _, t = gw.post("/v1/chat/completions", {"model": "gpt-4o", "messages": []})
        err = b'{"error":{"message":"slow down","type":"tokens"}}'
        r = self.respond(gw, 429, {b"content-type": [b"application/json"], b"content-encoding": [b"gzip"]})
        r.send(gzip.compress(err))
        r.end()
        status, headers, body, complete = parse_response(t.value())
        self.assertEqual((status, body, complete), (429, err, True))
        self.assertNotIn(b"content-encoding", headers)

    def test_unknown_encoding_is_502_in_dialect(self) -> None:
        """
        A body in an encoding the gateway cannot decode (br, zstd, stacked
        codings) is a 502 in the route's dialect, the upstream is closed,
        and the record is an upstream error.
        """
        for route, body, kind_check in (
            ("/v1/chat/completions", STREAM_CHAT, lambda j: j["error"]["type"] == "upstream_error"),
            ("/v1/messages", {"model": "claude-x", "stream": True, "messages": []}, lambda j: j["type"] == "error"),
        ):
            for enc in (b"br", b"zstd", b"gzip, gzip"):
                gw = Gateway()
                _, t = gw.post(route, body)
                r = self.respond(gw, 200, {b"content-type": [b"text/event-stream"], b"content-encoding": [enc]})
                status, headers, got, _ = parse_response(t.value())
                self.assertEqual(status, 502, enc)
                self.assertTrue(kind_check(json.loads(got)), got)
                self.assertNotIn(b"content-encoding", headers)
                self.assertTrue(r.transport.stopped)
                [ex] = gw.accounting.exchanges
                self.assertEqual((ex.outcome, ex.phase), ("upstream_error", "headers"))

    def test_bomb_is_cut_visibly(self) -> None:
        """
        A compression bomb in an event stream is cut: the client gets an
        error event and no [DONE], the upstream is closed.
        """
        gw = Gateway()
        _, t = gw.post("/v1/chat/completions", STREAM_CHAT)
        r = self.respond(gw, 200, {b"content-type": [b"text/event-stream"], b"content-encoding": [b"gzip"]})
        r.send(gzip.compress(b"data: {}\n\n" + b"\0" * (64 << 20)))
        self.assertTrue(r.transport.stopped)
        gw.clock.advance(0)  # the write coalescer flushes at the end of the turn
        _, _, body, _ = parse_response(t.value())
        self.assertIn(b"error", body)
        self.assertNotIn(b"[DONE]", body)
        self.assertLess(len(t.value()), 1 << 20)
        [ex] = gw.accounting.exchanges
        self.assertEqual((ex.outcome, ex.phase), ("upstream_error", "body"))

    def test_truncated_gzip_is_not_success(self) -> None:
        """A gzip body that ends before its trailer is an upstream error, not a clean end."""
        gw = Gateway()
        _, t = gw.post("/v1/chat/completions", STREAM_CHAT)
        r = self.respond(gw, 200, {b"content-type": [b"text/event-stream"], b"content-encoding": [b"gzip"]})
        r.send(gzip.compress(fixture("openai_chat_stream.sse"))[:-8])
        r.end()
        [ex] = gw.accounting.exchanges
        self.assertEqual(ex.outcome, "upstream_error")

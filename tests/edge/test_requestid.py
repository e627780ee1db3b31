# -*- test-case-name: tests.edge.test_requestid -*-
"""Request ids: taken from the client when valid, sent upstream, answered, recorded."""

from __future__ import annotations

import sqlite3
from typing import Any

from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from llmgate.accounting.ledger import add_missing_columns
from llmgate.accounting.recorder import Accounting
from llmgate.edge.requestid import valid_client_id
from tests.fakes import FakeResponse, Gateway, parse_response


class ListLedger:
    def __init__(self) -> None:
        self.records: list[Any] = []

    def record(self, rec: Any) -> None:
        self.records.append(rec)


def gateway() -> tuple[Gateway, ListLedger]:
    gw = Gateway()
    ledger = ListLedger()
    gw.resource.accounting = Accounting(gw.clock, ledger=ledger)
    return gw, ledger


def relay_json(gw: Gateway, transport: Any, headers: dict[bytes, list[bytes]]) -> tuple[int, dict[bytes, list[bytes]]]:
    r = FakeResponse(200, {b"content-type": [b"application/json"], **headers})
    gw.http.calls[0]["deferred"].callback(r)
    r.send(b'{"model":"real-model","usage":{"prompt_tokens":3,"completion_tokens":2}}')
    r.end()
    gw.clock.advance(0)
    status, got, _, _ = parse_response(transport.value())
    return status, got


class ValidationTests(SynchronousTestCase):
    def check(self, raw: list[bytes]) -> Any:
        h = Headers()
        h.setRawHeaders(b"x-request-id", raw)
        return valid_client_id(h)

    def test_token_kept(self) -> None:
        """A UUID-like id of token characters is the client's id."""
        self.assertEqual(self.check([b"3f2a-11ee.b0_c~X"]), "3f2a-11ee.b0_c~X")

    def test_invalid_ignored(self) -> None:
        """Spaces, quotes, non-ASCII, empty, over 128 chars or two headers: no client id."""
        for raw in ([b"a b"], [b'a"b'], [b"caf\xc3\xa9"], [b""], [b"x" * 129], [b"a", b"b"], [b"a\x01"]):
            self.assertIsNone(self.check(raw), raw)
        self.assertEqual(self.check([b"x" * 128]), "x" * 128)


class RelayedIdTests(SynchronousTestCase):
    def test_client_id_sent_upstream_answered_and_recorded(self) -> None:
        """
        A client's valid id goes upstream and back to the client; the ledger
        keeps the gateway's own id as request_id, the client's as
        client_request_id, and the upstream's as upstream_id, which the
        client gets as x-upstream-request-id.
        """
        gw, ledger = gateway()
        with capturedLogs() as events:
            _, t = gw.post("/v1/chat/completions", {"model": "gpt-4o"}, headers={"X-Request-Id": "trace-42"})
            sent = gw.http.calls[0]["headers"]
            self.assertEqual(sent.getRawHeaders(b"x-request-id"), [b"trace-42"])
            status, headers = relay_json(gw, t, {b"x-request-id": [b"req_up_1"]})
        self.assertEqual(status, 200)
        self.assertEqual(headers[b"x-request-id"], [b"trace-42"])
        self.assertEqual(headers[b"x-upstream-request-id"], [b"req_up_1"])
        [rec] = ledger.records
        self.assertEqual(rec.client_request_id, "trace-42")
        self.assertEqual(rec.upstream_id, "req_up_1")
        self.assertRegex(rec.request_id, "^[0-9a-f]{32}$")
        [line] = [e["line"] for e in events if e.get("log_namespace") == "llmgate.access"]
        self.assertIn(f" id={rec.request_id} client_id=trace-42 upstream_id=req_up_1", line)

    def test_generated_id(self) -> None:
        """Without a (valid) client id the gateway's id is sent upstream and answered."""
        gw, ledger = gateway()
        _, t = gw.post("/v1/chat/completions", {"model": "gpt-4o"}, headers={"X-Request-Id": "has space"})
        sent = gw.http.calls[0]["headers"].getRawHeaders(b"x-request-id")
        _, headers = relay_json(gw, t, {})
        [rec] = ledger.records
        self.assertIsNone(rec.client_request_id)
        self.assertEqual(sent, [rec.request_id.encode()])
        self.assertEqual(headers[b"x-request-id"], [rec.request_id.encode()])

    def test_duplicate_client_ids_keep_both_records(self) -> None:
        """Two requests with the same client id are two records with distinct request_ids."""
        gw, ledger = gateway()
        for i in range(2):
            _, t = gw.post("/v1/chat/completions", {"model": "gpt-4o"}, headers={"X-Request-Id": "same"})
            r = FakeResponse(200, {b"content-type": [b"application/json"]})
            gw.http.calls[i]["deferred"].callback(r)
            r.send(b"{}")
            r.end()
            gw.clock.advance(0)
        self.assertEqual([r.client_request_id for r in ledger.records], ["same", "same"])
        self.assertEqual(len({r.request_id for r in ledger.records}), 2)

    def test_rejected_request_has_ids(self) -> None:
        """A request the gateway refuses itself answers and records the ids too."""
        gw, ledger = gateway()
        _, t = gw.post("/v1/chat/completions", {"model": ""}, headers={"X-Request-Id": "rej-1"})
        gw.clock.advance(0)
        status, headers, _, _ = parse_response(t.value())
        self.assertEqual(status, 400)
        self.assertEqual(headers[b"x-request-id"], [b"rej-1"])
        [rec] = ledger.records
        self.assertEqual((rec.outcome, rec.client_request_id), ("rejected", "rej-1"))

    def test_edge_refusal_has_ids(self) -> None:
        """A body refused at the edge (413) carries and records the ids."""
        gw = Gateway(max_body=10)
        ledger = ListLedger()
        gw.resource.accounting = Accounting(gw.clock, ledger=ledger)
        _, t = gw.post("/v1/chat/completions", None, raw=b"x" * 100, headers={"X-Request-Id": "big-1"})
        status, headers, _, _ = parse_response(t.value())
        self.assertEqual(status, 413)
        self.assertEqual(headers[b"x-request-id"], [b"big-1"])
        [rec] = ledger.records
        self.assertEqual(rec.client_request_id, "big-1")


class MigrationTests(SynchronousTestCase):
    def test_old_ledger_gains_column(self) -> None:
        """A ledger file without client_request_id gets the column added."""
        conn = sqlite3.connect(":memory:")
        conn.execute("CREATE TABLE usage (request_id TEXT NOT NULL UNIQUE)")
        added = add_missing_columns(conn)
        self.assertIn("client_request_id", added)


class AccessLineTests(SynchronousTestCase):
    def test_rejected_logs_real_method_and_client(self) -> None:
        """A refused GET is logged as GET, with the client's address and the fields as keys."""
        gw, ledger = gateway()
        channel, t = gw.connect()
        with capturedLogs() as events:
            channel.dataReceived(b"GET /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nX-Request-Id: g-1\r\n\r\n")
            gw.clock.advance(0)
        [event] = [e for e in events if e.get("log_namespace") == "llmgate.access"]
        self.assertTrue(event["line"].startswith("GET /v1/chat/completions client=192.168.1.1 "), event["line"])
        access = event["access"]
        self.assertEqual((access["method"], access["status"], access["outcome"]), ("GET", 405, "rejected"))
        self.assertEqual((access["client"], access["client_request_id"]), ("192.168.1.1", "g-1"))


class NewIdTests(SynchronousTestCase):
    """Gateway ids come from the kernel's random bytes, drawn a pool at a time."""

    def test_ids_are_distinct_128_bit_hex_across_pools(self) -> None:
        """Ids drawn over several pool refills are 32 hex digits and all different."""
        from llmgate.edge import requestid

        count = 3 * requestid._POOL_BYTES // 16 + 5
        ids = [requestid.new_id() for _ in range(count)]
        self.assertEqual(len(set(ids)), count)
        self.assertTrue(all(len(i) == 32 and int(i, 16) >= 0 for i in ids))

    def test_one_kernel_call_per_pool(self) -> None:
        """os.urandom is asked once per 256 ids, for a whole pool."""
        from llmgate.edge import requestid

        asked: list[int] = []
        real = requestid.os.urandom

        def urandom(n: int) -> bytes:
            asked.append(n)
            return real(n)

        requestid._forget_pool()
        self.patch(requestid.os, "urandom", urandom)
        for _ in range(2 * requestid._POOL_BYTES // 16):
            requestid.new_id()
        self.assertEqual(asked, [requestid._POOL_BYTES, requestid._POOL_BYTES])

    def test_forked_child_draws_its_own_bytes(self) -> None:
        """After a fork the child forgets the parent's pool, so the two never give the same id."""
        import os

        from llmgate.edge import requestid

        requestid.new_id()  # the parent has a pool with bytes left
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report its next id and leave at once
            try:
                os.write(write, requestid.new_id().encode())
            finally:
                os._exit(0)
        os.close(write)
        child = os.read(read, 64).decode()
        os.close(read)
        os.waitpid(pid, 0)
        self.assertEqual(len(child), 32)
        self.assertNotEqual(child, requestid.new_id())

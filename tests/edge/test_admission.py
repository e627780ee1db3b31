"""
Admission when the headers arrive: the gateway key (or, without keys, the
loopback-only checks) decides before a byte of the body is read.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any, Optional

from twisted.trial.unittest import SynchronousTestCase

from llmgate.accounting.recorder import Accounting
from llmgate.edge.admission import loopback_authority, loopback_origin
from tests.fakes import Gateway, make_config, parse_response

KEYED = {"keys": {"team": {"api_key_env": "GW_KEY"}}}  # secret "gw-secret"


class ListLedger:
    def __init__(self) -> None:
        self.records: list[Any] = []

    def record(self, rec: Any) -> None:
        self.records.append(rec)


def gateway(keyed: bool = False) -> tuple[Gateway, ListLedger]:
    gw = Gateway(make_config(**KEYED) if keyed else None)
    ledger = ListLedger()
    gw.resource.accounting = Accounting(gw.clock, ledger=ledger)
    return gw, ledger


def head(path: str = "/v1/chat/completions", length: int = 13, **headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1"]
    fields = {"Host": "localhost", "Content-Type": "application/json", "Content-Length": str(length)}
    fields.update({k.replace("_", "-"): v for k, v in headers.items()})
    lines += [f"{k}: {v}" for k, v in fields.items() if v]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


BODY = b'{"model":"m"}'


class KeyAtHeadersTests(SynchronousTestCase):
    def test_unauthenticated_refused_before_body(self) -> None:
        """
        A request without a valid key announcing 32 MiB is answered 401 in
        its dialect as soon as its headers arrive, with Connection: close,
        none of the body read and one ledger record.
        """
        for path, kind in (("/v1/chat/completions", "openai"), ("/v1/messages", "anthropic")):
            gw, ledger = gateway(keyed=True)
            channel, t = gw.connect()
            channel.dataReceived(head(path, 32 * 1024 * 1024, Authorization="Bearer wrong"))
            status, headers, body, _ = parse_response(t.value())
            self.assertEqual(status, 401)
            self.assertEqual(headers[b"connection"], [b"close"])
            doc = json.loads(body)
            if kind == "openai":
                self.assertEqual(doc["error"]["code"], "invalid_api_key")
            else:
                self.assertEqual(doc["error"]["type"], "authentication_error")
            self.assertTrue(t.disconnecting)
            self.assertEqual(gw.site.budget.used, 0)
            channel.dataReceived(b"x" * 65536)
            self.assertEqual(channel.requests[-1].received, 0)
            self.assertEqual([(r.route, r.status, r.outcome) for r in ledger.records], [(path, 401, "rejected")])
            self.assertNotIn(b"wrong", t.value())

    def test_no_100_continue_for_unauthenticated(self) -> None:
        """A client that waits for 100 Continue gets the 401 instead."""
        gw, _ = gateway(keyed=True)
        channel, t = gw.connect()
        channel.dataReceived(head(length=1000, Expect="100-continue"))
        self.assertTrue(t.value().startswith(b"HTTP/1.1 401 "))
        self.assertNotIn(b"100 Continue", t.value())

    def test_valid_key_relayed(self) -> None:
        """A valid key (Bearer or x-api-key) is let through to the relay."""
        for field, value in (("Authorization", "Bearer gw-secret"), ("x-api-key", "gw-secret")):
            gw, _ = gateway(keyed=True)
            channel, t = gw.connect()
            channel.dataReceived(head(**{field: value}) + BODY)
            self.assertEqual(len(gw.http.calls), 1, field)

    def test_healthz_needs_no_key(self) -> None:
        """Liveness probes carry no key and are answered."""
        gw, _ = gateway(keyed=True)
        channel, t = gw.connect()
        channel.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: lb.internal\r\n\r\n")
        self.assertEqual(parse_response(t.value())[0], 200)


class DuplicateCredentialsTests(SynchronousTestCase):
    def test_two_authorization_headers(self) -> None:
        """Two Authorization headers are a 400, even if one is valid."""
        gw, ledger = gateway(keyed=True)
        channel, t = gw.connect()
        channel.dataReceived(
            head(length=13, Authorization="Bearer wrong")[:-2] + b"Authorization: Bearer gw-secret\r\n\r\n" + BODY
        )
        status, _, body, _ = parse_response(t.value())
        self.assertEqual(status, 400)
        self.assertEqual(json.loads(body)["error"]["code"], "duplicate_credentials")
        self.assertEqual(gw.http.calls, [])
        self.assertEqual([r.status for r in ledger.records], [400])

    def test_two_x_api_key_headers(self) -> None:
        """Two x-api-key headers are a 400, in the Anthropic dialect on its route."""
        gw, _ = gateway(keyed=True)
        channel, t = gw.connect()
        channel.dataReceived(
            head("/v1/messages", x_api_key="gw-secret")[:-2] + b"x-api-key: gw-secret\r\n\r\n" + BODY
        )
        status, _, body, _ = parse_response(t.value())
        self.assertEqual(status, 400)
        self.assertEqual(json.loads(body)["type"], "error")
        self.assertEqual(gw.http.calls, [])

    def test_resource_takes_no_duplicate_as_a_key(self) -> None:
        """
        The resource's own check agrees: two keys are no key (not "the last
        one wins").
        """
        gw, _ = gateway(keyed=True)

        class Req:
            from twisted.web.http_headers import Headers

            requestHeaders = Headers({b"authorization": [b"Bearer x", b"Bearer gw-secret"]})

        self.assertIsNone(gw.resource.authenticate(Req()))
        Req.requestHeaders = Req.Headers({b"authorization": [b"Bearer gw-secret"]})
        self.assertEqual(gw.resource.authenticate(Req()), "team")


class KeylessTests(SynchronousTestCase):
    """Without keys, only local programs: loopback Host, no foreign Origin, JSON."""

    def answer(self, data: bytes, keyed: bool = False) -> tuple[int, Optional[dict[str, Any]], Gateway, ListLedger]:
        gw, ledger = gateway(keyed)
        channel, t = gw.connect()
        channel.dataReceived(data)
        if not t.value():
            return 0, None, gw, ledger
        status, _, body, _ = parse_response(t.value())
        return status, json.loads(body), gw, ledger

    def test_cross_site_text_plain_post(self) -> None:
        """
        The cross-site form POST a web page can send without a preflight
        (text/plain) is refused 415 in dialect, and not relayed.
        """
        status, body, gw, ledger = self.answer(head(Content_Type="text/plain") + BODY)
        self.assertEqual(status, 415)
        assert body is not None
        self.assertEqual(body["error"]["code"], "unsupported_media_type")
        self.assertEqual(gw.http.calls, [])
        self.assertEqual([(r.status, r.outcome) for r in ledger.records], [(415, "rejected")])

    def test_missing_content_type(self) -> None:
        """A POST with no content-type is refused 415 too."""
        self.assertEqual(self.answer(head(Content_Type="") + BODY)[0], 415)

    def test_json_with_charset_accepted(self) -> None:
        """application/json with parameters is JSON."""
        status, _, gw, _ = self.answer(head(Content_Type="Application/JSON; charset=utf-8") + BODY)
        self.assertEqual(status, 0)
        self.assertEqual(len(gw.http.calls), 1)

    def test_foreign_host(self) -> None:
        """
        A Host that is not loopback (DNS rebinding: a foreign name resolved
        to 127.0.0.1) is refused 421 in dialect.
        """
        for host in ("evil.example", "evil.example:8080", "127.0.0.1.evil.example", "10.0.0.1", "localhost.evil"):
            status, body, gw, _ = self.answer(head("/v1/messages", Host=host) + BODY)
            self.assertEqual(status, 421, host)
            assert body is not None
            self.assertEqual(body["type"], "error")
            self.assertEqual(gw.http.calls, [])

    def test_missing_host(self) -> None:
        """A request with no Host is refused."""
        self.assertEqual(self.answer(head(Host="") + BODY)[0], 421)

    def test_foreign_origin(self) -> None:
        """A request from a page of another site (Origin) is refused 403."""
        for origin in ("https://evil.example", "null", "http://evil.example:8080"):
            status, body, gw, _ = self.answer(head(Origin=origin) + BODY)
            self.assertEqual(status, 403, origin)
            self.assertEqual(gw.http.calls, [])

    def test_loopback_names_accepted(self) -> None:
        """localhost, 127.x and [::1], with any port, and loopback origins are served."""
        for host, origin in (
            ("localhost", ""),
            ("localhost:8080", "http://localhost:3000"),
            ("127.0.0.1:8080", ""),
            ("127.9.8.7", "http://127.0.0.1"),
            ("[::1]:8080", "http://[::1]:5173"),
        ):
            status, _, gw, _ = self.answer(head(Host=host, Origin=origin) + BODY)
            self.assertEqual(status, 0, host)
            self.assertEqual(len(gw.http.calls), 1, host)

    def test_keys_make_the_checks_unneeded(self) -> None:
        """With keys configured, a keyed request from any host, origin and content-type is served."""
        status, _, gw, _ = self.answer(
            head(Host="gw.example.com", Origin="https://app.example.com", Content_Type="text/plain", Authorization="Bearer gw-secret")
            + BODY,
            keyed=True,
        )
        self.assertEqual(status, 0)
        self.assertEqual(len(gw.http.calls), 1)


class LoopbackTests(SynchronousTestCase):
    def test_authorities(self) -> None:
        """Which Host values name loopback."""
        for ok in (b"localhost", b"LOCALHOST:1", b"127.0.0.1", b"127.255.0.1:80", b"[::1]", b"[::1]:8080"):
            self.assertTrue(loopback_authority(ok), ok)
        for bad in (b"", b"localhost:", b"localhost:x", b"[::1", b"[::1]x", b"::1", b"128.0.0.1", b"127.1", b"[::2]", b"0.0.0.0"):
            self.assertFalse(loopback_authority(bad), bad)

    def test_answer_remembered_per_value_bounded(self) -> None:
        """
        A Host value is parsed once, not per request; the remembered values
        are bounded, so new values per request cannot grow them.
        """
        from llmgate.edge import admission

        parsed: list[str] = []
        real = ipaddress.ip_address

        def counting(text: str) -> Any:
            parsed.append(text)
            return real(text)

        self.patch(admission.ipaddress, "ip_address", counting)
        loopback_authority.cache_clear()
        self.addCleanup(loopback_authority.cache_clear)
        for _ in range(3):
            self.assertTrue(loopback_authority(b"127.0.0.1:8080"))
            self.assertFalse(loopback_authority(b"10.0.0.1:8080"))
        self.assertEqual(parsed, ["127.0.0.1", "10.0.0.1"])
        for i in range(1000):
            loopback_authority(b"127.0.0.1:%d" % i)
        self.assertEqual(loopback_authority.cache_info().currsize, 256)

    def test_origins(self) -> None:
        """Which Origin values name a loopback page."""
        self.assertTrue(loopback_origin(b"http://localhost:3000"))
        self.assertTrue(loopback_origin(b"https://127.0.0.1"))
        for bad in (b"null", b"file://", b"http://localhost/x", b"chrome-extension://abc", b"http://evil.example"):
            self.assertFalse(loopback_origin(bad), bad)

"""The gateway's upstream client: treq without the layers a proxy must not have."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import Agent
from twisted.web.http_headers import Headers

from llmgate.relay.client import BytesProducer, UpstreamClient, _NoCookies


class RecordingAgent:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None) -> Deferred[Any]:
        self.calls.append((method, uri, headers, bodyProducer))
        return Deferred()


class ProxyClientTests(SynchronousTestCase):
    def test_fast_path_goes_straight_to_the_agent(self) -> None:
        """
        The relay's unbuffered, non-redirected requests reach the agent as
        given: no cookie, redirect or gzip agents in between, and no
        Accept-Encoding added (event streams must not be compressed).
        """
        client = UpstreamClient(MemoryReactorClock())
        # The agent the client really holds is treq's plain Agent: a wrapper
        # built in (cookies, redirects, gzip) would sit inside it and be
        # replaced, unseen, by the recording agent below.
        self.assertIs(type(client.http._agent), Agent)
        agent = RecordingAgent()
        client.http._agent = agent
        h = Headers({b"x-a": [b"1"]})
        client.http.request("POST", "http://up.test/v1/x", headers=h, data=b"{}", unbuffered=True, allow_redirects=False)
        [(method, uri, headers, producer)] = agent.calls
        self.assertEqual((method, uri), (b"POST", b"http://up.test/v1/x"))
        self.assertIs(headers, h)
        self.assertFalse(headers.hasHeader(b"accept-encoding"))
        self.assertEqual(producer.length, 2)

    def test_body_producer_writes_once(self) -> None:
        """The body is written in one call with no cooperator."""
        t = StringTransport()
        d = BytesProducer(b"hello").startProducing(t)
        self.assertEqual(t.value(), b"hello")
        self.successResultOf(d)

    def test_no_cookies_kept_or_sent(self) -> None:
        """One client serves all users: no upstream cookie is ever replayed."""
        from http.cookiejar import Cookie

        jar = _NoCookies()
        jar.set_cookie(Cookie(0, "s", "v", None, False, "up.test", True, False, "/", True, False, None, False, None, None, {}))

        class Req:
            headers: dict[str, str] = {}

            def add_unredirected_header(self, k: str, v: str) -> None:
                self.headers[k] = v

        r = Req()
        jar.add_cookie_header(r)
        self.assertEqual(r.headers, {})

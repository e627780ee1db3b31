"""The client-facing channel: deadlines that no trickle of bytes resets."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from llmgate.edge.site import BODY_DEADLINE, HEADER_DEADLINE
from tests.fakes import Gateway


class DeadlineTests(SynchronousTestCase):
    def test_slowloris_headers(self) -> None:
        """
        A client trickling header bytes is answered 408 and closed at the
        header deadline, although it never went quiet for long.
        """
        gw = Gateway()
        channel, t = gw.connect()
        channel.dataReceived(b"POST /v1/chat/completions HTTP/1.1\r\n")
        for _ in range(int(HEADER_DEADLINE)):
            gw.clock.advance(0.9)
            channel.dataReceived(b"X")
        gw.clock.advance(1)
        self.assertTrue(t.value().startswith(b"HTTP/1.1 408"))
        self.assertTrue(t.disconnecting)

    def test_slow_body(self) -> None:
        """A body trickled past the body deadline is cut with 408."""
        gw = Gateway()
        channel, t = gw.connect()
        channel.dataReceived(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
        for _ in range(int(BODY_DEADLINE / 5)):
            gw.clock.advance(5)
            channel.dataReceived(b"{")
        gw.clock.advance(5)
        self.assertTrue(t.value().startswith(b"HTTP/1.1 408"))
        self.assertEqual(gw.http.calls, [])

    def test_prompt_request_not_cut(self) -> None:
        """A request sent promptly is served and leaves no deadline behind."""
        gw = Gateway()
        gw.post("/v1/chat/completions", {"model": "m"})
        self.assertEqual(len(gw.http.calls), 1)
        gw.clock.advance(HEADER_DEADLINE + 1)
        self.assertEqual(gw.http.calls[0]["cancelled"], False)
        self.assertEqual(gw.site.waiting, set())

    def test_no_100_continue_after_413(self) -> None:
        """A refused body is not invited with 100 Continue after the 413."""
        gw = Gateway(max_body=10)
        channel, t = gw.connect()
        channel.dataReceived(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 11\r\n\r\n"
        )
        self.assertTrue(t.value().startswith(b"HTTP/1.1 413"))
        self.assertNotIn(b"100 Continue", t.value())

"""
End to end: real twistd processes (gateway and mock provider) on
127.0.0.1, driven by the official openai and anthropic SDKs and by raw
sockets.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time

import anthropic
import openai
from twisted.trial.unittest import SynchronousTestCase

from llmgate.mock.provider import mock_text
from tests.e2e.procs import Daemon, MockStack, get_json, shared

UPSTREAM_KEY = "sk-e2e-upstream-secret"


def shared_stack() -> MockStack:
    """The module's mock provider and gateway (see L{shared})."""
    return shared("gateway", lambda: MockStack("llmgate-e2e-", UPSTREAM_KEY))


class GatewayE2ETests(SynchronousTestCase):
    def setUp(self) -> None:
        stack = shared_stack()
        self.gw = stack.gw
        self.mock = stack.mock
        self.oai = openai.OpenAI(base_url=self.gw.url("/v1"), api_key="client-key", max_retries=0, timeout=20)
        self.ant = anthropic.Anthropic(base_url=self.gw.url(), api_key="client-key", max_retries=0, timeout=20)

    def test_openai_stream_arrives_spread_over_time(self) -> None:
        """
        Chunks reach the SDK as the upstream produces them (not all at the
        end), and the usage chunk the gateway asked for is not shown to a
        client that did not ask for it.
        """
        arrivals = []
        text = ""
        stream = self.oai.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            extra_headers={"x-mock-tokens": "8", "x-mock-delay-ms": "80"},
        )
        for chunk in stream:
            self.assertIsNone(chunk.usage)
            self.assertTrue(chunk.choices, "a usage-only chunk leaked to the client")
            if chunk.choices[0].delta.content:
                arrivals.append(time.monotonic())
                text += chunk.choices[0].delta.content
        self.assertEqual(text, mock_text(8))
        self.assertGreater(arrivals[-1] - arrivals[0], 0.4)
        gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
        self.assertGreater(min(gaps), 0.03, gaps)

    def test_openai_stream_with_usage(self) -> None:
        """A client that asks for usage gets the provider's usage chunk."""
        stream = self.oai.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"x-mock-tokens": "5"},
        )
        chunks = list(stream)
        self.assertEqual(chunks[-1].choices, [])
        self.assertEqual(chunks[-1].usage.completion_tokens, 5)

    def test_openai_non_streaming_and_model_mapping(self) -> None:
        """
        A non-streaming call is relayed whole; the public model name is
        mapped to the upstream's and the provider key replaces the client's.
        """
        r = self.oai.chat.completions.create(
            model="public-name", messages=[{"role": "user", "content": "hi"}], extra_headers={"x-mock-tokens": "3"}
        )
        self.assertEqual(r.choices[0].message.content, mock_text(3))
        self.assertEqual(r.model, "upstream-name")
        self.assertEqual(r.usage.completion_tokens, 3)

    def test_embeddings_and_responses(self) -> None:
        """Embeddings and the Responses API stream pass through."""
        e = self.oai.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
        self.assertEqual(len(e.data), 2)
        events = list(
            self.oai.responses.create(model="gpt-4.1", input="hi", stream=True, extra_headers={"x-mock-tokens": "4"})
        )
        self.assertEqual(events[-1].type, "response.completed")
        self.assertEqual(events[-1].response.usage.output_tokens, 4)

    def test_anthropic_stream_and_message(self) -> None:
        """The Anthropic SDK streams and reads messages through the gateway."""
        with self.ant.messages.stream(
            model="claude-sonnet-4-5",
            max_tokens=50,
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-mock-tokens": "6", "x-mock-delay-ms": "10"},
        ) as s:
            text = "".join(s.text_stream)
            final = s.get_final_message()
        self.assertEqual(text, mock_text(6))
        self.assertEqual(final.usage.output_tokens, 6)
        m = self.ant.messages.create(model="claude-sonnet-4-5", max_tokens=50, messages=[{"role": "user", "content": "hi"}])
        self.assertEqual(m.usage.output_tokens, 16)
        n = self.ant.messages.count_tokens(model="claude-sonnet-4-5", messages=[{"role": "user", "content": "hi"}])
        self.assertGreater(n.input_tokens, 0)

    def test_upstream_sees_provider_key_not_client_key(self) -> None:
        """The upstream gets the provider's key; the client's never leaves."""
        self.ant.messages.create(model="claude-x", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
        self.oai.chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": "hi"}])
        seen = get_json(self.mock.url("/mock/requests"))[-2:]
        ant, oai = seen
        self.assertEqual(ant["headers"]["x-api-key"], UPSTREAM_KEY)
        self.assertEqual(oai["headers"]["authorization"], "Bearer " + UPSTREAM_KEY)
        for r in seen:
            self.assertNotIn("client-key", json.dumps(r))

    def test_unknown_model_is_not_found_in_each_dialect(self) -> None:
        """Each SDK raises its own NotFoundError for an unknown model."""
        cfg_dir = tempfile.mkdtemp()
        conf = os.path.join(cfg_dir, "c.toml")
        with open(conf, "w") as f:
            f.write(f'[providers.only]\nkind = "openai"\nbase_url = "http://127.0.0.1:{self.mock.port}/v1"\n')
        gw = Daemon("llmgate", ["--config", conf, "--port", "tcp:0:interface=127.0.0.1"], cfg_dir)
        try:
            oai = openai.OpenAI(base_url=gw.url("/v1"), api_key="k", max_retries=0)
            ant = anthropic.Anthropic(base_url=gw.url(), api_key="k", max_retries=0)
            with self.assertRaises(openai.NotFoundError) as e:
                oai.chat.completions.create(model="nope", messages=[])
            self.assertEqual(e.exception.code, "model_not_found")
            with self.assertRaises(anthropic.NotFoundError):
                ant.messages.create(model="nope", max_tokens=5, messages=[])
        finally:
            gw.stop()

    def test_upstream_errors_relayed(self) -> None:
        """Upstream 429 and 529 reach the SDKs as their own exceptions."""
        with self.assertRaises(openai.RateLimitError) as e:
            self.oai.chat.completions.create(model="gpt-x", messages=[], extra_headers={"x-mock-fault": "status-429"})
        self.assertEqual(e.exception.response.headers["retry-after"], "1")
        with self.assertRaises(anthropic.InternalServerError) as e2:
            self.ant.messages.create(model="claude-x", max_tokens=5, messages=[], extra_headers={"x-mock-fault": "status-529"})
        self.assertEqual(e2.exception.status_code, 529)

    def test_mid_stream_reset_is_an_error_not_success(self) -> None:
        """
        An upstream that resets mid-stream makes the SDK raise, after the
        events that did arrive; it never sees a clean end.
        """
        got = []
        with self.assertRaises(openai.APIError):
            for chunk in self.oai.chat.completions.create(
                model="gpt-x",
                messages=[],
                stream=True,
                extra_headers={
                    "x-mock-tokens": "10",
                    "x-mock-delay-ms": "20",
                    "x-mock-fault": "reset-mid",
                    "x-mock-fault-after": "4",
                },
            ):
                got.append(chunk)
        self.assertGreater(len(got), 0)

    def test_client_disconnect_cancels_upstream_stream(self) -> None:
        """
        A client that drops mid-stream makes the gateway close the upstream
        stream: the mock counts it cancelled long before it would end.
        """
        before = get_json(self.mock.url("/mock/stats"))["streams_cancelled"]
        body = json.dumps({"model": "gpt-x", "stream": True, "messages": []}).encode()
        s = socket.create_connection(("127.0.0.1", self.gw.port))
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"x-mock-tokens: 1000\r\nx-mock-delay-ms: 20\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        got = b""
        while b"data:" not in got:
            chunk = s.recv(65536)
            self.assertTrue(chunk, "connection closed before the first event")
            got += chunk
        s.close()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if get_json(self.mock.url("/mock/stats"))["streams_cancelled"] > before:
                break
            time.sleep(0.02)
        self.assertGreater(get_json(self.mock.url("/mock/stats"))["streams_cancelled"], before)

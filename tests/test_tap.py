"""The twistd plugin's options and service tree (nothing listens)."""

from __future__ import annotations

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from llmgate import tap
from llmgate.relay.client import UpstreamClient


class OptionsTests(SynchronousTestCase):
    def test_ports(self) -> None:
        """
        --port is repeatable; without gateway keys a bare number listens on
        loopback only, and full endpoint strings are taken as given.
        """
        o = tap.Options()
        o.parseOptions(["--port", "8081", "--port", "tcp:9090", "--demo"])
        self.assertEqual(
            o["ports"], ["tcp:8081:interface=127.0.0.1:backlog=4096", "tcp:9090:backlog=4096"]
        )

    def test_backlog_kept_when_given(self) -> None:
        """A backlog named in the endpoint string is left alone."""
        o = tap.Options()
        o.parseOptions(["--demo", "--port", "tcp:1:backlog=10", "--port", "unix:/tmp/x"])
        self.assertEqual(o["ports"], ["tcp:1:backlog=10", "unix:/tmp/x"])

    def test_bare_port_with_keys(self) -> None:
        """With gateway keys a bare port listens on every interface."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('[keys.a]\napi_key_env = "PATH"\n')
        o = tap.Options()
        o.parseOptions(["--config", path, "--port", "8081"])
        self.assertEqual(o["ports"], ["tcp:8081:backlog=4096"])

    def test_default_port(self) -> None:
        """Without --port the gateway listens on port 8080."""
        o = tap.Options()
        o.parseOptions(["--demo"])
        self.assertEqual(o["ports"], ["tcp:8080:interface=127.0.0.1:backlog=4096"])

    def test_invalid_config_is_a_usage_error(self) -> None:
        """A bad config stops twistd before it listens, naming the setting."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('[providers.x]\nkind = "gemini"\n')
        o = tap.Options()
        with self.assertRaises(usage.UsageError) as e:
            o.parseOptions(["--config", path])
        self.assertIn("providers.x.kind", str(e.exception))


class ServiceTests(SynchronousTestCase):
    def test_build(self) -> None:
        """The tree holds the upstream pool and one listener per port."""
        from llmgate import config

        cfg = config.parse({"providers": {"p": {"kind": "openai", "base_url": "http://x/v1", "default": True}}}, {})
        top = tap.build(cfg, MemoryReactorClock(), ["tcp:1", "tcp:2"])
        kinds = [type(s) for s in top]
        self.assertIn(UpstreamClient, kinds)
        self.assertEqual(kinds.count(StreamServerEndpointService), 2)

    def test_executors_of_their_own(self) -> None:
        """
        Big-body parses and token estimates run on bounded pools of their
        own, not the reactor's (which DNS lookups use), and stop after the
        drain that waits for the estimates.
        """
        from llmgate import config
        from llmgate.ops.drain import Drain
        from llmgate.ops.executors import BoundedExecutor

        cfg = config.parse({"providers": {"p": {"kind": "openai", "base_url": "http://x/v1", "default": True}}}, {})
        top = tap.build(cfg, MemoryReactorClock(), ["tcp:1"])
        services = list(top)
        pools = {s.name: s for s in services if isinstance(s, BoundedExecutor)}
        self.assertEqual(set(pools), {"llmgate-parse", "llmgate-estimate"})
        self.assertEqual((pools["llmgate-parse"].max_jobs, pools["llmgate-parse"].max_bytes), (64, 256 * 1024 * 1024))
        drain = next(i for i, s in enumerate(services) if isinstance(s, Drain))
        self.assertTrue(all(services.index(p) < drain for p in pools.values()))
        root = next(s for s in services if isinstance(s, StreamServerEndpointService)).factory.resource
        self.assertEqual(root._parse_in_thread, pools["llmgate-parse"].submit)
        self.assertIs(root.accounting._in_thread, pools["llmgate-estimate"])


class WarningTests(SynchronousTestCase):
    def test_no_providers_warns(self) -> None:
        """Starting with no providers at all says so, naming the remedies."""
        from twisted.logger import globalLogPublisher

        events: list[dict] = []  # type: ignore[type-arg]
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        o = tap.Options()
        o["loaded"] = None
        from llmgate import config

        o["loaded"] = config.parse({}, {})
        o["demo"] = False
        o["ports"] = ["tcp:0"]
        self.patch(tap.tokens, "load_encodings", lambda: None)
        self.patch(tap, "_tune_gc", lambda: None)
        tap.makeService(o, reactor=MemoryReactorClock())
        warned = [e for e in events if "no providers configured" in e.get("log_format", "")]
        self.assertEqual(len(warned), 1)

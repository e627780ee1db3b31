"""The twistd plugin's options and service tree (nothing listens)."""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from llmgate import tap
from llmgate.relay.client import UpstreamClient
from llmgate.service import Listener


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
        self.assertEqual([s.desc for s in top if isinstance(s, Listener)], ["tcp:1", "tcp:2"])

    def test_budget_cutoff_in_tree(self) -> None:
        """The tree holds the budget cut-off, watching the resource's relays with the accounting's estimate."""
        from llmgate import config
        from llmgate.api.resource import GatewayResource
        from llmgate.policy.cutoff import BudgetCutoff

        cfg = config.parse({"providers": {"p": {"kind": "openai", "base_url": "http://x/v1", "default": True}}}, {})
        top = tap.build(cfg, MemoryReactorClock(), ["tcp:1"])
        [cut] = [s for s in top if isinstance(s, BudgetCutoff)]
        [listener] = [s for s in top if isinstance(s, Listener)]
        root = listener.factory.resource
        self.assertIsInstance(root, GatewayResource)
        self.assertIs(cut._relays, root.active)
        self.assertIs(cut._quotas, root.quotas)

    def test_streams_drive_young_collections(self) -> None:
        """The resource tells the tree's young collections of every stream it starts."""
        from llmgate import config
        from llmgate.ops.gcstats import YoungCollections

        cfg = config.parse({"providers": {"p": {"kind": "openai", "base_url": "http://x/v1", "default": True}}}, {})
        top = tap.build(cfg, MemoryReactorClock(), ["tcp:1"])
        [young] = [s for s in top if isinstance(s, YoungCollections)]
        [listener] = [s for s in top if isinstance(s, Listener)]
        self.assertEqual(listener.factory.resource.stream_started, young.stream_started)

    def test_reactor_descriptor_counts_drive_young_collections(self) -> None:
        """
        On the gateway's own reactor, every YOUNG_PER_DESCRIPTORS ready
        descriptors handled run one of the tree's young collections, and
        upstream connections are handled last in each turn; the daemon's GC
        settings make that service freeze what survives.
        """
        from llmgate import config
        from llmgate.ops import gcstats, sendnow
        from llmgate.ops.gcstats import YoungCollections

        hooked: list[tuple[int, object]] = []
        last: list[tuple[type, ...]] = []

        class CountingReactor(MemoryReactorClock):
            def everyDescriptors(self, count: int, call: object) -> None:
                hooked.append((count, call))

            def handleLast(self, *types: type) -> None:
                last.append(types)

        cfg = config.parse({"providers": {"p": {"kind": "openai", "base_url": "http://x/v1", "default": True}}}, {})
        top = tap.build(cfg, CountingReactor(), ["tcp:1"])
        [young] = [s for s in top if isinstance(s, YoungCollections)]
        self.assertEqual(hooked, [(gcstats.YOUNG_PER_DESCRIPTORS, young.descriptors)])
        # Upstream connections' reads come after new requests in each turn.
        self.assertEqual(last, [(sendnow.SendNowClient,)])
        tuned: list[object] = []
        self.patch(gcstats, "tune", tuned.append)
        tap._tune_gc(top)
        self.assertEqual(tuned, [young])

    def test_request_metrics_only_with_a_metrics_port(self) -> None:
        """
        Without a [metrics] port nothing reads the per-request metrics, so
        requests update none (no accounting metrics, none for the
        resource's refusals or the attempts); with one they are kept, and
        batched on the reactor.
        """
        from llmgate import config
        from llmgate.ops.metrics import Metrics

        providers = {"p": {"kind": "openai", "base_url": "http://x/v1", "default": True}}

        def root(doc: dict) -> object:  # type: ignore[type-arg]
            reactor = MemoryReactorClock()
            top = tap.build(config.parse(doc, {}), reactor, ["tcp:1"])
            listener = [s for s in top if isinstance(s, Listener)][0]
            return listener.factory.resource, reactor

        off, _ = root({"providers": providers})
        self.assertIsNone(off.accounting.metrics)  # type: ignore[attr-defined]
        on, reactor = root({"providers": providers, "metrics": {"port": "tcp:9"}})
        self.assertIsInstance(on.accounting.metrics, Metrics)  # type: ignore[attr-defined]
        self.assertIs(on.accounting.metrics._clock, reactor)  # type: ignore[attr-defined]

    def test_site_limits_from_config(self) -> None:
        """The listening site takes the body cap and the buffered-bodies budget from the config."""
        from llmgate import config

        cfg = config.parse({"server": {"max_body_bytes": 1000, "max_buffered_body_bytes": 5000}}, {})
        top = tap.build(cfg, MemoryReactorClock(), ["tcp:1"])
        [listener] = [s for s in top if isinstance(s, Listener)]
        self.assertEqual(listener.factory.budget.limit, 5000)
        self.assertEqual(listener.factory.requestFactory.maxBody, 1000)

    def test_writes_coalesced(self) -> None:
        """
        The gateway twistd runs coalesces client writes per reactor turn,
        the configuration tests.fakes.Gateway gives the unit tests.
        """
        from llmgate import config
        from llmgate.relay.stream import Coalescer

        cfg = config.parse({"providers": {"p": {"kind": "openai", "base_url": "http://x/v1", "default": True}}}, {})
        top = tap.build(cfg, MemoryReactorClock(), ["tcp:1"])
        [listener] = [s for s in top if isinstance(s, Listener)]
        self.assertIsInstance(listener.factory.resource._coalescer, Coalescer)

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
        root = next(s for s in services if isinstance(s, Listener)).factory.resource
        self.assertEqual(root._parse_in_thread, pools["llmgate-parse"].submit)
        self.assertIs(root.accounting._in_thread, pools["llmgate-estimate"])


    def test_state_from_config(self) -> None:
        """
        With [state] redis_url the gateway's quotas use a RedisState (its
        URL, timeout and policy), started before the Drain so it stops
        after it and the last settles reach Redis; without it, memory.
        """
        from llmgate import config
        from llmgate.ops.drain import Drain
        from llmgate.policy.limits import MemoryState
        from llmgate.policy.redis import RedisState

        doc = {"providers": {"p": {"kind": "openai", "base_url": "http://x/v1", "default": True}}}
        top = tap.build(config.parse(doc, {}), MemoryReactorClock(), ["tcp:1"])
        root = next(s for s in top if isinstance(s, Listener)).factory.resource
        self.assertIsInstance(root.quotas.state, MemoryState)
        doc["state"] = {"redis_url": "redis://127.0.0.1:6390/2", "timeout": 0.1, "on_error": "fail_open"}
        doc["metrics"] = {"port": "tcp:9"}  # the registry read below
        services = list(tap.build(config.parse(doc, {}), MemoryReactorClock(), ["tcp:1"]))
        root = next(s for s in services if isinstance(s, Listener)).factory.resource
        state = root.quotas.state
        self.assertIsInstance(state, RedisState)
        self.assertEqual((state.client.port, state.client.db, state.client.timeout, state.on_error), (6390, 2, 0.1, "fail_open"))
        self.assertLess(services.index(state), next(i for i, s in enumerate(services) if isinstance(s, Drain)))
        registry = root.accounting.metrics.registry
        self.assertEqual(registry.get_sample_value("llmgate_state_errors_total", {"policy": "fail_open"}), 0)


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
        self.patch(tap, "_tune_gc", lambda tree: None)
        tap.makeService(o, reactor=MemoryReactorClock())
        warned = [e for e in events if "no providers configured" in e.get("log_format", "")]
        self.assertEqual(len(warned), 1)


class StartErrorTests(SynchronousTestCase):
    """
    What the daemon cannot start with stops twistd as a usage error (one
    line naming the setting), never as a traceback from makeService.
    """

    def usage_error(self, text: str, *args: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        with self.assertRaises(usage.UsageError) as e:
            tap.Options().parseOptions(["--config", path, *args])
        return str(e.exception)

    def test_price_without_output(self) -> None:
        """A price without output."""
        self.assertIn("prices.m.output: missing", self.usage_error("[prices.m]\ninput = 1\n"))

    def test_negative_price(self) -> None:
        """A negative price."""
        self.assertIn("prices.m.output", self.usage_error("[prices.m]\ninput = 1\noutput = -2\n"))

    def test_bad_metrics_endpoint(self) -> None:
        """A [metrics] port that is no endpoint string."""
        self.assertIn("metrics.port", self.usage_error('[metrics]\nport = "tcp:abc"\n'))

    def test_bad_port(self) -> None:
        """--port tcp:abc, with or without a config file."""
        self.assertIn("--port: invalid endpoint 'tcp:abc'", self.usage_error("", "--port", "tcp:abc"))
        with self.assertRaises(usage.UsageError) as e:
            tap.Options().parseOptions(["--demo", "--port", "tcp:abc"])
        self.assertIn("--port", str(e.exception))

    def test_missing_systemd_socket(self) -> None:
        """A systemd endpoint naming no socket systemd passed says what to fix."""
        msg = self.usage_error("", "--port", "systemd:domain=INET:name=llmgate-test-nothing")
        self.assertIn("FileDescriptorName", msg)


class ReloadRefusalTests(SynchronousTestCase):
    def test_last_key_removed_with_public_bare_port(self) -> None:
        """
        A reload that removes every gateway key is refused when a bare
        --port listens on every interface: it would become an open relay.
        """
        from llmgate import config

        keyless = config.parse({}, {})
        self.assertIn("keys:", tap._reload_refusal(keyless, bare_public=True))
        self.assertIsNone(tap._reload_refusal(keyless, bare_public=False))
        keyed = config.parse({"keys": {"a": {"api_key_env": "K"}}}, {"K": "s"})
        self.assertIsNone(tap._reload_refusal(keyed, bare_public=True))

    def test_state_change_needs_restart(self) -> None:
        """A reload changing [state] is refused (the state is built at start); one keeping it is taken."""
        from llmgate import config

        cur = config.parse({"state": {"redis_url": "redis://127.0.0.1:6379/0"}}, {})
        for new in ({}, {"state": {"redis_url": "redis://127.0.0.1:6380/0"}},
                    {"state": {"redis_url": "redis://127.0.0.1:6379/0", "on_error": "fail_open"}}):
            self.assertIn("restart", tap._reload_refusal(config.parse(new, {}), False, cur))
        self.assertIsNone(tap._reload_refusal(config.parse({"state": {"redis_url": "redis://127.0.0.1:6379/0"}}, {}), False, cur))

    def test_bare_public_option(self) -> None:
        """bare_public is set only for a bare --port with gateway keys."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('[keys.a]\napi_key_env = "PATH"\n')
        for args, want in [
            (["--port", "8081"], True),
            ([], True),
            (["--port", "tcp:8081"], False),
        ]:
            o = tap.Options()
            o.parseOptions(["--config", path, *args])
            self.assertEqual(o["bare_public"], want, args)
        o = tap.Options()
        o.parseOptions(["--demo", "--port", "8081"])
        self.assertFalse(o["bare_public"])


class ReloadWiringTests(SynchronousTestCase):
    def test_reload_reaches_routes_keys_and_prices(self) -> None:
        """
        The tree's Reloader hands an accepted file to the gateway resource
        (routes, gateway keys, the key file's keys) and the accounting
        (prices).
        """
        from twisted.internet.defer import maybeDeferred

        from llmgate import config
        from llmgate.reload import Reloader

        path = self.mktemp()
        base = '[providers.p]\nkind = "openai"\nbase_url = "http://x/v1"\n'
        with open(path, "w") as f:
            f.write(base + '[models.old]\nprovider = "p"\n')
        env = {"K1": "secret-1"}
        top = tap.build(config.load(path, env), MemoryReactorClock(), ["tcp:1"], config_path=path)
        [reloader] = [s for s in top if isinstance(s, Reloader)]
        reloader._in_thread = maybeDeferred  # type: ignore[assignment]
        reloader._load = lambda p: config.load(p, env)  # type: ignore[assignment]
        [listener] = [s for s in top if isinstance(s, Listener)]
        root = listener.factory.resource
        with open(path, "w") as f:
            f.write(
                base + '[models.new]\nprovider = "p"\n[keys.team]\napi_key_env = "K1"\n'
                '[prices.new]\ninput = 1\noutput = 2\n'
            )
        from llmgate.policy import keys as keymod

        keymod.write_raw(config.key_file_path(path, None), {"filed": {"hash": "sha256:" + "0" * 64, "rpm": 3}})
        reloader.reload()
        self.assertEqual(sorted(root.config.models), ["new"])
        self.assertEqual(sorted(root.keys.by_name), ["filed", "team"])
        self.assertEqual(root.keys.by_name["filed"].limits.rpm, 3)
        self.assertEqual(root.accounting.prices.lookup("new").output, 2.0)

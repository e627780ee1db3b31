"""Config validation: every error names the setting."""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from llmgate import config as c


def provider(**kw: object) -> dict[str, object]:
    return {"providers": {"p": {"kind": "openai", "base_url": "http://x/v1", **kw}}}


class ParseTests(SynchronousTestCase):
    def check(self, doc: dict[str, object], *fragments: str, env: dict[str, str] | None = None) -> None:
        with self.assertRaises(c.ConfigError) as e:
            c.parse(doc, env or {})
        for f in fragments:
            self.assertIn(f, str(e.exception))

    def test_unknown_key(self) -> None:
        """An unknown setting is named with its table."""
        self.check(provider(colour="red"), "providers.p.colour", "unknown setting")
        self.check({"bogus": 1}, "config.bogus")

    def test_wrong_type(self) -> None:
        """A wrong type names the setting and the expected type."""
        self.check({"timeouts": {"idle": "soon"}}, "timeouts.idle", "expected int or float")
        self.check(provider(default="yes"), "providers.p.default", "bool")
        self.check({"server": {"max_body_bytes": True}}, "server.max_body_bytes")

    def test_buffered_bodies_budget(self) -> None:
        """
        server.max_buffered_body_bytes defaults to 256 MiB and may not be
        below the per-request cap.
        """
        self.assertEqual(c.parse({}, {}).max_buffered_body_bytes, 256 * 1024 * 1024)
        cfg = c.parse({"server": {"max_buffered_body_bytes": 64 * 1024 * 1024}}, {})
        self.assertEqual(cfg.max_buffered_body_bytes, 64 * 1024 * 1024)
        self.check({"server": {"max_buffered_body_bytes": 10}}, "server.max_buffered_body_bytes", "at least")
        self.check({"server": {"max_buffered_body_bytes": "1G"}}, "server.max_buffered_body_bytes", "int")

    def test_missing_env_var(self) -> None:
        """A key from an unset environment variable is refused at start."""
        self.check(provider(api_key_env="NOPE_KEY"), "providers.p.api_key_env", "NOPE_KEY")

    def test_unknown_kind(self) -> None:
        """An unknown provider kind lists the known ones."""
        self.check({"providers": {"p": {"kind": "gemini"}}}, "providers.p.kind", "gemini", "openai")

    def test_inline_secret_refused(self) -> None:
        """Secrets come from an env var or a file, never inline."""
        self.check(provider(api_key="sk-123"), "providers.p", "inline")

    def test_key_from_file(self) -> None:
        """A provider key can be read from a file."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("sk-file\n")
        cfg = c.parse(provider(api_key_file=path), {})
        self.assertEqual(cfg.providers["p"].api_key, "sk-file")
        self.check(provider(api_key_file=path + ".missing"), "providers.p.api_key_file", "cannot read")

    def test_model_to_unknown_provider(self) -> None:
        """A model naming no configured provider is refused."""
        self.check({"models": {"m": {"provider": "ghost"}}}, "models.m.provider", "ghost")

    def test_routing(self) -> None:
        """
        Listed models go to their provider under their upstream name; other
        models go to the default provider of the route's dialect.
        """
        cfg = c.parse(
            {
                "providers": {
                    "a": {"kind": "openai", "base_url": "http://a/v1", "default": True},
                    "b": {"kind": "anthropic", "base_url": "http://b"},
                },
                "models": {"fast": {"provider": "a", "upstream_model": "gpt-4o-mini"}, "claude": {"provider": "b"}},
            },
            {},
        )
        p, m = cfg.route("openai", "fast")
        self.assertEqual((p.name, m), ("a", "gpt-4o-mini"))
        self.assertEqual(cfg.route("openai", "other")[1], "other")
        self.assertEqual(cfg.route("anthropic", "claude")[1], "claude")
        self.assertIsNone(cfg.route("anthropic", "other"))
        self.assertIsNone(cfg.route("openai", "claude"))

    def test_from_environment(self) -> None:
        """With no file, providers come from the SDKs' own variables."""
        cfg = c.from_environment(
            {"OPENAI_API_KEY": "sk-o", "OPENAI_BASE_URL": "http://vllm:8000/v1/", "ANTHROPIC_API_KEY": "sk-a"}
        )
        self.assertEqual(cfg.providers["openai"].base_url, "http://vllm:8000/v1")
        self.assertEqual(cfg.providers["openai"].api_key, "sk-o")
        self.assertEqual(cfg.providers["anthropic"].base_url, c.ANTHROPIC_DEFAULT_BASE)
        self.assertEqual(cfg.route("anthropic", "claude-sonnet-4")[0].name, "anthropic")

    def test_secret_not_in_repr(self) -> None:
        """A provider's key never shows in its repr (and so in logs)."""
        cfg = c.parse(provider(api_key_env="K"), {"K": "sk-very-secret"})
        self.assertNotIn("sk-very-secret", repr(cfg))

    def test_load_toml(self) -> None:
        """A TOML file is read; a broken one is one clear error."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('[providers.p]\nkind = "openai"\nbase_url = "http://x/v1"\n')
        self.assertIn("p", c.load(path, {}).providers)
        with open(path, "w") as f:
            f.write("[providers\n")
        with self.assertRaises(c.ConfigError) as e:
            c.load(path, {})
        self.assertIn("not valid TOML", str(e.exception))
        self.assertTrue(os.path.exists(path))


class UrlTests(SynchronousTestCase):
    def test_bad_base_urls(self) -> None:
        """A base URL the client could not use is refused at start."""
        for url, words in [
            ("ftp://x/v1", "http://"),
            ("http://host:notaport/v1", "invalid port"),
            ("http:///v1", "no host"),
            ("http://x/v1?a=b", "query"),
        ]:
            with self.assertRaises(c.ConfigError) as e:
                c.parse(provider(base_url=url), {})
            self.assertIn("providers.p.base_url", str(e.exception))
            self.assertIn(words, str(e.exception))


class DaemonSettingsTests(SynchronousTestCase):
    """
    Everything the daemon uses at start is checked by parse, so a file that
    passes check-config never stops the daemon with a traceback.
    """

    def error(self, doc: dict[str, object]) -> str:
        with self.assertRaises(c.ConfigError) as e:
            c.parse(doc, {})
        return str(e.exception)

    def test_price_without_output(self) -> None:
        """A price with input but no output names prices.<model>.output."""
        msg = self.error({"prices": {"my-model": {"input": 1.0}}})
        self.assertIn("prices.my-model.output: missing", msg)
        self.assertIn("USD per 1M", msg)

    def test_negative_price(self) -> None:
        """A negative or non-finite price is refused, naming the setting."""
        msg = self.error({"prices": {"m": {"input": -1, "output": 2}}})
        self.assertIn("prices.m.input", msg)
        self.assertIn(">= 0", msg)
        self.assertIn("prices.m.output", self.error({"prices": {"m": {"input": 1, "output": float("nan")}}}))

    def test_valid_price(self) -> None:
        """A complete price is kept as floats."""
        cfg = c.parse({"prices": {"m": {"input": 1, "output": 2.5, "cached_input": 0}}}, {})
        self.assertEqual(dict(cfg.prices["m"]), {"input": 1.0, "output": 2.5, "cached_input": 0.0})

    def test_price_tiers_and_1h_cache_write_accepted(self) -> None:
        """
        Long-context tiers and the 1-hour cache-write price pass the config
        check and reach the daemon's price table with their values.
        """
        from llmgate.accounting.prices import PriceTable

        cfg = c.parse(
            {"prices": {"m": {"input": 3, "output": 15, "cache_write_1h": 6,
                              "tiers": [{"above": 200000, "input": 6, "output": 22.5}]}}},
            {},
        )
        price = PriceTable.from_config(dict(cfg.prices)).lookup("m")
        self.assertEqual(price.cache_write_1h, 6.0)
        self.assertEqual([(t.above, t.input, t.output) for t in price.tiers], [(200000, 6.0, 22.5)])

    def test_bad_tiers_refused_like_the_daemon(self) -> None:
        """
        A tier the price table would refuse (no threshold, negative rate,
        not a list) is refused by the config check, naming prices.<model>.
        """
        for tiers in [[{"input": 6}], [{"above": 200000, "input": -1}], {"above": 1}]:
            msg = self.error({"prices": {"m": {"input": 1, "output": 2, "tiers": tiers}}})
            self.assertIn("prices.m", msg, tiers)
            self.assertIn("tiers", msg, tiers)

    def test_bad_metrics_endpoint(self) -> None:
        """A [metrics] port that is not an endpoint string names metrics.port."""
        for bad in ["tcp:abc", "nope:1", "tcp:70000", ""]:
            msg = self.error({"metrics": {"port": bad}})
            self.assertIn("metrics.port", msg, bad)
            self.assertIn("tcp:8080:interface=127.0.0.1", msg)

    def test_metrics_bare_port_is_loopback(self) -> None:
        """A bare [metrics] port number (int or string) listens on 127.0.0.1."""
        for port in [9464, "9464"]:
            cfg = c.parse({"metrics": {"port": port}}, {})
            self.assertEqual(cfg.metrics_port, "tcp:9464:interface=127.0.0.1")
        cfg = c.parse({"metrics": {"port": "tcp:9464"}}, {})
        self.assertEqual(cfg.metrics_port, "tcp:9464")


class ListenEndpointTests(SynchronousTestCase):
    def test_bad_port_value(self) -> None:
        """A --port value that is no endpoint is one error naming --port."""
        for bad in ["tcp:abc", "bogus:1", "70000", "systemd:domain=INET"]:
            with self.assertRaises(c.ConfigError) as e:
                c.listen_endpoints([bad], True)
            self.assertIn("--port", str(e.exception))
            self.assertIn(repr(bad) if not bad.isdigit() else "70000", str(e.exception))

    def test_bare_ports(self) -> None:
        """
        A bare port listens on loopback only without gateway keys, on every
        interface with them; 8080 when no --port is given; TCP gets a deep
        backlog.
        """
        self.assertEqual(c.listen_endpoints([], True), ["tcp:8080:interface=127.0.0.1:backlog=4096"])
        self.assertEqual(c.listen_endpoints(["81"], False), ["tcp:81:backlog=4096"])
        self.assertEqual(c.listen_endpoints(["unix:/tmp/s"], True), ["unix:/tmp/s"])

    def test_systemd_socket(self) -> None:
        """
        A systemd endpoint must name an inherited socket in the daemon; the
        check outside systemd (check-config) looks at its syntax only.
        """
        desc = "systemd:domain=INET:name=llmgate-test-nothing"
        self.assertEqual(c.listen_endpoints([desc], True, inherited=False), [desc])
        with self.assertRaises(c.ConfigError) as e:
            c.listen_endpoints([desc], True)
        self.assertIn("FileDescriptorName", str(e.exception))


class StateTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """Without [state] the limits live in memory; fail_closed and a 50 ms timeout are the defaults."""
        cfg = c.parse(provider(), {})
        self.assertEqual((cfg.state_redis_url, cfg.state_timeout, cfg.state_on_error), (None, 0.05, "fail_closed"))

    def test_settings(self) -> None:
        """[state] redis_url, timeout and on_error are read."""
        cfg = c.parse({**provider(), "state": {
            "redis_url": "redis://127.0.0.1:6380/1", "timeout": 0.2, "on_error": "fail_open"}}, {})
        self.assertEqual((cfg.state_redis_url, cfg.state_timeout, cfg.state_on_error),
                         ("redis://127.0.0.1:6380/1", 0.2, "fail_open"))

    def test_invalid(self) -> None:
        """A bad URL, policy, timeout or unknown setting is a ConfigError naming the setting."""
        for state, where in (
            ({"redis_url": "http://h"}, "state.redis_url"),
            ({"redis_url": "redis://h/x"}, "state.redis_url"),
            ({"on_error": "ignore"}, "state.on_error"),
            ({"timeout": 0}, "state.timeout"),
            ({"url": "redis://h"}, "state.url"),
        ):
            with self.assertRaises(c.ConfigError) as e:
                c.parse({**provider(), "state": state}, {})
            self.assertIn(where, str(e.exception))

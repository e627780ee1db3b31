# -*- test-case-name: tests.ops.test_startup -*-
"""The start-up block and --version."""

from __future__ import annotations

import io
import subprocess
import sys
from contextlib import redirect_stdout
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.trial.unittest import SynchronousTestCase

from llmgate import __version__, cli
from llmgate.config import parse
from llmgate.ops.startup import describe


class _Port:
    def __init__(self, host: str, port: int) -> None:
        self._addr = IPv4Address("TCP", host, port)

    def getHost(self) -> Any:
        return self._addr


class _Listener:
    def __init__(self, setting: str, desc: str, port: Any) -> None:
        self.setting, self.desc, self.port = setting, desc, port


def config(env: Any = None, **extra: Any) -> Any:
    doc: dict[str, Any] = {
        "providers": {"oai": {"kind": "openai", "base_url": "https://user:pw@api.example/v1", "default": True}},
        "models": {"fast": {"provider": "oai", "upstream_model": "gpt-4o-mini"}},
        "ledger": {"path": "/var/lib/llmgate/usage.db"},
    }
    doc.update(extra)
    return parse(doc, env or {})


class DescribeTests(SynchronousTestCase):
    def test_block(self) -> None:
        """The block names version, workers, providers, models, bound addresses, ledger and metrics."""
        text, facts = describe(
            config(), demo=False, workers=4,
            listeners=[_Listener("--port", "tcp:8080:interface=127.0.0.1", _Port("127.0.0.1", 8080)),
                       _Listener("[metrics] port", "tcp:9464", _Port("0.0.0.0", 9464))],
            raw_ports=["8080"], config_path="/etc/llmgate.toml",
        )
        self.assertTrue(text.startswith(f"llmgate {__version__} running (config /etc/llmgate.toml)"), text)
        self.assertIn("workers: 4 worker processes", text)
        self.assertIn("oai: openai at https://api.example/v1 (default", text)
        self.assertIn("fast -> oai/gpt-4o-mini", text)
        self.assertIn("listening: 127.0.0.1:8080 (tcp:8080:interface=127.0.0.1)", text)
        self.assertIn("bare port (8080) listens on 127.0.0.1 only", text)
        self.assertIn("ledger: /var/lib/llmgate/usage.db", text)
        self.assertIn("metrics: http://0.0.0.0:9464/metrics", text)
        self.assertEqual(facts["listening"][0]["address"], "127.0.0.1:8080")
        self.assertTrue(facts["bare_ports_loopback_only"])
        self.assertEqual(facts["workers"], 4)
        self.assertIn("opentelemetry: off", text)

    def test_otel_line(self) -> None:
        """With [otel], the block names the OTLP endpoint (without credentials) and service name."""
        text, facts = describe(
            config(otel={"endpoint": "http://u:pw@127.0.0.1:4318", "service_name": "gw"}), demo=False, workers=1,
            listeners=[], raw_ports=["8080"], config_path=None,
        )
        self.assertIn("opentelemetry: GenAI metrics and spans over OTLP/HTTP to http://127.0.0.1:4318 (service gw)", text)
        self.assertNotIn("pw", text)
        self.assertEqual(facts["otel"], "http://127.0.0.1:4318")

    def test_no_secrets(self) -> None:
        """Credentials in a base URL and gateway key names and secrets are never shown."""
        cfg = config({"GW": "gw-very-secret"}, keys={"team-a": {"api_key_env": "GW"}})
        text, facts = describe(cfg, demo=False, workers=1, listeners=[], raw_ports=["8080"], config_path=None)
        for secret in ("pw@", "user", "gw-very-secret", "team-a"):
            self.assertNotIn(secret, text + repr(facts))
        self.assertIn("gateway keys: 1", text)
        self.assertIn("listens on every interface: gateway keys are required", text)

    def test_demo(self) -> None:
        """--demo says so."""
        text, facts = describe(config(), demo=True, workers=1, listeners=[], raw_ports=[], config_path=None)
        self.assertIn("(demo: the built-in mock provider", text)
        self.assertTrue(facts["demo"])


class VersionTests(SynchronousTestCase):
    def test_cli_version(self) -> None:
        """llmgate --version prints the version and exits 0."""
        out = io.StringIO()
        with redirect_stdout(out):
            with self.assertRaises(SystemExit) as e:
                cli.main(["--version"])
        self.assertEqual(e.exception.code, 0)
        self.assertTrue(out.getvalue().startswith(f"llmgate {__version__} "), out.getvalue())

    def test_twistd_version(self) -> None:
        """twistd llmgate --version prints llmgate's version and exits 0."""
        p = subprocess.run(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "llmgate", "--version"],
            capture_output=True, text=True, timeout=60,
        )
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertTrue(p.stdout.startswith(f"llmgate {__version__} (Twisted "), p.stdout)


class KeyFileTests(SynchronousTestCase):
    def test_key_file_keys_counted_and_labelled(self) -> None:
        """Keys from a key file count in the start-up block and are metric key labels."""
        import dataclasses

        from llmgate.policy.keys import KeyRecord
        from llmgate.tap import key_names

        cfg = dataclasses.replace(config(), key_records=(KeyRecord(name="file-key", digest=b"\0" * 32),))
        text, facts = describe(cfg, demo=False, workers=1, listeners=[], raw_ports=["8080"], config_path=None)
        self.assertIn("gateway keys: 1", text)
        self.assertFalse(facts["bare_ports_loopback_only"])
        self.assertEqual(key_names(cfg), ["file-key"])

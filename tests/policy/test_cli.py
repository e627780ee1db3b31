"""
Tests for C{llmgate keys}: the secret is printed once and only its hash is
stored; list and revoke edit the same file the daemon reads.
"""

from __future__ import annotations

import io
import os
import tempfile
from contextlib import redirect_stderr, redirect_stdout

from twisted.trial.unittest import SynchronousTestCase

from llmgate import cli
from llmgate import config as configmod
from llmgate.policy import keys as keymod


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


CONFIG = """
[providers.oai]
kind = "openai"
base_url = "http://127.0.0.1:1/v1"
api_key_env = "LLMGATE_TEST_NO_SUCH_VAR_IS_FINE_FOR_THE_CLI"
"""


class KeysCLITests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(lambda: __import__("shutil").rmtree(self.dir))
        self.file = os.path.join(self.dir, "keys.json")

    def test_create_prints_secret_stores_hash(self) -> None:
        """create prints the secret; the file holds its sha256 only, and that finds the key."""
        code, out, err = run("keys", "--file", self.file, "create", "alice", "--models", "gpt-4o*", "claude-*",
                             "--rpm", "5", "--tpm", "900", "--concurrency", "2", "--budget", "3.5", "--period", "day",
                             "--expires", "2030-01-01", "--tag", "team=search", "--tag", "env=prod")
        self.assertEqual(code, 0, err)
        secret = out.strip()
        self.assertTrue(secret.startswith("lg-"))
        with open(self.file) as f:
            text = f.read()
        self.assertNotIn(secret, text)
        self.assertNotIn(secret[3:], text)
        (r,) = keymod.load(self.file)
        self.assertEqual(keymod.KeyStore([r]).find(secret.encode()).name, "alice")
        self.assertEqual((r.models, r.limits, r.budget_usd, r.period), (("gpt-4o*", "claude-*"), keymod.Limits(5, 900, 2), 3.5, "day"))
        self.assertEqual(dict(r.tags), {"team": "search", "env": "prod"})
        self.assertEqual(keymod.format_time(r.expires), "2030-01-01T00:00:00Z")

    def test_cut_at_budget_flag(self) -> None:
        """--cut-at-budget stores cut_at_budget (needs --budget); without it the key is not cut."""
        code, _, err = run("keys", "--file", self.file, "create", "a", "--budget", "1", "--cut-at-budget")
        self.assertEqual(code, 0, err)
        run("keys", "--file", self.file, "create", "b", "--budget", "1")
        code, _, err = run("keys", "--file", self.file, "create", "c", "--cut-at-budget")
        self.assertEqual(code, 1)
        self.assertIn("needs --budget", err)
        self.assertEqual({r.name: r.cut_at_budget for r in keymod.load(self.file)}, {"a": True, "b": False})

    def test_list_and_revoke(self) -> None:
        """list shows names and limits, never hashes; revoke removes the key; a second create of a name fails."""
        run("keys", "--file", self.file, "create", "a", "--rpm", "3")
        _, secret_b, _ = run("keys", "--file", self.file, "create", "b")
        self.assertEqual(run("keys", "--file", self.file, "create", "a")[0], 1)
        code, out, _ = run("keys", "--file", self.file, "list")
        self.assertEqual(out.splitlines(), ["a  models=*  rpm=3", "b  models=*"])
        self.assertNotIn("sha256", out)
        self.assertEqual(run("keys", "--file", self.file, "revoke", "a")[0], 0)
        self.assertEqual([r.name for r in keymod.load(self.file)], ["b"])
        self.assertEqual(run("keys", "--file", self.file, "revoke", "a")[0], 1)

    def test_config_names_the_file(self) -> None:
        """Without --file the key file is [keys] file of --config (relative to it), which the daemon's load reads."""
        cfg = os.path.join(self.dir, "llmgate.toml")
        with open(cfg, "w") as f:
            f.write(CONFIG + '\n[keys]\nfile = "sub.toml"\n')
        code, out, err = run("keys", "--config", cfg, "create", "ci")
        self.assertEqual(code, 0, err)
        self.assertTrue(os.path.exists(os.path.join(self.dir, "sub.toml")))
        loaded = configmod.load(cfg, env={"LLMGATE_TEST_NO_SUCH_VAR_IS_FINE_FOR_THE_CLI": "sk"})
        self.assertEqual([r.name for r in loaded.key_records], ["ci"])
        self.assertTrue(loaded.keyed)

    def test_default_file_beside_config(self) -> None:
        """With no [keys] file the key file is llmgate-keys.json beside the config."""
        cfg = os.path.join(self.dir, "llmgate.toml")
        with open(cfg, "w") as f:
            f.write(CONFIG)
        self.assertEqual(run("keys", "--config", cfg, "create", "x")[0], 0)
        self.assertTrue(os.path.exists(os.path.join(self.dir, "llmgate-keys.json")))
        loaded = configmod.load(cfg, env={"LLMGATE_TEST_NO_SUCH_VAR_IS_FINE_FOR_THE_CLI": "sk"})
        self.assertEqual(loaded.key_file, os.path.join(self.dir, "llmgate-keys.json"))
        self.assertEqual([r.name for r in loaded.key_records], ["x"])

    def test_bad_key_file_is_config_error(self) -> None:
        """A key file that does not validate fails the config load (so a reload keeps the running keys)."""
        cfg = os.path.join(self.dir, "llmgate.toml")
        with open(cfg, "w") as f:
            f.write(CONFIG)
        with open(os.path.join(self.dir, "llmgate-keys.json"), "w") as f:
            f.write('{"keys": {"a": {"hash": "secret"}}}')
        e = self.assertRaises(configmod.ConfigError, configmod.load, cfg, {"LLMGATE_TEST_NO_SUCH_VAR_IS_FINE_FOR_THE_CLI": "sk"})
        self.assertIn("keys.a.hash", str(e))

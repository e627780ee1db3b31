"""
Tests for L{llmgate.policy.keys}: the key file holds hashes only, is
rewritten atomically, and is read into records the gateway checks.
"""

from __future__ import annotations

import json
import os
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from llmgate.config import GatewayKey
from llmgate.policy import keys as keymod
from twisted.web.http_headers import Headers


def _hash(secret: str) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()


class SecretTests(SynchronousTestCase):
    def test_secret_shape(self) -> None:
        """A new secret is lg- and 32 random bytes in urlsafe base64 (43 characters), never the same twice."""
        a, b = keymod.new_secret(), keymod.new_secret()
        self.assertTrue(a.startswith("lg-"))
        self.assertEqual(len(a), 3 + 43)
        self.assertNotEqual(a, b)
        self.assertTrue(set(a[3:]) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"))


class FileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(lambda: __import__("shutil").rmtree(self.dir))

    def test_roundtrip_json_and_toml(self) -> None:
        """Every field written to a JSON or a TOML key file is read back the same."""
        entry = {
            "hash": _hash("s1"), "models": ["gpt-4o*", "claude-*"], "rpm": 5, "tpm": 1000, "concurrency": 2,
            "budget_usd": 1.5, "period": "day", "expires": "2030-01-02T00:00:00Z", "tags": {"team": "a \"b\""},
            "per_model": {"gpt-4o": {"rpm": 1}},
        }
        for name in ("k.json", "k.toml"):
            path = os.path.join(self.dir, name)
            keymod.write_raw(path, {"alice": entry})
            (r,) = keymod.load(path)
            self.assertEqual(r.name, "alice")
            self.assertEqual(r.digest.hex(), _hash("s1")[7:])
            self.assertEqual(r.models, ("gpt-4o*", "claude-*"))
            self.assertEqual(r.limits, keymod.Limits(5, 1000, 2))
            self.assertEqual(r.per_model, (("gpt-4o", keymod.Limits(1, None, None)),))
            self.assertEqual((r.budget_usd, r.period), (1.5, "day"))
            self.assertEqual(r.expires, 1893542400.0)
            self.assertEqual(dict(r.tags), {"team": 'a "b"'})

    def test_atomic_write_leaves_no_temp_and_is_private(self) -> None:
        """The file is replaced by rename: no temporary file stays beside it, and it is mode 0600."""
        path = os.path.join(self.dir, "k.json")
        keymod.write_raw(path, {"a": {"hash": _hash("x")}})
        keymod.write_raw(path, {"b": {"hash": _hash("y")}})
        self.assertEqual(os.listdir(self.dir), ["k.json"])
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        self.assertEqual([r.name for r in keymod.load(path)], ["b"])

    def test_invalid_write_keeps_old_file(self) -> None:
        """A record that does not validate is not written: the old file stays whole."""
        path = os.path.join(self.dir, "k.json")
        keymod.write_raw(path, {"a": {"hash": _hash("x")}})
        self.assertRaises(keymod.KeyFileError, keymod.write_raw, path, {"a": {"hash": "plain-secret"}})
        self.assertEqual([r.name for r in keymod.load(path)], ["a"])
        self.assertEqual(os.listdir(self.dir), ["k.json"])

    def test_missing_file_has_no_keys(self) -> None:
        """A key file that does not exist (yet) holds no keys."""
        self.assertEqual(keymod.load(os.path.join(self.dir, "none.json")), ())

    def test_invalid_files(self) -> None:
        """Bad hashes, unknown fields, bad periods and bad limits are refused with where they are."""
        path = os.path.join(self.dir, "k.json")
        for entry, where in (
            ({"hash": "sha256:abc"}, "keys.a.hash"),
            ({"hash": _hash("x"), "secret": "s"}, "unknown field(s) secret"),
            ({"hash": _hash("x"), "period": "week"}, "keys.a.period"),
            ({"hash": _hash("x"), "rpm": 0}, "keys.a.rpm"),
            ({"hash": _hash("x"), "expires": "soon"}, "expires"),
        ):
            with open(path, "w") as f:
                json.dump({"keys": {"a": entry}}, f)
            e = self.assertRaises(keymod.KeyFileError, keymod.load, path)
            self.assertIn(where, str(e))


class RecordTests(SynchronousTestCase):
    def test_allows_patterns(self) -> None:
        """Model patterns are fnmatch patterns; no patterns allow every model."""
        r = keymod.KeyRecord("a", b"x" * 32, models=("gpt-4o*",))
        self.assertTrue(r.allows("gpt-4o-mini"))
        self.assertFalse(r.allows("o1"))
        self.assertTrue(keymod.KeyRecord("b", b"y" * 32).allows("anything"))

    def test_expiry(self) -> None:
        """A key is expired from its expiry time on, and a date means its UTC midnight."""
        r = keymod.KeyRecord("a", b"x" * 32, expires=keymod.parse_expiry("2030-01-01"))
        self.assertFalse(r.expired(1893455999.0))
        self.assertTrue(r.expired(1893456000.0))

    def test_period_start(self) -> None:
        """Periods start at the UTC day, the UTC month, or never for total."""
        now = 1893542400.0 + 3600 * 5  # 2030-01-02T05:00Z
        self.assertEqual(keymod.period_start("day", now), 1893542400.0)
        self.assertEqual(keymod.period_start("month", now), 1893456000.0)
        self.assertEqual(keymod.period_start("total", now), 0.0)


class StoreTests(SynchronousTestCase):
    def test_find_by_secret(self) -> None:
        """The store finds a key by its secret (config keys too); a wrong or absent secret finds none."""
        file_rec = keymod.KeyRecord("f", keymod.digest(b"lg-file"))
        store = keymod.store_for([GatewayKey("c", "gw-conf")], [file_rec])
        self.assertEqual(store.find(b"lg-file").name, "f")
        self.assertEqual(store.find(b"gw-conf").name, "c")
        self.assertIsNone(store.find(b"lg-wrong"))
        self.assertIsNone(store.find(None))

    def test_file_record_wins_a_name(self) -> None:
        """A name in both the config and the key file is the key file's (its restrictions apply)."""
        store = keymod.store_for([GatewayKey("a", "old")], [keymod.KeyRecord("a", keymod.digest(b"new"), models=("x",))])
        self.assertIsNone(store.find(b"old"))
        self.assertEqual(store.find(b"new").models, ("x",))

    def test_presented_secret(self) -> None:
        """Bearer and x-api-key are both read; a repeated header presents nothing."""
        self.assertEqual(keymod.presented_secret(Headers({b"authorization": [b"Bearer lg-a"]})), b"lg-a")
        self.assertEqual(keymod.presented_secret(Headers({b"x-api-key": [b"lg-b"]})), b"lg-b")
        self.assertIsNone(keymod.presented_secret(Headers({b"x-api-key": [b"a", b"b"]})))
        self.assertIsNone(keymod.presented_secret(Headers({})))

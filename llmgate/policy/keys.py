# -*- test-case-name: tests.policy.test_keys -*-
"""
Gateway keys kept in a key file, as hashes.

The file never holds a secret: only the sha256 of each one, so reading it
(a backup, a support bundle, a config repository) gives nobody a usable
key.  The secret is printed once, by C{llmgate keys create}, and is not
recoverable afterwards; a lost key is revoked and a new one created.

A secret is C{lg-} and 32 random bytes (urlsafe base64): a key's entropy
makes a fast unsalted hash safe, there is no password to brute-force.

The file is JSON (or TOML when its name ends in C{.toml}):

    {"keys": {"alice": {"hash": "sha256:<hex>", "models": ["gpt-4o*"],
      "rpm": 60, "tpm": 100000, "concurrency": 4, "budget_usd": 10.0,
      "period": "month", "expires": "2027-01-01T00:00:00Z",
      "tags": {"team": "search"}, "cut_at_budget": false}}}

C{cut_at_budget} (off by default) ends a key's streams when its budget
runs out mid-stream (L{llmgate.policy.cutoff}) instead of letting them
finish past it.

Every field but C{hash} is optional: no C{models} means every model, no
limit means unlimited.  The CLI rewrites the file atomically (a temporary
file beside it, then C{rename}), so the daemon, which reads it at start
and on SIGHUP, sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import base64
import calendar
import datetime
import fnmatch
import hashlib
import hmac
import json
import os
import secrets
import tempfile
import tomllib
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

PERIODS = ("day", "month", "total")
_LIMIT_FIELDS = ("rpm", "tpm", "concurrency")
_FIELDS = {"hash", "models", "budget_usd", "period", "expires", "tags", "created", "per_model", "cut_at_budget"} | set(_LIMIT_FIELDS)

DEFAULT_FILE = "llmgate-keys.json"


class KeyFileError(ValueError):
    """The key file cannot be read or is not valid; the message says where."""


@dataclass(frozen=True)
class Limits:
    """Per-minute and concurrency limits; L{None} is unlimited."""

    rpm: Optional[int] = None
    tpm: Optional[int] = None
    concurrency: Optional[int] = None

    def any(self) -> bool:
        return any(v is not None for v in (self.rpm, self.tpm, self.concurrency))


@dataclass(frozen=True)
class KeyRecord:
    """
    One gateway key as the gateway knows it: its name, the sha256 of its
    secret and what it may do.  Config keys (C{[keys.NAME] api_key_env})
    become records with no restrictions.
    """

    name: str
    digest: bytes = field(repr=False)
    models: tuple[str, ...] = ()
    limits: Limits = Limits()
    # Limits of one key-model pair: (fnmatch pattern, limits), first match.
    per_model: tuple[tuple[str, Limits], ...] = ()
    budget_usd: Optional[float] = None
    period: str = "month"
    expires: Optional[float] = None  # epoch seconds
    tags: Mapping[str, str] = field(default_factory=dict)
    created: Optional[str] = None
    # End its streams mid-way when the budget runs out (llmgate.policy.cutoff).
    cut_at_budget: bool = False

    def allows(self, model: str) -> bool:
        """Whether the key may call C{model} (no patterns: every model)."""
        return not self.models or any(fnmatch.fnmatchcase(model, p) for p in self.models)

    def model_limits(self, model: str) -> Optional[tuple[str, Limits]]:
        """The pattern and limits of the key-model pair C{model} falls in."""
        for pattern, limits in self.per_model:
            if fnmatch.fnmatchcase(model, pattern):
                return pattern, limits
        return None

    def expired(self, now: float) -> bool:
        return self.expires is not None and now >= self.expires


def new_secret() -> str:
    """A new key's secret: C{lg-} and 32 random bytes, urlsafe base64."""
    return "lg-" + base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()


def digest(secret: bytes) -> bytes:
    return hashlib.sha256(secret).digest()


def parse_expiry(value: str) -> float:
    """
    C{YYYY-MM-DD} (the end of that UTC day is not included: the key stops
    working at its midnight) or an ISO 8601 time; a time without a zone is
    UTC.  Epoch seconds.
    """
    try:
        when = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise KeyFileError(f"expires: {value!r} is not a date (YYYY-MM-DD) or an ISO 8601 time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.timestamp()


def format_time(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _int(v: Any, where: str) -> Optional[int]:
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise KeyFileError(f"{where}: must be a positive integer")
    return v


def _limits(table: Mapping[str, Any], where: str) -> Limits:
    return Limits(*(_int(table.get(f), f"{where}.{f}") for f in _LIMIT_FIELDS))


def _record(name: str, table: Any) -> KeyRecord:
    where = f"keys.{name}"
    if not isinstance(table, dict):
        raise KeyFileError(f"{where}: must be a table")
    unknown = set(table) - _FIELDS
    if unknown:
        raise KeyFileError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    h = table.get("hash")
    if not isinstance(h, str) or not h.startswith("sha256:"):
        raise KeyFileError(f"{where}.hash: must be 'sha256:<64 hex digits>'")
    try:
        raw = bytes.fromhex(h[7:])
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise KeyFileError(f"{where}.hash: must be 'sha256:<64 hex digits>'")
    models = table.get("models", [])
    if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
        raise KeyFileError(f"{where}.models: must be a list of model name patterns")
    budget = table.get("budget_usd")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget < 0):
        raise KeyFileError(f"{where}.budget_usd: must be a number >= 0")
    period = table.get("period", "month")
    if period not in PERIODS:
        raise KeyFileError(f"{where}.period: must be one of {', '.join(PERIODS)}")
    expires = table.get("expires")
    if expires is not None:
        if not isinstance(expires, str):
            raise KeyFileError(f"{where}.expires: must be a date string")
        expires = parse_expiry(expires)
    cut = table.get("cut_at_budget", False)
    if not isinstance(cut, bool):
        raise KeyFileError(f"{where}.cut_at_budget: must be true or false")
    tags = table.get("tags", {})
    if not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values()):
        raise KeyFileError(f"{where}.tags: must be a table of strings")
    per_model = table.get("per_model", {})
    if not isinstance(per_model, dict):
        raise KeyFileError(f"{where}.per_model: must be a table of model pattern -> limits")
    pm = []
    for pattern, lim in per_model.items():
        if not isinstance(lim, dict) or set(lim) - set(_LIMIT_FIELDS):
            raise KeyFileError(f"{where}.per_model.{pattern}: must hold only rpm, tpm, concurrency")
        pm.append((pattern, _limits(lim, f"{where}.per_model.{pattern}")))
    return KeyRecord(
        name=name,
        digest=raw,
        models=tuple(models),
        limits=_limits(table, where),
        per_model=tuple(pm),
        budget_usd=None if budget is None else float(budget),
        period=period,
        expires=expires,
        tags=dict(tags),
        created=table.get("created"),
        cut_at_budget=cut,
    )


def _decode(path: str, data: bytes) -> dict[str, Any]:
    try:
        if path.endswith(".toml"):
            doc = tomllib.loads(data.decode("utf-8"))
        else:
            doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise KeyFileError(f"{path}: not valid {'TOML' if path.endswith('.toml') else 'JSON'}: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys", {}), dict):
        raise KeyFileError(f"{path}: must hold a 'keys' table")
    return doc


def read_raw(path: str) -> dict[str, Any]:
    """The file's C{keys} table as stored (the CLI edits it); empty if absent."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise KeyFileError(f"{path}: {e.strerror}") from None
    return dict(_decode(path, data).get("keys", {}))


def load(path: str) -> tuple[KeyRecord, ...]:
    """
    The key file's records (sync disk I/O: call it off the reactor thread).
    A missing file has no keys.
    """
    return tuple(_record(name, table) for name, table in read_raw(path).items())


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON's escapes are valid TOML basic strings
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def _dumps(path: str, keys: Mapping[str, Any]) -> bytes:
    if not path.endswith(".toml"):
        return (json.dumps({"keys": keys}, indent=2, sort_keys=True) + "\n").encode()
    lines = ["# llmgate gateway keys (hashes only); edit with `llmgate keys`"]
    for name in sorted(keys):
        lines.append(f"\n[keys.{json.dumps(name)}]")
        for k, v in sorted(keys[name].items()):
            lines.append(f"{k} = {_toml_value(v)}")
    return ("\n".join(lines) + "\n").encode()


def write_raw(path: str, keys: Mapping[str, Any]) -> None:
    """
    Replace the file with C{keys}, atomically: written to a temporary file
    in the same directory, flushed, then renamed over it.  Mode 0600: the
    hashes are not secrets, but names, budgets and tags are nobody else's.
    """
    # Validate what we write with the reader the daemon uses.
    data = _dumps(path, keys)
    for name, table in _decode(path, data).get("keys", {}).items():
        _record(name, table)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".llmgate-keys.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def period_start(period: str, now: float) -> float:
    """The start (epoch seconds, UTC) of the budget period C{now} is in."""
    if period == "total":
        return 0.0
    t = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
    if period == "day":
        start = t.replace(hour=0, minute=0, second=0, microsecond=0)
    else:
        start = t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return float(calendar.timegm(start.timetuple()))


def presented_secret(headers: Any) -> Optional[bytes]:
    """
    The secret a request presents: C{Authorization: Bearer ...} or
    C{x-api-key}; L{None} if none, or if either header is repeated (which
    one would be billed?).
    """
    auth = headers.getRawHeaders(b"authorization") or []
    api_key = headers.getRawHeaders(b"x-api-key") or []
    if len(auth) > 1 or len(api_key) > 1:
        return None
    presented = None
    if auth and auth[0][:7].lower() == b"bearer ":
        presented = auth[0][7:].strip()
    elif api_key:
        presented = api_key[0]
    return presented or None


class KeyStore:
    """
    The keys the gateway accepts: config keys and key file records, found
    by the sha256 of the presented secret.

    The lookup is a dict lookup on the digest followed by a constant-time
    compare: the timing of a dict lookup can only tell an attacker about
    the sha256 of their own guesses, which does not help find a secret.
    """

    def __init__(self, records: Iterable[KeyRecord]) -> None:
        self._by_digest: dict[bytes, KeyRecord] = {}
        self.by_name: dict[str, KeyRecord] = {}
        for r in records:
            self._by_digest[r.digest] = r
            self.by_name[r.name] = r

    def __len__(self) -> int:
        return len(self._by_digest)

    def find(self, secret: Optional[bytes]) -> Optional[KeyRecord]:
        if not secret:
            return None
        d = digest(secret)
        r = self._by_digest.get(d)
        if r is not None and hmac.compare_digest(r.digest, d):
            return r
        return None


def store_for(config_keys: Iterable[Any], records: Iterable[KeyRecord]) -> KeyStore:
    """
    A store of the config's C{[keys.NAME]} keys (no restrictions, as
    before) and the key file's records.  A name in both is the key file's.
    """
    file_records = list(records)
    names = {r.name for r in file_records}
    legacy = [KeyRecord(k.name, digest(k.secret.encode())) for k in config_keys if k.name not in names]
    return KeyStore(legacy + file_records)

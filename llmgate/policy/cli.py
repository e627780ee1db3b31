# -*- test-case-name: tests.policy.test_cli -*-
"""
C{llmgate keys create|list|revoke}: edit the key file.

The daemon reads the file at start and on SIGHUP; after an edit, send it
SIGHUP (C{kill -HUP <pid>}) for the change to take effect.  Streams in
flight are not dropped and spend is not reset by it.
"""

from __future__ import annotations

import argparse
import sys
import time
import tomllib
from typing import Any

from llmgate.config import key_file_path
from llmgate.policy import keys as keymod


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="llmgate.toml",
                   help="the daemon's config, to find its key file ([keys] file, or llmgate-keys.json beside it)")
    p.add_argument("--file", help="the key file (default: found from --config)")
    sub = p.add_subparsers(dest="action", required=True)
    c = sub.add_parser("create", help="add a key and print its secret (once)")
    c.add_argument("name")
    c.add_argument("--models", nargs="+", default=[], metavar="PATTERN", help="allowed model names (fnmatch patterns)")
    c.add_argument("--rpm", type=int, help="requests per minute")
    c.add_argument("--tpm", type=int, help="tokens (input + output) per minute")
    c.add_argument("--concurrency", type=int, help="requests in flight at once")
    c.add_argument("--budget", type=float, metavar="USD", help="spend allowed per --period")
    c.add_argument("--period", choices=keymod.PERIODS, default="month")
    c.add_argument("--cut-at-budget", action="store_true",
                   help="end the key's streams mid-way when its budget runs out (with --budget)")
    c.add_argument("--expires", metavar="DATE", help="YYYY-MM-DD or an ISO 8601 time (UTC unless a zone is given)")
    c.add_argument("--tag", action="append", default=[], metavar="K=V")
    sub.add_parser("list", help="list the keys (never their secrets)")
    r = sub.add_parser("revoke", help="remove a key")
    r.add_argument("name")


def key_file(args: argparse.Namespace) -> str:
    if args.file:
        return str(args.file)
    setting = None
    try:
        with open(args.config, "rb") as f:
            setting = tomllib.load(f).get("keys", {}).get("file")
    except FileNotFoundError:
        pass
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise keymod.KeyFileError(f"{args.config}: {e}") from None
    return key_file_path(args.config, setting if isinstance(setting, str) else None)


def run(args: argparse.Namespace) -> int:
    try:
        path = key_file(args)
        return {"create": _create, "list": _list, "revoke": _revoke}[args.action](args, path)
    except keymod.KeyFileError as e:
        print(f"llmgate keys: {e}", file=sys.stderr)
        return 1


def _create(args: argparse.Namespace, path: str) -> int:
    keys = keymod.read_raw(path)
    if args.name in keys:
        print(f"llmgate keys: a key named {args.name!r} exists in {path}; revoke it first", file=sys.stderr)
        return 1
    secret = keymod.new_secret()
    entry: dict[str, Any] = {
        "hash": "sha256:" + keymod.digest(secret.encode()).hex(),
        "created": keymod.format_time(time.time()),
    }
    if args.models:
        entry["models"] = list(args.models)
    for name in ("rpm", "tpm", "concurrency"):
        if getattr(args, name) is not None:
            entry[name] = getattr(args, name)
    if args.budget is not None:
        entry["budget_usd"] = args.budget
        entry["period"] = args.period
    if args.cut_at_budget:
        if args.budget is None:
            print("llmgate keys: --cut-at-budget needs --budget", file=sys.stderr)
            return 1
        entry["cut_at_budget"] = True
    if args.expires:
        entry["expires"] = keymod.format_time(keymod.parse_expiry(args.expires))
    tags = {}
    for t in args.tag:
        k, sep, v = t.partition("=")
        if not sep or not k:
            print(f"llmgate keys: --tag {t!r}: use KEY=VALUE", file=sys.stderr)
            return 1
        tags[k] = v
    if tags:
        entry["tags"] = tags
    keys[args.name] = entry
    keymod.write_raw(path, keys)
    print(secret)
    print(f"key {args.name!r} added to {path}; this secret is not stored and will not be shown again. "
          "Send the daemon SIGHUP to load it.", file=sys.stderr)
    return 0


def _list(args: argparse.Namespace, path: str) -> int:
    records = keymod.load(path)
    now = time.time()
    for r in sorted(records, key=lambda r: r.name):
        parts = [r.name]
        parts.append("models=" + (",".join(r.models) if r.models else "*"))
        for f in ("rpm", "tpm", "concurrency"):
            v = getattr(r.limits, f)
            if v is not None:
                parts.append(f"{f}={v}")
        if r.budget_usd is not None:
            parts.append(f"budget=${r.budget_usd:g}/{r.period}" + (" cut_at_budget" if r.cut_at_budget else ""))
        if r.expires is not None:
            parts.append(("expired=" if r.expired(now) else "expires=") + keymod.format_time(r.expires))
        for k, v in sorted(r.tags.items()):
            parts.append(f"{k}={v}")
        print("  ".join(parts))
    return 0


def _revoke(args: argparse.Namespace, path: str) -> int:
    keys = keymod.read_raw(path)
    if args.name not in keys:
        print(f"llmgate keys: no key named {args.name!r} in {path}", file=sys.stderr)
        return 1
    del keys[args.name]
    keymod.write_raw(path, keys)
    print(f"key {args.name!r} revoked in {path}; send the daemon SIGHUP to apply it", file=sys.stderr)
    return 0

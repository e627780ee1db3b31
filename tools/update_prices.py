#!/usr/bin/env python3
"""
Regenerate llmgate/accounting/prices.json from LiteLLM's price table.

LiteLLM (repository BerriAI/litellm) maintains
``model_prices_and_context_window.json``; each release of the ``litellm``
package ships the same file as
``litellm/model_prices_and_context_window_backup.json``. This script reads
LOCAL copies only (the gateway never fetches prices), keeps the models an
OpenAI/Anthropic gateway serves (OpenAI chat, reasoning, completion and
embedding models, Anthropic Claude, and the OpenAI-compatible DeepSeek,
Mistral, Groq and xAI models, their provider prefix dropped), converts USD
per token to USD per 1M tokens, and writes one line per model so a
regeneration diffs readably.

Sources are given newest first; an older one only adds models the newer
ones no longer list (LiteLLM drops retired models, whose last price is
still what old traffic cost). Each entry records which source it came
from.

Usage (paths and labels are examples)::

    pip download --no-deps litellm==1.110.2 -d /tmp/l
    unzip -p /tmp/l/litellm-1.110.2-*.whl \\
        litellm/model_prices_and_context_window_backup.json > /tmp/new.json
    python tools/update_prices.py \\
        --source /tmp/new.json "litellm 1.110.2" 2026-11-20 \\
        --source /tmp/old.json "litellm 1.80.0" 2025-11-16 \\
        --out llmgate/accounting/prices.json

A checkout of the repository works the same way: pass its
``model_prices_and_context_window.json`` and label it with the commit.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmgate.accounting.prices import ALIASES, load_price_file  # noqa: E402

# litellm_provider -> prefix LiteLLM puts on the key (dropped: clients of an
# OpenAI-compatible upstream send the bare name). Earlier wins a clash.
PROVIDERS = {
    "openai": "",
    "text-completion-openai": "",
    "anthropic": "",
    "deepseek": "deepseek/",
    "mistral": "mistral/",
    "groq": "groq/",
    "xai": "xai/",
}
MODES = {"chat", "responses", "completion", "embedding"}

# LiteLLM field -> our bucket. Batch, priority and flex service tiers,
# audio and image tokens are not modelled.
FIELDS = {
    "input_cost_per_token": "input",
    "output_cost_per_token": "output",
    "cache_read_input_token_cost": "cached_input",
    "cache_creation_input_token_cost": "cache_write",
    "cache_creation_input_token_cost_above_1hr": "cache_write_1h",
}
_TIER_KEY = re.compile(r"(?P<field>[a-z0-9_]+?)_above_(?P<k>\d+)k_tokens")

REPO = "BerriAI/litellm"
PATH = "model_prices_and_context_window.json"


def per_million(value) -> float:
    """USD per token -> USD per 1M tokens, float noise rounded away."""
    return round(float(value) * 1_000_000, 9) + 0.0


def convert(spec: dict) -> dict | None:
    """One LiteLLM entry -> our entry, or None if it has no token price."""
    out: dict = {}
    for src, dst in FIELDS.items():
        v = spec.get(src)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[dst] = per_million(v)
    if "input" not in out:
        return None
    if "output" not in out:
        if spec.get("mode") != "embedding":
            return None
        out["output"] = 0.0
    tiers: dict[int, dict] = {}
    for key, v in spec.items():
        m = _TIER_KEY.fullmatch(key)
        if m is None or m.group("field") not in FIELDS:
            continue
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        above = int(m.group("k")) * 1000
        tiers.setdefault(above, {"above": above})[FIELDS[m.group("field")]] = per_million(v)
    if tiers:
        order = ["above", *FIELDS.values()]  # stable key order: readable diffs
        out["tiers"] = [{k: tiers[a][k] for k in order if k in tiers[a]} for a in sorted(tiers)]
    return out


def select(doc: dict) -> dict[str, tuple[str, dict]]:
    """Our model name -> (provider, entry) for the models we keep."""
    picked: dict[str, tuple[str, dict]] = {}
    order = {p: i for i, p in enumerate(PROVIDERS)}
    for key, spec in doc.items():
        if not isinstance(spec, dict):
            continue
        provider = spec.get("litellm_provider")
        if provider not in PROVIDERS or spec.get("mode") not in MODES:
            continue
        prefix = PROVIDERS[provider]
        if prefix and not key.startswith(prefix):
            continue
        if not prefix and "/" in key:
            continue  # "openai/container" and the like: not a model id
        name = key[len(prefix):]
        entry = convert(spec)
        if entry is None:
            continue
        old = picked.get(name)
        if old is not None and order[old[0]] <= order[provider]:
            continue
        picked[name] = (provider, entry)
    return picked


def _rates(entry: dict) -> tuple:
    return entry.get("input"), entry.get("output")


def build(sources: list[tuple[str, str, str]], today: str) -> tuple[dict, list[str]]:
    """The price document and notes for the operator (what was dropped)."""
    models: dict[str, dict] = {}
    meta = []
    notes = []
    for index, (path, label, date) in enumerate(sources):
        raw = Path(path).read_bytes()
        doc = json.loads(raw)
        meta.append(
            {
                "label": f"{REPO} {PATH} ({label}, {date})",
                "repo": REPO,
                "path": PATH,
                "release": label,
                "date": date,
                "sha256": hashlib.sha256(raw).hexdigest(),
            }
        )
        for name, (provider, entry) in select(doc).items():
            if name not in models:
                models[name] = {"provider": provider, **entry, "src": index}
    # A documented alias priced differently from the snapshot it names is
    # a slip in the source: the provider bills the snapshot. Drop it so the
    # lookup derives the alias from its snapshot.
    for alias, snapshot in ALIASES.items():
        if alias in models and snapshot in models and _rates(models[alias]) != _rates(models[snapshot]):
            notes.append(f"dropped {alias} {_rates(models[alias])}: its snapshot {snapshot} is {_rates(models[snapshot])}")
            del models[alias]
    # Anthropic documents the 1-hour cache write as 2x base input; a
    # value that is not is a slip (older LiteLLM releases gave 6.0 to
    # every Claude 3 model). No price beats a wrong one.
    for name, e in models.items():
        if e["provider"] == "anthropic" and "cache_write_1h" in e and abs(e["cache_write_1h"] - 2 * e["input"]) > 1e-9:
            notes.append(f"dropped {name} cache_write_1h {e['cache_write_1h']}: not 2x input {e['input']}")
            del e["cache_write_1h"]
    out = {
        "comment": "Generated by tools/update_prices.py; do not edit by hand. USD per 1M tokens.",
        "generated": today,
        "sources": meta,
        "models": dict(sorted(models.items())),
    }
    return out, notes


def dump(doc: dict) -> str:
    """JSON with one model per line, for readable diffs."""
    head = {k: v for k, v in doc.items() if k != "models"}
    text = json.dumps(head, indent=2)[:-2]
    lines = [f"  {json.dumps(m)}: {json.dumps(e)}" for m, e in doc["models"].items()]
    return text + ',\n  "models": {\n  ' + ",\n  ".join(lines) + "\n  }\n}\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--source",
        nargs=3,
        action="append",
        required=True,
        metavar=("PATH", "LABEL", "DATE"),
        help="a local copy of the LiteLLM table, what it is (release or commit), its date; newest first",
    )
    p.add_argument("--out", required=True, help="where to write (llmgate/accounting/prices.json)")
    p.add_argument("--today", default=datetime.date.today().isoformat(), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    doc, notes = build([tuple(s) for s in args.source], args.today)
    Path(args.out).write_text(dump(doc), encoding="utf-8")
    load_price_file(args.out)  # what the gateway will read must parse
    for n in notes:
        print(n, file=sys.stderr)
    print(f"wrote {len(doc['models'])} models to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

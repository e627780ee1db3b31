# -*- test-case-name: tests.ops.test_startup -*-
"""
The start-up block: what this gateway is doing, in one log event, once
every listener is bound.

An operator reading the log of a fresh start should not have to piece the
setup together from a dozen lines (or the config file): the version, demo
or not, workers, providers and models, the addresses actually bound (and
that a bare port is loopback-only), the ledger file and the metrics
address.  In the JSON log format the same facts are keys of a C{startup}
object.  Provider base URLs are shown without user info or query (where a
credential could hide); keys are counted, their names and secrets never
shown.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence
from urllib.parse import urlsplit, urlunsplit

from twisted.application.service import Service
from twisted.logger import Logger

from llmgate import __version__

_log = Logger(namespace="llmgate.startup")


def _safe_url(url: str) -> str:
    """C{url} without user info, query or fragment."""
    try:
        p = urlsplit(url)
        host = p.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = host + (f":{p.port}" if p.port else "")
        return urlunsplit((p.scheme, netloc, p.path, "", ""))
    except ValueError:
        return "(unparsable URL)"


def _address(port: Any) -> Optional[str]:
    """The address a listening port is bound to, as C{host:port} or a path."""
    if port is None:
        return None
    try:
        host = port.getHost()
    except Exception:
        return None
    if hasattr(host, "port"):
        h = host.host
        return f"[{h}]:{host.port}" if ":" in h else f"{h}:{host.port}"
    name = getattr(host, "name", None)
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    return str(name) if name else None


def describe(
    cfg: Any,
    *,
    demo: bool,
    workers: int,
    listeners: Sequence[Any],
    raw_ports: Sequence[str],
    config_path: Optional[str],
) -> tuple[str, dict[str, Any]]:
    """
    The start-up block's text and its facts as a dict.

    @param listeners: objects with C{setting}, C{desc} and C{port} (the
        listening port once bound, or L{None}).
    """
    keyless = not cfg.keyed
    n_keys = len(cfg.keys) + len(cfg.key_records)
    source = "demo: the built-in mock provider, no keys, no network" if demo else (
        f"config {os.path.abspath(config_path)}" if config_path else "providers from the environment"
    )
    lines = [f"llmgate {__version__} running ({source})"]
    lines.append(
        "  workers: " + ("1 (serving in this process)" if workers <= 1 else f"{workers} worker processes, supervised by this one")
    )
    providers = []
    for name, p in sorted(cfg.providers.items()):
        providers.append({"name": name, "kind": p.kind, "base_url": _safe_url(p.base_url), "default": p.default})
    if providers:
        lines.append("  providers:")
        for p in providers:
            lines.append(f"    {p['name']}: {p['kind']} at {p['base_url']}" + (" (default for its dialect)" if p["default"] else ""))
    else:
        lines.append("  providers: none (every request will get 404)")
    models = {name: _deployments(m) for name, m in sorted(cfg.models.items())}
    defaults = [p["name"] for p in providers if p["default"]]
    lines.append(
        "  models: " + (", ".join(f"{k} -> {v}" for k, v in models.items()) or "no mapped models")
        + ("; any other model goes to " + ", ".join(defaults) if defaults else "; other models are refused (404)")
    )
    listening = []
    for lst in listeners:
        listening.append({"setting": lst.setting, "endpoint": lst.desc, "address": _address(getattr(lst, "port", None))})
    for entry in listening:
        if entry["setting"] != "--port":
            continue
        lines.append(f"  listening: {entry['address'] or entry['endpoint']} ({entry['endpoint']})")
    bare = [p for p in (raw_ports or ["8080"]) if p.isdigit()]
    if bare:
        lines.append(
            "  a bare port ("
            + ", ".join(bare)
            + (
                ") listens on 127.0.0.1 only: no gateway keys are configured, so anyone who reaches it "
                "spends the provider keys; give an endpoint (tcp:PORT) to choose the interface"
                if keyless
                else ") listens on every interface: gateway keys are required"
            )
        )
    lines.append(
        f"  gateway keys: {n_keys}" + (f" (key file {cfg.key_file})" if cfg.key_file else "") if not keyless else "  gateway keys: none (only loopback clients are admitted)"
    )
    ledger = os.path.abspath(cfg.ledger_path) if cfg.ledger_enabled else None
    lines.append(f"  ledger: {ledger or 'disabled'}")
    metrics = [e for e in listening if e["setting"] != "--port"]
    lines.append(
        "  metrics: " + (", ".join(f"http://{e['address'] or e['endpoint']}/metrics (status page: /status)" for e in metrics) if metrics else "off")
    )
    otel = _safe_url(cfg.otel_endpoint) if getattr(cfg, "otel_endpoint", None) else None
    lines.append(
        f"  opentelemetry: GenAI metrics and spans over OTLP/HTTP to {otel} (service {cfg.otel_service_name})"
        if otel else "  opentelemetry: off"
    )
    facts = {
        "version": __version__,
        "demo": demo,
        "config": os.path.abspath(config_path) if config_path else None,
        "workers": workers,
        "providers": providers,
        "models": models,
        "listening": [e for e in listening if e["setting"] == "--port"],
        "bare_ports_loopback_only": bool(bare) and keyless,
        "gateway_keys": n_keys,
        "key_file": cfg.key_file,
        "ledger": ledger,
        "metrics": [e for e in listening if e["setting"] != "--port"],
        "otel": otel,
    }
    return "\n".join(lines), facts


class StartupBlock(Service):
    """
    Logs L{describe}'s block when started: add it after the listeners
    (they bind before any service starts).
    """

    def __init__(self, cfg: Any, listeners: Sequence[Any], **kw: Any) -> None:
        self._cfg = cfg
        self._listeners = listeners
        self._kw = kw

    def startService(self) -> None:
        super().startService()
        text, facts = describe(self._cfg, listeners=self._listeners, **self._kw)
        _log.info("{text}", text=text, startup=facts)


def _tags(d: Any) -> str:
    tags = getattr(d, "tags", ())
    return f"[{','.join(tags)}]" if tags else ""


def _deployments(m: Any) -> str:
    """
    C{provider/model}, or C{a/x*2 | b/y} for several (with weights), each
    with its tags (C{a/x[eu,cheap]}), then C{(fallbacks f, g)}.
    """
    deps = getattr(m, "deployments", ()) or ()
    if len(deps) <= 1:
        text = f"{m.provider}/{m.upstream_model}" + (_tags(deps[0]) if deps else "")
    else:
        text = " | ".join(
            f"{d.provider}/{d.upstream_model}" + ("" if d.weight == 1 else f"*{d.weight:g}") + _tags(d) for d in deps
        )
    if getattr(m, "fallbacks", ()):
        text += " (fallbacks " + ", ".join(m.fallbacks) + ")"
    return text

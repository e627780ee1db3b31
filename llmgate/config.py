# -*- test-case-name: tests.test_config -*-
"""
TOML configuration, validated up front.

Every error names the setting it is about, so a bad config stops the daemon
before it listens with one clear line instead of a traceback at request time.
Secrets are never stored in the file: a provider names an environment
variable or a file that holds its key.
"""

from __future__ import annotations

import math
import dataclasses
import os
import tomllib
from urllib.parse import urlsplit
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence, Union

from llmgate.accounting.prices import price_entry

KINDS = ("openai", "anthropic")

# The dialect a client speaks is given by the route it calls.
OPENAI_DEFAULT_BASE = "https://api.openai.com/v1"
ANTHROPIC_DEFAULT_BASE = "https://api.anthropic.com"


class ConfigError(ValueError):
    """A configuration problem; the message names the setting."""


@dataclass(frozen=True)
class Provider:
    name: str
    kind: str
    base_url: str
    api_key: str | None = field(default=None, repr=False)
    default: bool = False
    anthropic_version: str = "2023-06-01"


@dataclass(frozen=True)
class Deployment:
    """One place a public model is served: a provider, the model name sent
    to it, and its share of the traffic (L{llmgate.routing.balance})."""

    provider: str
    upstream_model: str
    weight: float = 1.0
    # Labels a request can require with x-llmgate-tags (L{TAG_RULE}).
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelRoute:
    """
    A public model: its deployments (the first is also C{provider} and
    C{upstream_model}, the single-deployment form) and the public models
    tried in order when none of them could answer (L{llmgate.routing}).
    """

    name: str
    provider: str
    upstream_model: str
    deployments: tuple[Deployment, ...] = ()
    fallbacks: tuple[str, ...] = ()
    # Hedging (L{llmgate.routing.attempts}): seconds without first content
    # before a second deployment races the first, or "p95" (the lowest
    # observed p95 TTFT among the model's deployments); None: off. At most
    # hedge_max_fraction of the model's requests get a hedge.
    hedge_after: Union[float, str, None] = None
    hedge_max_fraction: float = 0.1

    def __post_init__(self) -> None:
        if not self.deployments:
            object.__setattr__(self, "deployments", (Deployment(self.provider, self.upstream_model),))


@dataclass(frozen=True)
class Routing:
    """
    C{[routing]}: retries and fallbacks before the first byte, and the
    per-deployment circuit breaker (L{llmgate.routing}).

    @ivar max_attempts: upstream attempts per client request, in all.
    @ivar deadline: no new attempt starts this long after the request began.
    @ivar retry_after_cap: a deployment that answered 429/503 with
        C{retry-after} is skipped for that long, at most this.
    @ivar breaker_failures: consecutive failures that open a deployment's
        breaker.
    @ivar breaker_cooldown: seconds an open breaker waits before one probe.
    @ivar balance: C{"weighted"} (random by weight), C{"least_outstanding"}
        or C{"latency"} (power of two choices on each deployment's TTFT
        EWMA, error ratio and requests in flight: L{llmgate.routing.balance}).
    @ivar breaker_failure_ratio: a breaker also opens when at least this
        fraction of the deployment's requests of the last C{breaker_window}
        seconds failed, once C{breaker_min_requests} were counted there.
    @ivar breaker_window: seconds of that window.
    @ivar breaker_min_requests: requests in the window before the ratio counts.
    """

    max_attempts: int = 3
    deadline: float = 300.0
    retry_after_cap: float = 60.0
    breaker_failures: int = 5
    breaker_cooldown: float = 30.0
    balance: str = "weighted"
    breaker_failure_ratio: float = 0.5
    breaker_window: float = 30.0
    breaker_min_requests: int = 20
    # A failed 429/503 whose retry-after is at most this many seconds, when
    # no other deployment can take the request, is retried on the same
    # deployment after that wait; 0 disables.
    retry_after_wait: float = 5.0


BALANCES = ("weighted", "least_outstanding", "latency")

# Deployment tags: short names a request header can carry safely.
TAG_RULE = "1 to 32 characters of a-z, A-Z, 0-9, '_', '-' or '.'"
MAX_TAGS = 16


def is_tag(value: str) -> bool:
    """Whether C{value} is a valid tag (L{TAG_RULE})."""
    return 0 < len(value) <= 32 and value.isascii() and all(c.isalnum() or c in "_-." for c in value)


@dataclass(frozen=True)
class Timeouts:
    connect: float = 5.0
    headers: float = 120.0
    idle: float = 120.0
    write_stall: float = 60.0


@dataclass(frozen=True)
class GatewayKey:
    name: str
    secret: str = field(repr=False)


@dataclass(frozen=True)
class Config:
    providers: Mapping[str, Provider]
    models: Mapping[str, ModelRoute]
    timeouts: Timeouts = Timeouts()
    routing: Routing = Routing()
    max_body_bytes: int = 32 * 1024 * 1024
    # Request bodies being received at once, across all connections.
    max_buffered_body_bytes: int = 256 * 1024 * 1024
    drain_seconds: float = 25.0
    keys: tuple[GatewayKey, ...] = ()
    ledger_enabled: bool = True
    ledger_path: str = "llmgate-usage.db"
    ledger_batch_interval: float = 0.2
    accounting_enabled: bool = True
    prices: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    metrics_port: str | None = None
    # The key file (L{llmgate.policy.keys}): its path and its records, read
    # with the config (at start and on SIGHUP, off the reactor thread).
    key_file: str | None = None
    key_records: tuple[Any, ...] = ()
    # Output tokens reserved for a request that sets no max_tokens.
    default_output_tokens: int = 4096
    # [state]: limits and spend shared through Redis (None: in memory).
    state_redis_url: str | None = None
    state_timeout: float = 0.05
    state_on_error: str = "fail_closed"
    # [otel]: OpenTelemetry GenAI metrics and spans over OTLP/HTTP (None: off).
    otel_endpoint: str | None = None
    otel_service_name: str = "llmgate"

    @property
    def keyed(self) -> bool:
        """Whether any gateway key is configured (config or key file)."""
        return bool(self.keys or self.key_records)

    def route(self, kind: str, model: str) -> tuple[Provider, str] | None:
        """
        The provider and upstream model for a public model name on a route of
        dialect C{kind}, or L{None} if nothing serves it.
        """
        m = self.models.get(model)
        if m is not None:
            p = self.providers[m.provider]
            if p.kind == kind:
                return p, m.upstream_model
            return None
        for p in self.providers.values():
            if p.default and p.kind == kind:
                return p, model
        return None


def _expect(value: Any, types: type | tuple[type, ...], where: str) -> Any:
    if isinstance(value, bool) and bool not in (
        types if isinstance(types, tuple) else (types,)
    ):
        raise ConfigError(f"{where}: expected {_tname(types)}, got a boolean")
    if not isinstance(value, types):
        raise ConfigError(
            f"{where}: expected {_tname(types)}, got {type(value).__name__}"
        )
    return value


def _tname(types: type | tuple[type, ...]) -> str:
    if isinstance(types, tuple):
        return " or ".join(t.__name__ for t in types)
    return types.__name__


def _no_unknown(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(
                f"{where}.{key}: unknown setting (expected one of: "
                f"{', '.join(sorted(allowed))})"
            )


def _secret(table: Mapping[str, Any], where: str, env: Mapping[str, str]) -> str | None:
    """
    Read a secret named by C{<where>.*_env} or C{<where>.*_file}; never inline.
    """
    if "api_key" in table or "secret" in table:
        raise ConfigError(
            f"{where}: secrets may not be written inline; use api_key_env or "
            f"api_key_file"
        )
    env_name = table.get("api_key_env")
    path = table.get("api_key_file")
    if env_name is not None and path is not None:
        raise ConfigError(f"{where}: set api_key_env or api_key_file, not both")
    if env_name is not None:
        _expect(env_name, str, f"{where}.api_key_env")
        value = env.get(env_name)
        if not value:
            raise ConfigError(
                f"{where}.api_key_env: environment variable {env_name} is not set"
            )
        return value
    if path is not None:
        _expect(path, str, f"{where}.api_key_file")
        try:
            with open(path, encoding="utf-8") as f:
                value = f.read().strip()
        except OSError as e:
            raise ConfigError(
                f"{where}.api_key_file: cannot read {path}: {e.strerror}"
            ) from None
        if not value:
            raise ConfigError(f"{where}.api_key_file: {path} is empty")
        return value
    return None


def _check_url(url: str, where: str) -> None:
    if not url.isascii():
        raise ConfigError(f"{where}: must be ASCII (write an IDN host in its xn-- form)")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"{where}: must start with http:// or https://")
    try:
        parts.port
    except ValueError:
        raise ConfigError(f"{where}: invalid port in {url!r}") from None
    if not parts.hostname:
        raise ConfigError(f"{where}: no host in {url!r}")
    if parts.query or parts.fragment:
        raise ConfigError(f"{where}: must not have a query or fragment")


def _positive(value: Any, where: str) -> float:
    _expect(value, (int, float), where)
    if value <= 0:
        raise ConfigError(f"{where}: must be greater than 0")
    return float(value)


PRICE_FIELDS = ("input", "output", "cached_input", "cache_write", "cache_write_1h")


def _price(value: Any, where: str) -> float:
    _expect(value, (int, float), where)
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{where}: must be a number >= 0 (USD per 1M tokens), got {value!r}")
    return float(value)


def _metrics_endpoint(value: Any, inherited: bool) -> str:
    """
    C{[metrics] port}: a port number listens on 127.0.0.1 (metrics name
    keys and models, which are not for everyone to read); a string is an
    endpoint string, checked here so a typo stops the daemon before it
    starts rather than with a traceback.
    """
    where = "metrics.port"
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    _expect(value, str, where)
    if value.isdigit():
        value = f"tcp:{value}:interface=127.0.0.1"
    check_endpoint(value, where, inherited=inherited)
    return value


def check_endpoint(desc: str, where: str, *, inherited: bool = True) -> None:
    """
    Parse the server endpoint string C{desc} as the daemon will, without
    listening (nothing is bound: the endpoint is made on a memory reactor).

    @param inherited: whether a C{systemd:} endpoint must name a socket this
        process inherited. C{llmgate check-config} runs outside systemd, so
        it checks only the syntax of those.
    @raise ConfigError: naming C{where}, the string and a fix.
    """
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.testing import MemoryReactor

    hint = (
        "write a port number or a Twisted endpoint string such as "
        "tcp:8080:interface=127.0.0.1"
    )
    if not desc or not desc.strip():
        raise ConfigError(f"{where}: empty endpoint; {hint}")
    systemd = desc.split(":", 1)[0] == "systemd"
    try:
        endpoint = serverFromString(MemoryReactor(), desc)
    except (KeyError, IndexError) as e:
        if not systemd:
            raise ConfigError(f"{where}: invalid endpoint {desc!r} ({e}); {hint}") from None
        if inherited:
            raise ConfigError(
                f"{where}: {desc!r}: systemd passed no such socket ({e}); start the "
                f"service through its socket unit, and match name= to the socket's "
                f"FileDescriptorName= (or index= to its position)"
            ) from None
    except Exception as e:
        # Endpoint parsers raise what they like (ValueError, TypeError,
        # AttributeError for an unknown address family, OSError for an
        # unreadable certificate): every one is a bad setting.
        raise ConfigError(f"{where}: invalid endpoint {desc!r} ({e}); {hint}") from None
    else:
        port = getattr(endpoint, "_port", None)
        if isinstance(port, int) and not 0 <= port <= 65535:
            raise ConfigError(f"{where}: invalid endpoint {desc!r} (port {port} is not 0-65535); {hint}")


def listen_endpoints(raw: Sequence[str], open_relay: bool, *, inherited: bool = True) -> list[str]:
    """
    The endpoint strings to listen on for C{--port} values C{raw}
    (C{8080} when there are none), each checked with L{check_endpoint}.

    A bare port number is the common case (C{--port 8080}). Without gateway
    keys anyone who reaches the port spends the provider keys, so a bare
    port then listens on loopback only; a full endpoint string is taken as
    given.

    @raise ConfigError: naming the bad C{--port} value.
    """
    out = []
    for value in raw or ["8080"]:
        if value.isdigit():
            desc = f"tcp:{value}:interface=127.0.0.1" if open_relay else f"tcp:{value}"
        else:
            desc = value
        check_endpoint(desc, "--port", inherited=inherited)
        out.append(_with_backlog(desc))
    return out


def _with_backlog(desc: str) -> str:
    """
    Twisted listens with a backlog of 50: a burst of new streams (hundreds
    a second) overflows it and clients wait seconds to retry their SYNs.
    TCP endpoints get a deep queue unless they name one.
    """
    if desc.split(":", 1)[0] in ("tcp", "tcp6") and "backlog=" not in desc:
        return desc + ":backlog=4096"
    return desc


def parse(
    data: Mapping[str, Any], env: Mapping[str, str] | None = None, *, inherited: bool = True
) -> Config:
    """
    Validate a parsed TOML document into a L{Config}.

    @param env: the environment to read secrets from (L{os.environ} by default).
    @param inherited: see L{check_endpoint}; false for C{check-config}.
    """
    env = os.environ if env is None else env
    _no_unknown(
        data,
        {
            "providers",
            "models",
            "timeouts",
            "server",
            "keys",
            "ledger",
            "accounting",
            "prices",
            "metrics",
            "routing",
            "state",
            "otel",
        },
        "config",
    )

    providers: dict[str, Provider] = {}
    for name, table in _expect(data.get("providers", {}), dict, "providers").items():
        where = f"providers.{name}"
        _expect(table, dict, where)
        _no_unknown(
            table,
            {
                "kind",
                "base_url",
                "api_key_env",
                "api_key_file",
                "api_key",
                "default",
                "anthropic_version",
            },
            where,
        )
        kind = _expect(table.get("kind"), str, f"{where}.kind") if "kind" in table else None
        if kind is None:
            raise ConfigError(f"{where}.kind: missing (one of: {', '.join(KINDS)})")
        if kind not in KINDS:
            raise ConfigError(
                f"{where}.kind: unknown provider kind {kind!r} "
                f"(expected one of: {', '.join(KINDS)})"
            )
        base = table.get(
            "base_url",
            OPENAI_DEFAULT_BASE if kind == "openai" else ANTHROPIC_DEFAULT_BASE,
        )
        _expect(base, str, f"{where}.base_url")
        _check_url(base, f"{where}.base_url")
        providers[name] = Provider(
            name=name,
            kind=kind,
            base_url=base.rstrip("/"),
            api_key=_secret(table, where, env),
            default=_expect(table.get("default", False), bool, f"{where}.default"),
            anthropic_version=_expect(
                table.get("anthropic_version", "2023-06-01"),
                str,
                f"{where}.anthropic_version",
            ),
        )

    models = _models(_expect(data.get("models", {}), dict, "models"), providers)
    routing = _routing(_expect(data.get("routing", {}), dict, "routing"))

    t = _expect(data.get("timeouts", {}), dict, "timeouts")
    _no_unknown(t, {"connect", "headers", "idle", "write_stall"}, "timeouts")
    timeouts = Timeouts(
        **{k: _positive(v, f"timeouts.{k}") for k, v in t.items()}
    )

    server = _expect(data.get("server", {}), dict, "server")
    _no_unknown(server, {"max_body_bytes", "max_buffered_body_bytes", "drain_seconds"}, "server")
    max_body = server.get("max_body_bytes", 32 * 1024 * 1024)
    _expect(max_body, int, "server.max_body_bytes")
    if max_body <= 0:
        raise ConfigError("server.max_body_bytes: must be greater than 0")
    max_buffered = server.get("max_buffered_body_bytes", max(256 * 1024 * 1024, max_body))
    _expect(max_buffered, int, "server.max_buffered_body_bytes")
    if max_buffered < max_body:
        # Else a body at the cap could never be received.
        raise ConfigError("server.max_buffered_body_bytes: must be at least server.max_body_bytes")

    keys = []
    keys_table = dict(_expect(data.get("keys", {}), dict, "keys"))
    # Scalars in [keys] are settings; tables are config keys.
    key_file = keys_table.pop("file", None)
    if key_file is not None:
        _expect(key_file, str, "keys.file")
    default_output = keys_table.pop("default_output_tokens", 4096)
    if not isinstance(default_output, int) or isinstance(default_output, bool) or default_output <= 0:
        raise ConfigError("keys.default_output_tokens: must be a positive integer")
    for name, table in keys_table.items():
        where = f"keys.{name}"
        _expect(table, dict, where)
        _no_unknown(table, {"api_key_env", "api_key_file"}, where)
        secret = _secret(table, where, env)
        if secret is None:
            raise ConfigError(f"{where}: set api_key_env or api_key_file")
        keys.append(GatewayKey(name, secret))

    ledger = _expect(data.get("ledger", {}), dict, "ledger")
    _no_unknown(ledger, {"enabled", "path", "batch_interval"}, "ledger")
    accounting = _expect(data.get("accounting", {}), dict, "accounting")
    _no_unknown(accounting, {"enabled"}, "accounting")

    prices: dict[str, dict[str, Any]] = {}
    for model, table in _expect(data.get("prices", {}), dict, "prices").items():
        where = f"prices.{model}"
        _expect(table, dict, where)
        _no_unknown(table, set(PRICE_FIELDS) | {"tiers"}, where)
        for k in ("input", "output"):
            if k not in table:
                raise ConfigError(
                    f"{where}.{k}: missing (set {k} = USD per 1M {k} tokens; "
                    f"input and output are both required)"
                )
        entry: dict[str, Any] = {
            k: _price(v, f"{where}.{k}") for k, v in table.items() if k != "tiers"
        }
        if "tiers" in table:
            entry["tiers"] = table["tiers"]
        try:
            # The price table's own parser: the daemon builds its table with
            # it, so what passes here is exactly what the daemon accepts.
            price_entry(model, entry)
        except ValueError as e:
            raise ConfigError(
                f"{where}: {e} (tiers = [{{above = 200000, input = 6.0, output = 22.5}}])"
            ) from None
        prices[model] = entry

    metrics = _expect(data.get("metrics", {}), dict, "metrics")
    _no_unknown(metrics, {"port"}, "metrics")
    metrics_port = None
    if "port" in metrics:
        metrics_port = _metrics_endpoint(metrics["port"], inherited)

    state = _expect(data.get("state", {}), dict, "state")
    _no_unknown(state, {"redis_url", "timeout", "on_error"}, "state")
    redis_url = state.get("redis_url")
    if redis_url is not None:
        from llmgate.policy.redis import parse_url

        _expect(redis_url, str, "state.redis_url")
        try:
            parse_url(redis_url)
        except ValueError as e:
            raise ConfigError(f"state.redis_url: {e} (redis://127.0.0.1:6379/0)") from None
    state_timeout = _positive(state.get("timeout", 0.05), "state.timeout")
    on_error = _expect(state.get("on_error", "fail_closed"), str, "state.on_error")
    if on_error not in ("fail_open", "fail_closed"):
        raise ConfigError(f"state.on_error: must be \"fail_open\" or \"fail_closed\", not {on_error!r}")

    otel_endpoint, otel_service = _otel(_expect(data.get("otel", {}), dict, "otel"))

    return Config(
        providers=providers,
        models=models,
        timeouts=timeouts,
        routing=routing,
        max_body_bytes=max_body,
        max_buffered_body_bytes=max_buffered,
        drain_seconds=_positive(server.get("drain_seconds", 25.0), "server.drain_seconds"),
        keys=tuple(keys),
        key_file=key_file,
        default_output_tokens=default_output,
        ledger_enabled=_expect(ledger.get("enabled", True), bool, "ledger.enabled"),
        ledger_path=_expect(ledger.get("path", "llmgate-usage.db"), str, "ledger.path"),
        ledger_batch_interval=_positive(
            ledger.get("batch_interval", 0.2), "ledger.batch_interval"
        ),
        accounting_enabled=_expect(
            accounting.get("enabled", True), bool, "accounting.enabled"
        ),
        prices=prices,
        metrics_port=metrics_port,
        state_redis_url=redis_url,
        state_timeout=state_timeout,
        state_on_error=on_error,
        otel_endpoint=otel_endpoint,
        otel_service_name=otel_service,
    )


def _deployment(table: Any, name: str, where: str, providers: Mapping[str, Provider]) -> Deployment:
    _expect(table, dict, where)
    _no_unknown(table, {"provider", "upstream_model", "weight", "tags"}, where)
    prov = table.get("provider")
    if prov is None:
        raise ConfigError(f"{where}.provider: missing")
    _expect(prov, str, f"{where}.provider")
    if prov not in providers:
        raise ConfigError(f"{where}.provider: no provider named {prov!r}")
    upstream = _expect(table.get("upstream_model", name), str, f"{where}.upstream_model")
    weight = _expect(table.get("weight", 1), (int, float), f"{where}.weight")
    if not math.isfinite(weight) or weight <= 0:
        raise ConfigError(f"{where}.weight: must be a number greater than 0")
    return Deployment(prov, upstream, float(weight), _tags(table.get("tags", []), f"{where}.tags"))


def _tags(value: Any, where: str) -> tuple[str, ...]:
    """C{tags = ["eu", "cheap"]}: at most L{MAX_TAGS} distinct L{TAG_RULE} names."""
    _expect(value, list, where)
    if len(value) > MAX_TAGS:
        raise ConfigError(f"{where}: at most {MAX_TAGS} tags")
    for i, t in enumerate(value):
        _expect(t, str, f"{where}[{i}]")
        if not is_tag(t):
            raise ConfigError(f"{where}[{i}]: {t!r} is not a tag ({TAG_RULE})")
    if len(set(value)) != len(value):
        raise ConfigError(f"{where}: a tag is listed twice")
    return tuple(value)


def _models(tables: Mapping[str, Any], providers: Mapping[str, Provider]) -> dict[str, ModelRoute]:
    """
    C{[models.NAME]}: C{provider}/C{upstream_model} (one deployment) or
    C{deployments = [{provider, upstream_model, weight}, ...]}, and
    C{fallbacks}: other public models, of the same dialect, tried in order.
    """
    models: dict[str, ModelRoute] = {}
    for name, table in tables.items():
        where = f"models.{name}"
        _expect(table, dict, where)
        _no_unknown(table, {"provider", "upstream_model", "deployments", "fallbacks", "tags", "hedge_after", "hedge_max_fraction"}, where)
        hedge = _hedge(table, where)
        if "deployments" in table:
            if "provider" in table or "upstream_model" in table or "tags" in table:
                raise ConfigError(
                    f"{where}: set provider/upstream_model/tags or deployments, not both"
                )
            raw = _expect(table["deployments"], list, f"{where}.deployments")
            if not raw:
                raise ConfigError(f"{where}.deployments: must name at least one deployment")
            deps = tuple(
                _deployment(d, name, f"{where}.deployments[{i}]", providers) for i, d in enumerate(raw)
            )
            kinds = {providers[d.provider].kind for d in deps}
            if len(kinds) > 1:
                raise ConfigError(f"{where}.deployments: providers of one dialect only (got {', '.join(sorted(kinds))})")
        else:
            deps = (
                _deployment(
                    {k: v for k, v in table.items() if k not in ("fallbacks", "hedge_after", "hedge_max_fraction")},
                    name, where, providers,
                ),
            )
        fallbacks = _expect(table.get("fallbacks", []), list, f"{where}.fallbacks")
        for i, f in enumerate(fallbacks):
            _expect(f, str, f"{where}.fallbacks[{i}]")
            if f == name:
                raise ConfigError(f"{where}.fallbacks[{i}]: a model cannot be its own fallback")
        models[name] = ModelRoute(name, deps[0].provider, deps[0].upstream_model, deps, tuple(fallbacks), *hedge)
    for name, m in models.items():
        kind = providers[m.provider].kind
        for i, f in enumerate(m.fallbacks):
            other = models.get(f)
            if other is None:
                raise ConfigError(f"models.{name}.fallbacks[{i}]: no model named {f!r}")
            if providers[other.provider].kind != kind:
                raise ConfigError(
                    f"models.{name}.fallbacks[{i}]: {f!r} is served by {providers[other.provider].kind} "
                    f"providers, {name!r} by {kind} ones"
                )
    return models


def _hedge(table: Mapping[str, Any], where: str) -> tuple[Union[float, str, None], float]:
    """C{hedge_after} (seconds > 0, or "p95") and C{hedge_max_fraction} (0 < f <= 1)."""
    after: Union[float, str, None] = None
    if "hedge_after" in table:
        raw = table["hedge_after"]
        if raw == "p95":
            after = "p95"
        elif isinstance(raw, str):
            raise ConfigError(f"{where}.hedge_after: expected seconds or \"p95\"")
        else:
            after = _positive(raw, f"{where}.hedge_after")
            if not math.isfinite(after):
                raise ConfigError(f"{where}.hedge_after: must be finite")
    fraction = 0.1
    if "hedge_max_fraction" in table:
        fraction = _positive(table["hedge_max_fraction"], f"{where}.hedge_max_fraction")
        if fraction > 1:
            raise ConfigError(f"{where}.hedge_max_fraction: must be at most 1")
    return after, fraction


def _routing(table: Mapping[str, Any]) -> Routing:
    fields_ = {f.name for f in dataclasses.fields(Routing)}
    _no_unknown(table, fields_, "routing")
    out: dict[str, Any] = {}
    for k in ("max_attempts", "breaker_failures", "breaker_min_requests"):
        if k in table:
            v = table[k]
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"routing.{k}: must be an integer >= 1")
            out[k] = v
    for k in ("deadline", "retry_after_cap", "breaker_cooldown", "breaker_window"):
        if k in table:
            out[k] = _positive(table[k], f"routing.{k}")
    if "breaker_failure_ratio" in table:
        r = _expect(table["breaker_failure_ratio"], (int, float), "routing.breaker_failure_ratio")
        if not (0 < r <= 1):
            raise ConfigError(
                f"routing.breaker_failure_ratio: must be a fraction greater than 0 and at most 1 (0.5 = half the requests), got {r!r}"
            )
        out["breaker_failure_ratio"] = float(r)
    if "retry_after_wait" in table:
        v = _expect(table["retry_after_wait"], (int, float), "routing.retry_after_wait")
        if isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise ConfigError("routing.retry_after_wait: must be a number >= 0 (0 disables)")
        out["retry_after_wait"] = float(v)
    if "balance" in table:
        b = _expect(table["balance"], str, "routing.balance")
        if b not in BALANCES:
            raise ConfigError(f"routing.balance: expected one of {', '.join(repr(x) for x in BALANCES)}, got {b!r}")
        out["balance"] = b
    return Routing(**out)


# The modules C{[otel]} needs, from C{pip install llmgate[otel]}.
OTEL_MODULES = ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http")


def _otel(table: Mapping[str, Any]) -> tuple[str | None, str]:
    """
    C{[otel] endpoint, service_name}: the OTLP/HTTP collector to export the
    GenAI metrics and spans to. Checked here (and so by C{check-config})
    without importing the packages: only whether they are installed.
    """
    _no_unknown(table, {"endpoint", "service_name"}, "otel")
    service = _expect(table.get("service_name", "llmgate"), str, "otel.service_name")
    if not service:
        raise ConfigError("otel.service_name: must not be empty")
    if "endpoint" not in table:
        if table:
            raise ConfigError("otel.endpoint: missing (e.g. \"http://127.0.0.1:4318\")")
        return None, service
    endpoint = _expect(table["endpoint"], str, "otel.endpoint")
    _check_url(endpoint, "otel.endpoint")
    import importlib.util

    for name in OTEL_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            raise ConfigError(
                f"otel.endpoint: OpenTelemetry is not installed ({name} is missing); "
                "install it with: pip install 'llmgate[otel]'"
            )
    return endpoint.rstrip("/"), service


def from_environment(env: Mapping[str, str] | None = None) -> Config:
    """
    The config used when no file is given: the providers the official SDKs
    would use, from C{OPENAI_API_KEY}/C{OPENAI_BASE_URL} and
    C{ANTHROPIC_API_KEY}/C{ANTHROPIC_BASE_URL}, each the default for its
    dialect.
    """
    env = os.environ if env is None else env
    doc: dict[str, Any] = {"providers": {}}
    if env.get("OPENAI_API_KEY") or env.get("OPENAI_BASE_URL"):
        p: dict[str, Any] = {"kind": "openai", "default": True}
        if env.get("OPENAI_BASE_URL"):
            p["base_url"] = env["OPENAI_BASE_URL"]
        if env.get("OPENAI_API_KEY"):
            p["api_key_env"] = "OPENAI_API_KEY"
        doc["providers"]["openai"] = p
    if env.get("ANTHROPIC_API_KEY") or env.get("ANTHROPIC_BASE_URL"):
        p = {"kind": "anthropic", "default": True}
        if env.get("ANTHROPIC_BASE_URL"):
            p["base_url"] = env["ANTHROPIC_BASE_URL"]
        if env.get("ANTHROPIC_API_KEY"):
            p["api_key_env"] = "ANTHROPIC_API_KEY"
        doc["providers"]["anthropic"] = p
    return parse(doc, env)


def demo(base_url: str) -> Config:
    """
    The config for C{--demo}: both dialects served by the in-process mock.
    """
    return parse(
        {
            "providers": {
                "mock-openai": {"kind": "openai", "base_url": base_url + "/v1", "default": True},
                "mock-anthropic": {"kind": "anthropic", "base_url": base_url, "default": True},
            }
        },
        {},
    )


def load(path: str, env: Mapping[str, str] | None = None, *, inherited: bool = True) -> Config:
    """
    Read and validate the TOML file at C{path}.
    """
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    cfg = parse(data, env, inherited=inherited)
    return with_key_file(cfg, key_file_path(path, cfg.key_file))


def key_file_path(config_path: str, setting: str | None) -> str:
    """
    The key file: C{[keys] file} (relative to the config's directory), or
    C{llmgate-keys.json} beside the config.
    """
    from llmgate.policy.keys import DEFAULT_FILE

    base = os.path.dirname(os.path.abspath(config_path))
    return os.path.join(base, os.path.expanduser(setting or DEFAULT_FILE))


def with_key_file(cfg: Config, path: str) -> Config:
    """C{cfg} with the records of the key file at C{path} (sync disk I/O)."""
    from llmgate.policy import keys as keyfile

    try:
        records = keyfile.load(path)
    except keyfile.KeyFileError as e:
        raise ConfigError(f"key file {e}") from None
    return dataclasses.replace(cfg, key_file=path, key_records=records)

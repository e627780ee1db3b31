# -*- test-case-name: tests.test_tap -*-
"""
C{twistd llmgate}: options and the service tree.

This is the only module that reaches for the global reactor; everything it
builds takes the reactor as an argument.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Optional

from twisted.application import service
from twisted.internet import endpoints
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.server import Site

from llmgate import config as configmod
from llmgate.accounting import tokens
from llmgate.accounting.recorder import Accounting
from llmgate.accounting.ledger import Ledger
from llmgate.ops.metrics import Metrics, MetricsResource
from llmgate.accounting.prices import PriceTable
from llmgate.ops.drain import Drain
from llmgate.ops import gcstats, logformat, sendnow, status
from llmgate.ops import reactor as lean_reactor
from llmgate.ops.executors import BoundedExecutor
from llmgate.ops.memory import Trimmer, tune_malloc
from llmgate.ops.notify import Notifier, SystemdNotify
from llmgate.ops.startup import StartupBlock
from llmgate.ops.threads import ThreadRunner
from llmgate.ops.deployments import DeploymentGauges, DeploymentGaugesLoop
from llmgate.policy.budgets import SpendLoader
from llmgate.policy.cutoff import BudgetCutoff
from llmgate.policy.limits import Quotas
from llmgate.reload import Reloader
from llmgate.service import Listener, OrderedMultiService
from llmgate.edge.site import GatewaySite
from llmgate.api.resource import GatewayResource
from llmgate.relay.client import UpstreamClient
from llmgate.routing.balance import configured_keys


# Threads and queue bounds of the parse pool (bodies over 64 kB): past
# either bound a big body is answered 503 with Retry-After.
PARSE_THREADS = 2
PARSE_MAX_JOBS = 64
PARSE_MAX_BYTES = 256 * 1024 * 1024
# Token estimates (tiktoken) run after a request ends and must never be
# refused (the record would lose its tokens): a thread, no bound.
ESTIMATE_THREADS = 1


class Options(usage.Options):
    synopsis = "[--port ENDPOINT ...] [--config PATH] [--demo]"
    longdesc = (
        "Run the llmgate LLM API gateway. With no --config, providers come "
        "from OPENAI_API_KEY/OPENAI_BASE_URL and ANTHROPIC_API_KEY/"
        "ANTHROPIC_BASE_URL; --demo serves a built-in mock provider instead. "
        "SIGHUP re-reads --config for new requests (an invalid file is logged "
        "and the running config kept); a port that cannot be bound exits 1. "
        "--workers (default auto, one per CPU) runs that many worker processes "
        "on the ports this process binds; SIGTERM and SIGHUP are passed on to them."
    )
    optParameters = [
        ["config", "c", None, "Path of a TOML config file."],
        ["log-format", None, "text",
         "text, or json: one JSON object per line (access lines with their fields as keys)."],
        ["workers", "w", "auto",
         "Worker processes serving the ports: auto (one per CPU) or a number; "
         "1 serves in this process, as without workers."],
    ]
    optFlags = [
        ["demo", None, "Serve the built-in mock provider (no keys, no network)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["ports"] = []
        self["raw_ports"] = []
        self["bare_public"] = False

    def opt_port(self, value: str) -> None:
        "Port number or Twisted endpoint string (tcp:8080:interface=127.0.0.1, ssl:..., systemd:domain=INET:index=0); repeatable. Default 8080. A bare port listens on 127.0.0.1 only when no gateway keys are configured."
        self["raw_ports"].append(value)

    opt_p = opt_port

    def opt_version(self) -> None:
        "Print llmgate's version (and Twisted's and Python's) and exit."
        print(version_line())
        raise SystemExit(0)

    def postOptions(self) -> None:
        if self["demo"] and self["config"]:
            raise usage.UsageError("--demo and --config are exclusive")
        if self["log-format"] not in logformat.FORMATS:
            raise usage.UsageError("--log-format must be text or json")
        self["log_format"] = self["log-format"]
        parent = getattr(self, "parent", None)
        if parent is not None:
            # Both formats: our observer buffers the access lines.
            logformat.use_for_twistd(parent, self["log_format"])
        self["loaded"] = None
        try:
            if self["config"]:
                self["loaded"] = configmod.load(self["config"])
            elif not self["demo"]:
                self["loaded"] = configmod.from_environment()
            open_relay = self["loaded"] is None or not self["loaded"].keyed
            self["ports"] = configmod.listen_endpoints(self["raw_ports"], open_relay)
            self["bare_public"] = not open_relay and any(
                p.isdigit() for p in self["raw_ports"] or ["8080"]
            )
        except configmod.ConfigError as e:
            raise usage.UsageError(f"invalid configuration: {e}") from None
        from llmgate import workers

        self["worker_count"] = workers.parse_workers(self["workers"])
        if self["worker_count"] > 1:
            metrics_port = self["loaded"].metrics_port if self["loaded"] is not None else None
            for desc in self["ports"] + ([metrics_port] if metrics_port else []):
                why = workers.endpoint_refusal(desc)
                if why is not None and self["workers"] != "auto":
                    raise usage.UsageError(why)
                if why is not None:
                    # auto: serve such endpoints from one process, as before.
                    self["worker_count"] = 1
                    break


def key_names(cfg: configmod.Config) -> list[str]:
    """The configured gateway key names (config and key file): the metrics' key labels."""
    return [k.name for k in cfg.keys] + [r.name for r in cfg.key_records]


def version_line() -> str:
    """C{llmgate X (Twisted Y, Python Z)}: what C{--version} prints."""
    import platform

    import twisted

    from llmgate import __version__

    return f"llmgate {__version__} (Twisted {twisted.__version__}, Python {platform.python_version()})"


class _ListeningPort(service.Service):
    """Stops listening on a port that was opened before the service tree."""

    def __init__(self, port: Any) -> None:
        self._port = port

    def stopService(self) -> Any:
        super().stopService()
        return self._port.stopListening()


def build(
    cfg: configmod.Config,
    reactor: Any,
    ports: list[str],
    config_path: Optional[str] = None,
    bare_public: bool = False,
    adopt: Optional[list[tuple[int, int]]] = None,
    notify: Any = None,
) -> service.MultiService:
    """
    The gateway's service tree for C{cfg}: the upstream pool, the
    accounting sinks, one listener per endpoint string, and the SIGHUP
    reload of C{config_path}.

    @param bare_public: whether a bare C{--port} number listens on every
        interface (it does when gateway keys were configured at start).
    @param notify: the sd_notify L{Notifier} the reload reports to (the
        single process's; never a worker's).
    @param adopt: for a worker under C{--workers}: the (fd, family) of the
        sockets its supervisor listens on, served instead of C{ports}; the
        ledger rows carry this process's pid and the supervisor recovers
        open rows; metrics go to the shared multiprocess files, served by
        the supervisor.
    """
    worker = adopt is not None
    top = OrderedMultiService()
    # Not Twisted's thread pool: it leaves a reference cycle per call.
    work = ThreadRunner(reactor, name="llmgate-work")

    def in_thread(f: Any, *a: Any) -> Any:
        return work(f, *a)

    def apply(new: configmod.Config) -> None:
        # Called only once the tree is running, when root and accounting
        # (bound below) exist.
        root.reconfigure(new)
        # Costed when a request is recorded: a price changed by a reload
        # applies to the requests that finish after it.
        accounting.prices = PriceTable.from_config(dict(new.prices))
        # Key labels follow the configured names (a removed key's late
        # requests count as "other").
        metrics.keys = frozenset(key_names(new))

    # First child, so it stops last: a SIGHUP during the drain still
    # reloads instead of killing the process before the ledger is flushed.
    Reloader(
        config_path, cfg, apply, reactor, in_thread,
        check=lambda new: _reload_refusal(new, bare_public, cfg), notify=notify,
    ).setServiceParent(top)
    # Stopped after everything that hands it work.
    work.setServiceParent(top)
    ledger = None
    if cfg.ledger_enabled:
        ledger_thread = ThreadRunner(reactor, workers=1, name="llmgate-ledger")
        ledger_thread.setServiceParent(top)
        # Before the rest, so it stops after them: records of requests cut
        # off by the shutdown still reach the file.
        ledger = Ledger(
            cfg.ledger_path,
            reactor,
            batch_interval=cfg.ledger_batch_interval,
            run_in_thread=ledger_thread,
            owner=str(os.getpid()) if worker else None,
            recover=not worker,
        )
        ledger.setServiceParent(top)
    # DNS keeps the reactor's pool; big-body parses and token estimates get
    # their own (stopped after the drain, which waits for the estimates).
    parse_pool = BoundedExecutor(reactor, "llmgate-parse", PARSE_THREADS, PARSE_MAX_JOBS, PARSE_MAX_BYTES)
    parse_pool.setServiceParent(top)
    estimate_pool = BoundedExecutor(reactor, "llmgate-estimate", ESTIMATE_THREADS)
    estimate_pool.setServiceParent(top)
    trimmer = Trimmer(reactor, estimate_pool)
    parse_pool.on_release = trimmer.freed
    upstream = UpstreamClient(reactor, connect_timeout=cfg.timeouts.connect)
    upstream.setServiceParent(top)
    metrics = Metrics(models=cfg.models, keys=key_names(cfg))
    # Per-request updates summed on the reactor thread, written at each
    # scrape (or within a second: a worker's files).
    metrics.batch(reactor)
    metrics.watch_executor(parse_pool)
    metrics.watch_executor(estimate_pool)
    pauses = gcstats.GCPauses()
    pauses.setServiceParent(top)
    # A full collection waits for a quiet moment (root is bound below).
    young = gcstats.YoungCollections(reactor, load=lambda: len(root.active))
    young.setServiceParent(top)
    if hasattr(reactor, "everyDescriptors"):  # llmgate.ops.reactor, not --reactor=NAME
        reactor.everyDescriptors(gcstats.YOUNG_PER_DESCRIPTORS, young.descriptors)
        # In each turn, new connections and requests before the upstream
        # reads that make the bulk of it: a new request's upstream call
        # then leaves early in the turn, not after every stream's event.
        reactor.handleLast(sendnow.SendNowClient)
    if worker:
        # The supervisor sums the workers' files, not their registries.
        gcstats.GCPush(pauses, reactor, metrics.registry).setServiceParent(top)
    else:
        metrics.registry.register(pauses)
    if ledger is not None:
        if worker:
            metrics.push_ledger(ledger, reactor).setServiceParent(top)
        else:
            metrics.watch_ledger(ledger)
    accounting = Accounting(
        reactor,
        ledger=ledger,
        # Without a [metrics] port (a restart-only setting) nothing reads
        # the per-request metrics, here or in a supervisor: not kept.
        metrics=metrics if cfg.metrics_port else None,
        enabled=cfg.accounting_enabled,
        prices=PriceTable.from_config(dict(cfg.prices)),
        in_thread=estimate_pool,
    )
    # -- [otel]: optional; nothing of OpenTelemetry is imported when off --
    if cfg.otel_endpoint is not None:
        from llmgate.ops.otel import OTLPExport

        otlp = OTLPExport(cfg.otel_endpoint, cfg.otel_service_name, in_thread)
        otlp.setServiceParent(top)
        accounting.telemetry = otlp.telemetry
    # -- end [otel] --

    quotas = Quotas(reactor, _shared_state(cfg, reactor, top, metrics, in_thread))
    root = GatewayResource(
        cfg, upstream.http, reactor, accounting, parse_in_thread=parse_pool.submit, coalesce=True,
        on_big_body_done=trimmer.freed, quotas=quotas,
    )
    root.watchdog.setServiceParent(top)
    root.stream_started = young.stream_started
    # Per-deployment state in /metrics: set at each scrape, or by a
    # worker every second (its gauges are files the supervisor reads).
    deployment_gauges = DeploymentGauges(metrics.registry, root.breakers, lambda: configured_keys(root.config))
    if worker:
        DeploymentGaugesLoop(deployment_gauges, reactor).setServiceParent(top)
    # Budgets go on from the spend in the ledger (started above).
    SpendLoader(root.quotas, cfg.ledger_path if cfg.ledger_enabled else None, in_thread).setServiceParent(top)
    # Streams of keys with cut_at_budget end when the budget runs out.
    BudgetCutoff(
        reactor, root.active, lambda: root.keys.by_name, root.quotas, accounting.in_flight_cost
    ).setServiceParent(top)
    site = GatewaySite(root, reactor, cfg.max_body_bytes, cfg.max_buffered_body_bytes)
    # Stopped after the listeners (children stop in reverse order) and
    # before the pool and the ledger.
    Drain(root, reactor, cfg.drain_seconds).setServiceParent(top)
    if worker:
        from llmgate.workers import AdoptedPort

        for fd, family in adopt or ():
            AdoptedPort(reactor, fd, family, site).setServiceParent(top)
        return top
    top.listeners = []  # type: ignore[attr-defined]
    for desc in ports:
        ep = endpoints.serverFromString(reactor, desc)
        lst = Listener("--port", desc, ep, site, reactor)
        lst.setServiceParent(top)
        top.listeners.append(lst)  # type: ignore[attr-defined]
    if cfg.metrics_port:
        # On its own listener: metrics name keys and models, which are not
        # for every client of the gateway to read.
        # -- the status page (llmgate.ops.status) beside /metrics --
        metrics.board = status.StatusBoard(reactor)
        admin = status.AdminRoot(
            MetricsResource(metrics.registry, before=lambda: (metrics.sync_ledger(), deployment_gauges.update())),
            status.StatusResource(
                metrics.board, lambda: len(root.active), lambda: root.quotas, lambda: root.keys.by_name.values()
            ),
        )
        msite = Site(admin, reactor=reactor)
        msite.log = lambda request: None  # type: ignore[method-assign]
        ep = endpoints.serverFromString(reactor, cfg.metrics_port)
        lst = Listener("[metrics] port", cfg.metrics_port, ep, msite, reactor)
        lst.setServiceParent(top)
        top.listeners.append(lst)  # type: ignore[attr-defined]
    return top


def _startup_block(options: Options, cfg: configmod.Config, workers: int, listeners: list[Any]) -> StartupBlock:
    return StartupBlock(
        cfg, listeners, demo=bool(options["demo"]), workers=workers,
        raw_ports=options["raw_ports"], config_path=options["config"],
    )


def _state_settings(cfg: configmod.Config) -> tuple[Any, ...]:
    return (cfg.state_redis_url, cfg.state_timeout, cfg.state_on_error)


def _shared_state(cfg: configmod.Config, reactor: Any, top: Any, metrics: Any, in_thread: Any) -> Any:
    """
    The limit state: L{None} (in this process) or, with C{[state]
    redis_url}, a Redis connection.  Started here, before the listeners,
    so it stops after the drain and the last settles reach Redis.
    """
    if not cfg.state_redis_url:
        return None
    from llmgate.policy import redis as redisstate

    state = redisstate.from_config(reactor, cfg.state_redis_url, cfg.state_timeout, cfg.state_on_error)
    if cfg.ledger_enabled:
        # After a reconnection (Redis may have restarted empty), the spend
        # is summed from the ledger again, as it is then.
        from llmgate.policy.budgets import spend_from_ledger

        state.reload_spend = lambda: in_thread(spend_from_ledger, cfg.ledger_path, reactor.seconds())
    state.setServiceParent(top)
    state.count_in(metrics.registry)
    return state


def _reload_refusal(new: configmod.Config, bare_public: bool, current: Optional[configmod.Config] = None) -> Optional[str]:
    """
    A bare C{--port} chosen to listen on every interface because gateway
    keys were configured must not become an open relay by a reload that
    removes the last key.  The limit state (C{[state]}) is built at start:
    a reload that changes it is refused rather than silently not applied.
    """
    if current is not None and _state_settings(new) != _state_settings(current):
        return "state: [state] settings take effect at start only; restart the gateway to change them"
    if bare_public and not new.keyed:
        return (
            "keys: the new file has no gateway keys, but a bare --port listens on every "
            "interface (chosen at start because keys were set), so anyone could spend the "
            "provider keys; keep a key, or restart to listen on 127.0.0.1 only"
        )
    return None


def makeService(options: Options, reactor: Optional[Any] = None) -> service.MultiService:
    if reactor is None:
        # Unless twistd was given --reactor: epoll without a legacy log
        # context per ready descriptor (llmgate.ops.reactor).
        lean_reactor.install()
        from twisted.internet import reactor as _reactor

        reactor = _reactor
        # The twistd log observer (made after this) buffers access lines
        # on this reactor's timer.
        logformat.use_reactor(reactor)
        # Until the reload handler is installed (first thing when the tree
        # starts), a SIGHUP (systemctl reload right after start) would kill
        # the process: ignore it meanwhile, the file was just read.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if (options.get("worker_count") or 1) > 1:
        return _supervisor(options, reactor)
    top = OrderedMultiService()
    cfg = options["loaded"]
    if cfg is None or cfg.accounting_enabled:
        # Build the tiktoken encodings (from the package's files, never the
        # network) before listening: about a second of CPU that would
        # otherwise contend with live streams for the GIL.
        tokens.load_encodings()
    if options["demo"]:
        cfg = configmod.demo(_mock_upstream(reactor, top))
    if not cfg.providers:
        Logger(namespace="llmgate").warn(
            "no providers configured: every request will get 404. Set OPENAI_API_KEY "
            "or ANTHROPIC_API_KEY (and *_BASE_URL), pass --config, or try --demo."
        )
    # -- sd_notify (llmgate.ops.notify) --
    notifier = Notifier.from_environ()
    tree = build(
        cfg, reactor, options["ports"], config_path=options["config"], bare_public=options["bare_public"],
        notify=notifier,
    )
    tree.setServiceParent(top)
    # Last: logs once every listener is bound.
    _startup_block(options, cfg, 1, tree.listeners).setServiceParent(top)
    # READY=1 at that same moment; STOPPING=1 first thing on stop.
    SystemdNotify(notifier, reactor).setServiceParent(top)
    _tune_gc(tree)
    tune_malloc()
    return top


def _mock_upstream(reactor: Any, top: service.MultiService) -> str:
    """C{--demo}: the mock provider on 127.0.0.1; returns its base URL."""
    from llmgate.mock.provider import MockProvider

    mock = MockProvider(reactor)
    mock_site = Site(mock.resource, reactor=reactor)
    mock_site.log = lambda request: None  # type: ignore[method-assign]
    port = reactor.listenTCP(0, mock_site, interface="127.0.0.1")
    _ListeningPort(port).setServiceParent(top)
    return f"http://127.0.0.1:{port.getHost().port}"


def _supervisor(options: Options, reactor: Any) -> service.MultiService:
    """
    C{--workers N} above 1: this process binds the ports and supervises N
    workers serving them (L{llmgate.workers}).  The C{--demo} mock provider
    runs here, once, and every worker relays to it.
    """
    from llmgate import workers
    from llmgate.ops.metrics import AggregateMetricsResource

    top = OrderedMultiService()
    cfg = options["loaded"]
    demo_url = None
    if options["demo"]:
        demo_url = _mock_upstream(reactor, top)
        cfg = configmod.demo(demo_url)
    if not cfg.providers:
        Logger(namespace="llmgate").warn(
            "no providers configured: every request will get 404. Set OPENAI_API_KEY "
            "or ANTHROPIC_API_KEY (and *_BASE_URL), pass --config, or try --demo."
        )
    # First child: stops last, once every worker has exited.
    metrics_dir = _TempDir("llmgate-metrics-")
    metrics_dir.setServiceParent(top)
    env = dict(os.environ)
    # -- sd_notify: this process is MAINPID; the workers never notify --
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        env.pop(name, None)
    notifier = Notifier.from_environ()
    # Not Twisted's thread pool: it leaves a reference cycle per call.
    in_thread = ThreadRunner(reactor, workers=2, name="llmgate-supervisor")
    in_thread.setServiceParent(top)

    held: list[workers.HeldListener] = []
    for desc in options["ports"]:
        ep = endpoints.serverFromString(reactor, desc)
        held.append(workers.HeldListener("--port", desc, ep, "GatewaySite", reactor))

    def argv(index: int) -> list[str]:
        families = [h.socket()[1] for h in held]
        return workers.worker_argv(index, families, options, demo_url)

    sup = workers.Supervisor(
        options["worker_count"],
        reactor,
        argv,
        lambda: [h.socket() for h in held],
        env,
        in_thread=in_thread,
        ledger_path=cfg.ledger_path if cfg.ledger_enabled else None,
        metrics_dir=metrics_dir.get,
        kill_after=cfg.drain_seconds + 15,
        # Decided at start: a daemonizing twistd redirects stdout later.
        relay_output=None,
        notify=notifier,
    )
    workers.HupForwarder(sup, reactor).setServiceParent(top)
    sup.setServiceParent(top)
    # Added after the supervisor, so stopped before it: the supervisor's
    # copies of the sockets close first, then the workers drain.
    for h in held:
        h.setServiceParent(top)
    shown: list[Any] = list(held)
    if cfg.metrics_port:
        msite = Site(
            status.AdminRoot(
                AggregateMetricsResource(metrics_dir.get, in_thread),
                status.WorkersStatusResource(options["worker_count"], metrics_dir.get, in_thread, reactor),
            ),
            reactor=reactor,
        )
        msite.log = lambda request: None  # type: ignore[method-assign]
        ep = endpoints.serverFromString(reactor, cfg.metrics_port)
        lst = Listener("[metrics] port", cfg.metrics_port, ep, msite, reactor)
        lst.setServiceParent(top)
        shown.append(lst)
    _startup_block(options, cfg, options["worker_count"], shown).setServiceParent(top)
    # READY=1 comes from the supervisor once every worker serves.
    SystemdNotify(notifier, reactor, ready_at_start=False).setServiceParent(top)
    return top


class _TempDir(service.Service):
    """
    A private directory made when the tree starts (so a failed bind
    leaves none behind) and removed when it has stopped.
    """

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self.path: Optional[str] = None

    def get(self) -> str:
        assert self.path is not None
        return self.path

    def startService(self) -> None:
        import tempfile

        super().startService()
        self.path = tempfile.mkdtemp(prefix=self._prefix)

    def stopService(self) -> Any:
        import shutil

        super().stopService()
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)


def worker_service(opts: Any, sockets: list[tuple[int, int]], reactor: Any) -> service.MultiService:
    """
    A worker's tree under C{--workers}: L{build} on the sockets adopted
    from the supervisor (C{opts} are L{llmgate.workers.WorkerOptions}).
    """
    if opts["config"]:
        cfg = configmod.load(opts["config"])
    elif opts["demo-upstream"]:
        cfg = configmod.demo(opts["demo-upstream"])
    else:
        cfg = configmod.from_environment()
    if cfg.accounting_enabled:
        tokens.load_encodings()
    top = build(
        cfg, reactor, [], config_path=opts["config"], bare_public=bool(opts["bare-public"]), adopt=sockets
    )
    _tune_gc(top)
    tune_malloc()
    return top


def _tune_gc(tree: service.MultiService) -> None:
    """
    The objects made at start-up live as long as the process: freeze them
    out of the collector's sight, set thresholds that keep every
    collection short, and have the tree's young collections freeze what
    survives them (see L{llmgate.ops.gcstats.tune}).
    """
    young = [s for s in tree if isinstance(s, gcstats.YoungCollections)]
    gcstats.tune(young[0] if young else None)

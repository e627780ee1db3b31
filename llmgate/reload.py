# -*- test-case-name: tests.test_reload -*-
"""
SIGHUP: re-read the config file and serve new requests with it.

Without a handler SIGHUP kills the process on the spot: no log line, and
no ledger record for the streams in flight. Here it reloads instead, and
atomically: the file is read, parsed and validated off the reactor thread
by the same code that checks it at start (L{llmgate.config.load}, which
also reads the key file, L{llmgate.policy.keys}), and only
a config that passes replaces the running one, in one step on the reactor
thread. An invalid file is logged with its reason and the running config
is kept. Streams in flight hold their own provider, model and timeouts, so
they finish on the config they started with.  Rate-limit state and spend
are kept by name across a reload; a revoked key is refused from then on.

Settings bound to something opened at start (listeners, the ledger file,
the upstream pool, the body cap, the drain) keep their running values; a
change to one is logged as needing a restart.
"""

from __future__ import annotations

import dataclasses
import signal
from typing import Any, Callable, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from llmgate import config as configmod
from llmgate.config import Config

_log = Logger(namespace="llmgate.reload")

# Config field -> the setting's name in the file, for the settings that
# only a restart changes.
RESTART_ONLY = {
    "max_body_bytes": "server.max_body_bytes",
    "drain_seconds": "server.drain_seconds",
    "ledger_enabled": "ledger.enabled",
    "ledger_path": "ledger.path",
    "ledger_batch_interval": "ledger.batch_interval",
    "accounting_enabled": "accounting.enabled",
    "metrics_port": "metrics.port",
}


def merge(running: Config, new: Config) -> tuple[Config, list[str]]:
    """
    The config to serve with after a reload: C{new}, with the settings only
    a restart can change kept at their C{running} values; and the names of
    those settings that C{new} would have changed.
    """
    kept = {f: getattr(running, f) for f in RESTART_ONLY}
    pending = [RESTART_ONLY[f] for f, v in kept.items() if getattr(new, f) != v]
    if new.timeouts.connect != running.timeouts.connect:
        pending.append("timeouts.connect")
    timeouts = dataclasses.replace(new.timeouts, connect=running.timeouts.connect)
    return dataclasses.replace(new, timeouts=timeouts, **kept), sorted(pending)


class Reloader(Service):
    """
    Reloads the config file on SIGHUP while running.

    @param path: the C{--config} file, or L{None} when there is none
        (C{--demo}, or providers from the environment): then a SIGHUP is
        only logged.
    @param running: the config the daemon started with.
    @param apply: called on the reactor thread with each accepted config.
    @param reactor: C{IReactorFromThreads}; the signal handler only hands
        the work to it, since a handler may run between any two bytecodes.
    @param in_thread: runs a callable off the reactor thread, returning a
        Deferred.
    @param check: returns why a valid config may still not be taken while
        running (L{None} when it may).
    @param load: reads and validates a config file (L{configmod.load}).
    @param install: C{signal.signal}.
    @param notify: a L{llmgate.ops.notify.Notifier} (or L{None}): systemd
        hears C{RELOADING=1} when a reload starts and C{READY=1} when it
        is over, accepted or rejected.
    """

    def __init__(
        self,
        path: Optional[str],
        running: Config,
        apply: Callable[[Config], Any],
        reactor: Any,
        in_thread: Callable[..., Deferred[Any]],
        check: Callable[[Config], Optional[str]] = lambda cfg: None,
        load: Callable[[str], Config] = configmod.load,
        install: Callable[[int, Any], Any] = signal.signal,
        notify: Any = None,
    ) -> None:
        self._notify = notify
        self.path = path
        self.current = running
        self._apply = apply
        self._reactor = reactor
        self._in_thread = in_thread
        self._check = check
        self._load = load
        self._install = install
        self._previous: Any = None
        self._installed = False
        self._loading = False
        self._again = False

    def privilegedStartService(self) -> None:
        # twistd calls this on the whole tree before any startService, and
        # the listeners bind in theirs: installing here (as the tree's first
        # child) means no client can be served before SIGHUP is handled.
        super().privilegedStartService()
        self._install_handler()

    def startService(self) -> None:
        super().startService()
        self._install_handler()

    def _install_handler(self) -> None:
        if not self._installed:
            self._previous = self._install(signal.SIGHUP, self._on_signal)
            self._installed = True

    def stopService(self) -> Any:
        super().stopService()
        if self._installed:
            self._install(signal.SIGHUP, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False
        return None

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._reactor.callFromThread(self.reload)

    def reload(self) -> Deferred[None]:
        """
        Read the file and take it if valid. A SIGHUP while a read is under
        way reads the file once more afterwards, so the last edit wins.
        """
        if self._loading:
            self._again = True
            return succeed(None)
        if self._notify is not None:
            self._notify.reloading()
        if self.path is None:
            if self._notify is not None:
                self._notify.ready()
            _log.info(
                "SIGHUP: nothing to reload (no --config file; --demo and the "
                "environment's provider settings are read at start only)"
            )
            return succeed(None)
        self._loading = True
        _log.info("SIGHUP: reloading the config from {path}", path=self.path)
        d = self._in_thread(self._load, self.path)
        d.addCallback(self._loaded)
        d.addErrback(self._failed)
        d.addBoth(self._done)
        return d

    def _loaded(self, new: Config) -> None:
        why = self._check(new)
        if why is not None:
            self._reject(why)
            return
        merged, pending = merge(self.current, new)
        self._apply(merged)
        self.current = merged
        _log.info(
            "config reloaded from {path}: {providers} providers, {models} models, "
            "{keys} gateway keys; new requests use it, streams in flight finish on theirs",
            path=self.path,
            providers=len(merged.providers),
            models=len(merged.models),
            keys=len(merged.keys) + len(merged.key_records),
        )
        if pending:
            _log.warn(
                "config reload: {settings} changed in the file and take effect at the next restart",
                settings=", ".join(pending),
            )

    def _failed(self, failure: Failure) -> None:
        if failure.check(configmod.ConfigError):
            self._reject(str(failure.value))
        else:
            _log.failure("config reload from {path} failed", failure, path=self.path)
            self._reject("unexpected error (logged above)")

    def _reject(self, why: str) -> None:
        _log.error(
            "config reload from {path} rejected, keeping the running config: {why}",
            path=self.path,
            why=why,
        )

    def _done(self, _: Any) -> None:
        self._loading = False
        if self._again:
            self._again = False
            self.reload()
        elif self._notify is not None:
            self._notify.ready()

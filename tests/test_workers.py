# -*- test-case-name: tests.test_workers -*-
"""
The C{--workers} supervisor's logic, in memory: a fake process spawner and
a L{MemoryReactorClock}; no process is started.
"""

from __future__ import annotations

import os
import signal
import socket
from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from llmgate import tap, workers


class FakeTransport:
    """A spawned process: its pid and the signals sent to it."""

    def __init__(self, pid: int) -> None:
        self.pid: Optional[int] = pid
        self.signals: list[int] = []
        self.gone = False

    def signalProcess(self, sig: int) -> None:
        if self.gone:
            raise ProcessExitedAlready()
        self.signals.append(sig)


class FakeSpawner:
    """C{reactor.spawnProcess} that records each call."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.next_pid = 100

    def __call__(self, proto: Any, exe: str, args: list[str], env: Any = None, childFDs: Any = None) -> FakeTransport:
        t = FakeTransport(self.next_pid)
        self.next_pid += 1
        proto.makeConnection(t)
        self.calls.append(dict(proto=proto, exe=exe, args=args, env=env, childFDs=childFDs, transport=t))
        return t

    def live(self) -> list[dict[str, Any]]:
        return [c for c in self.calls if not c["transport"].gone]

    def end(self, call: dict[str, Any], reason: Any = None) -> None:
        """The process of C{call} exits (killed by SIGKILL unless told)."""
        t = call["transport"]
        t.gone = True
        t.pid = None  # as Twisted does once the process is reaped
        call["proto"].processEnded(Failure(reason or ProcessTerminated(signal=signal.SIGKILL)))


class SupervisorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.spawn = FakeSpawner()
        self.recovered: list[tuple[str, Optional[str]]] = []
        self.recovery: Optional[defer.Deferred[int]] = None
        self.dead: list[tuple[int, str]] = []

    def recover(self, path: str, owner: Optional[str]) -> int:
        self.recovered.append((path, owner))
        return 0

    def in_thread(self, f: Any, *a: Any) -> defer.Deferred[Any]:
        if f == self.recover and self.recovery is not None:
            # Hold the recovery until the test fires it.
            d, self.recovery = self.recovery, None
            self.recover(*a)
            return d
        return defer.maybeDeferred(f, *a)

    def make(self, count: int = 2, ledger: Optional[str] = "/l/usage.db", **kw: Any) -> workers.Supervisor:
        sup = workers.Supervisor(
            count,
            self.reactor,
            lambda i: ["/py", "-m", "llmgate.workers", "--index", str(i)],
            lambda: [(7, socket.AF_INET), (9, socket.AF_INET6)],
            {"HOME": "/h"},
            spawn=self.spawn,
            in_thread=self.in_thread,
            ledger_path=ledger,
            recover=self.recover,
            metrics_dir=lambda: "/m",
            mark_dead=lambda pid, path: self.dead.append((pid, path)),
            **kw,
        )
        return sup

    def test_spawnsWorkersWithTheSockets(self) -> None:
        """
        Each worker gets the listening sockets from fd 4 on (in order), a
        status pipe on fd 3, the supervisor's stdout/stderr, and the
        environment with the metrics directory.
        """
        sup = self.make(2)
        sup.startService()
        self.assertEqual(len(self.spawn.calls), 2)
        for i, call in enumerate(self.spawn.calls):
            self.assertEqual(call["childFDs"], {0: "w", 1: 1, 2: 2, 3: "r", 4: 7, 5: 9})
            self.assertEqual(call["args"][-1], str(i))
            self.assertEqual(call["exe"], "/py")
            self.assertEqual(call["env"], {"HOME": "/h", "PROMETHEUS_MULTIPROC_DIR": "/m"})

    def test_notifyReadyOnceAllServe(self) -> None:
        """
        The supervisor (systemd's MAINPID) sends READY=1 only once every
        worker has said it serves, once per run (not after a replacement);
        SIGHUP is RELOADING=1 then READY=1 around passing it on.
        """
        sent: list[str] = []

        class Notes:
            def ready(self) -> None:
                sent.append("READY=1")

            def reloading(self) -> None:
                sent.append("RELOADING=1")

        sup = self.make(2, ledger=None, notify=Notes())
        sup.startService()
        first, second = self.spawn.calls
        first["proto"].childDataReceived(workers.STATUS_FD, workers.READY)
        self.assertEqual(sent, [])
        second["proto"].childDataReceived(workers.STATUS_FD, workers.READY)
        self.assertEqual(sent, ["READY=1"])
        self.spawn.end(first)
        self.reactor.advance(60)
        self.spawn.calls[-1]["proto"].childDataReceived(workers.STATUS_FD, workers.READY)
        self.assertEqual(sent, ["READY=1"])
        sup.hup()
        self.assertEqual(sent, ["READY=1", "RELOADING=1", "READY=1"])
        self.assertEqual(second["transport"].signals, [signal.SIGHUP])

    def test_relayedOutput(self) -> None:
        """
        When this process's stdout is discarded (a daemonized twistd logs
        to a file), the workers' stdout and stderr are read and each line
        logged here, a partial last line too when the worker ends.
        """
        from twisted.logger import capturedLogs

        sup = self.make(1, ledger=None, relay_output=True)
        sup.startService()
        (call,) = self.spawn.calls
        self.assertEqual((call["childFDs"][1], call["childFDs"][2]), ("r", "r"))
        self.assertEqual(call["env"]["LLMGATE_WORKER_RELAYED"], "1")
        with capturedLogs() as events:
            call["proto"].childDataReceived(1, b"first\nsec")
            call["proto"].childDataReceived(2, b"err line\n")
            call["proto"].childDataReceived(1, b"ond\nlast")
            self.spawn.end(call)
        lines = [e["line"] for e in events if e.get("log_namespace") == "llmgate.worker"]
        self.assertEqual(lines, ["first", "err line", "second", "last"])

    def test_recoversAllOpenRowsBeforeAnyWorker(self) -> None:
        """
        Every open ledger row is marked interrupted (owner None) before the
        first worker starts: a worker never recovers, a sibling's rows are
        live.
        """
        self.recovery = defer.Deferred()
        held = self.recovery
        sup = self.make(2)
        sup.startService()
        self.assertEqual(self.recovered, [("/l/usage.db", None)])
        self.assertEqual(self.spawn.calls, [])
        held.callback(3)
        self.assertEqual(len(self.spawn.calls), 2)

    def test_deadWorkerRowsRecoveredBeforeReplacement(self) -> None:
        """
        When a worker dies its own open rows (owner = its pid) are marked
        interrupted and its live gauges removed, and only then, after the
        backoff, is its replacement started; the other worker is left alone.
        """
        sup = self.make(2)
        sup.startService()
        first, other = self.spawn.calls
        self.recovery = defer.Deferred()
        held = self.recovery
        self.spawn.end(first)
        self.assertEqual(self.recovered[-1], ("/l/usage.db", "100"))
        self.assertEqual(self.dead, [(100, "/m")])
        self.reactor.advance(60)
        self.assertEqual(len(self.spawn.calls), 2)
        held.callback(1)
        self.reactor.advance(sup.first_backoff)
        self.assertEqual(len(self.spawn.calls), 3)
        self.assertEqual(self.spawn.calls[2]["args"][-1], "0")
        self.assertEqual(other["transport"].signals, [])
        self.assertEqual(sup.restarts, 1)

    def test_backoffDoublesThenResetsAfterAStableRun(self) -> None:
        """
        A worker that keeps dying at once is restarted after 0.5, 1, 2 ...
        seconds up to the cap; one that ran past C{stable_after} is
        restarted at once.
        """
        sup = self.make(1, ledger=None, first_backoff=0.5, max_backoff=2.0, stable_after=10.0)
        sup.startService()
        delays = []
        for _ in range(4):
            self.spawn.end(self.spawn.live()[0])
            n = len(self.spawn.calls)
            waited = 0.0
            while len(self.spawn.calls) == n:
                self.reactor.advance(0.25)
                waited += 0.25
            delays.append(waited)
        self.assertEqual(delays, [0.5, 1.0, 2.0, 2.0])
        self.reactor.advance(11)
        self.spawn.end(self.spawn.live()[0])
        self.reactor.advance(0)
        self.assertEqual(len(self.spawn.calls), 6)

    def test_stopDrainsWorkers(self) -> None:
        """
        Stopping sends SIGTERM to every worker and fires only when all have
        exited; no replacement is started meanwhile, and a worker that
        was killed during the drain still gets its rows recovered.
        """
        sup = self.make(2)
        sup.startService()
        a, b = self.spawn.calls
        d = sup.stopService()
        self.assertEqual((a["transport"].signals, b["transport"].signals), ([signal.SIGTERM], [signal.SIGTERM]))
        self.assertNoResult(d)
        self.spawn.end(a, ProcessDone(0))
        self.assertNoResult(d)
        self.spawn.end(b)
        self.successResultOf(d)
        self.assertIn(("/l/usage.db", "101"), self.recovered)
        self.reactor.advance(120)
        self.assertEqual(len(self.spawn.calls), 2)

    def test_stopKillsWorkersThatOutliveTheDrain(self) -> None:
        """A worker still running C{kill_after} seconds after SIGTERM gets SIGKILL."""
        sup = self.make(1, kill_after=40.0)
        sup.startService()
        (a,) = self.spawn.calls
        d = sup.stopService()
        self.reactor.advance(39)
        self.assertEqual(a["transport"].signals, [signal.SIGTERM])
        self.reactor.advance(1)
        self.assertEqual(a["transport"].signals, [signal.SIGTERM, signal.SIGKILL])
        self.spawn.end(a)
        self.successResultOf(d)

    def test_stopCancelsPendingRestart(self) -> None:
        """A replacement waiting out its backoff is not started after stop."""
        sup = self.make(1, ledger=None)
        sup.startService()
        self.spawn.end(self.spawn.calls[0])
        self.successResultOf(sup.stopService())
        self.reactor.advance(60)
        self.assertEqual(len(self.spawn.calls), 1)

    def test_hupGoesToEveryWorkerOnceServing(self) -> None:
        """
        SIGHUP is passed on to the workers that are serving; one still
        starting gets it as soon as it reports ready (it may have read the
        file before the edit).
        """
        sup = self.make(2, ledger=None)
        sup.startService()
        a, b = self.spawn.calls
        a["proto"].childDataReceived(workers.STATUS_FD, workers.READY)
        sup.hup()
        self.assertEqual((a["transport"].signals, b["transport"].signals), ([signal.SIGHUP], []))
        b["proto"].childDataReceived(workers.STATUS_FD, b"rea")
        self.assertEqual(b["transport"].signals, [])
        b["proto"].childDataReceived(workers.STATUS_FD, b"dy\n")
        self.assertEqual(b["transport"].signals, [signal.SIGHUP])

    def test_hupForwarderInstallsHandler(self) -> None:
        """
        The supervisor handles SIGHUP from the start (the default action
        would kill it) and hands it to the reactor thread.
        """
        installed: dict[int, Any] = {}
        sup = self.make(1, ledger=None)
        fwd = workers.HupForwarder(sup, self.reactor, install=lambda s, h: installed.__setitem__(s, h))
        fwd.privilegedStartService()
        calls: list[Any] = []
        self.patch(sup, "hup", lambda: calls.append(1))
        self.reactor.callFromThread = lambda f, *a: f(*a)  # type: ignore[method-assign]
        installed[signal.SIGHUP](signal.SIGHUP, None)
        self.assertEqual(calls, [1])


class OptionsTests(SynchronousTestCase):
    def test_parseWorkers(self) -> None:
        """C{--workers} takes auto (the CPUs this process may use) or a number from 1."""
        self.patch(workers, "cpu_count", lambda: 6)
        self.assertEqual(workers.parse_workers("auto"), 6)
        self.assertEqual(workers.parse_workers("3"), 3)
        for bad in ("0", "-1", "many"):
            self.assertRaises(usage.UsageError, workers.parse_workers, bad)

    def test_workersDefaultAuto(self) -> None:
        """Without C{--workers} the gateway runs one worker per CPU."""
        self.patch(workers, "cpu_count", lambda: 4)
        o = tap.Options()
        o.parseOptions(["--demo"])
        self.assertEqual(o["worker_count"], 4)

    def test_unshareableEndpointRefused(self) -> None:
        """
        An explicit C{--workers} above 1 with an endpoint a worker cannot
        adopt (unix:, ssl:) is a usage error naming it; C{auto} serves such
        endpoints from one process, as before.
        """
        o = tap.Options()
        with self.assertRaises(usage.UsageError) as e:
            o.parseOptions(["--demo", "--workers", "2", "--port", "unix:/tmp/x.sock"])
        self.assertIn("unix:/tmp/x.sock", str(e.exception))
        self.patch(workers, "cpu_count", lambda: 4)
        o = tap.Options()
        o.parseOptions(["--demo", "--port", "unix:/tmp/x.sock"])
        self.assertEqual(o["worker_count"], 1)
        o = tap.Options()
        o.parseOptions(["--demo", "--workers", "2", "--port", "8081", "--port", "tcp6:0"])
        self.assertEqual(o["worker_count"], 2)
        self.assertIsNone(workers.endpoint_refusal("systemd:domain=INET:name=llmgate"))
        self.assertIsNotNone(workers.endpoint_refusal("ssl:443"))

    def test_supervisorTree(self) -> None:
        """
        With more than one worker, makeService builds the supervisor: the
        ports are bound here but not accepted on, the demo mock runs once,
        here, and nothing of the gateway's own tree (ledger, relay).
        """
        o = tap.Options()
        o.parseOptions(["--demo", "--workers", "2", "--port", "tcp:0:interface=127.0.0.1"])
        reactor = MemoryReactorClock()
        top = tap.makeService(o, reactor=reactor)
        kinds = [type(s).__name__ for s in top]
        self.assertEqual(kinds, ["_ListeningPort", "_TempDir", "ThreadRunner", "HupForwarder", "Supervisor", "HeldListener", "StartupBlock", "SystemdNotify"])
        self.assertEqual(len(reactor.tcpServers), 1)  # the mock provider
        sup = [s for s in top if isinstance(s, workers.Supervisor)][0]
        self.assertEqual(sup.count, 2)
        self.assertEqual(sup.ledger_path, "llmgate-usage.db")
        tmp = list(top)[1]
        tmp.startService()
        path = sup.metrics_dir() if sup.metrics_dir else ""
        self.assertTrue(os.path.isdir(path))
        tmp.stopService()
        self.assertFalse(os.path.exists(path))

    def test_supervisorWarnsWithoutProviders(self) -> None:
        """Started with no providers at all, the supervisor says so once."""
        from twisted.logger import globalLogPublisher

        from llmgate import config

        events: list[dict] = []  # type: ignore[type-arg]
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        o = tap.Options()
        o.update(loaded=config.parse({}, {}), demo=False, ports=["tcp:0"], worker_count=2, bare_public=False)
        tap.makeService(o, reactor=MemoryReactorClock())
        warned = [e for e in events if "no providers configured" in e.get("log_format", "")]
        self.assertEqual(len(warned), 1)

    def test_workerArgv(self) -> None:
        """
        A worker's command line names its index, the supervisor's pid, the
        sockets' families, the config file as an absolute path, and the
        demo upstream.
        """
        o = tap.Options()
        o.parseOptions(["--demo", "--workers", "2"])
        argv = workers.worker_argv(1, [socket.AF_INET, socket.AF_INET6], o, "http://127.0.0.1:5")
        self.assertEqual(argv[1:3], ["-m", "llmgate.workers"])
        opts = workers.WorkerOptions()
        opts.parseOptions(argv[3:])
        self.assertEqual(
            (opts["index"], opts["parent"], opts["sockets"], opts["demo-upstream"], opts["config"]),
            (1, os.getpid(), f"{int(socket.AF_INET)},{int(socket.AF_INET6)}", "http://127.0.0.1:5", None),
        )


class WorkerTreeTests(SynchronousTestCase):
    def test_workerTree(self) -> None:
        """
        A worker's tree serves the adopted sockets instead of binding, its
        ledger writes its pid as owner and does not recover at start, it
        pushes the ledger gauges on a timer, and it has no metrics listener
        (the supervisor serves the sum).
        """
        from llmgate import config
        from llmgate.accounting.ledger import Ledger
        from llmgate.ops.metrics import _LedgerGauges
        from llmgate.service import Listener

        cfg = config.parse(
            {"providers": {"p": {"kind": "openai", "base_url": "http://127.0.0.1:1/v1"}},
             "metrics": {"port": "tcp:0:interface=127.0.0.1"},
             "ledger": {"path": self.mktemp()}},
            {},
        )
        reactor = MemoryReactorClock()
        top = tap.build(cfg, reactor, ["tcp:0"], adopt=[(4, socket.AF_INET), (5, socket.AF_INET6)])
        adopted = [s for s in top if isinstance(s, workers.AdoptedPort)]
        self.assertEqual([(a.fd, a.family) for a in adopted], [(4, socket.AF_INET), (5, socket.AF_INET6)])
        self.assertEqual([s for s in top if isinstance(s, Listener)], [])
        (ledger,) = [s for s in top if isinstance(s, Ledger)]
        self.assertEqual(ledger._writer.owner, str(os.getpid()))
        self.assertTrue(ledger._writer._recovered)  # nothing left to recover
        self.assertEqual(len([s for s in top if isinstance(s, _LedgerGauges)]), 1)

        single = tap.build(cfg, reactor, ["tcp:0"])
        (ledger,) = [s for s in single if isinstance(s, Ledger)]
        self.assertEqual((ledger._writer.owner, ledger._writer._recovered), (None, False))
        self.assertEqual(len([s for s in single if isinstance(s, Listener)]), 2)

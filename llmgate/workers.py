# -*- test-case-name: tests.test_workers -*-
"""
C{--workers N}: one supervisor process owns the listening sockets, N
worker processes serve them.

One reactor thread uses one core; workers use them all.  The supervisor
(the C{twistd} process) binds every C{--port} (TCP, or a socket passed by
systemd) exactly as a single process would -- a port that cannot be bound
exits 1 with one line -- then stops accepting on them itself and hands
their descriptors to each worker (C{spawnProcess(childFDs=...)}); a worker
adopts them (C{adoptStreamPort}) and runs the usual service tree, and the
kernel spreads the connections over the workers that accept.

The supervisor:
  - marks every open ledger row C{interrupted} before the first worker
    starts (a worker never does: a sibling's rows are live);
  - when a worker dies, marks I{its} open rows (owner = its pid)
    C{interrupted} and removes its live gauge files, then starts a
    replacement, at once if it had run a while, else after a backoff
    that doubles up to C{max_backoff};
  - on SIGTERM (its C{stopService}) sends SIGTERM to every worker, which
    drains like a single process, and stops when all have exited
    (SIGKILL after C{kill_after} seconds);
  - on SIGHUP sends SIGHUP to every worker (each reloads and logs on its
    own); a worker not started yet gets it once it is;
  - serves C{[metrics] port} with the sum of the workers' metrics.

A worker gets SIGTERM when its supervisor dies (C{PR_SET_PDEATHSIG}) and
drains, so a killed supervisor never leaves workers behind that nobody
would restart.

This module's L{worker_main} is the worker process's entry point
(C{python -m llmgate.workers}); like L{llmgate.tap} it is a process top
and so may use the global reactor, only there.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.protocol import ProcessProtocol, ServerFactory
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from llmgate.ops.logformat import RAW, json_observer
from llmgate.service import Listener

_log = Logger(namespace="llmgate.workers")

# The fds a worker gets, in order: 0 a pipe from the supervisor (unused,
# so stdin never is a terminal), 1 and 2 the supervisor's, 3 a pipe on
# which it says "ready", then one per listening socket.
STATUS_FD = 3
FIRST_LISTEN_FD = 4
READY = b"ready\n"


def cpu_count() -> int:
    """The CPUs this process may run on (C{auto})."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def parse_workers(value: str) -> int:
    """C{--workers}: C{auto} or a whole number from 1."""
    if value == "auto":
        return cpu_count()
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise usage.UsageError(f"--workers: expected auto or a number from 1, got {value!r}")
    return n


def endpoint_refusal(desc: str) -> Optional[str]:
    """
    Why an endpoint cannot be shared with workers (L{None} if it can):
    only stream sockets a worker can adopt as they are, TCP and systemd's.
    """
    kind = desc.split(":", 1)[0].strip().lower()
    if kind in ("tcp", "tcp6", "systemd") or desc.strip().isdigit():
        return None
    return (
        f"--workers above 1 shares tcp:, tcp6: and systemd: endpoints only, not {desc!r}; "
        "use --workers 1 for it (or put TLS in front)"
    )


class HeldListener(Listener):
    """
    A L{Listener} whose socket the supervisor binds but never accepts on:
    the workers do.  Binding here keeps the single process's failure
    (one line, exit 1) and its log line C{<name> starting on <port>}.
    """

    def __init__(self, setting: str, desc: str, endpoint: Any, name: str, reactor: Any) -> None:
        super().__init__(setting, desc, endpoint, _HeldFactory(name), reactor)
        self.port: Any = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._waitingForPort.addCallback(self._hold)

    def _hold(self, port: Any) -> Any:
        port.stopReading()
        self.port = port
        return port

    def socket(self) -> tuple[int, int]:
        """The listening socket's fd and address family."""
        return self.port.fileno(), self.port.addressFamily


class _HeldFactory(ServerFactory):
    # Never started: no "Starting factory" line.
    noisy = False

    def __init__(self, name: str) -> None:
        self._name = name

    def logPrefix(self) -> str:
        # The workers serve this port with a GatewaySite.
        return self._name


@dataclass
class _Slot:
    """One worker position: its process now, and its restart history."""

    index: int
    transport: Any = None
    pid: Optional[int] = None
    started: float = 0.0
    ready: bool = False
    hup_pending: bool = False
    backoff: float = 0.0
    restart: Any = None
    ended: list[defer.Deferred[None]] = field(default_factory=list)


_relayed = Logger(namespace="llmgate.worker")


def stdout_discarded() -> bool:
    """
    Whether this process's stdout is C{/dev/null}: a daemonized C{twistd}
    (without C{-n}) logs to its file, so workers cannot just inherit fd 1.
    """
    try:
        out, null = os.fstat(1), os.stat(os.devnull)
    except OSError:
        return True
    return (out.st_dev, out.st_ino) == (null.st_dev, null.st_ino)


class _WorkerProtocol(ProcessProtocol):
    def __init__(self, supervisor: "Supervisor", slot: _Slot) -> None:
        self._supervisor = supervisor
        self._slot = slot
        self._buf = b""
        self._out = {1: b"", 2: b""}

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == STATUS_FD:
            self._buf += data
            if READY in self._buf:
                self._buf = b""
                self._supervisor._ready(self._slot, self.transport)
        elif childFD in self._out:
            # Only when relaying (daemonized): the worker's log lines go
            # into this process's log.
            *lines, self._out[childFD] = (self._out[childFD] + data).split(b"\n")
            for line in lines:
                self._relay(line)

    def _relay(self, line: bytes) -> None:
        if line:
            text = line.decode("utf-8", "replace")
            if text[:1] == "{":
                # A worker's JSON line (--log-format json): written as it
                # is by a JSON observer, as text by a text one.
                _relayed.info("{line}", line=text, **{RAW: text})
            else:
                _relayed.info("{line}", line=text)

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in self._out.items():
            self._out[fd] = b""
            self._relay(rest)
        self._supervisor._ended(self._slot, self.transport, reason)


class Supervisor(Service):
    """
    Starts C{count} workers, restarts the ones that die, passes SIGTERM
    (as its own stop) and SIGHUP on to them.

    @param argv: C{callable(index) -> list of str}: a worker's command
        line (executable first).
    @param sockets: C{callable() -> list of (fd, family)}, asked at start:
        the listening sockets every worker adopts.
    @param spawn: C{reactor.spawnProcess}'s signature.
    @param in_thread: runs a blocking callable off the reactor thread.
    @param ledger_path: the usage ledger, or L{None} if disabled.
    @param recover: C{recover(path, owner)} marks open rows interrupted
        (L{llmgate.accounting.ledger.recover_open_rows}).
    @param metrics_dir: returns the multiprocess metrics directory (made
        when the tree starts): given to the workers in the environment;
        a dead worker's live gauges there are removed.
    @param relay_output: read the workers' stdout/stderr and log their
        lines here (when this process's own stdout is discarded); else
        they write to this process's stdout/stderr directly.  L{None}:
        decide at start (L{stdout_discarded}), after twistd daemonized.
    @param notify: a L{llmgate.ops.notify.Notifier} (or L{None}): this
        process is systemd's C{MAINPID}, so it sends C{READY=1} once every
        worker has said it serves (once per run, not after a
        replacement), and C{RELOADING=1}/C{READY=1} around passing
        SIGHUP on.
    """

    def __init__(
        self,
        count: int,
        reactor: Any,
        argv: Callable[[int], list[str]],
        sockets: Callable[[], list[tuple[int, int]]],
        env: dict[str, str],
        spawn: Optional[Callable[..., Any]] = None,
        in_thread: Optional[Callable[..., defer.Deferred[Any]]] = None,
        ledger_path: Optional[str] = None,
        recover: Optional[Callable[[str, Optional[str]], int]] = None,
        metrics_dir: Optional[Callable[[], str]] = None,
        mark_dead: Optional[Callable[[int, str], Any]] = None,
        stable_after: float = 10.0,
        first_backoff: float = 0.5,
        max_backoff: float = 30.0,
        kill_after: float = 60.0,
        relay_output: Optional[bool] = False,
        notify: Any = None,
    ) -> None:
        self._notify = notify
        self._announced = False
        self.count = count
        self.relay_output = relay_output
        self._reactor = reactor
        self._argv = argv
        self._sockets = sockets
        self._env = env
        self._spawn = spawn
        self._in_thread = in_thread or (lambda f, *a: defer.maybeDeferred(f, *a))
        self.ledger_path = ledger_path
        if recover is None:
            from llmgate.accounting.ledger import recover_open_rows as recover
        self._recover = recover
        self.metrics_dir = metrics_dir
        if mark_dead is None:
            from prometheus_client.multiprocess import mark_process_dead as mark_dead
        self._mark_dead = mark_dead
        self.stable_after = stable_after
        self.first_backoff = first_backoff
        self.max_backoff = max_backoff
        self.kill_after = kill_after
        self.slots = [_Slot(i) for i in range(count)]
        self._fds: list[tuple[int, int]] = []
        self._stopping = False
        self.restarts = 0

    # -- start ----------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self.relay_output is None:
            self.relay_output = stdout_discarded()
        self._fds = list(self._sockets())
        d: defer.Deferred[Any] = defer.succeed(None)
        if self.ledger_path is not None:
            # Before any worker writes: every open row is a previous run's.
            d = self._in_thread(self._recover, self.ledger_path, None)
            d.addCallbacks(self._recovered_all, self._recovery_failed)
        d.addCallback(lambda _: [self._start(slot) for slot in self.slots])

    def _recovered_all(self, n: int) -> None:
        if n:
            _log.warn(
                "usage ledger {path}: {count} requests were in flight when the gateway "
                "last stopped without a clean shutdown; their rows are marked interrupted",
                path=self.ledger_path,
                count=n,
            )

    def _recovery_failed(self, f: Failure) -> None:
        _log.failure("usage ledger {path}: marking open rows interrupted failed", f, path=self.ledger_path)

    def _start(self, slot: _Slot) -> None:
        slot.restart = None
        if self._stopping:
            return
        childFDs: dict[int, Any] = {0: "w", 1: 1, 2: 2, STATUS_FD: "r"}
        for i, (fd, _family) in enumerate(self._fds):
            childFDs[FIRST_LISTEN_FD + i] = fd
        args = self._argv(slot.index)
        proto = _WorkerProtocol(self, slot)
        spawn = self._spawn or self._reactor.spawnProcess
        env = dict(self._env)
        if self.metrics_dir is not None:
            env["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir()
        if self.relay_output:
            childFDs.update({1: "r", 2: "r"})
            env["LLMGATE_WORKER_RELAYED"] = "1"
        transport = spawn(proto, args[0], args, env=env, childFDs=childFDs)
        slot.transport = transport
        slot.pid = transport.pid
        slot.started = self._reactor.seconds()
        slot.ready = False
        _log.info("worker {index} started (pid {pid})", index=slot.index, pid=slot.pid)

    def _ready(self, slot: _Slot, transport: Any) -> None:
        if transport is not slot.transport:
            return
        slot.ready = True
        _log.info("worker {index} (pid {pid}) is serving", index=slot.index, pid=slot.pid)
        if not self._announced and all(s.ready for s in self.slots):
            self._announced = True
            if self._notify is not None:
                self._notify.ready()
        if slot.hup_pending:
            slot.hup_pending = False
            self._signal(slot, signal.SIGHUP)

    # -- a worker ends --------------------------------------------------------

    def _ended(self, slot: _Slot, transport: Any, reason: Failure) -> None:
        pid = transport.pid if transport.pid is not None else slot.pid
        pid = slot.pid if pid is None else pid
        code = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        if not self._stopping:
            _log.error(
                "worker {index} (pid {pid}) exited ({how}); starting a replacement",
                index=slot.index,
                pid=pid,
                how=f"signal {sig}" if sig else f"status {code}",
            )
        slot.transport = None
        slot.ready = False
        d = self._cleanup(pid)
        ran = self._reactor.seconds() - slot.started
        d.addCallback(lambda _: self._after_end(slot, ran))

    def _cleanup(self, pid: Optional[int]) -> defer.Deferred[Any]:
        """A dead worker's open rows become interrupted; its live gauges go."""
        if pid is None:
            return defer.succeed(None)
        d: defer.Deferred[Any] = defer.succeed(None)
        if self.metrics_dir is not None:
            path = self.metrics_dir()
            d.addCallback(lambda _: self._in_thread(self._mark_dead, pid, path))
            d.addErrback(lambda f: _log.failure("removing worker {pid}'s gauges failed", f, pid=pid))
        if self.ledger_path is not None:
            d.addCallback(lambda _: self._in_thread(self._recover, self.ledger_path, str(pid)))

            def marked(n: int) -> None:
                if n:
                    _log.warn(
                        "usage ledger: {count} requests in flight on worker pid {pid} "
                        "are marked interrupted",
                        count=n,
                        pid=pid,
                    )

            d.addCallbacks(
                marked,
                lambda f: _log.failure("usage ledger: marking worker {pid}'s open rows failed", f, pid=pid),
            )
        return d

    def _after_end(self, slot: _Slot, ran: float) -> None:
        waiting, slot.ended = slot.ended, []
        for w in waiting:
            w.callback(None)
        if self._stopping:
            return
        if ran >= self.stable_after:
            slot.backoff = 0.0
        else:
            slot.backoff = min(max(slot.backoff * 2, self.first_backoff), self.max_backoff)
        self.restarts += 1
        slot.restart = self._reactor.callLater(slot.backoff, self._start, slot)

    # -- signals ----------------------------------------------------------------

    def _signal(self, slot: _Slot, signum: int) -> None:
        if slot.transport is None:
            return
        try:
            slot.transport.signalProcess(signum)
        except Exception:
            # ProcessExitedAlready: its processEnded is on its way.
            pass

    def hup(self) -> None:
        """SIGHUP: every worker reloads (one still starting, once started)."""
        _log.info("SIGHUP: passing it on to {count} workers", count=self.count)
        announce = self._notify is not None and self._announced
        if announce:
            self._notify.reloading()
        for slot in self.slots:
            if slot.ready:
                self._signal(slot, signal.SIGHUP)
            elif slot.transport is not None:
                slot.hup_pending = True
        if announce:
            # Each worker reloads and logs on its own; the supervisor has
            # passed the signal on and is ready again.  (Before the first
            # READY=1 it says nothing: that READY=1 is the workers'.)
            self._notify.ready()

    def stopService(self) -> defer.Deferred[None]:
        """
        Send SIGTERM to every worker (each drains its streams and flushes
        its ledger) and fire when all have exited; SIGKILL any left after
        C{kill_after} seconds.
        """
        super().stopService()
        self._stopping = True
        waits = []
        for slot in self.slots:
            if slot.restart is not None and slot.restart.active():
                slot.restart.cancel()
                slot.restart = None
            if slot.transport is not None:
                d: defer.Deferred[None] = defer.Deferred()
                slot.ended.append(d)
                waits.append(d)
                self._signal(slot, signal.SIGTERM)
        if not waits:
            return defer.succeed(None)
        _log.info("stopping {count} workers", count=len(waits))
        kill = self._reactor.callLater(self.kill_after, self._kill_all)
        done = defer.gatherResults(waits)

        def finished(_: Any) -> None:
            if kill.active():
                kill.cancel()

        done.addCallback(finished)
        return done

    def _kill_all(self) -> None:
        for slot in self.slots:
            if slot.transport is not None:
                _log.error(
                    "worker {index} (pid {pid}) still running {after}s after SIGTERM: killing it",
                    index=slot.index,
                    pid=slot.pid,
                    after=self.kill_after,
                )
                self._signal(slot, signal.SIGKILL)


class HupForwarder(Service):
    """The supervisor's SIGHUP handler: hands it to L{Supervisor.hup}."""

    def __init__(self, supervisor: Supervisor, reactor: Any, install: Callable[[int, Any], Any] = signal.signal) -> None:
        self._supervisor = supervisor
        self._reactor = reactor
        self._install = install
        self._installed = False

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if not self._installed:
            self._install(signal.SIGHUP, self._on_signal)
            self._installed = True

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._reactor.callFromThread(self._supervisor.hup)

    def stopService(self) -> None:
        # The handler stays while the workers drain (this stops after the
        # supervisor): SIGHUP's default action would kill the process
        # before the workers are done.
        super().stopService()


# -- the worker process ---------------------------------------------------------


class WorkerOptions(usage.Options):
    """A worker's command line, written by the supervisor."""

    optParameters = [
        ["index", None, "0", "This worker's position.", int],
        ["parent", None, "0", "The supervisor's pid.", int],
        ["sockets", None, "", "family,... of the sockets at fds 4, 5, ..."],
        ["config", None, None, "The --config file."],
        ["demo-upstream", None, None, "The supervisor's mock provider (--demo)."],
        ["log-format", None, "text", "text or json (the supervisor's --log-format)."],
    ]
    optFlags = [["bare-public", None, "A bare --port listens on every interface."]]


def worker_argv(index: int, families: Sequence[int], options: Any, demo_url: Optional[str]) -> list[str]:
    """The command line of worker C{index}."""
    argv = [
        sys.executable, "-m", "llmgate.workers",
        "--index", str(index),
        "--parent", str(os.getpid()),
        "--sockets", ",".join(str(int(f)) for f in families),
    ]
    if options["config"]:
        argv += ["--config", os.path.abspath(options["config"])]
    if demo_url:
        argv += ["--demo-upstream", demo_url]
    if options["bare_public"]:
        argv.append("--bare-public")
    if options.get("log_format", "text") != "text":
        argv += ["--log-format", options["log_format"]]
    return argv


class AdoptedPort(Service):
    """Accepts on a listening socket inherited from the supervisor."""

    def __init__(self, reactor: Any, fd: int, family: int, factory: Any) -> None:
        self._reactor = reactor
        self.fd = fd
        self.family = family
        self._factory = factory
        self.port: Any = None

    def startService(self) -> None:
        super().startService()
        self.port = self._reactor.adoptStreamPort(self.fd, self.family, self._factory)
        # adoptStreamPort works on a copy: close ours, so the socket is
        # closed for good once this worker and the supervisor stop.
        os.close(self.fd)

    def stopService(self) -> Any:
        super().stopService()
        if self.port is not None:
            return self.port.stopListening()
        return None


def _die_with_parent(parent: int) -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if parent and os.getppid() != parent:
        # The supervisor died before the line above.
        raise SystemExit(1)


def _logging(index: int, log_format: str = "text") -> Any:
    """Log to stdout as twistd would (C{worker-N} before each system); returns the observer."""
    from twisted.logger import globalLogBeginner

    from llmgate.ops.logformat import text_observer

    if log_format == "json":
        observer = json_observer(sys.stdout, worker=index)
    else:
        # Relayed lines get the supervisor's timestamp: no second one.
        relayed = os.environ.get("LLMGATE_WORKER_RELAYED") == "1"
        observer = text_observer(sys.stdout, **({"time_format": None} if relayed else {}), system_prefix=f"worker-{index}")
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    return observer


def worker_main(argv: Optional[list[str]] = None) -> None:
    """Run one worker: the gateway's service tree on the adopted sockets."""
    # The reload handler is installed when the tree starts; until then a
    # SIGHUP must not kill the worker.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    opts = WorkerOptions()
    try:
        opts.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        print(f"llmgate worker: {e}", file=sys.stderr)
        raise SystemExit(2)
    _die_with_parent(opts["parent"])
    observer = _logging(opts["index"], opts["log-format"])
    from llmgate.ops import reactor as lean_reactor

    lean_reactor.install()
    from twisted.internet import reactor

    observer.attach(reactor)

    from llmgate import tap

    families = [int(f) for f in opts["sockets"].split(",") if f]
    sockets = [(FIRST_LISTEN_FD + i, fam) for i, fam in enumerate(families)]
    try:
        top = tap.worker_service(opts, sockets, reactor)
    except Exception as e:
        _log.critical("worker cannot start: {error}", error=str(e))
        raise SystemExit(1)
    top.privilegedStartService()
    top.startService()
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)

    def ready() -> None:
        try:
            os.write(STATUS_FD, READY)
            os.close(STATUS_FD)
        except OSError:
            pass

    def stop_once(signum: int, frame: Any) -> None:
        # SIGTERM from the supervisor, and maybe from systemd (KillMode=
        # control-group) or a terminal's SIGINT too: one drain, no error
        # for the second "stop".
        if not stopping:
            stopping.append(signum)
            _log.info("worker {index}: signal {signum}, draining", index=opts["index"], signum=signum)
            reactor.callFromThread(reactor.stop)

    stopping: list[int] = []

    def handlers() -> None:
        # After the reactor's own handlers, which these replace.
        signal.signal(signal.SIGTERM, stop_once)
        signal.signal(signal.SIGINT, stop_once)

    reactor.callWhenRunning(handlers)
    reactor.callWhenRunning(ready)
    reactor.run()


if __name__ == "__main__":
    worker_main()

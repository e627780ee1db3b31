"""SIGHUP reloads the config file atomically, or keeps the running one."""

from __future__ import annotations

import signal
from typing import Any, Callable

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from llmgate import config
from llmgate.reload import Reloader, merge

GOOD = '[providers.p]\nkind = "openai"\nbase_url = "http://x/v1"\n[models.old]\nprovider = "p"\n'
NEW = GOOD.replace("[models.old]", "[models.new]")


class FromThreads:
    """C{callFromThread} that queues, to be run as the reactor would later."""

    def __init__(self) -> None:
        self.calls: list[Callable[[], Any]] = []

    def callFromThread(self, f: Callable[..., Any], *a: Any) -> None:
        self.calls.append(lambda: f(*a))

    def run(self) -> None:
        calls, self.calls = self.calls, []
        for c in calls:
            c()


class Signals:
    """A stand-in for C{signal.signal}."""

    def __init__(self) -> None:
        self.handlers: dict[int, Any] = {signal.SIGHUP: signal.SIG_DFL}
        self.installs: list[tuple[int, Any]] = []

    def __call__(self, signum: int, handler: Any) -> Any:
        previous = self.handlers.get(signum)
        self.handlers[signum] = handler
        self.installs.append((signum, handler))
        return previous


class ReloaderTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.path = self.mktemp()
        self.write(GOOD)
        self.running = config.load(self.path, {})
        self.applied: list[config.Config] = []
        self.reactor = FromThreads()
        self.signals = Signals()
        self.threaded: list[Deferred[Any]] = []
        self.held = False

    def write(self, text: str) -> None:
        with open(self.path, "w") as f:
            f.write(text)

    def in_thread(self, f: Callable[..., Any], *a: Any) -> Deferred[Any]:
        if self.held:
            d: Deferred[Any] = Deferred()
            self.threaded.append(d)
            d.addCallback(lambda _: f(*a))
            return d
        return maybeDeferred(f, *a)

    def reloader(self, path: str | None = "", **kw: Any) -> Reloader:
        r = Reloader(
            self.path if path == "" else path,
            self.running,
            self.applied.append,
            self.reactor,
            self.in_thread,
            load=lambda p: config.load(p, {}),
            install=self.signals,
            **kw,
        )
        r.startService()
        return r

    def hup(self) -> None:
        self.signals.handlers[signal.SIGHUP](signal.SIGHUP, None)
        self.reactor.run()

    def log(self) -> str:
        return "\n".join(formatEvent(e) for e in self.events)

    def test_handler_installed_and_restored(self) -> None:
        """
        The SIGHUP handler is installed on start and the previous one put
        back on stop; the handler itself only queues the reload for the
        reactor.
        """
        r = self.reloader()
        handler = self.signals.handlers[signal.SIGHUP]
        self.assertTrue(callable(handler))
        handler(signal.SIGHUP, None)
        self.assertEqual(self.applied, [])
        self.assertEqual(len(self.reactor.calls), 1)
        r.stopService()
        self.assertEqual(self.signals.handlers[signal.SIGHUP], signal.SIG_DFL)

    def test_handler_installed_before_listening(self) -> None:
        """
        The handler is installed by privilegedStartService, which twistd
        runs on the whole tree before any listener starts; startService
        then installs nothing more, and stop restores the previous one.
        """
        r = Reloader(self.path, self.running, self.applied.append, self.reactor, self.in_thread, install=self.signals)
        r.privilegedStartService()
        self.assertEqual(len(self.signals.installs), 1)
        self.assertTrue(callable(self.signals.handlers[signal.SIGHUP]))
        r.startService()
        self.assertEqual(len(self.signals.installs), 1)
        r.stopService()
        self.assertEqual(self.signals.handlers[signal.SIGHUP], signal.SIG_DFL)

    def test_valid_file_replaces_the_config(self) -> None:
        """A valid changed file is applied: the new route is there, the old gone."""
        self.reloader()
        self.write(NEW)
        self.hup()
        [cfg] = self.applied
        self.assertEqual(sorted(cfg.models), ["new"])
        self.assertIn("config reloaded from", self.log())

    def test_invalid_file_keeps_the_running_config(self) -> None:
        """
        An invalid file is rejected with its reason logged; nothing is
        applied, and a later valid file still is.
        """
        r = self.reloader()
        self.write(NEW + '[timeouts]\nidle = "soon"\n')
        self.hup()
        self.assertEqual(self.applied, [])
        self.assertIn("rejected, keeping the running config: timeouts.idle", self.log())
        self.write("[providers\n")
        self.hup()
        self.assertEqual(self.applied, [])
        self.assertIn("not valid TOML", self.log())
        self.assertIs(r.current, self.running)
        self.write(NEW)
        self.hup()
        self.assertEqual(sorted(self.applied[0].models), ["new"])

    def test_missing_file_is_rejected(self) -> None:
        """A file that is gone is rejected, not fatal."""
        import os

        self.reloader()
        os.remove(self.path)
        self.hup()
        self.assertEqual(self.applied, [])
        self.assertIn("cannot read", self.log())

    def test_check_can_refuse(self) -> None:
        """A valid file the check refuses is rejected with the check's reason."""
        self.reloader(check=lambda cfg: "keys: no")
        self.write(NEW)
        self.hup()
        self.assertEqual(self.applied, [])
        self.assertIn("rejected, keeping the running config: keys: no", self.log())

    def test_unexpected_error_is_logged_not_raised(self) -> None:
        """An exception from applying is logged; the process carries on."""
        r = self.reloader()

        def boom(cfg: config.Config) -> None:
            raise RuntimeError("boom")

        r._apply = boom
        self.write(NEW)
        self.hup()
        self.assertIn("rejected", self.log())
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertIs(r.current, self.running)

    def test_nothing_to_reload(self) -> None:
        """Without a config file a SIGHUP is logged and changes nothing."""
        self.reloader(path=None)
        self.hup()
        self.assertEqual(self.applied, [])
        self.assertIn("nothing to reload", self.log())

    def test_hup_during_a_read_reads_again(self) -> None:
        """A SIGHUP while the file is being read leads to one more read after it."""
        self.held = True
        self.reloader()
        self.write(NEW)
        self.hup()
        self.hup()
        self.hup()
        self.assertEqual(len(self.threaded), 1)
        self.threaded.pop().callback(None)
        self.assertEqual(len(self.applied), 1)
        self.assertEqual(len(self.threaded), 1)
        self.threaded.pop().callback(None)
        self.assertEqual(len(self.applied), 2)
        self.assertEqual(self.threaded, [])

    def test_restart_only_settings_keep_running_values(self) -> None:
        """
        Settings bound at start (ledger, body cap, metrics port, connect
        timeout...) keep their running values, and the change is logged as
        waiting for a restart; the rest of the file is applied.
        """
        self.reloader()
        self.write(
            NEW
            + '[ledger]\npath = "elsewhere.db"\n[timeouts]\nconnect = 1\nidle = 7\n'
            + '[metrics]\nport = 9999\n[server]\nmax_body_bytes = 10\n'
        )
        self.hup()
        [cfg] = self.applied
        self.assertEqual(cfg.ledger_path, self.running.ledger_path)
        self.assertEqual(cfg.metrics_port, None)
        self.assertEqual(cfg.max_body_bytes, self.running.max_body_bytes)
        self.assertEqual(cfg.timeouts.connect, self.running.timeouts.connect)
        self.assertEqual(cfg.timeouts.idle, 7.0)
        self.assertEqual(sorted(cfg.models), ["new"])
        self.assertIn(
            "ledger.path, metrics.port, server.max_body_bytes, timeouts.connect changed in the file "
            "and take effect at the next restart",
            self.log(),
        )


class MergeTests(SynchronousTestCase):
    def test_no_change_no_pending(self) -> None:
        """The same file twice leaves nothing waiting for a restart."""
        cfg = config.parse({"ledger": {"path": "x.db"}}, {})
        merged, pending = merge(cfg, config.parse({"ledger": {"path": "x.db"}}, {}))
        self.assertEqual((merged, pending), (cfg, []))


class _Notes:
    """A stand-in notifier recording what systemd would hear."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    def reloading(self) -> None:
        self.sent.append("RELOADING=1")

    def ready(self) -> None:
        self.sent.append("READY=1")


class ReloadNotifyTests(SynchronousTestCase):
    """The reload's sd_notify messages (the file handling is ReloaderTests')."""

    setUp = ReloaderTests.setUp
    write = ReloaderTests.write
    in_thread = ReloaderTests.in_thread
    reloader = ReloaderTests.reloader
    hup = ReloaderTests.hup

    def test_reloading_then_ready(self) -> None:
        """A SIGHUP tells systemd RELOADING=1 when the read starts and READY=1 once the new config is applied."""
        notes = _Notes()
        self.held = True
        self.reloader(notify=notes)
        self.write(NEW)
        self.hup()
        self.assertEqual(notes.sent, ["RELOADING=1"])
        self.threaded.pop().callback(None)
        self.assertEqual(len(self.applied), 1)
        self.assertEqual(notes.sent, ["RELOADING=1", "READY=1"])

    def test_rejected_file_still_ready(self) -> None:
        """A rejected file ends the reload too: READY=1 follows RELOADING=1 (the running config serves on)."""
        notes = _Notes()
        self.reloader(notify=notes)
        self.write("not toml [")
        self.hup()
        self.assertEqual(self.applied, [])
        self.assertEqual(notes.sent, ["RELOADING=1", "READY=1"])

    def test_no_config_file(self) -> None:
        """Without a config file (--demo) a SIGHUP is still RELOADING=1 then READY=1."""
        notes = _Notes()
        self.reloader(path=None, notify=notes)
        self.hup()
        self.assertEqual(notes.sent, ["RELOADING=1", "READY=1"])

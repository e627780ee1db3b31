# -*- test-case-name: tests.accounting.test_ledger -*-
"""
Tests for L{llmgate.accounting.ledger}: batching on the clock, retry after write
failures, bounded memory, clean-stop flush, and the C{kill -9} bound.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import sys
import uuid
from typing import Any, Callable, List

from twisted.internet import defer
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

import llmgate
from llmgate.accounting.ledger import Ledger, Progress, UsageRecord, read_records, recover_open_rows


def makeRecord(n: int = 0, **kw: Any) -> UsageRecord:
    """
    A completed, reported, priced record; C{kw} overrides fields.
    """
    values: dict[str, Any] = dict(
        request_id=uuid.uuid4().hex,
        ts=1_700_000_000.0 + n,
        key_name="team-a",
        route="/v1/chat/completions",
        model="gpt-4o-mini",
        provider="openai",
        upstream_model="gpt-4o-mini-2024-07-18",
        upstream_id="chatcmpl-%d" % (n,),
        status=200,
        streamed=True,
        outcome="completed",
        phase=None,
        input_tokens=10,
        output_tokens=5,
        cached_input_tokens=0,
        cache_creation_tokens=0,
        reasoning_tokens=0,
        source="reported",
        cost_usd=0.0001,
        ttft_ms=12.5,
        duration_ms=40.0,
        bytes_in=100,
        bytes_out=400,
    )
    values.update(kw)
    return UsageRecord(**values)


def openRecord(n: int = 0, **kw: Any) -> UsageRecord:
    """
    The row of a request just admitted: no status, tokens or bytes out yet.
    """
    values: dict[str, Any] = dict(
        outcome="open", status=0, upstream_id=None, input_tokens=None,
        output_tokens=None, source=None, cost_usd=None, ttft_ms=None,
        duration_ms=0.0, bytes_out=0,
    )
    values.update(kw)
    return makeRecord(n, **values)


def progressOf(rec: UsageRecord, **kw: Any) -> Progress:
    """
    Progress of C{rec}'s request: 200, 300 bytes, 40 estimated tokens.
    """
    values: dict[str, Any] = dict(
        request_id=rec.request_id, status=200, upstream_id="chatcmpl-p",
        input_tokens=None, output_tokens=40, cached_input_tokens=0,
        cache_creation_tokens=0, source="estimated", cost_usd=None,
        ttft_ms=7.0, duration_ms=900.0, bytes_out=300,
    )
    values.update(kw)
    return Progress(**values)


def syncRunner(f: Callable[..., Any], *a: Any) -> defer.Deferred[Any]:
    """
    Run C{f} right away on this thread: no threads in unit tests.
    """
    return defer.maybeDeferred(f, *a)


class FlakyRunner:
    """
    A runner that fails the next C{failures} writes like a sick disk.

    @ivar commitThenFail: run the write, then report failure anyway (a batch
        that reached the disk but whose success got lost), to exercise retry.
    """

    def __init__(self, failures: int = 0, commitThenFail: bool = False) -> None:
        self.failures = failures
        self.commitThenFail = commitThenFail
        self.calls = 0

    def __call__(self, f: Callable[..., Any], *a: Any) -> defer.Deferred[Any]:
        self.calls += 1
        if self.failures > 0 and getattr(f, "__name__", "") == "write":
            self.failures -= 1
            if self.commitThenFail:
                f(*a)
            return defer.fail(sqlite3.OperationalError("disk I/O error"))
        return defer.maybeDeferred(f, *a)


class LedgerTests(SynchronousTestCase):
    """
    The ledger with a L{Clock} and a synchronous runner.
    """

    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "usage.db")
        self.clock = Clock()

    def makeLedger(self, runner: Any = syncRunner, **kw: Any) -> Ledger:
        ledger = Ledger(self.path, self.clock, run_in_thread=runner, **kw)
        ledger.startService()
        self.addCleanup(self.stop, ledger)
        return ledger

    def stop(self, ledger: Ledger) -> None:
        if ledger.running:
            self.successResultOf(ledger.stopService())

    def rows(self) -> List[dict[str, Any]]:
        return read_records(self.path)

    def test_recordOnlyQueues(self) -> None:
        """
        record() writes nothing by itself; the batch goes out on the next
        tick, in one go, and round-trips field for field.
        """
        ledger = self.makeLedger(batch_interval=0.2)
        recs = [makeRecord(i) for i in range(3)]
        recs[1] = makeRecord(1, cost_usd=None, source="estimated", upstream_id=None)
        for r in recs:
            ledger.record(r)
        self.assertEqual(ledger.pending_count(), 3)
        # The file exists from the start (open rows of a previous run were
        # looked for), but holds nothing of this run before the tick.
        self.assertEqual(self.rows(), [])
        self.clock.advance(0.19)
        self.assertEqual(self.rows(), [])
        self.clock.advance(0.01)
        self.assertEqual(ledger.pending_count(), 0)
        self.assertEqual(ledger.flushed, 3)
        self.assertEqual([UsageRecord(**d) for d in self.rows()], recs)

    def test_batchPerTick(self) -> None:
        """
        Records queued between ticks go out on the following tick.
        """
        ledger = self.makeLedger(batch_interval=1.0)
        ledger.record(makeRecord(0))
        self.clock.advance(1.0)
        ledger.record(makeRecord(1))
        ledger.record(makeRecord(2))
        self.assertEqual(len(self.rows()), 1)
        self.clock.advance(1.0)
        self.assertEqual(len(self.rows()), 3)
        self.assertEqual(ledger.flushed, 3)

    def test_walMode(self) -> None:
        """
        The file is in WAL mode, so readers never block the writer.
        """
        ledger = self.makeLedger()
        ledger.record(makeRecord())
        self.clock.advance(ledger.batch_interval)
        conn = sqlite3.connect(self.path)
        self.addCleanup(conn.close)
        (mode,) = conn.execute("PRAGMA journal_mode").fetchone()
        self.assertEqual(mode, "wal")
        indexes = [r[1] for r in conn.execute("PRAGMA index_list(usage)")]
        self.assertIn("usage_ts", indexes)

    def test_stopFlushesEverything(self) -> None:
        """
        stopService writes what is still queued, without waiting for a
        tick, and then stops the timer.
        """
        ledger = self.makeLedger(batch_interval=60.0)
        for i in range(5):
            ledger.record(makeRecord(i))
        d = ledger.stopService()
        self.successResultOf(d)
        self.assertEqual(len(self.rows()), 5)
        self.assertEqual(ledger.pending_count(), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stopWaitsForInflight(self) -> None:
        """
        A stop during a slow write waits for it, then writes what arrived
        meanwhile: nothing is lost and only one write runs at a time.
        """
        held: List[defer.Deferred[Any]] = []
        work: List[Any] = []

        def slowRunner(f: Callable[..., Any], *a: Any) -> defer.Deferred[Any]:
            if f.__name__ == "write" and not held:
                d: defer.Deferred[Any] = defer.Deferred()
                held.append(d)
                work.append((f, a))
                return d
            return defer.maybeDeferred(f, *a)

        ledger = self.makeLedger(runner=slowRunner)
        ledger.record(makeRecord(0))
        self.clock.advance(ledger.batch_interval)
        self.assertEqual(len(held), 1)
        ledger.record(makeRecord(1))
        # A tick while a write is in flight starts no second write.
        self.clock.advance(ledger.batch_interval)
        self.assertEqual(len(held), 1)
        self.assertEqual(ledger.pending_count(), 2)
        stopped = ledger.stopService()
        self.assertNoResult(stopped)
        f, a = work[0]
        held[0].callback(f(*a))
        self.successResultOf(stopped)
        self.assertEqual(len(self.rows()), 2)

    def test_failureKeepsRecordsAndRetries(self) -> None:
        """
        A failed write counts, logs without record contents, calls the
        hook, keeps the records; the next tick writes them all exactly once.
        """
        runner = FlakyRunner(failures=2)
        hooked: List[Failure] = []
        ledger = self.makeLedger(runner=runner, on_write_failure=hooked.append)
        ledger.record(makeRecord(0, key_name="secret-looking-name"))
        with capturedLogs() as events:
            self.clock.advance(ledger.batch_interval)
        self.assertEqual(ledger.write_failures, 1)
        self.assertEqual(len(hooked), 1)
        self.assertIsInstance(hooked[0].value, sqlite3.OperationalError)
        self.assertEqual(ledger.pending_count(), 1)
        errors = [e for e in events if "write of" in e.get("log_format", "")]
        self.assertEqual(len(errors), 1)
        self.assertEqual(errors[0]["error"], "disk I/O error")
        self.assertNotIn("secret-looking-name", repr(errors[0]))

        ledger.record(makeRecord(1))
        self.clock.advance(ledger.batch_interval)
        self.assertEqual(ledger.write_failures, 2)
        self.assertEqual(ledger.pending_count(), 2)

        self.clock.advance(ledger.batch_interval)
        self.assertEqual(ledger.pending_count(), 0)
        self.assertEqual(ledger.flushed, 2)
        rows = self.rows()
        self.assertEqual([r["upstream_id"] for r in rows], ["chatcmpl-0", "chatcmpl-1"])

    def test_unwritableDirectoryThenRecovers(self) -> None:
        """
        A path whose parent cannot be created (a file is in the way) is a
        write failure like any other, and the ledger recovers once it can.
        """
        blocker = os.path.join(self.dir, "blocked")
        with open(blocker, "w"):
            pass
        self.path = os.path.join(blocker, "usage.db")
        ledger = self.makeLedger()
        # The start-up recovery failed already: it is retried with the batch.
        self.assertEqual(ledger.write_failures, 1)
        ledger.record(makeRecord(0))
        self.clock.advance(ledger.batch_interval)
        self.assertEqual(ledger.write_failures, 2)
        self.assertEqual(ledger.pending_count(), 1)
        os.remove(blocker)
        os.mkdir(blocker)
        self.clock.advance(ledger.batch_interval)
        self.assertEqual(ledger.pending_count(), 0)
        self.assertEqual(len(self.rows()), 1)

    def test_retriedBatchNotDuplicated(self) -> None:
        """
        If a batch reached the file but its success was lost, the retry
        adds no row (UNIQUE request_id: the final record replaces itself).
        """
        runner = FlakyRunner(failures=1, commitThenFail=True)
        ledger = self.makeLedger(runner=runner)
        for i in range(3):
            ledger.record(makeRecord(i))
        self.clock.advance(ledger.batch_interval)
        self.assertEqual(ledger.write_failures, 1)
        self.assertEqual(ledger.pending_count(), 3)
        self.clock.advance(ledger.batch_interval)
        self.assertEqual(ledger.pending_count(), 0)
        self.assertEqual(len(self.rows()), 3)
        self.assertEqual(ledger.flushed, 3)

    def test_maxPendingDropsOldest(self) -> None:
        """
        Past max_pending, record() drops the oldest record and counts it,
        and the next tick logs the loss loudly.
        """
        ledger = self.makeLedger(max_pending=3)
        for i in range(5):
            ledger.record(makeRecord(i))
        self.assertEqual(ledger.dropped, 2)
        self.assertEqual(ledger.pending_count(), 3)
        with capturedLogs() as events:
            self.clock.advance(ledger.batch_interval)
        crit = [e for e in events if e["log_level"].name == "critical"]
        self.assertEqual(len(crit), 1)
        self.assertEqual(crit[0]["new"], 2)
        self.assertEqual(
            [r["upstream_id"] for r in self.rows()],
            ["chatcmpl-2", "chatcmpl-3", "chatcmpl-4"],
        )

    def test_maxPendingAfterFailure(self) -> None:
        """
        A failed batch goes back in front of newer records; if that
        overflows max_pending, the oldest go.
        """
        runner = FlakyRunner(failures=1)
        ledger = self.makeLedger(runner=runner, max_pending=3)
        ledger.record(makeRecord(0))
        ledger.record(makeRecord(1))
        self.clock.advance(ledger.batch_interval)
        ledger.record(makeRecord(2))
        ledger.record(makeRecord(3))
        self.assertEqual(ledger.dropped, 1)
        self.clock.advance(ledger.batch_interval)
        self.assertEqual(
            [r["upstream_id"] for r in self.rows()],
            ["chatcmpl-1", "chatcmpl-2", "chatcmpl-3"],
        )

    def test_stopWithFailingDisk(self) -> None:
        """
        If the final write fails, stopService still completes (and logs the
        loss) rather than hanging the shutdown.
        """
        ledger = self.makeLedger(runner=FlakyRunner(failures=100))
        ledger.record(makeRecord(0))
        with capturedLogs() as events:
            self.successResultOf(ledger.stopService())
        self.assertFalse(ledger.running)
        self.assertTrue(
            any("unwritten" in e.get("log_format", "") for e in events)
        )

    def test_readRecordsEmpty(self) -> None:
        """
        read_records on a ledger file without the table yet gives [], and a
        missing file raises FileNotFoundError.
        """
        sqlite3.connect(self.path).close()
        self.assertEqual(read_records(self.path), [])
        self.assertRaises(
            FileNotFoundError, read_records, os.path.join(self.dir, "nope.db")
        )


class OpenRowTests(SynchronousTestCase):
    """
    Open rows written at admission, replaced by the final record, updated
    with progress, and marked interrupted by the next start.
    """

    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "usage.db")
        self.clock = Clock()

    def makeLedger(self, runner: Any = syncRunner, **kw: Any) -> Ledger:
        ledger = Ledger(self.path, self.clock, run_in_thread=runner, **kw)
        ledger.startService()
        self.addCleanup(self.stop, ledger)
        return ledger

    def stop(self, ledger: Ledger) -> None:
        if ledger.running:
            self.successResultOf(ledger.stopService())

    def rows(self) -> List[dict[str, Any]]:
        return read_records(self.path)

    def killed(self, ledger: Ledger) -> None:
        """
        Forget C{ledger} as C{kill -9} would: no final flush, no close
        beyond what the file already holds.
        """
        if ledger._loop is not None:
            ledger._loop.stop_timer()
        ledger._writer.close()
        ledger.running = False

    def test_openThenFinal(self) -> None:
        """
        An open row is in the file after one tick; the final record of the
        same request replaces it: one row, the final one.
        """
        ledger = self.makeLedger()
        opened = openRecord(0)
        ledger.open(opened)
        self.clock.advance(ledger.batch_interval)
        [row] = self.rows()
        self.assertEqual(UsageRecord(**row), opened)
        final = makeRecord(0, request_id=opened.request_id)
        ledger.record(final)
        self.clock.advance(ledger.batch_interval)
        self.assertEqual([UsageRecord(**r) for r in self.rows()], [final])

    def test_finalWinsWhateverTheOrder(self) -> None:
        """
        A final record is never overwritten by its open row: not in the
        same batch, nor when the open row comes in a later batch (a retry).
        """
        ledger = self.makeLedger()
        a, b = makeRecord(0), makeRecord(1)
        ledger.open(openRecord(0, request_id=a.request_id))
        ledger.record(a)
        ledger.record(b)
        self.clock.advance(ledger.batch_interval)
        ledger.open(openRecord(1, request_id=b.request_id))
        self.clock.advance(ledger.batch_interval)
        self.assertEqual([UsageRecord(**r) for r in self.rows()], [a, b])

    def test_openRowSkippedWhenEndedInSameBatch(self) -> None:
        """
        A request that ends before its open row is written costs one
        insert, not an insert and a replacement.
        """
        ledger = self.makeLedger()
        conn = sqlite3.connect(self.path)
        self.addCleanup(conn.close)
        conn.executescript(
            "CREATE TABLE inserted (outcome TEXT);"
            "CREATE TRIGGER count_inserts AFTER INSERT ON usage "
            "BEGIN INSERT INTO inserted VALUES (NEW.outcome); END;"
        )
        short, long = makeRecord(0), openRecord(1)
        ledger.open(openRecord(0, request_id=short.request_id))
        ledger.open(long)
        ledger.record(short)
        self.clock.advance(ledger.batch_interval)
        self.assertEqual(
            sorted(o for (o,) in conn.execute("SELECT outcome FROM inserted")), ["completed", "open"]
        )
        self.assertEqual(len(self.rows()), 2)

    def test_openLaterBuiltOnlyIfStillOpen(self) -> None:
        """
        An open row queued with open_later is built when its batch goes to
        the writer, from the state then, and written as an open row; one
        whose final record is in the same batch is never built.  Built or
        not, each request ends with its one final row.
        """
        ledger = self.makeLedger()
        built: list[str] = []

        def build(rid: str) -> UsageRecord:
            built.append(rid)
            return openRecord(0, request_id=rid)

        short, long = makeRecord(0), makeRecord(1)
        ledger.open_later(short.request_id, build, short.request_id)
        ledger.open_later(long.request_id, build, long.request_id)
        self.assertEqual(ledger.pending_count(), 2)
        ledger.record(short)
        self.assertEqual(built, [])
        self.clock.advance(ledger.batch_interval)
        self.assertEqual(built, [long.request_id])
        rows = {r["request_id"]: r["outcome"] for r in self.rows()}
        self.assertEqual(rows, {short.request_id: "completed", long.request_id: "open"})
        ledger.record(long)
        self.clock.advance(ledger.batch_interval)
        self.assertEqual([UsageRecord(**r) for r in self.rows()], [short, long])

    def test_openLaterBuildFailureLogged(self) -> None:
        """
        An open row whose build fails is logged and left out; the rest of
        its batch is written.
        """
        ledger = self.makeLedger()

        def broken(arg: object) -> UsageRecord:
            raise RuntimeError("no row")

        ledger.open_later("x", broken, None)
        ledger.record(makeRecord(3))
        self.clock.advance(ledger.batch_interval)
        self.assertEqual([r["outcome"] for r in self.rows()], ["completed"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_progressUpdatesOpenRowsOnly(self) -> None:
        """
        Progress is asked for progress_slices times per progress_interval
        on its own timer, each time for a share of the open requests
        (C{parts} = progress_slices, so each open request is reported about
        once an interval and no call does them all), and goes with the next
        batch to update open rows; a finished row keeps its final values.
        """
        ledger = self.makeLedger(batch_interval=0.2, progress_interval=1.0, progress_slices=20)
        running, done = openRecord(0), makeRecord(1)
        ledger.open(running)
        ledger.record(done)
        asked = []

        def source(parts: int) -> List[Progress]:
            asked.append(parts)
            return [progressOf(running, bytes_out=75 * min(len(asked), 40)), progressOf(done)]

        ledger.progress_source = source
        for _ in range(44):
            self.clock.advance(0.05)
        self.assertEqual(asked, [20] * 44)
        byId = {r["request_id"]: r for r in self.rows()}
        self.assertEqual(UsageRecord(**byId[done.request_id]), done)
        row = byId[running.request_id]
        self.assertEqual(
            (row["outcome"], row["status"], row["output_tokens"], row["source"], row["bytes_out"], row["ttft_ms"]),
            ("open", 200, 40, "estimated", 3000, 7.0),
        )

    def test_progressHeldUntilTheNextBatchLatestOnly(self) -> None:
        """
        Progress asked between two batches waits for the next one, one
        report per request (the latest): what is held is bounded by the
        open requests however often it is asked before a write.
        """
        ledger = self.makeLedger(batch_interval=1.0, progress_interval=1.0, progress_slices=4)
        running = openRecord(0)
        ledger.open(running)
        asked: List[int] = []

        def source(parts: int) -> List[Progress]:
            asked.append(parts)
            return [progressOf(running, bytes_out=100 * len(asked))]

        ledger.progress_source = source
        for _ in range(3):
            self.clock.advance(0.25)
        self.assertEqual(asked, [4, 4, 4])
        self.assertEqual(self.rows(), [])
        self.assertEqual(len(ledger._progress), 1)
        self.clock.advance(0.25)
        self.clock.advance(1.0)
        [row] = self.rows()
        self.assertEqual(row["outcome"], "open")
        self.assertIn(row["bytes_out"], (400, 500))

    def test_restartMarksOpenRowsInterrupted(self) -> None:
        """
        Rows left open by a killed run become interrupted when the next
        run starts, before any tick, keeping what was known (route, key,
        model, provider, ts, streamed, bytes in, progress); the new run's
        own open rows stay open.
        """
        first = self.makeLedger()
        cut, fresh, done = openRecord(0), openRecord(1), makeRecord(2)
        first.open(cut)
        first.open(fresh)
        first.record(done)
        self.clock.advance(first.batch_interval)
        first.progress_source = lambda parts: [progressOf(cut)]
        for _ in range(5):
            self.clock.advance(first.batch_interval)
        self.killed(first)

        with capturedLogs() as events:
            second = self.makeLedger()
        self.assertEqual(second.recovered, 2)
        self.assertTrue(any(e.get("count") == 2 and "interrupted" in e["log_format"] for e in events))
        byId = {r["request_id"]: r for r in self.rows()}
        self.assertEqual(UsageRecord(**byId[done.request_id]), done)
        row = byId[cut.request_id]
        kept = ("ts", "key_name", "route", "model", "provider", "upstream_model", "streamed", "bytes_in")
        self.assertEqual({k: row[k] for k in kept}, {k: getattr(cut, k) for k in kept})
        self.assertEqual(
            (row["outcome"], row["phase"], row["status"], row["output_tokens"], row["bytes_out"]),
            ("interrupted", "body", 200, 40, 300),
        )
        self.assertEqual(
            (byId[fresh.request_id]["outcome"], byId[fresh.request_id]["phase"]),
            ("interrupted", None),
        )

        mine = openRecord(3)
        second.open(mine)
        self.clock.advance(second.batch_interval)
        self.assertEqual({r["request_id"]: r["outcome"] for r in self.rows()}[mine.request_id], "open")
        self.assertEqual(second.recovered, 2)

    def test_failedRecoveryRunsBeforeOwnRows(self) -> None:
        """
        If the start-up recovery fails, the first write does it in the same
        transaction, before the new run's own open rows go in: those are
        never taken for leftovers.
        """
        first = self.makeLedger()
        old = openRecord(0)
        first.open(old)
        self.clock.advance(first.batch_interval)
        self.killed(first)

        fails = [True]

        def runner(f: Callable[..., Any], *a: Any) -> defer.Deferred[Any]:
            if fails and f.__name__ == "recover":
                fails.pop()
                return defer.fail(sqlite3.OperationalError("database is locked"))
            return defer.maybeDeferred(f, *a)

        second = self.makeLedger(runner=runner)
        self.assertEqual((second.recovered, second.write_failures), (0, 1))
        self.assertEqual(self.rows()[0]["outcome"], "open")
        mine = openRecord(1)
        second.open(mine)
        self.clock.advance(second.batch_interval)
        outcomes = {r["request_id"]: r["outcome"] for r in self.rows()}
        self.assertEqual(outcomes, {old.request_id: "interrupted", mine.request_id: "open"})
        self.assertEqual(second.recovered, 1)

    def test_workerLeavesOtherOwnersOpenRows(self) -> None:
        """
        A ledger started with C{recover=False} (a worker under
        C{--workers}) does not mark another live process's open rows
        interrupted; each row carries its writer's owner.
        """
        first = self.makeLedger(owner="101", recover=False)
        theirs = openRecord(0)
        first.open(theirs)
        self.clock.advance(first.batch_interval)
        second = self.makeLedger(owner="202", recover=False)
        mine = openRecord(1)
        second.open(mine)
        self.clock.advance(second.batch_interval)
        self.assertEqual(second.recovered, 0)
        conn = sqlite3.connect(self.path)
        got = dict(conn.execute("SELECT request_id, outcome || ':' || owner FROM usage"))
        conn.close()
        self.assertEqual(got, {theirs.request_id: "open:101", mine.request_id: "open:202"})

    def test_recoverOpenRowsOfOneOwner(self) -> None:
        """
        L{recover_open_rows} with an owner marks that owner's open rows
        only (a dead worker's), leaving final records and other owners'
        open rows alone; without an owner it marks every open row.
        """
        dead = self.makeLedger(owner="101", recover=False)
        live = self.makeLedger(owner="202", recover=False)
        cut, done = openRecord(0, bytes_out=0), makeRecord(1)
        dead.open(cut)
        dead.record(done)
        other = openRecord(2)
        live.open(other)
        self.clock.advance(dead.batch_interval)
        self.killed(dead)
        self.assertEqual(recover_open_rows(self.path, "101"), 1)
        outcomes = {r["request_id"]: r["outcome"] for r in self.rows()}
        self.assertEqual(
            outcomes,
            {cut.request_id: "interrupted", done.request_id: "completed", other.request_id: "open"},
        )
        self.assertEqual(recover_open_rows(self.path, "101"), 0)
        self.assertEqual(recover_open_rows(self.path), 1)
        self.assertEqual({r["outcome"] for r in self.rows()}, {"interrupted", "completed"})

    def test_fileWithoutOwnerColumn(self) -> None:
        """
        A ledger file written before the C{owner} column existed gets it
        added; its rows are kept and new ones are written.
        """
        conn = sqlite3.connect(self.path)
        conn.executescript(
            "CREATE TABLE usage (request_id TEXT NOT NULL UNIQUE, ts REAL NOT NULL, key_name TEXT NOT NULL,"
            " route TEXT NOT NULL, model TEXT NOT NULL, provider TEXT NOT NULL, upstream_model TEXT NOT NULL,"
            " upstream_id TEXT, status INTEGER NOT NULL, streamed INTEGER NOT NULL, outcome TEXT NOT NULL,"
            " phase TEXT, input_tokens INTEGER, output_tokens INTEGER, cached_input_tokens INTEGER NOT NULL,"
            " cache_creation_tokens INTEGER NOT NULL, reasoning_tokens INTEGER NOT NULL, source TEXT,"
            " cost_usd REAL, ttft_ms REAL, duration_ms REAL NOT NULL, bytes_in INTEGER NOT NULL,"
            " bytes_out INTEGER NOT NULL);"
        )
        old = makeRecord(0)
        conn.execute("INSERT INTO usage VALUES (%s)" % ",".join("?" * 23), [
            getattr(old, f) for f in list(old.__dataclass_fields__)[:23]
        ])
        conn.commit()
        conn.close()
        ledger = self.makeLedger(owner="7")
        new = makeRecord(1)
        ledger.record(new)
        self.clock.advance(ledger.batch_interval)
        self.assertEqual([UsageRecord(**r) for r in self.rows()], [old, new])

    def test_lockedDatabaseIsRetried(self) -> None:
        """
        While another process holds the write lock past the busy timeout
        the batch stays queued (a counted failure, nothing dropped), and
        once the lock is released it is written, each record once.
        """
        ledger = self.makeLedger(owner="1", busy_timeout=0.01)
        other = sqlite3.connect(self.path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        recs = [makeRecord(n) for n in range(3)]
        for r in recs:
            ledger.record(r)
        self.clock.advance(ledger.batch_interval)
        self.assertEqual((ledger.write_failures, ledger.dropped, ledger.pending_count()), (1, 0, 3))
        other.execute("COMMIT")
        other.close()
        self.clock.advance(ledger.batch_interval)
        self.assertEqual(ledger.pending_count(), 0)
        self.assertEqual(sorted(r["request_id"] for r in self.rows()), sorted(r.request_id for r in recs))


def oldLedgerFile(path: str, drop: tuple[str, ...] = ("served_model",)) -> UsageRecord:
    """
    Write at C{path} a ledger file as an older version made it: its table
    lacks the columns C{drop}; holds one record, returned.
    """
    from llmgate.accounting import ledger as ledgermod

    schema = "\n".join(
        line for line in ledgermod._SCHEMA.splitlines()
        if not any(line.strip().startswith(c + " ") for c in drop)
    ).replace("bytes_in INTEGER NOT NULL,\n);", "bytes_in INTEGER NOT NULL\n);")
    schema = schema.replace("bytes_out INTEGER NOT NULL,\n);", "bytes_out INTEGER NOT NULL\n);")
    conn = sqlite3.connect(path)
    conn.executescript(schema)
    rec = makeRecord(0)
    cols = [c for c in ledgermod.COLUMNS if c not in drop]
    conn.execute(
        "INSERT INTO usage ({}) VALUES ({})".format(", ".join(cols), ", ".join("?" * len(cols))),
        [getattr(rec, c) for c in cols],
    )
    conn.commit()
    conn.close()
    return rec


class MigrationTests(SynchronousTestCase):
    """
    A ledger file written by an older version (fewer columns) gets the
    missing columns when the ledger opens it, in its worker.
    """

    def setUp(self) -> None:
        d = self.mktemp()
        os.makedirs(d)
        self.path = os.path.join(d, "usage.db")
        self.clock = Clock()

    def test_missingColumnAddedAtOpen(self) -> None:
        """
        An old file without C{served_model} is migrated by the worker's
        first operation: the old row reads it as None, new rows keep it.
        """
        old = oldLedgerFile(self.path)
        calls: list[str] = []

        def runner(f: Callable[..., Any], *a: Any) -> defer.Deferred[Any]:
            calls.append(f.__name__)
            return defer.maybeDeferred(f, *a)

        ledger = Ledger(self.path, self.clock, run_in_thread=runner)
        with capturedLogs() as events:
            ledger.startService()
        # Added by the worker's first operation, and said in the log.
        self.assertEqual(calls, ["recover"])
        [logged] = [e for e in events if "added the columns" in e["log_format"]]
        self.assertEqual(logged["columns"], "served_model")
        new = makeRecord(1, served_model="gpt-4o-mini-2024-07-18")
        ledger.record(new)
        self.successResultOf(ledger.stopService())
        rows = read_records(self.path)
        self.assertEqual([UsageRecord(**r) for r in rows], [old, new])
        self.assertIsNone(rows[0]["served_model"])

    def test_cache1hColumnAddedWithZero(self) -> None:
        """
        An old file without C{cache_creation_1h_tokens} gets the column,
        NOT NULL with 0 for its old rows; new rows keep their count.
        """
        oldLedgerFile(self.path, drop=("cache_creation_1h_tokens",))
        ledger = Ledger(self.path, self.clock, run_in_thread=syncRunner)
        with capturedLogs() as events:
            ledger.startService()
        [logged] = [e for e in events if "added the columns" in e["log_format"]]
        self.assertEqual(logged["columns"], "cache_creation_1h_tokens")
        ledger.record(makeRecord(1, cache_creation_tokens=300, cache_creation_1h_tokens=200))
        self.successResultOf(ledger.stopService())
        rows = read_records(self.path)
        self.assertEqual([r["cache_creation_1h_tokens"] for r in rows], [0, 200])
        conn = sqlite3.connect(self.path)
        [notnull] = [r[3] for r in conn.execute("PRAGMA table_info(usage)") if r[1] == "cache_creation_1h_tokens"]
        conn.close()
        self.assertEqual(notnull, 1)

    def test_notNullColumnAddedNullable(self) -> None:
        """
        A missing C{NOT NULL} column without a default is added nullable
        (the old rows have no value for it); a second open adds nothing.
        """
        oldLedgerFile(self.path, drop=("served_model", "bytes_out"))
        ledger = Ledger(self.path, self.clock, run_in_thread=syncRunner)
        with capturedLogs() as events:
            ledger.startService()
        [logged] = [e for e in events if "added the columns" in e["log_format"]]
        self.assertEqual(logged["columns"], "bytes_out, served_model")
        ledger.record(makeRecord(1))
        self.successResultOf(ledger.stopService())
        self.assertEqual([r["bytes_out"] for r in read_records(self.path)], [None, 400])
        again = Ledger(self.path, self.clock, run_in_thread=syncRunner)
        with capturedLogs() as events:
            again.startService()
        self.successResultOf(again.stopService())
        self.assertEqual([e for e in events if "added the columns" in e["log_format"]], [])

    def test_readOldFileUnmigrated(self) -> None:
        """
        read_records reads a file no daemon of this version opened yet:
        the missing column reads as None.
        """
        old = oldLedgerFile(self.path)
        [row] = read_records(self.path)
        self.assertEqual(UsageRecord(**row), old)

    def test_progressSetsServedModel(self) -> None:
        """The progress of an open request fills its row's served model."""
        ledger = Ledger(self.path, self.clock, run_in_thread=syncRunner)
        ledger.startService()
        running = openRecord(0)
        ledger.open(running)
        ledger.progress_source = lambda parts: [progressOf(running, served_model="gpt-4o-mini-2024-07-18")]
        for _ in range(5):
            self.clock.advance(ledger.batch_interval)
        [row] = read_records(self.path)
        self.assertEqual((row["outcome"], row["served_model"]), ("open", "gpt-4o-mini-2024-07-18"))
        self.successResultOf(ledger.stopService())


class ThreadedLedgerTests(TestCase):
    """
    The default one-thread pool, on the real reactor (the handoff itself
    is what is under test).
    """

    def test_writesFromWorkerThread(self) -> None:
        """
        With no runner injected, writes happen in the pool's single thread
        and stopService stops it.
        """
        from twisted.internet import reactor

        path = os.path.join(self.mktemp(), "sub", "usage.db")
        ledger = Ledger(path, reactor, batch_interval=0.01)
        ledger.startService()
        for i in range(50):
            ledger.record(makeRecord(i))
        pool = ledger._pool
        assert pool is not None

        d = ledger.stopService()

        def check(_: object) -> None:
            self.assertEqual(len(read_records(path)), 50)
            self.assertFalse(pool.started)
            self.assertEqual(ledger.flushed, 50)

        return d.addCallback(check)


_KILL_SCRIPT = r"""
import sys, uuid
from twisted.internet import reactor
from llmgate.accounting.ledger import Ledger, UsageRecord

path, first = sys.argv[1], int(sys.argv[2])
ledger = Ledger(path, reactor, batch_interval=0.05)
ledger.startService()
n = 0

def rec():
    global n
    ledger.record(UsageRecord(
        request_id=uuid.uuid4().hex, ts=1e9 + n, key_name="k", route="/r",
        model="m", provider="p", upstream_model="m", upstream_id=None,
        status=200, streamed=False, outcome="completed", phase=None,
        input_tokens=1, output_tokens=1, cached_input_tokens=0,
        cache_creation_tokens=0, reasoning_tokens=0, source="reported",
        cost_usd=None, ttft_ms=None, duration_ms=1.0, bytes_in=1, bytes_out=1))
    n += 1

for _ in range(first):
    rec()

last = -1
def poll():
    global last
    # Keep recording, so some records are always queued when we die.
    for _ in range(20):
        rec()
    if ledger.flushed != last:
        last = ledger.flushed
        print("flushed %d recorded %d" % (ledger.flushed, n), flush=True)
    reactor.callLater(0.005, poll)

reactor.callLater(0, poll)
reactor.run()
"""


class _Watcher(ProcessProtocol):
    """
    Reads the script's progress lines; SIGKILLs it once C{target} records
    are reported flushed.
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.buf = b""
        self.flushed = 0
        self.recorded = 0
        self.killed = False
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.stderr = b""

    def outReceived(self, data: bytes) -> None:
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        for line in lines:
            parts = line.split()
            if len(parts) == 4 and parts[0] == b"flushed":
                self.flushed, self.recorded = int(parts[1]), int(parts[3])
        if not self.killed and self.flushed >= self.target:
            self.kill()

    def errReceived(self, data: bytes) -> None:
        self.stderr += data

    def kill(self) -> None:
        if not self.killed:
            self.killed = True
            os.kill(self.transport.pid, signal.SIGKILL)

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)


class KillNineTests(TestCase):
    """
    Integration test: a real process killed with SIGKILL mid-stream.
    """

    timeout = 20

    def test_killNineKeepsFlushed(self) -> None:
        """
        After SIGKILL the file opens cleanly and holds at least every record
        the process had seen written; whatever is missing was queued.
        """
        from twisted.internet import reactor

        tmp = self.mktemp()
        os.makedirs(tmp)
        script = os.path.join(tmp, "writer.py")
        with open(script, "w") as f:
            f.write(_KILL_SCRIPT)
        path = os.path.join(tmp, "usage.db")
        root = os.path.dirname(os.path.dirname(os.path.abspath(llmgate.__file__)))
        env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        first = 200
        watcher = _Watcher(target=first)
        reactor.spawnProcess(
            watcher, sys.executable, [sys.executable, script, path, str(first)], env=env
        )
        guard = reactor.callLater(8, watcher.kill)

        def check(_: object) -> None:
            if guard.active():
                guard.cancel()
            self.assertGreaterEqual(
                watcher.flushed, first, "never flushed: %r" % (watcher.stderr,)
            )
            conn = sqlite3.connect(path)
            try:
                (ok,) = conn.execute("PRAGMA integrity_check").fetchone()
            finally:
                conn.close()
            self.assertEqual(ok, "ok")
            rows = read_records(path)
            self.assertGreaterEqual(len(rows), watcher.flushed)
            self.assertEqual(len({r["request_id"] for r in rows}), len(rows))

        return watcher.ended.addCallback(check)


# -*- test-case-name: tests.accounting.test_ledger -*-
"""
The durable usage ledger: one row per gateway request, in SQLite.

Each request's row is written twice: an C{open} row when it is admitted
(L{Ledger.open}), then its final record (L{Ledger.record}) replaces it.
The gateway queues its open rows with L{Ledger.open_later}: built when
the batch goes to the writer, and not at all for a request whose final
record is in the same batch (most short requests).  While
it is open, its progress (bytes and an estimate of the tokens relayed) is
refreshed about once a second (L{Ledger.progress_source}).  On start, rows
still open from a previous run -- the process was killed or lost power --
become C{interrupted}, keeping what was known.  So a request that was in
flight when the gateway died still has its one row.

All of it happens on the reactor thread as appends to in-memory queues; a
timer hands the queue to one dedicated worker thread that writes it in a
single transaction.  This keeps disk latency (fsync, a locked or full disk)
off the reactor, where it would stall every stream, and makes a write
failure cost memory, never a request.

Durability bound:
  - clean stop (C{stopService}, e.g. SIGTERM under twistd): nothing is lost,
    unless the disk refuses the final write (then the loss is logged);
  - C{kill -9} / power loss after the OS wrote the WAL: a request whose
    open row was still queued may have no row -- one admitted less than
    C{batch_interval} before the kill, or a little longer if a write was in
    flight then (a batch's transaction is atomic: all of it is in the file
    or none), or much longer if the disk was failing; every request
    admitted earlier has its row, C{interrupted} if its final record was
    not written yet (even if it had just ended), with its progress as of
    about C{progress_interval} before the kill;
  - a disk failing for long: the oldest records beyond C{max_pending} are
    dropped and counted in L{Ledger.dropped}.
With C{synchronous=NORMAL} in WAL mode a power cut (not a process kill) may
also roll back the last few committed transactions; the file stays valid.

Several processes may share the file (C{--workers}): each writes its
C{owner} (its pid) on its rows and does not recover at start
(C{recover=False}); the supervisor marks all open rows interrupted before
any worker starts, and a dead worker's (L{recover_open_rows} with its
owner) before its replacement starts, so no process ever marks a live
one's rows.  SQLite serialises the writers; a writer that finds the file
locked waits up to C{busy_timeout}, and a batch that still fails goes back
to the queue and is retried, never dropped for that.  Without C{--workers}
one process owns the file and marks every open row at start, as before.
"""

from __future__ import annotations

import os
import re
import sqlite3
from collections import deque
from dataclasses import dataclass, fields
from operator import attrgetter
from pathlib import Path
from typing import Any, Callable, Deque, Iterable, List, Optional

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from llmgate.ops.periodic import Periodic

OUTCOMES = (
    "completed",
    "client_cancelled",
    "upstream_error",
    "rejected",
    "gateway_error",
    # Written at admission, replaced by the final record.
    "open",
    # Still open when the gateway started: the previous run died with it
    # in flight.
    "interrupted",
)
OPEN = "open"
INTERRUPTED = "interrupted"
PHASES = ("connect", "headers", "body")
SOURCES = ("reported", "estimated")


@dataclass
class UsageRecord:
    """
    What one request through the gateway used and cost.

    Built by the relay once the request is over; never mutated after
    L{Ledger.record} (the writer thread reads it later).

    @ivar key_name: the gateway key's I{name}, never its secret.
    @ivar status: HTTP status sent to the client, 0 if none was sent.
    @ivar outcome: one of L{OUTCOMES}.
    @ivar phase: for C{client_cancelled}/C{upstream_error}, where it
        happened: one of L{PHASES}.
    @ivar source: C{"reported"} by the provider, C{"estimated"} by us, or
        C{None} when there are no token counts at all.
    @ivar cost_usd: C{None} when the price is unknown; never 0 for unknown,
        so sums can tell "free" from "we don't know".
    @ivar model: the model the client asked for; C{upstream_model} is the
        name sent upstream (after the config's mapping).
    @ivar served_model: the model the provider's response named (a router
        deployment or a fallback list may serve another model than the one
        asked for), or C{None} if the response named none.
    @ivar cache_creation_1h_tokens: the part of C{cache_creation_tokens}
        written to Anthropic's 1-hour cache (priced apart); 0 in rows
        written before this column existed.
    @ivar request_id: the gateway's own unique id of the request.
    @ivar client_request_id: the valid C{x-request-id} the client sent, if
        it sent one (clients may repeat ids: it is not a key).
    @ivar attempt: the upstream attempt that served the request (0 when
        none was made: a rejected request); on a failed attempt's own
        record, that attempt's number.
    @ivar parent_request_id: on a failed attempt's record, the
        C{request_id} of the client request it was made for (whose record
        names the attempt that served it); L{None} on a client request's.
    @ivar hedged: on a client request's record, a hedge (a second attempt
        racing the first, L{llmgate.routing.attempts}) was started for it.
    """

    request_id: str
    ts: float
    key_name: str
    route: str
    model: str
    provider: str
    upstream_model: str
    upstream_id: Optional[str]
    status: int
    streamed: bool
    outcome: str
    phase: Optional[str]
    input_tokens: Optional[int]
    output_tokens: Optional[int]
    cached_input_tokens: int
    cache_creation_tokens: int
    reasoning_tokens: int
    source: Optional[str]
    cost_usd: Optional[float]
    ttft_ms: Optional[float]
    duration_ms: float
    bytes_in: int
    bytes_out: int
    served_model: Optional[str] = None
    cache_creation_1h_tokens: int = 0
    client_request_id: Optional[str] = None
    attempt: int = 1
    parent_request_id: Optional[str] = None
    hedged: bool = False


COLUMNS = tuple(f.name for f in fields(UsageRecord))
_asRow = attrgetter(*COLUMNS)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    request_id TEXT NOT NULL UNIQUE,
    ts REAL NOT NULL,
    key_name TEXT NOT NULL,
    route TEXT NOT NULL,
    model TEXT NOT NULL,
    provider TEXT NOT NULL,
    upstream_model TEXT NOT NULL,
    upstream_id TEXT,
    status INTEGER NOT NULL,
    streamed INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    phase TEXT,
    input_tokens INTEGER,
    output_tokens INTEGER,
    cached_input_tokens INTEGER NOT NULL,
    cache_creation_tokens INTEGER NOT NULL,
    reasoning_tokens INTEGER NOT NULL,
    source TEXT,
    cost_usd REAL,
    ttft_ms REAL,
    duration_ms REAL NOT NULL,
    bytes_in INTEGER NOT NULL,
    bytes_out INTEGER NOT NULL,
    served_model TEXT,
    cache_creation_1h_tokens INTEGER NOT NULL DEFAULT 0,
    client_request_id TEXT,
    attempt INTEGER NOT NULL DEFAULT 1,
    parent_request_id TEXT,
    hedged INTEGER NOT NULL DEFAULT 0,
    owner TEXT
);
CREATE INDEX IF NOT EXISTS usage_ts ON usage (ts);
-- Only open rows, so finding them at start-up costs nothing on a big file.
CREATE INDEX IF NOT EXISTS usage_open ON usage (request_id) WHERE outcome = 'open';
"""

# The writing process (its pid), so a supervisor can recover exactly the
# open rows of a worker that died; not part of UsageRecord.
_WRITE_COLUMNS = COLUMNS + ("owner",)
# Each column's declaration in _SCHEMA, for adding the ones a ledger file
# written by an older version lacks (L{add_missing_columns}).
_DECLARED = dict(
    re.findall(r"^    (\w+) ([^,\n]+),?$", _SCHEMA.split("CREATE TABLE IF NOT EXISTS usage (", 1)[1].split(");", 1)[0], re.M)
)


def add_missing_columns(conn: sqlite3.Connection) -> List[str]:
    """
    Add to the C{usage} table of C{conn} every column it lacks
    (a file written by an older version), as declared in the schema; a
    C{NOT NULL} without a default is dropped, since the existing rows have
    no value for it.  Cheap when nothing is missing: one C{PRAGMA}.

    @return: the names of the columns added.
    """
    have = {row[1] for row in conn.execute("PRAGMA table_info(usage)")}
    added = []
    for name in _WRITE_COLUMNS:
        if name in have:
            continue
        decl = _DECLARED[name]
        if "NOT NULL" in decl.upper() and "DEFAULT" not in decl.upper():
            decl = re.sub(r"(?i)\s*NOT NULL", "", decl)
        try:
            conn.execute("ALTER TABLE usage ADD COLUMN {} {}".format(name, decl))
        except sqlite3.OperationalError as e:
            # Another process (a worker) added it meanwhile.
            if "duplicate column" not in str(e):
                raise
            continue
        added.append(name)
    return added


_VALUES = "({}) VALUES ({})".format(", ".join(_WRITE_COLUMNS), ", ".join("?" * len(_WRITE_COLUMNS)))
# An open row never overwrites anything (its final record may be there
# already, or a retried batch wrote it); a final record always replaces the
# open row of its request.  Together: one row per request, whatever order
# the two reach the file in.
_INSERT_OPEN = "INSERT OR IGNORE INTO usage " + _VALUES
_INSERT_FINAL = "INSERT OR REPLACE INTO usage " + _VALUES


@dataclass
class Progress:
    """
    What an open request has relayed so far; updates its open row only.

    @ivar output_tokens: reported by the provider, or estimated from the
        text relayed (then C{source} is C{"estimated"}).
    """

    request_id: str
    status: int
    upstream_id: Optional[str]
    input_tokens: Optional[int]
    output_tokens: Optional[int]
    cached_input_tokens: int
    cache_creation_tokens: int
    source: Optional[str]
    cost_usd: Optional[float]
    ttft_ms: Optional[float]
    duration_ms: float
    bytes_out: int
    served_model: Optional[str] = None


_PROGRESS_COLUMNS = tuple(f.name for f in fields(Progress))[1:]
_asProgressRow = attrgetter(*(_PROGRESS_COLUMNS + ("request_id",)))
_PROGRESS = "UPDATE usage SET {} WHERE request_id = ? AND outcome = 'open'".format(
    ", ".join("%s = ?" % (c,) for c in _PROGRESS_COLUMNS)
)
# phase "body": it had relayed bytes, so it was cut mid-response.
_RECOVER = (
    "UPDATE usage SET outcome = 'interrupted', "
    "phase = CASE WHEN bytes_out > 0 THEN 'body' ELSE phase END "
    "WHERE outcome = 'open'"
)
_RECOVER_OWNER = _RECOVER + " AND owner = ?"

RunInThread = Callable[..., "defer.Deferred[Any]"]


class _SQLiteWriter:
    """
    Owns the SQLite connection.  Only ever called from one thread at a time
    (the L{Ledger} keeps a single operation in flight), normally the single
    worker of the ledger's pool.

    The connection is opened lazily, so it is created in the thread that
    uses it, and dropped after any error so the next attempt starts from a
    fresh handle (a connection that saw EIO is not worth trusting).
    """

    def __init__(
        self, path: str, owner: Optional[str] = None, recover: bool = True, busy_timeout: float = 5.0
    ) -> None:
        self.path = path
        self.owner = owner
        self.busy_timeout = busy_timeout
        self._conn: Optional[sqlite3.Connection] = None
        # Open rows left by a previous run are marked once, before this
        # run writes any row of its own (unless a supervisor does it).
        self._recovered = not recover
        # Columns this writer added to an older file (for the log and tests).
        self.added_columns: List[str] = []

    def _open(self) -> sqlite3.Connection:
        if self._conn is None:
            parent = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(parent, exist_ok=True)
            # check_same_thread=False: safety comes from the ledger's
            # one-operation-at-a-time rule, not from thread affinity, so an
            # injected runner may use any thread.
            # timeout= is SQLite's busy timeout: another process holding
            # the write lock is waited for, not an instant failure.
            conn = sqlite3.connect(
                self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False
            )
            try:
                conn.execute("PRAGMA busy_timeout = %d" % (int(self.busy_timeout * 1000),))
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.executescript(_SCHEMA)
                # In this (the worker) thread, before any row is written.
                added = add_missing_columns(conn)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
            if added:
                self.added_columns.extend(added)
        return self._conn

    def recover(self) -> int:
        """
        Mark the rows a previous run left open as C{interrupted}.

        @return: how many there were (0 if already done by this writer).
        """
        return self.write([], [])

    def write(self, records: List[UsageRecord], progress: Optional[List[Progress]] = None) -> int:
        """
        Write C{records} (open rows and final records) and C{progress} in
        one transaction, after recovering the previous run's open rows if
        that is not done yet.

        @return: how many rows were recovered.
        """
        try:
            conn = self._open()
            ended = {r.request_id for r in records if r.outcome != OPEN}
            # A request that ended within the batch skips its open row.
            owner = (self.owner,)
            opens = [_asRow(r) + owner for r in records if r.outcome == OPEN and r.request_id not in ended]
            finals = [_asRow(r) + owner for r in records if r.outcome != OPEN]
            conn.execute("BEGIN IMMEDIATE")
            try:
                recovered = 0
                if not self._recovered:
                    recovered = max(conn.execute(_RECOVER).rowcount, 0)
                if opens:
                    conn.executemany(_INSERT_OPEN, opens)
                if finals:
                    conn.executemany(_INSERT_FINAL, finals)
                if progress:
                    conn.executemany(_PROGRESS, [_asProgressRow(p) for p in progress])
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            self._recovered = True
            return recovered
        except BaseException:
            self.close()
            raise

    def recover_owner(self, owner: Optional[str]) -> int:
        """
        Mark the open rows of C{owner} (every open row if L{None})
        C{interrupted}: a supervisor's job, for a worker that died.

        @return: how many there were.
        """
        try:
            conn = self._open()
            conn.execute("BEGIN IMMEDIATE")
            try:
                if owner is None:
                    n = conn.execute(_RECOVER).rowcount
                else:
                    n = conn.execute(_RECOVER_OWNER, (owner,)).rowcount
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return max(n, 0)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:
                pass


class _LaterOpen:
    """An open row queued by L{Ledger.open_later}: built when its batch goes to the writer."""

    __slots__ = ("request_id", "build", "arg")

    def __init__(self, request_id: str, build: Callable[[Any], UsageRecord], arg: Any) -> None:
        self.request_id = request_id
        self.build = build
        self.arg = arg


class Ledger(Service):
    """
    Batches L{UsageRecord}s in memory and writes them off the reactor thread.

    See the module docstring for the durability bound: a clean stop loses
    nothing; after C{kill -9} the requests admitted in the last
    C{batch_interval} window (plus the batch in flight) may have no row,
    and every earlier one in flight has an C{interrupted} row.

    @ivar flushed: records confirmed in the file.
    @ivar write_failures: failed write attempts (each is retried).
    @ivar dropped: records discarded, oldest first, because more than
        C{max_pending} were waiting for a failing disk.
    @ivar on_write_failure: optional C{callable(Failure)} called after each
        failed write, e.g. to bump a metric.
    @ivar progress_source: optional C{callable(parts) -> list of Progress},
        asked C{parts} (L{progress_slices}) times per C{progress_interval}
        on its own timer for the progress of a C{parts}-th of the requests
        still open, so each is reported about once an interval and the
        work is spread thin (the accounting sets it); what it reports goes
        with the next batch, the latest report per request only.
    @ivar recovered: open rows of a previous run marked C{interrupted}.
    """

    log = Logger()

    def __init__(
        self,
        path: str,
        reactor: Any,
        batch_interval: float = 0.2,
        max_pending: int = 100_000,
        run_in_thread: Optional[RunInThread] = None,
        on_write_failure: Optional[Callable[[Failure], object]] = None,
        progress_interval: float = 1.0,
        progress_slices: int = 20,
        owner: Optional[str] = None,
        recover: bool = True,
        busy_timeout: float = 5.0,
    ) -> None:
        """
        @param reactor: provides C{IReactorTime}; also C{IReactorFromThreads}
            unless C{run_in_thread} is given.
        @param run_in_thread: C{callable(f, *args) -> Deferred}; defaults to
            a one-thread L{ThreadPool} owned by this service.  Tests pass a
            synchronous runner so no thread is involved.
        @param owner: written on every row (a worker's pid under
            C{--workers}), so L{recover_open_rows} can find a dead one's.
        @param recover: mark every open row C{interrupted} at start; a
            worker passes C{False} (its supervisor does it).
        @param busy_timeout: seconds SQLite waits for another process's
            write lock before a write fails (and is retried).
        @param progress_slices: the progress of open requests is asked for
            this many times per C{progress_interval}, a share each time, on
            its own timer, and written with the next batch: at 1,000 open
            streams, asking for a fifth of them with each 0.2 s batch
            stopped the reactor for ~3.6 ms (up to 12) five times a
            second, the largest regular stop left in the TTFT tail.
        """
        self.path = path
        self._reactor = reactor
        self.batch_interval = batch_interval
        self.max_pending = max_pending
        self._runInThread = run_in_thread
        self.on_write_failure = on_write_failure
        self._writer = _SQLiteWriter(path, owner=owner, recover=recover, busy_timeout=busy_timeout)
        self._pending: Deque[UsageRecord] = deque()
        self._inflight: Optional[List[UsageRecord]] = None
        self._inflightDone: Optional[defer.Deferred[None]] = None
        self._pool: Optional[ThreadPool] = None
        self._loop: Optional[Periodic] = None
        self._droppedLogged = 0
        self.progress_source: Optional[Callable[[], List[Progress]]] = None
        self.progress_interval = progress_interval
        self.progress_slices = max(1, progress_slices)
        self._progressLoop: Optional[Periodic] = None
        # The latest progress of each request not written yet (bounded by
        # the open requests however long a write takes).
        self._progress: dict[str, Progress] = {}
        self.flushed = 0
        self.write_failures = 0
        self.dropped = 0
        self.recovered = 0

    # -- reactor-thread API -------------------------------------------------

    def open(self, rec: UsageRecord) -> None:
        """
        Queue the row of a request just admitted (C{rec.outcome} is
        C{"open"}); its final record, same C{request_id}, replaces it.
        Same cost and queue as L{record}.
        """
        assert rec.outcome == OPEN
        self.record(rec)

    def open_later(self, request_id: str, build: Callable[[Any], UsageRecord], arg: Any) -> None:
        """
        Queue the open row of the request C{request_id}, just admitted, to
        be built (C{build(arg)}, on the reactor thread) when the queue is
        handed to the writer -- and only if that batch does not already
        hold the request's final record.  A short request usually ends
        before the next batch, and the writer drops the open row of a
        request whose final record it gets in the same batch: it is not
        built at all.  Otherwise as L{open}: written with the same batch.
        """
        self.record(_LaterOpen(request_id, build, arg))  # type: ignore[arg-type]

    def record(self, rec: UsageRecord) -> None:
        """
        Queue C{rec} for writing.  O(1); never blocks, never raises for a
        full queue: the oldest record is dropped (and counted) instead.
        """
        pending = self._pending
        pending.append(rec)
        if len(pending) > self.max_pending:
            pending.popleft()
            self.dropped += 1

    def pending_count(self) -> int:
        """
        Records not yet known to be in the file (queued plus in flight).
        """
        inflight = len(self._inflight) if self._inflight is not None else 0
        return len(self._pending) + inflight

    # -- service ------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self._runInThread is None:
            pool = ThreadPool(minthreads=1, maxthreads=1, name="llmgate-ledger")
            pool.start()
            self._pool = pool
            reactor = self._reactor

            def run(f: Callable[..., Any], *a: Any) -> defer.Deferred[Any]:
                return deferToThreadPool(reactor, pool, f, *a)

            self._runInThread = run
        # Recover first: the tick does not flush while this is in flight.
        self._flush(recover=True)
        loop = Periodic(self._reactor, self.batch_interval, self._tick)
        loop.start_timer()
        self._loop = loop
        progress = Periodic(self._reactor, self.progress_interval / self.progress_slices, self._askProgress)
        progress.start_timer()
        self._progressLoop = progress

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        """
        Flush everything queued, close the database, stop the worker.

        @return: a Deferred that fires when the file holds every record
            (or a failed final write has been logged).
        """
        super().stopService()
        if self._loop is not None:
            self._loop.stop_timer()
        self._loop = None
        if self._progressLoop is not None:
            self._progressLoop.stop_timer()
        self._progressLoop = None
        if self._runInThread is None:
            return
        if self._inflightDone is not None:
            yield self._inflightDone
        # Loop: records may still arrive while we drain (requests aborted by
        # the shutdown report their outcome too).
        while self._pending:
            ok = yield self._flush()
            if not ok:
                break
        self._reportDropped()
        if self._pending:
            self.log.critical(
                "usage ledger {path}: stopping with {count} unwritten records",
                path=self.path,
                count=len(self._pending),
            )
        try:
            yield self._runInThread(self._writer.close)
        finally:
            pool, self._pool = self._pool, None
            if pool is not None:
                self._runInThread = None
                pool.stop()

    # -- flushing -----------------------------------------------------------

    def _tick(self) -> None:
        # Never return the Deferred: the timer would wait on it.
        self._reportDropped()
        if self._inflight is not None:
            return
        progress: List[Progress] = []
        if self._progress:
            progress = list(self._progress.values())
            self._progress = {}
        if self._pending or progress:
            self._flush(progress)

    def _askProgress(self) -> None:
        """A share of the open requests' progress, kept for the next batch."""
        source = self.progress_source
        if source is None:
            return
        try:
            reports = source(self.progress_slices)
        except Exception:
            self.log.failure("usage ledger: progress of open requests failed")
            return
        held = self._progress
        for p in reports:
            held[p.request_id] = p

    def _flush(self, progress: Optional[List[Progress]] = None, recover: bool = False) -> defer.Deferred[bool]:
        """
        Hand the whole queue (and C{progress}) to the writer.  Only one
        flush is in flight.

        @param progress: written with the batch, or lost with it if the
            write fails (newer progress follows within a second).
        @param recover: write nothing, only mark the previous run's open
            rows (the first operation of the worker).
        @return: a Deferred firing C{True} if written, C{False} if the
            records went back to the queue.  It never fails.
        """
        assert self._inflight is None and self._runInThread is not None
        batch = [] if recover else self._built(list(self._pending))
        if not recover:
            self._pending.clear()
        self._inflight = batch
        done: defer.Deferred[None] = defer.Deferred()
        self._inflightDone = done

        def written(recovered: int) -> bool:
            # Count the batch, not the new rows: rows a lost-success attempt
            # already wrote are in the file too, and counted only once
            # because that attempt was counted as a failure.
            self.flushed += len(batch)
            added = self._writer.added_columns
            if added:
                self.log.info(
                    "usage ledger {path}: added the columns {columns} to a file "
                    "written by an older version (its rows read them as null)",
                    path=self.path,
                    columns=", ".join(added),
                )
                self._writer.added_columns = []
            if recovered:
                self.recovered += recovered
                self.log.warn(
                    "usage ledger {path}: {count} requests were in flight when "
                    "the gateway last stopped without a clean shutdown; their "
                    "rows are marked interrupted",
                    path=self.path,
                    count=recovered,
                )
            return True

        def failed(f: Failure) -> bool:
            self.write_failures += 1
            self._requeue(batch)
            self.log.error(
                "usage ledger {path}: write of {count} records failed "
                "({error}); {pending} kept for retry, {failures} failures so far",
                path=self.path,
                count=len(batch),
                error=f.getErrorMessage() or f.type.__name__,
                pending=len(self._pending),
                failures=self.write_failures,
            )
            hook = self.on_write_failure
            if hook is not None:
                try:
                    hook(f)
                except Exception:
                    self.log.failure("usage ledger on_write_failure hook raised")
            return False

        def settle(ok: bool) -> bool:
            self._inflight = None
            self._inflightDone = None
            done.callback(None)
            return ok

        if recover:
            d = defer.maybeDeferred(self._runInThread, self._writer.recover)
        else:
            d = defer.maybeDeferred(self._runInThread, self._writer.write, batch, progress or [])
        d.addCallbacks(written, failed)
        d.addCallback(settle)
        return d

    def _built(self, items: List[Any]) -> List[UsageRecord]:
        """
        C{items} with each L{open_later} row built, or left out when its
        request's final record is among them (the writer would skip it).
        """
        if not any(type(item) is _LaterOpen for item in items):
            return items
        ended = {item.request_id for item in items if type(item) is not _LaterOpen and item.outcome != OPEN}
        batch: List[UsageRecord] = []
        for item in items:
            if type(item) is _LaterOpen:
                if item.request_id in ended:
                    continue
                try:
                    item = item.build(item.arg)
                except Exception:
                    self.log.failure("usage ledger: building the open row of {rid} failed", rid=item.request_id)
                    continue
            batch.append(item)
        return batch

    def _requeue(self, batch: Iterable[UsageRecord]) -> None:
        """
        Put a failed batch back in front of newer records, then trim the
        oldest beyond C{max_pending}.
        """
        self._pending.extendleft(reversed(list(batch)))
        excess = len(self._pending) - self.max_pending
        for _ in range(max(excess, 0)):
            self._pending.popleft()
        self.dropped += max(excess, 0)

    def _reportDropped(self) -> None:
        # Logged once per tick, not per record: record() must stay cheap
        # and a failing disk must not also flood the log.
        if self.dropped != self._droppedLogged:
            self.log.critical(
                "usage ledger {path}: dropped {new} records (oldest first, "
                "{total} in total): more than {max_pending} waiting to be written",
                path=self.path,
                new=self.dropped - self._droppedLogged,
                total=self.dropped,
                max_pending=self.max_pending,
            )
            self._droppedLogged = self.dropped


def recover_open_rows(path: str, owner: Optional[str] = None, busy_timeout: float = 5.0) -> int:
    """
    Mark C{owner}'s open rows (all open rows if L{None}) C{interrupted};
    synchronous, for a supervisor's thread or before its reactor runs.

    @return: how many rows were marked.
    """
    writer = _SQLiteWriter(path, busy_timeout=busy_timeout)
    try:
        return writer.recover_owner(owner)
    finally:
        writer.close()


def connect_readonly(path: str) -> sqlite3.Connection:
    """
    Open the ledger read-only, so readers never take a write lock and can
    run while the daemon writes (WAL lets readers and one writer coexist).

    @raise FileNotFoundError: if C{path} does not exist (SQLite would
        otherwise report a vague "unable to open database file").
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(path)
    return sqlite3.connect(p.resolve().as_uri() + "?mode=ro", uri=True)


def read_records(path: str) -> List[dict[str, Any]]:
    """
    Every record in the ledger, oldest first, as dicts with the
    L{UsageRecord} field names (so C{UsageRecord(**d)} round-trips).
    Synchronous: for tests and the CLI, never for the reactor thread.
    """
    conn = connect_readonly(path)
    try:
        # A file an older version wrote (and no daemon has migrated yet)
        # lacks the newer columns: they read as NULL.
        have = {row[1] for row in conn.execute("PRAGMA table_info(usage)")}
        if not have:
            return []
        cursor = conn.execute(
            "SELECT {} FROM usage ORDER BY ts, rowid".format(
                ", ".join(c if c in have else "NULL" for c in COLUMNS)
            )
        )
        out = []
        for row in cursor:
            d = dict(zip(COLUMNS, row))
            d["streamed"] = bool(d["streamed"])
            out.append(d)
        return out
    finally:
        conn.close()


__all__ = [
    "COLUMNS",
    "INTERRUPTED",
    "Ledger",
    "OPEN",
    "OUTCOMES",
    "Progress",
    "PHASES",
    "SOURCES",
    "UsageRecord",
    "add_missing_columns",
    "connect_readonly",
    "read_records",
    "recover_open_rows",
]

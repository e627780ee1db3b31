# -*- test-case-name: tests.policy.test_budgets -*-
"""
Spend per key and budget period, and its rebuild from the usage ledger.

The ledger is the record of what was spent: at start the spend of every
key in the current day, the current month and in total is summed from it
(L{spend_from_ledger}, sync SQLite reads: run it off the reactor thread),
so a restart does not reset a budget.  From then on every settled request
adds its cost here, from the same record the ledger gets.

Periods are UTC calendar days and months.  A request is charged to the
period it settles in; the ledger dates a row by the request's start, so a
request running across midnight may count in the next period here and in
the previous one after a restart.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any, Callable, Iterable, Optional

from twisted.application.service import Service
from twisted.logger import Logger

from llmgate.policy.keys import PERIODS, period_start

_log = Logger(namespace="llmgate.policy")


class Spend:
    """
    One key's settled spend in each period kind, rolled over as the clock
    crosses a period start, and the cost of its admitted, unsettled
    requests (C{reserved}).
    """

    __slots__ = ("starts", "spent", "reserved")

    def __init__(self, now: float) -> None:
        self.starts = {p: period_start(p, now) for p in PERIODS}
        self.spent = {p: 0.0 for p in PERIODS}
        self.reserved = 0.0

    def roll(self, now: float) -> None:
        for p in ("day", "month"):
            start = period_start(p, now)
            if start != self.starts[p]:
                self.starts[p] = start
                self.spent[p] = 0.0

    def add(self, cost: float) -> None:
        for p in PERIODS:
            self.spent[p] += cost


def spend_from_ledger(path: str, now: float, keys: Optional[Iterable[str]] = None) -> dict[str, dict[str, float]]:
    """
    C{{key_name: {period: cost}}} summed from the ledger at C{path} since
    the start of each period C{now} is in.  Every row counts, whatever its
    outcome: a cancelled or interrupted request's cost is spent too.  A
    missing ledger has spent nothing.  Sync: call it off the reactor thread.
    """
    if not os.path.exists(path):
        return {}
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    try:
        out: dict[str, dict[str, float]] = {}
        for p in PERIODS:
            rows = conn.execute(
                "SELECT key_name, COALESCE(SUM(cost_usd), 0) FROM usage WHERE ts >= ? GROUP BY key_name",
                (period_start(p, now),),
            ).fetchall()
            for name, total in rows:
                out.setdefault(name, {q: 0.0 for q in PERIODS})[p] = float(total)
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):
            return {}
        raise
    finally:
        conn.close()
    if keys is not None:
        wanted = set(keys)
        out = {k: v for k, v in out.items() if k in wanted}
    return out


class SpendLoader(Service):
    """
    At start, loads the ledger's spend into the quotas off the reactor
    thread; budgets are enforced (requests of keys with a budget answered
    503 until then) once it is in.  A ledger that cannot be read keeps them
    refused: failing open would let a restart reset every budget.
    """

    def __init__(self, quotas: Any, ledger_path: Optional[str], in_thread: Callable[..., Any]) -> None:
        self.quotas = quotas
        self.path = ledger_path
        self.in_thread = in_thread

    def startService(self) -> None:
        super().startService()
        self.start()

    def start(self) -> Any:
        if self.path is None:
            _log.warn("budgets: the ledger is disabled, so spend starts at 0 at every restart")
            self.quotas.load_spend({})
            return None
        d = self.in_thread(spend_from_ledger, self.path, self.quotas.clock.seconds())
        d.addCallback(self.quotas.load_spend)
        d.addErrback(lambda f: _log.failure(
            "budgets: could not read the spend from the ledger {path}; keys with a budget are refused",
            f, path=self.path))
        return d

# -*- test-case-name: tests.policy.test_usage -*-
"""
The budget columns of C{llmgate usage --by key}: each key's budget, its
period, what it spent in the current period and the share of the budget
that is.

The spend is summed from the ledger by L{spend_from_ledger
<llmgate.policy.budgets.spend_from_ledger>}, the sum the daemon starts
from, over the whole current period whatever C{--since}/C{--until} say:
it is the number the daemon enforces (less what it has not yet written,
about a batch interval's worth, and requests in flight beyond their open
row's progress).  The key file is found as the daemon finds it; without
one (or with one that cannot be read: said on stderr) there are no
budget columns.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Callable, Dict, List, Optional

from llmgate.policy import keys as keymod
from llmgate.policy.budgets import spend_from_ledger

COLUMNS = ["budget_usd", "period", "period_spent_usd", "budget_used"]


def annotator(now: Callable[[], float] = time.time) -> Callable[[argparse.Namespace, List[Dict[str, Any]]], List[str]]:
    """A L{llmgate.accounting.report.Annotate} adding the budget columns at time C{now()}."""

    def annotate(args: argparse.Namespace, rows: List[Dict[str, Any]]) -> List[str]:
        return add_budgets(args, rows, now())

    return annotate


def _key_file(args: argparse.Namespace) -> str:
    from llmgate.policy.cli import key_file

    return key_file(argparse.Namespace(file=getattr(args, "key_file", None), config=getattr(args, "config", "llmgate.toml")))


def add_budgets(args: argparse.Namespace, rows: List[Dict[str, Any]], now: float) -> List[str]:
    """
    Add the budget columns to C{rows} (grouped by key) and return their
    names; none if no key in the key file has a budget.  A key without a
    budget (or not in the file) has L{None} in them.
    """
    try:
        records = keymod.load(_key_file(args))
    except keymod.KeyFileError as e:
        sys.stderr.write(f"llmgate usage: no budget columns: key file {e}\n")
        return []
    budgets = {r.name: r for r in records if r.budget_usd is not None}
    if not budgets:
        return []
    spend = spend_from_ledger(args.ledger, now, budgets)
    for row in rows:
        rec = budgets.get(row.get("key"))
        if rec is None:
            row.update(dict.fromkeys(COLUMNS))
            continue
        budget = float(rec.budget_usd)  # type: ignore[arg-type]
        spent = round(spend.get(rec.name, {}).get(rec.period, 0.0), 10)
        used: Optional[float] = spent / budget if budget > 0 else None
        row.update(budget_usd=budget, period=rec.period, period_spent_usd=spent, budget_used=used)
    return list(COLUMNS)

"""
Tests for L{llmgate.policy.budgets}: spend per key and period rebuilt from
the usage ledger at start.
"""

from __future__ import annotations

import os
import tempfile

from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from llmgate.accounting.ledger import _SQLiteWriter
from llmgate.policy.budgets import SpendLoader, spend_from_ledger
from llmgate.policy.limits import Quotas
from tests.accounting.test_ledger import makeRecord

DAY = 1893542400.0  # 2030-01-02T00:00Z


class LedgerSpendTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.path = os.path.join(self.dir, "usage.db")
        w = _SQLiteWriter(self.path)
        w.write([
            makeRecord(1, key_name="a", ts=DAY - 40 * 86400, cost_usd=5.0),  # last month
            makeRecord(2, key_name="a", ts=DAY - 3600, cost_usd=2.0),  # yesterday, this month
            makeRecord(3, key_name="a", ts=DAY + 60, cost_usd=0.25, outcome="client_cancelled"),
            makeRecord(4, key_name="a", ts=DAY + 120, cost_usd=None),
            makeRecord(5, key_name="b", ts=DAY + 60, cost_usd=1.0, outcome="interrupted"),
        ])
        w.close()

    def test_sums_per_period(self) -> None:
        """Every row's cost, whatever its outcome, summed per key since each period's start."""
        got = spend_from_ledger(self.path, DAY + 3600)
        self.assertEqual(got["a"], {"day": 0.25, "month": 2.25, "total": 7.25})
        self.assertEqual(got["b"], {"day": 1.0, "month": 1.0, "total": 1.0})

    def test_missing_ledger(self) -> None:
        """No ledger file yet: nothing was spent."""
        self.assertEqual(spend_from_ledger(os.path.join(self.dir, "none.db"), DAY), {})

    def test_loader_enables_budgets(self) -> None:
        """The loader puts the ledger's spend into the quotas, and only then are budgets enforced."""
        clock = Clock()
        clock.advance(DAY + 3600)
        q = Quotas(clock)
        self.assertFalse(q.spend_ready)
        SpendLoader(q, self.path, lambda f, *a: succeed(f(*a))).start()
        self.assertTrue(q.spend_ready)
        self.assertEqual(q.state.spend["a"].spent["month"], 2.25)

# -*- test-case-name: tests.policy.test_cutoff -*-
"""
End a key's streams when its budget runs out mid-stream (the key file's
C{cut_at_budget}, off by default).

Admission holds a budget to within the estimates of the requests in
flight (L{llmgate.policy.limits}); a stream whose output runs past its
estimate (no C{max_tokens}, a long prompt) may still spend past the
budget.  For keys that ask for it, this check ends such streams visibly:
the client gets the dialect's error event and no C{[DONE]}
(L{Relay.cut_for_budget <llmgate.relay.stream.Relay.cut_for_budget>}),
and the usage record, with what was relayed, settles the budget as usual.

Once a second, never per event: for each key with C{cut_at_budget} and a
budget that has streams in flight, its settled spend in the period plus
the estimated cost so far of those streams (L{Accounting.in_flight_cost
<llmgate.accounting.recorder.Accounting.in_flight_cost>}: text bytes / 4,
no tokenizer) is compared with the budget; over it, all of them end.  A
stream may so run past the budget by up to a second of output.  With
C{--workers} and in-memory state each worker checks its own spend; with
Redis, the check first reads the spend of the keys concerned from Redis
(every worker's settles), one C{MGET} a second while such streams run.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional

from twisted.logger import Logger

from llmgate.ops.periodic import Periodic
from llmgate.policy.keys import KeyRecord

log = Logger(namespace="llmgate.policy.cutoff")


class BudgetCutoff(Periodic):
    """
    @param relays: the relays in flight (C{GatewayResource.active}).
    @param keys: returns the keys by name, as now configured.
    @param quotas: the L{Quotas <llmgate.policy.limits.Quotas>} (its C{spent}).
    @param estimate: C{Exchange -> cost so far or None}.
    """

    def __init__(
        self,
        clock: Any,
        relays: Iterable[Any],
        keys: Callable[[], Mapping[str, KeyRecord]],
        quotas: Any,
        estimate: Callable[[Any], Optional[float]],
        interval: float = 1.0,
    ) -> None:
        super().__init__(clock, interval)
        self._relays = relays
        self._keys = keys
        self._quotas = quotas
        self._estimate = estimate
        self.cut = 0

    def tick(self) -> None:
        self.check()

    def check(self) -> None:
        """Cut the streams of every key that asks for it and is over its budget."""
        keys = self._keys()
        groups: dict[str, list[Any]] = {}
        for relay in self._relays:
            rec = keys.get(relay.exchange.key_name)
            if rec is not None and rec.cut_at_budget and rec.budget_usd is not None:
                groups.setdefault(rec.name, []).append(relay)
        if not groups:
            return
        # With Redis the spend this process knows is only its own settles
        # since its last one: read every worker's first.
        refresh = getattr(getattr(self._quotas, "state", None), "refresh_spend", None)
        if refresh is None:
            self._cut(keys, groups)
            return
        d = refresh(list(groups))
        d.addCallback(lambda _: self._cut(keys, groups))
        d.addErrback(lambda f: log.failure("budget cut-off check failed", f))

    def _cut(self, keys: Mapping[str, KeyRecord], groups: dict[str, list[Any]]) -> None:
        now = self.clock.seconds()
        for name, relays in groups.items():
            rec = keys[name]
            budget = float(rec.budget_usd)  # type: ignore[arg-type]
            total = self._quotas.spent(name, rec.period, now)
            for relay in relays:
                total += self._estimate(relay.exchange) or 0.0
            if total <= budget:
                continue
            period = rec.period if rec.period != "total" else "lifetime"
            message = f"the key's budget of ${budget:g} per {period} ran out during this response"
            for relay in relays:
                if relay.cut_for_budget(message):
                    self.cut += 1

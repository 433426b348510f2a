"""Spending limits: every attempt is reserved before it is sent, so no limit can be passed.

Two levels: one invocation of the job (`max_queries`, `max_cost`) and the whole run, every
invocation and kill included (`run_max_queries`, `run_max_cost`; the run's earlier calls come
from its call journal, unconfirmed ones counted). Limits hold on *attempts*: a call counts
when it is sent, whatever the provider later bills.

Money is counted in integer nano-units of the price currency: a float running sum of
$0.0015 steps would drift, and "spent <= max_cost" must hold exactly.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

NANO = 10**9


def per_call_nano(price_per_1000: float) -> int:
    """The price of one call in nano-units (price per 1,000 calls / 1,000)."""
    return int(round(price_per_1000 * NANO / 1000))


def to_money(nano: int) -> float:
    return nano / NANO


def _nano_limit(money: float | None) -> int | None:
    return None if money is None else int(math.floor(money * NANO + 1e-6))


@dataclass(frozen=True)
class BudgetSnapshot:
    queries: int  # attempts of this invocation
    cost: float  # their price
    run_queries: int  # attempts of the whole run (earlier invocations included)
    run_cost: float
    max_queries: int | None
    max_cost: float | None
    run_max_queries: int | None
    run_max_cost: float | None
    exhausted: str | None  # which limit stopped a reservation
    halted: str | None

    def describe(self) -> str:
        parts = []
        if self.max_queries is not None:
            parts.append(f"{self.queries}/{self.max_queries} queries")
        if self.max_cost is not None:
            parts.append(f"${self.cost:.4f}/${self.max_cost:.4f}")
        if self.run_max_queries is not None:
            parts.append(f"run {self.run_queries}/{self.run_max_queries} queries")
        if self.run_max_cost is not None:
            parts.append(f"run ${self.run_cost:.4f}/${self.run_max_cost:.4f}")
        return ", ".join(parts)


class Budget:
    """A job's allowance; `reserve()` once per attempt, before sending it (thread-safe)."""

    def __init__(
        self,
        max_queries: int | None,
        max_cost: float | None,
        price_per_1000: float,
        run_max_queries: int | None = None,
        run_max_cost: float | None = None,
        run_queries_before: int = 0,
    ) -> None:
        if max_queries is None and max_cost is None and run_max_queries is None and run_max_cost is None:
            raise ValueError("a budget needs at least one limit (max_queries, max_cost, run_max_*)")
        self.max_queries, self.max_cost = max_queries, max_cost
        self.run_max_queries, self.run_max_cost = run_max_queries, run_max_cost
        self._max_cost_nano, self._run_max_cost_nano = _nano_limit(max_cost), _nano_limit(run_max_cost)
        self._unit = per_call_nano(price_per_1000)
        self._queries = 0
        self._before = int(run_queries_before)
        self._exhausted: str | None = None
        self._halted: str | None = None
        self._lock = threading.Lock()

    def reserve(self) -> bool:
        """Take one attempt out of the budget; False (and nothing taken) when it would not fit
        a limit or when the job was halted."""
        with self._lock:
            if self._halted is not None:
                return False
            queries, run_queries = self._queries + 1, self._before + self._queries + 1
            checks = (
                ("max_queries", self.max_queries is None or queries <= self.max_queries),
                ("max_cost", self._max_cost_nano is None or queries * self._unit <= self._max_cost_nano),
                ("run_max_queries", self.run_max_queries is None or run_queries <= self.run_max_queries),
                ("run_max_cost", self._run_max_cost_nano is None or run_queries * self._unit <= self._run_max_cost_nano),
            )
            failed = [name for name, ok in checks if not ok]
            if failed:
                self._exhausted = self._exhausted or failed[0]
                return False
            self._queries += 1
            return True

    def halt(self, reason: str) -> None:
        """Refuse every further reservation (an authentication failure stops all workers)."""
        with self._lock:
            if self._halted is None:
                self._halted = reason

    def snapshot(self) -> BudgetSnapshot:
        with self._lock:
            run = self._before + self._queries
            return BudgetSnapshot(
                self._queries, to_money(self._queries * self._unit), run, to_money(run * self._unit),
                self.max_queries, self.max_cost, self.run_max_queries, self.run_max_cost,
                self._exhausted, self._halted,
            )

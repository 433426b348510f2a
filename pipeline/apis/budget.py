"""Spending limits: every attempt sent is reserved first, so the limits can never be passed.

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


@dataclass(frozen=True)
class BudgetSnapshot:
    queries: int
    cost: float
    max_queries: int | None
    max_cost: float | None
    exhausted: bool
    halted: str | None

    @property
    def queries_left(self) -> int | None:
        return None if self.max_queries is None else self.max_queries - self.queries

    @property
    def cost_left(self) -> float | None:
        return None if self.max_cost is None else max(0.0, self.max_cost - self.cost)


class Budget:
    """A job's allowance; `reserve()` is called once per attempt, before sending it."""

    def __init__(self, max_queries: int | None, max_cost: float | None, price_per_1000: float) -> None:
        if max_queries is None and max_cost is None:
            raise ValueError("a budget needs max_queries and/or max_cost")
        self.max_queries = max_queries
        self.max_cost = max_cost
        self._max_cost_nano = None if max_cost is None else int(math.floor(max_cost * NANO + 1e-6))
        self._unit = per_call_nano(price_per_1000)
        self._queries = 0
        self._cost = 0
        self._exhausted = False
        self._halted: str | None = None
        self._lock = threading.Lock()

    def reserve(self) -> bool:
        """Take one attempt out of the budget; False (and nothing taken) when it would not fit
        or when the job was halted."""
        with self._lock:
            if self._halted is not None:
                return False
            fits_queries = self.max_queries is None or self._queries + 1 <= self.max_queries
            fits_cost = self._max_cost_nano is None or self._cost + self._unit <= self._max_cost_nano
            if not (fits_queries and fits_cost):
                self._exhausted = True
                return False
            self._queries += 1
            self._cost += self._unit
            return True

    def halt(self, reason: str) -> None:
        """Refuse every further reservation (an authentication failure stops all workers)."""
        with self._lock:
            if self._halted is None:
                self._halted = reason

    def snapshot(self) -> BudgetSnapshot:
        with self._lock:
            return BudgetSnapshot(
                self._queries, to_money(self._cost), self.max_queries, self.max_cost, self._exhausted, self._halted
            )

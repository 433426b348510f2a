"""The ledger: the one place an API job asks before each call and reports after it.

Every attempt of every worker goes through `reserve` -- the budget is charged (both the
invocation's and the run's limits), the call is written to the journal *before* it is sent,
and its start time is taken from the job's single rate limiter -- and through `answered`,
which journals the outcome before the worker may use it. A query answered already (before
a crash, or by a worker that was lost after answering) is not sent again: `reserve` hands
back the recorded answer instead. So after a kill at any moment the journal holds every call
that may have been billed, and a resume repeats only calls that were in flight.

Plain Python and thread-safe; `actors/api_actor.py` runs one per job in a Ray actor pinned
to the driver's node.
"""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Mapping
from typing import Any

from pipeline.apis.books.billing import billable
from pipeline.apis.books.budget import Budget, BudgetSnapshot
from pipeline.apis.books.journal import Journal
from pipeline.apis.books.querylog import OK, answer_record, sent_record
from pipeline.apis.ratelimit import RateLimiter
from pipeline.apis.query.retry import Permit
from pipeline.runs.fs import Location

QueryKey = tuple[int, str, int]  # (image id, phase, sample)


class Ledger:
    def __init__(
        self,
        run: str | Location,
        provider: str,
        budget: Budget,
        limiter: RateLimiter,
        answered: Mapping[QueryKey, Mapping[str, Any]] | None = None,
        invocation: str | None = None,
    ) -> None:
        self.provider = provider
        self.budget = budget
        self.limiter = limiter
        self.journal = Journal(run, invocation)
        self.invocation = self.journal.invocation
        self._answered: dict[QueryKey, dict[str, Any]] = {k: dict(v) for k, v in (answered or {}).items()}
        self._statuses: Counter[str] = Counter()
        self._billable = 0
        self._lock = threading.Lock()
        self._halted: tuple[str, str] | None = None

    def reserve(self, image_id: int, image_name: str, phase: str, sample: int, attempt: int, worker: str) -> Permit:
        """Permission for one call: journaled (durably) before this returns, with the start
        time the rate limiter grants it."""
        key = (int(image_id), phase, int(sample))
        with self._lock:
            if key in self._answered:
                return Permit("answered", answer=self._answered[key])
            if self._halted is not None:
                return Permit("stop", reason=self._halted[0])
        call = uuid.uuid4().hex
        if not self.budget.reserve(call):
            return Permit("stop", reason="budget")
        record = sent_record(call, self.invocation, self.provider, int(image_id), image_name, phase,
                             int(sample), attempt, worker)
        held = self.budget.held(call)  # a token-priced call: what it may cost, until answered
        if held is not None:
            record.update(reserved_tokens=held[0] + held[1], reserved_cost=held[2] / 1e9)
        self.journal.append(record)
        return Permit("send", call=call, start_at=self.limiter.slot(held[0] + held[1] if held else 0))

    def reslot(self) -> float:
        """A new start time for a call that could not start on time."""
        return self.limiter.slot()

    def answered(self, call: str, image_id: int, phase: str, sample: int, status: str,
                 **fields: Any) -> dict[str, Any]:
        """Journal a call's outcome (durably); returns the record. A token-priced call is
        charged its usage (`prompt_tokens`, `completion_tokens` in `fields`) here."""
        if self.budget.token_priced:
            billed = billable(self.provider, status)
            prompt, completion, cost = self.budget.settle(call, fields.pop("prompt_tokens", None),
                                                          fields.pop("completion_tokens", None), billed)
            fields.update(prompt_tokens=prompt, completion_tokens=completion, cost=cost)
        record = answer_record(call, self.provider, status, **fields)
        self.journal.append(record)
        self.limiter.feedback(throttled=status == "throttled")
        with self._lock:
            self._statuses[status] += 1
            self._billable += bool(record["billable"])
            if status == OK:
                self._answered.setdefault((int(image_id), phase, int(sample)), {
                    "image_id": int(image_id), "phase": phase, "sample": int(sample), **record})
        return record

    def halt(self, kind: str, message: str) -> None:
        """Refuse every further call (an authentication failure stops all workers)."""
        with self._lock:
            if self._halted is None:
                self._halted = (kind, message)
        self.budget.halt(kind)

    def snapshot(self) -> dict[str, Any]:
        """This invocation's figures: the budget's, and answers by status, billable calls."""
        budget: BudgetSnapshot = self.budget.snapshot()
        with self._lock:
            return {"budget": budget, "statuses": dict(self._statuses), "billable": self._billable,
                    "halted": self._halted}

    def close(self) -> None:
        self.journal.close()

"""The books of `certify-api`, written: the one place a job asks before each call and reports
after it -- the budget charged, the call journaled, its rate-limit slot given.

Every attempt of every worker goes through `Ledger.reserve` -- the budget is charged (both
the invocation's and the run's limits), the call is written to the journal *before* it is
sent, and its start time is taken from the job's single rate limiter -- and through
`Ledger.answered`, which journals the outcome before the worker may use it. A query answered
already (before a crash, or by a worker that was lost after answering) is not sent again:
`reserve` hands back the recorded answer instead. So after a kill at any moment the journal
holds every call that may have been billed, and a resume repeats only calls that were in
flight. One module because the budget, the journal and the billing rules are written by the
ledger alone, each call under one grant; `pipeline.apis.books.querylog` reads them back.

The budget: spending limits, every attempt reserved before it is sent so no limit can be
passed. Two levels: one invocation of the job (`max_queries`, `max_cost`) and the whole run,
every invocation and kill included (`run_max_queries`, `run_max_cost`; the run's earlier calls
come from its call journal, unconfirmed ones counted). Limits hold on *attempts*: a call counts
when it is sent, whatever the provider later bills. Money is counted in integer nano-units of
the price currency: a float running sum of $0.0015 steps would drift, and "spent <= max_cost"
must hold exactly. Token-priced calls (chat models) cost what their answer's `usage` says,
known only after the call. So each call reserves, before it is sent, the most it can cost --
the largest prompt seen so far in the run (a configured guess before the first answer) plus
the answer cap it is sent with -- and `settle` replaces the reservation by the real usage when
it returns. A limit is checked against what is settled plus every reservation still out, so
calls in flight can never spend past it; a call without a usage that may have been billed (a
garbled 200, a timeout, a kill) stays charged at its reservation.

The journal: money is spent per call, so the journal is the run's books. A call is written as
`sent` (with its query: image, phase, sample, attempt) *before* it leaves, and as `answer`
(status, labels, whether the provider bills it) when it returns; both are durable when the
writer is told so. Records are JSON lines in segments under RUN/journal/. Commits are grouped:
writers append to a buffer and wait, and one committer thread writes whatever has gathered in
one go -- on a local disk appended to the invocation's open segment and fsync'd, on object
storage (no appends there) as one new segment object per commit.

Billing: budgets hold on attempts; what the provider bills is fewer. The providers charge for
images they processed -- an answer, even one we could not parse -- and not for requests they
refused before processing: throttling, rejected credentials, rejected requests, their own 5xx
errors (AWS Rekognition, Google Cloud Vision, Azure AI Vision and Clarifai bill per processed
image; chat APIs bill the tokens of every completed answer, a refusal included, by the same
rules). A call whose outcome is unknown -- it timed out, or the job was killed while it was in
flight -- may have been processed, so it is counted as billed: the record errs towards the
provider's count, never below it.

Plain Python and thread-safe; `actors/api_sampler.py` runs one Ledger per job in a Ray actor
pinned to the driver's node.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from pipeline.apis.query import OK, Permit, RateLimiter
from pipeline.runs.fs import Location, StorageError

log = logging.getLogger("dsmooth")

# outcome status -> billed? (None = an unconfirmed call: sent, no answer recorded); the same
# for every provider
BILLED: dict[str | None, bool] = {
    "ok": True,
    "malformed": True,
    "timeout": True,
    None: True,
    "throttled": False,
    "auth": False,
    "rejected": False,
    "server_error": False,
    "error": True,  # an unknown failure: may have been processed
}


def billable(status: str | None) -> bool:
    return BILLED.get(status, True)


# -- the budget --------------------------------------------------------------------------------

NANO = 10**9


def per_call_nano(price_per_1000: float) -> int:
    """The price of one call in nano-units (price per 1,000 calls / 1,000)."""
    return int(round(price_per_1000 * NANO / 1000))


def to_money(nano: int) -> float:
    return nano / NANO


def per_token_nano(price_per_million: float) -> int:
    """The price of one token in nano-units."""
    return int(round(price_per_million * NANO / 1_000_000))


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
    tokens: int = 0  # tokens of this invocation (settled plus reserved for calls in flight)
    run_tokens: int = 0
    max_tokens: int | None = None
    run_max_tokens: int | None = None

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
        if self.max_tokens is not None:
            parts.append(f"{self.tokens}/{self.max_tokens} tokens")
        if self.run_max_tokens is not None:
            parts.append(f"run {self.run_tokens}/{self.run_max_tokens} tokens")
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
        max_tokens: int | None = None,
        run_max_tokens: int | None = None,
        token_prices: tuple[float, float] | None = None,
        answer_tokens: int = 0,
        prompt_tokens_guess: int = 1500,
        run_tokens_before: int = 0,
        run_cost_before: float = 0.0,
        prompt_tokens_seen: int = 0,
    ) -> None:
        """`token_prices` (USD per million prompt and completion tokens) makes calls token-priced:
        `answer_tokens` is the completion cap each call is sent with; `run_tokens_before` and
        `run_cost_before` the token spending of the run's earlier invocations (their unconfirmed
        calls at their reservations); `prompt_tokens_seen` the largest prompt they saw."""
        if all(v is None for v in (max_queries, max_cost, run_max_queries, run_max_cost, max_tokens, run_max_tokens)):
            raise ValueError("a budget needs at least one limit (max_queries, max_cost, max_tokens, run_max_*)")
        self.max_queries, self.max_cost = max_queries, max_cost
        self.run_max_queries, self.run_max_cost = run_max_queries, run_max_cost
        self._max_cost_nano, self._run_max_cost_nano = _nano_limit(max_cost), _nano_limit(run_max_cost)
        self._unit = per_call_nano(price_per_1000)
        self.max_tokens, self.run_max_tokens = max_tokens, run_max_tokens
        self.token_priced = token_prices is not None or max_tokens is not None or run_max_tokens is not None
        self._in_nano, self._out_nano = (per_token_nano(p) for p in (token_prices or (0.0, 0.0)))
        self._answer_tokens = int(answer_tokens)
        self._prompt_guess = int(prompt_tokens_guess)
        self._prompt_seen = int(prompt_tokens_seen)
        self._tokens_before, self._token_nano_before = int(run_tokens_before), int(round(run_cost_before * NANO))
        self._tokens = self._token_nano = 0  # settled, this invocation
        self._held: dict[str, tuple[int, int, int]] = {}  # call -> (prompt, answer tokens, nano) reserved
        self._queries = 0
        self._before = int(run_queries_before)
        self._exhausted: str | None = None
        self._halted: str | None = None
        self._lock = threading.Lock()

    def reserve(self, call: str | None = None) -> bool:
        """Take one attempt out of the budget; False (and nothing taken) when it would not fit
        a limit or when the job was halted. A token-priced call is held under `call` until
        `settle(call, ...)`."""
        with self._lock:
            if self._halted is not None:
                return False
            queries, run_queries = self._queries + 1, self._before + self._queries + 1
            prompt, answer = self._reservation() if self.token_priced else (0, 0)
            nano = prompt * self._in_nano + answer * self._out_nano
            tokens = self._tokens + self._tokens_held() + prompt + answer
            token_nano = self._token_nano + self._nano_held() + nano
            run_tokens, run_token_nano = self._tokens_before + tokens, self._token_nano_before + token_nano
            checks = (
                ("max_queries", self.max_queries is None or queries <= self.max_queries),
                ("max_cost", self._max_cost_nano is None or queries * self._unit + token_nano <= self._max_cost_nano),
                ("run_max_queries", self.run_max_queries is None or run_queries <= self.run_max_queries),
                ("run_max_cost", self._run_max_cost_nano is None
                 or run_queries * self._unit + run_token_nano <= self._run_max_cost_nano),
                ("max_tokens", self.max_tokens is None or tokens <= self.max_tokens),
                ("run_max_tokens", self.run_max_tokens is None or run_tokens <= self.run_max_tokens),
            )
            failed = [name for name, ok in checks if not ok]
            if failed:
                self._exhausted = self._exhausted or failed[0]
                return False
            self._queries += 1
            if self.token_priced:
                self._held[call or f"#{self._queries}"] = (prompt, answer, nano)
            return True

    def held(self, call: str) -> tuple[int, int, int] | None:
        """(prompt tokens, answer tokens, nano) reserved for `call` and not settled yet."""
        with self._lock:
            return self._held.get(call)

    def settle(self, call: str, prompt_tokens: int | None, completion_tokens: int | None,
               billed: bool = True) -> tuple[int, int, float]:
        """Replace `call`'s reservation by what it cost: its usage; nothing when not `billed`
        (throttled, refused); its reservation when billed without a usage. Returns (prompt
        tokens, completion tokens, cost) as charged."""
        with self._lock:
            prompt, answer, nano = self._held.pop(call, (0, 0, 0))
            if not billed:
                prompt = answer = nano = 0
            elif prompt_tokens is not None and completion_tokens is not None:
                prompt, answer = int(prompt_tokens), int(completion_tokens)
                nano = prompt * self._in_nano + answer * self._out_nano
                self._prompt_seen = max(self._prompt_seen, prompt)
            self._tokens += prompt + answer
            self._token_nano += nano
            return prompt, answer, to_money(nano)

    def _reservation(self) -> tuple[int, int]:
        return (self._prompt_seen or self._prompt_guess), self._answer_tokens

    def _tokens_held(self) -> int:
        return sum(p + a for p, a, _ in self._held.values())

    def _nano_held(self) -> int:
        return sum(n for _, _, n in self._held.values())

    def halt(self, reason: str) -> None:
        """Refuse every further reservation (an authentication failure stops all workers)."""
        with self._lock:
            if self._halted is None:
                self._halted = reason

    def snapshot(self) -> BudgetSnapshot:
        with self._lock:
            run = self._before + self._queries
            tokens, token_nano = self._tokens + self._tokens_held(), self._token_nano + self._nano_held()
            return BudgetSnapshot(
                self._queries, to_money(self._queries * self._unit + token_nano), run,
                to_money(run * self._unit + self._token_nano_before + token_nano),
                self.max_queries, self.max_cost, self.run_max_queries, self.run_max_cost,
                self._exhausted, self._halted, tokens, self._tokens_before + tokens,
                self.max_tokens, self.run_max_tokens,
            )


# -- the journal -------------------------------------------------------------------------------

JOURNAL_DIR = "journal"
SEGMENT_RECORDS = 20_000  # a local segment is closed (a new one started) after this many


class Journal:
    """Append-only, group-committed; `append(record, durable=True)` returns once on disk."""

    def __init__(self, run: str | Location, invocation: str | None = None, commit_every_s: float = 0.005) -> None:
        self.folder = Location.of(run) / JOURNAL_DIR
        self.invocation = invocation or uuid.uuid4().hex[:12]
        self.commit_every_s = commit_every_s
        self._cond = threading.Condition()
        self._buffer: list[dict[str, Any]] = []
        self._appended = 0
        self._committed = 0
        self._error: BaseException | None = None
        self._closed = False
        self._segment = 0
        self._in_segment = 0
        self._handle: Any = None
        self.folder.mkdir()
        self._thread = threading.Thread(target=self._committer, name="dsmooth-journal", daemon=True)
        self._thread.start()

    # -- writing ------------------------------------------------------------------------------

    def append(self, record: dict[str, Any], durable: bool = True) -> None:
        with self._cond:
            if self._error is not None:
                raise StorageError(f"the call journal cannot be written: {self._error}")
            if self._closed:
                raise StorageError("the call journal is closed")
            self._buffer.append(record)
            self._appended += 1
            mine = self._appended
            self._cond.notify_all()
            while durable and self._committed < mine and self._error is None:
                self._cond.wait()
            if durable and self._error is not None:
                raise StorageError(f"the call journal cannot be written: {self._error}")

    def close(self) -> None:
        """Commit what is buffered and stop the committer."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=60)
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def _committer(self) -> None:
        while True:
            with self._cond:
                while not self._buffer and not self._closed:
                    self._cond.wait()
                if not self._buffer and self._closed:
                    return
            # let concurrent writers join this commit (group commit)
            with self._cond:
                self._cond.wait(timeout=self.commit_every_s)
                batch, self._buffer = self._buffer, []
                upto = self._appended
            try:
                self._write(batch)
            except BaseException as error:  # noqa: BLE001 - every waiter must learn of it
                with self._cond:
                    self._error = error
                    self._cond.notify_all()
                log.error("the call journal cannot be written: %s", error)
                return
            with self._cond:
                self._committed = upto
                self._cond.notify_all()

    def _write(self, batch: list[dict[str, Any]]) -> None:
        data = "".join(json.dumps(record, separators=(",", ":"), default=str) + "\n" for record in batch).encode()
        if self.folder.is_local:
            if self._handle is None or self._in_segment >= SEGMENT_RECORDS:
                if self._handle is not None:
                    self._handle.close()
                self._segment += 1
                self._in_segment = 0
                path = self.folder.local_path / f"seg-{self.invocation}-{self._segment:06d}.jsonl"
                self._handle = open(path, "ab")  # noqa: SIM115 - kept open across commits
            self._handle.write(data)
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._in_segment += len(batch)
        else:
            self._segment += 1
            (self.folder / f"seg-{self.invocation}-{self._segment:06d}.jsonl").write_bytes(data)


def sent_record(call: str, invocation: str, provider: str, image_id: int, image_name: str, phase: str,
                sample: int, attempt: int, worker: str) -> dict[str, Any]:
    """The journal record written before a call leaves."""
    return {"k": "sent", "call": call, "invocation": invocation, "provider": provider, "image_id": image_id,
            "image_name": image_name, "phase": phase, "sample": sample, "attempt": attempt, "worker": worker,
            "sent_at": datetime.now(timezone.utc).isoformat()}


def answer_record(call: str, status: str, **fields: Any) -> dict[str, Any]:
    """The journal record of a call's outcome."""
    return {"k": "answer", "call": call, "status": status, "billable": billable(status),
            "answered_at": datetime.now(timezone.utc).isoformat(), **fields}


# -- the ledger --------------------------------------------------------------------------------

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
            billed = billable(status)
            prompt, completion, cost = self.budget.settle(call, fields.pop("prompt_tokens", None),
                                                          fields.pop("completion_tokens", None), billed)
            fields.update(prompt_tokens=prompt, completion_tokens=completion, cost=cost)
        record = answer_record(call, status, **fields)
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

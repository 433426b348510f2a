"""Spending limits: every attempt is reserved before it is sent, so no limit can be passed.

Two levels: one invocation of the job (`max_queries`, `max_cost`) and the whole run, every
invocation and kill included (`run_max_queries`, `run_max_cost`; the run's earlier calls come
from its call journal, unconfirmed ones counted). Limits hold on *attempts*: a call counts
when it is sent, whatever the provider later bills.

Money is counted in integer nano-units of the price currency: a float running sum of
$0.0015 steps would drift, and "spent <= max_cost" must hold exactly.

Token-priced calls (chat models) cost what their answer's `usage` says, known only after the
call. So each call reserves, before it is sent, the most it can cost -- the largest prompt
seen so far in the run (a configured guess before the first answer) plus the answer cap it
is sent with -- and `settle` replaces the reservation by the real usage when it returns. A
limit is checked against what is settled plus every reservation still out, so calls in
flight can never spend past it; a call without a usage that may have been billed (a garbled
200, a timeout, a kill) stays charged at its reservation.
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

    def reservation(self) -> tuple[int, int]:
        """(prompt, answer) tokens the next call would reserve."""
        with self._lock:
            return self._reservation()

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

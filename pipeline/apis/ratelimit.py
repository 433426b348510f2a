"""One rate limit for a whole job: never more than `qps` calls in any 1-second window on the
provider's clock.

Providers meter per account and per second; a burst of starts above the quota is answered
with 429s, and every retry of those is paid. So every attempt of every actor takes its start
time from the job's single limiter (it lives in the ledger actor) and two rules make the
guarantee hold at the provider, whatever the delays between processes:

- slots: the limiter hands out start times (wall clock, shared by the machines of a cluster)
  so that at most floor(qps) slots fall in any window of 1 s + LATE_S, and adjacent slots are
  1/rate apart;
- punctuality: a worker sends exactly at its slot, or within LATE_S after it; a worker that
  finds itself later than that (descheduled, a slow network hop) does not send but asks for
  a new slot. So sends in any 1-second window come from slots in a window of 1 s + LATE_S:
  at most floor(qps) of them.

What the provider meters is arrivals, not sends, so two more rules keep the guarantee on its
clock:

- the wait for the slot is the last thing before the request's bytes go out: the provider
  adapters call `before_send()` from inside the HTTP client (a requests adapter, botocore's
  before-send event), after the client library has encoded and signed the request, whose
  time on a loaded machine varies by hundreds of milliseconds;
- margin: slots leave MARGIN_S more room (floor(qps) per 1 s + LATE_S + MARGIN_S), for the
  part of a call's trip that still varies (the last bytes through the client, the network,
  the provider's accept queue). Two calls' trips may differ by up to MARGIN_S and the
  provider still counts at most floor(qps) arrivals in any 1-second window; the price is a
  ceiling of floor(qps) / (1 + LATE_S + MARGIN_S) calls per second when demand never stops.

The rate below that ceiling adapts, as botocore's "adaptive" retry mode does: each
throttling answer halves it (down to a tenth of qps), each success raises it again by a
twentieth of qps.

Chat APIs publish their limits per minute, in requests and in tokens: `requests_per_minute`
and `tokens_per_minute` add the same rule over 60-second windows (+ LATE_S + MARGIN_S), a
call counting the tokens it reserved (pipeline.apis.books.budget) -- never less than it uses.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable

LATE_S = 0.1  # how late after its slot a call may still start
MARGIN_S = 0.25  # how much two calls' trips (send -> the provider's clock) may differ


class RateLimiter:
    """Thread-safe slot scheduler; `slot()` returns a start time, it does not wait."""

    def __init__(self, qps: float, clock: Callable[[], float] = time.time, requests_per_minute: int | None = None,
                 tokens_per_minute: int | None = None) -> None:
        if qps <= 0:
            raise ValueError(f"qps must be positive, got {qps!r}")
        self.requests_per_minute, self.tokens_per_minute = requests_per_minute, tokens_per_minute
        self._minute: deque[tuple[float, int]] = deque()  # (start, tokens) of the last minute's slots
        self.qps = float(qps)
        self.rate = float(qps)
        self.per_window = max(1, math.floor(qps))  # slots per window_s + LATE_S + MARGIN_S
        self.window_s = 1.0 if qps >= 1 else 1.0 / qps
        self._clock = clock
        self._lock = threading.Lock()
        self._slots: deque[float] = deque()
        self._next = float("-inf")

    def slot(self, tokens: int = 0) -> float:
        """The next start time (on the wall clock `clock`) a call may take; `tokens` is what
        it reserved (counted against tokens_per_minute)."""
        with self._lock:
            start = max(self._clock(), self._next)
            span = self.window_s + LATE_S + MARGIN_S
            while self._slots and self._slots[0] <= start - span:
                self._slots.popleft()
            if len(self._slots) >= self.per_window:
                start = max(start, self._slots[-self.per_window] + span + 1e-6)
            start = self._per_minute(start, int(tokens))
            self._slots.append(start)
            self._next = start + 1.0 / self.rate
            return start

    def _per_minute(self, start: float, tokens: int) -> float:
        """The earliest start >= `start` at which the last minute's slots leave room for one
        more request of `tokens` tokens (slots are handed out in order, so the window only
        ever loses its oldest ones)."""
        if self.requests_per_minute is None and self.tokens_per_minute is None:
            return start
        if self.tokens_per_minute is not None and tokens > self.tokens_per_minute:
            raise ValueError(f"one call reserves {tokens} tokens, more than tokens_per_minute="
                             f"{self.tokens_per_minute}")
        span = 60.0 + LATE_S + MARGIN_S
        window = self._minute
        while True:
            while window and window[0][0] <= start - span:
                window.popleft()
            full = (self.requests_per_minute is not None and len(window) >= self.requests_per_minute) or (
                self.tokens_per_minute is not None and sum(t for _, t in window) + tokens > self.tokens_per_minute)
            if not full:
                window.append((start, tokens))
                return start
            start = window[0][0] + span + 1e-6

    def feedback(self, throttled: bool) -> None:
        """Slow down after a throttling answer, speed back up after a success."""
        with self._lock:
            if throttled:
                self.rate = max(self.qps / 10, self.rate / 2)
            else:
                self.rate = min(self.qps, self.rate + self.qps / 20)


def start_at(slot: float, reslot: Callable[[], float], clock: Callable[[], float] = time.time,
             sleep: Callable[[float], None] = time.sleep) -> float:
    """Wait for `slot` and return when the call may go; a start found more than LATE_S late
    asks `reslot()` for a new slot instead of sending late (which could crowd a window)."""
    while True:
        now = clock()
        if now < slot:
            sleep(slot - now)
            now = clock()
        if now <= slot + LATE_S:
            return now
        slot = reslot()


_pending = threading.local()


class SendGate:
    """Holds this thread's next request until its slot, at the last moment: the provider
    adapters call `before_send()` just before the bytes go out (see the module doc)."""

    def __init__(self, wait: Callable[[], object]) -> None:
        self._wait = wait
        self.released: float | None = None  # time.monotonic() when the request was let go

    def release(self) -> None:
        """Wait for the slot (once: a second send in the same call is not a new call)."""
        if self.released is None:
            self._wait()
            self.released = time.monotonic()

    def __enter__(self) -> SendGate:
        _pending.gate = self
        return self

    def __exit__(self, *exc: object) -> None:
        _pending.gate = None


def before_send() -> None:
    """Called by the provider adapters right before a request leaves: waits for the slot of
    the `SendGate` this thread is in, if any."""
    gate = getattr(_pending, "gate", None)
    if gate is not None:
        gate.release()

"""Client-side rate limiting: at most `qps` query starts per second, `concurrency` at once.

Providers throttle per account; staying under their limits costs less (and wastes less
budget on 429s) than bouncing off them. Starts are spaced evenly (no bursts), which is
what per-second quotas measure.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class RateLimiter:
    """Thread-safe; `with limiter.slot(): send()` blocks until a start is allowed."""

    def __init__(
        self,
        qps: float,
        concurrency: int,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if qps <= 0:
            raise ValueError(f"qps must be positive, got {qps!r}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency!r}")
        self.interval = 1.0 / qps
        self.concurrency = concurrency
        self._clock, self._sleep = clock, sleep
        self._slots = threading.BoundedSemaphore(concurrency)
        self._lock = threading.Lock()
        self._next_start = float("-inf")

    def _wait_for_start(self) -> None:
        with self._lock:
            now = self._clock()
            start = max(now, self._next_start)
            self._next_start = start + self.interval
        if start > now:
            self._sleep(start - now)

    @contextmanager
    def slot(self) -> Iterator[None]:
        self._slots.acquire()
        try:
            self._wait_for_start()
            yield
        finally:
            self._slots.release()

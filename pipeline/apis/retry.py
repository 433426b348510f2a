"""One query with retries: exponential back-off with full jitter, budget reserved per attempt.

Throttling, timeouts and 5xx are retried up to `max_attempts`; a malformed answer is final
(it was answered, and charged); authentication and other fatal errors end the query at
once and tell the caller to stop the job. The budget is asked before *every* attempt, so
the number of calls sent can never exceed it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pipeline.apis.config import RetrySettings
from pipeline.apis.errors import ApiError, FatalError, MalformedResponse, ThrottledError
from pipeline.apis.providers.base import Label, LabelClient
from pipeline.apis.ratelimit import RateLimiter
from pipeline.apis.secrets import describe

# Outcomes. DONE: ok, malformed. Not done (asked again by a later run): the rest.
OK, MALFORMED, FAILED, BUDGET, FATAL = "ok", "malformed", "failed", "budget", "fatal"


@dataclass
class QueryOutcome:
    status: str
    labels: list[Label] = field(default_factory=list)
    attempts: int = 0
    latency_s: float = 0.0
    elapsed_s: float = 0.0
    error: str | None = None
    fatal_kind: str | None = None  # "auth" | "rejected" when status == FATAL


def backoff_delay(attempt: int, settings: RetrySettings, rng: random.Random, floor_s: float | None = None) -> float:
    """Full jitter: uniform in [0, min(max_delay, base * 2**attempt)], at least `floor_s`
    (a provider's Retry-After), never above max_delay."""
    ceiling = min(settings.max_delay_s, settings.base_delay_s * (2**attempt))
    delay = rng.uniform(0.0, ceiling)
    if floor_s is not None:
        delay = max(delay, min(floor_s, settings.max_delay_s))
    return delay


def query_with_retries(
    client: LabelClient,
    image: bytes,
    reserve: Callable[[], bool],
    limiter: RateLimiter,
    settings: RetrySettings,
    rng: random.Random,
    sleep: Callable[[float], None] = time.sleep,
    stopped: Callable[[], bool] = lambda: False,
) -> QueryOutcome:
    """Ask `client` for labels of `image`; see the module doc for the rules."""
    started = time.monotonic()
    outcome = QueryOutcome(FAILED)
    for attempt in range(settings.max_attempts):
        if stopped() or not reserve():
            outcome.status = BUDGET
            break
        outcome.attempts += 1
        retry_after = None
        with limiter.slot():
            sent = time.monotonic()
            try:
                outcome.labels = client.labels(image)
                outcome.status, outcome.error = OK, None
            except MalformedResponse as error:
                outcome.status, outcome.error = MALFORMED, describe(error)
            except FatalError as error:
                outcome.status, outcome.error, outcome.fatal_kind = FATAL, describe(error), error.kind
            except ApiError as error:  # transient
                outcome.status, outcome.error = FAILED, describe(error)
                retry_after = error.retry_after_s if isinstance(error, ThrottledError) else None
            except Exception as error:  # noqa: BLE001 - an unknown failure: retried as transient
                outcome.status, outcome.error = FAILED, describe(error)
            outcome.latency_s = time.monotonic() - sent
        if outcome.status != FAILED:
            break
        if attempt + 1 < settings.max_attempts:
            sleep(backoff_delay(attempt, settings, rng, retry_after))
    outcome.elapsed_s = time.monotonic() - started
    return outcome

"""One query with retries: every attempt permitted (and journaled) first, back-off with jitter.

Throttling, timeouts, 5xx and *malformed answers* are retried up to `max_attempts`: a
garbled 200 tells nothing about the image, and counting it as a vote (or as an abstention)
would change the certificate. Authentication and other request rejections end the query at
once and tell the caller to stop the job. Each attempt asks `permit` first, which charges
the budget, journals the call and waits for the job's rate limit; a query answered already
(before a crash) comes back from there without a call.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from pipeline.apis.config import RetrySettings
from pipeline.apis.errors import ApiError, ThrottledError
from pipeline.apis.providers.base import Label, LabelClient
from pipeline.apis.ratelimit import SendGate, start_at
from pipeline.apis.secrets import describe

# Final states of a query. OK: answered. FAILED: every attempt failed (asked again by a
# later run). STOPPED: the budget or a halt stopped it. FATAL: the provider refused us.
OK, FAILED, STOPPED, FATAL = "ok", "failed", "stopped", "fatal"


@dataclass(frozen=True)
class Permit:
    """The ledger's answer to one attempt (`pipeline.apis.books.ledger`): `send` (with the
    call's id), `answered` (the recorded answer: do not send), or `stop`."""

    kind: str
    call: str | None = None
    answer: dict[str, Any] | None = None
    reason: str | None = None
    start_at: float | None = None  # the call's slot (wall clock); see pipeline.apis.ratelimit


@dataclass
class QueryOutcome:
    state: str
    labels: list[Label] = field(default_factory=list)
    top_label: str | None = None
    attempts: int = 0  # calls sent for it now
    status: str | None = None  # the last call's status
    latency_s: float = 0.0
    elapsed_s: float = 0.0
    error: str | None = None
    reason: str | None = None  # why it stopped ("budget", "auth", ...)
    reused: bool = False  # answered before: no call made


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
    permit: Callable[[int], Any],
    answered: Callable[..., Any],
    settings: RetrySettings,
    rng: random.Random,
    sleep: Callable[[float], None] = time.sleep,
    reslot: Callable[[], float] | None = None,
) -> QueryOutcome:
    """Ask `client` for labels of `image`; see the module doc for the rules.

    `permit(attempt)` returns a `Permit` (from the ledger); `answered(call, status, **fields)`
    journals each call's outcome; `reslot()` gives a new start time to a call found late."""
    from pipeline.apis.providers import top_label

    started = time.monotonic()
    outcome = QueryOutcome(FAILED)
    for attempt in range(1, settings.max_attempts + 1):
        grant = permit(attempt)
        if grant.kind == "answered":
            answer = grant.answer or {}
            outcome = QueryOutcome(OK, top_label=answer.get("top_label"), attempts=outcome.attempts,
                                   status="ok", reused=True)
            outcome.labels = [Label(n, float(s)) for n, s in zip(answer.get("labels") or [], answer.get("scores") or [])]
            break
        if grant.kind == "stop":
            outcome.state, outcome.reason = STOPPED, grant.reason
            break
        outcome.attempts += 1
        retry_after = None
        gate = None
        if grant.start_at is not None:  # the job-wide rate limit: start on the slot, or get a new one
            gate = SendGate(lambda slot=grant.start_at: start_at(slot, reslot or (lambda: time.time())))
            if not getattr(client, "gates_sends", False):
                gate.release()  # a client that does not call before_send(): wait before calling it
        sent = time.monotonic()
        extra: dict[str, Any] = {}  # what a client journals beside labels (a chat answer's usage...)
        try:
            with gate or nullcontext():
                labels = client.labels(image)
            status, error_text = "ok", None
            extra = dict(getattr(labels, "journal", None) or {})
        except ApiError as error:
            labels, status, error_text = [], error.kind, describe(error)  # the journal status: `errors`
            retry_after = error.retry_after_s if isinstance(error, ThrottledError) else None
        except Exception as error:  # noqa: BLE001 - an unknown failure: retried as transient
            labels, status, error_text = [], "error", describe(error)
        outcome.latency_s = time.monotonic() - (gate.released if gate and gate.released else sent)
        outcome.status, outcome.error = status, error_text
        best = top_label(labels) if status == "ok" else None
        answered(grant.call, status, top_label=best, labels=[label.name for label in labels],
                 scores=[label.score for label in labels], latency_s=outcome.latency_s, error=error_text, **extra)
        if status == "ok":
            outcome.state, outcome.labels, outcome.top_label = OK, labels, best
            break
        if status in ("auth", "rejected"):
            outcome.state, outcome.reason = FATAL, status
            break
        if attempt < settings.max_attempts:
            sleep(backoff_delay(attempt - 1, settings, rng, retry_after))
    outcome.elapsed_s = time.monotonic() - started
    return outcome

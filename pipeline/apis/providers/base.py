"""What every provider adapter returns, and what the adapters share: label parsing, the HTTP
status rules, and the send gate (`before_send`) each adapter calls at the last moment before a
request's bytes leave, so the job-wide rate limit (`pipeline.apis.query.RateLimiter`) holds on
the provider's clock. The gate is here, not beside the limiter, because it is the adapters'
side of that contract: an adapter knows when its bytes leave, not what the rate is."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from pipeline.apis.errors import (
    ApiError,
    AuthError,
    MalformedResponse,
    QueryTimeout,
    RequestRejected,
    ServerError,
    ThrottledError,
)
from pipeline.apis.secrets import scrub


@dataclass(frozen=True)
class Label:
    """One returned label; `score` in [0, 1] whatever the provider's own scale."""

    name: str
    score: float


class LabelClient(Protocol):
    """One provider's label detection, with no retries of its own (the job retries, so that
    every attempt is counted against the budget)."""

    provider: str
    # True when `labels` calls before_send() just before the request
    # leaves (so the rate-limit wait comes after encoding and signing); else the retry loop
    # waits before calling `labels`.
    gates_sends: bool

    def labels(self, image: bytes) -> list[Label]:
        """Labels for an encoded image, best first; raises pipeline.apis.errors.ApiError."""
        ...


def top_label(labels: Sequence[Label]) -> str | None:
    """The query's class: the highest score, the first returned on ties (as the paper)."""
    best: Label | None = None
    for label in labels:
        if best is None or label.score > best.score:
            best = label
    return None if best is None else best.name


def parse_labels(items: object, name_key: str, score_key: str, scale: float = 1.0, where: str = "") -> list[Label]:
    """Validate a provider's list of label objects; anything unexpected is malformed."""
    if not isinstance(items, list):
        raise MalformedResponse(f"{where}: expected a list of labels, got {type(items).__name__}")
    labels = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise MalformedResponse(f"{where}[{i}]: expected an object, got {type(item).__name__}")
        name, score = item.get(name_key), item.get(score_key, 0.0)
        if not isinstance(name, str) or not name:
            raise MalformedResponse(f"{where}[{i}].{name_key}: expected a non-empty string")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise MalformedResponse(f"{where}[{i}].{score_key}: expected a number")
        labels.append(Label(name, float(score) / scale))
    return labels


def error_for_status(
    status: int,
    message: str,
    retry_after: str | None = None,
    auth_statuses: Iterable[int] = (401, 403),
) -> ApiError:
    """The error class for a non-2xx HTTP status (used by the REST adapters)."""
    text = scrub(message)[:300]
    if status == 429:
        return ThrottledError(f"HTTP 429: {text}", _seconds(retry_after))
    if status in set(auth_statuses):
        return AuthError(f"HTTP {status}: {text}")
    if status in (408,):
        return QueryTimeout(f"HTTP {status}: {text}")
    if status >= 500:
        return ServerError(f"HTTP {status}: {text}")
    return RequestRejected(f"HTTP {status}: {text}")


def _seconds(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


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

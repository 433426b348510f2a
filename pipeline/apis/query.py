"""One query of `certify-api`, in an actor: the noisy image drawn, encoded and sent, at its
time, with retries -- and a work unit's queries run in parallel threads.

One module because these are the steps of one query, in order: drawing the noisy image,
encoding it and sending it (the worker); and deciding *when* it is sent -- the job-wide rate
limit's slot, the punctual start, the back-off after a failure. Plain Python (no Ray):
`actors/api_sampler.py` wraps one QueryWorker per Ray actor, and the job's ledger
(`pipeline.apis.books.ledger`) holds the one RateLimiter and grants every attempt.

- noisy images: sample k of a phase takes row k % chunk_size of noise chunk k // chunk_size,
  drawn by `pipeline.sampling.noise` from its address (seed, image id, phase, chunk) exactly as
  the local engine draws it: a resumed run re-creates the very same images, and any sample can
  be (re)queried alone.
- encoding: clipped to [0, 1], rounded to 8 bits, lossless PNG, so the API sees exactly the
  rounded pixels we certify about (JPEG would add its own, unmodelled, distortion).
- retries: throttling, timeouts, 5xx and *malformed answers* are retried up to `max_attempts`
  (a garbled 200 tells nothing about the image; counting it as a vote or an abstention would
  change the certificate); authentication and other rejections end the query at once and stop
  the job. Each attempt asks `permit` first (the ledger charges the budget, journals the call
  and gives its rate-limit slot); a query answered already (before a crash) comes back from
  there without a call.
- the rate limit: see `RateLimiter`.
"""

from __future__ import annotations

import io
import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from pipeline.apis.config import ApiSettings, RetrySettings
from pipeline.apis.errors import ApiError, FatalError, ThrottledError
from pipeline.apis.providers import make_client
from pipeline.apis.providers.base import Label, LabelClient, SendGate, top_label
from pipeline.apis.secrets import describe
from pipeline.sampling.noise import Chunk, chunk_noise
from pipeline.sampling.precision import DEFAULT_PRECISION, compute_dtype

# Final states of a query. OK: answered (also the journal status of an answered call). FAILED:
# every attempt failed (asked again by a later run). STOPPED: the budget or a halt stopped it.
# FATAL: the provider refused us.
OK, FAILED, STOPPED, FATAL = "ok", "failed", "stopped", "fatal"
CLEAN = "clean"  # the phase of an image's clean query (its label); its one sample is 0

PNG_COMPRESS_LEVEL = 1  # noise does not compress; spend no CPU trying
LATE_S = 0.1  # how late after its slot a call may still start
MARGIN_S = 0.25  # how much two calls' trips (send -> the provider's clock) may differ


@dataclass(frozen=True)
class WorkUnit:
    """What an actor runs: the not-yet-answered samples of one noise chunk of an image (its
    noise is drawn once and every query in it reuses the draw), or its clean query."""

    image_id: int
    phase: str
    samples: tuple[int, ...]  # sample indices within the phase
    chunk: Chunk | None = None  # None for the clean query
    rows: tuple[int, ...] = ()  # rows of `chunk` holding `samples`


# -- the image sent ----------------------------------------------------------------------------


@torch.inference_mode()
def noisy_images(
    image: torch.Tensor,
    chunk: Chunk,
    rows: Sequence[int],
    sigma: float,
    denoiser: nn.Module | None = None,
    batch_size: int = 8,
    precision: str = DEFAULT_PRECISION,
    noise: str = "gaussian",
) -> torch.Tensor:
    """[len(rows), C, H, W]: image + noise rows of `chunk` (a full noise address), through the
    denoiser when given, in `precision` (`pipeline.sampling.precision`; its output in fp32).

    Noise is always drawn on the CPU in fp32 (CPU and CUDA generators differ), then moved to the
    denoiser's device. The result is not clipped: encoding does that.
    """
    image = image.to("cpu", torch.float32)
    drawn = chunk_noise(chunk, tuple(image.shape), sigma, device="cpu", noise=noise)
    noisy = image.unsqueeze(0) + drawn[list(rows)]
    if denoiser is None:
        return noisy
    device = next(denoiser.parameters(), torch.empty(0)).device
    dtype = compute_dtype(precision, device)
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        parts = [denoiser(noisy[i : i + batch_size].to(device)).to("cpu", torch.float32)
                 for i in range(0, len(noisy), batch_size)]
    return torch.cat(parts)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """float [3, H, W] (any range) -> uint8 [H, W, 3]: clip to [0, 1], round to nearest."""
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"expected an image [C, H, W] with C = 1 or 3, got {tuple(image.shape)}")
    scaled = image.detach().to("cpu", torch.float32).clamp(0.0, 1.0).mul(255.0).round()
    return scaled.to(torch.uint8).permute(1, 2, 0).contiguous().numpy()


def encode_png(image: torch.Tensor) -> bytes:
    pixels = to_uint8(image)
    mode = "L" if pixels.shape[2] == 1 else "RGB"
    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode=mode).save(
        buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL
    )
    return buffer.getvalue()


# -- when it is sent: the job-wide rate limit --------------------------------------------------


class RateLimiter:
    """One rate limit for a whole job: never more than `qps` calls in any 1-second window on the
    provider's clock. Thread-safe slot scheduler; `slot()` returns a start time, it does not wait.

    Providers meter per account and per second; a burst of starts above the quota is answered
    with 429s, and every retry of those is paid. So every attempt of every actor takes its start
    time from the job's single limiter (it lives in the ledger actor) and two rules make the
    guarantee hold at the provider, whatever the delays between processes:

    - slots: the limiter hands out start times (wall clock, shared by the machines of a cluster)
      so that at most floor(qps) slots fall in any window of 1 s + LATE_S, and adjacent slots
      are 1/rate apart;
    - punctuality (`start_at`): a worker sends exactly at its slot, or within LATE_S after it;
      a worker that finds itself later than that (descheduled, a slow network hop) does not
      send but asks for a new slot. So sends in any 1-second window come from slots in a window
      of 1 s + LATE_S: at most floor(qps) of them.

    What the provider meters is arrivals, not sends, so two more rules keep the guarantee on
    its clock:

    - the wait for the slot is the last thing before the request's bytes go out: the provider
      adapters call `before_send()` (`pipeline.apis.providers.base`) from inside the HTTP
      client (a requests adapter, botocore's before-send event), after the client library has
      encoded and signed the request, whose time on a loaded machine varies by hundreds of ms;
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
    call counting the tokens it reserved (pipeline.apis.books.ledger.Budget) -- never less than
    it uses.
    """

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


# -- one query with retries --------------------------------------------------------------------


@dataclass(frozen=True)
class Permit:
    """The ledger's answer to one attempt (`pipeline.apis.books.ledger`): `send` (with the
    call's id), `answered` (the recorded answer: do not send), or `stop`."""

    kind: str
    call: str | None = None
    answer: dict[str, Any] | None = None
    reason: str | None = None
    start_at: float | None = None  # the call's slot (wall clock); see RateLimiter


@dataclass
class QueryOutcome:
    state: str
    labels: list[Label] = field(default_factory=list)
    top_label: str | None = None
    attempts: int = 0  # calls sent for it now
    status: str | None = None  # the last call's status
    latency_s: float = 0.0
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
    return outcome


# -- a work unit's queries, in parallel threads ------------------------------------------------

PermitOf = Callable[..., Any]  # (image_id, image_name, phase, sample, attempt, worker) -> Permit
Answered = Callable[..., Any]  # (call, image_id, phase, sample, status, **fields) -> record


@dataclass
class UnitResult:
    """One row per query of the unit that reached a final state, and why the unit stopped
    early, if it did: stop None (every query ran), "budget", or a fatal kind ("auth",
    "rejected", "error"); `message` is already scrubbed of secrets."""

    unit: WorkUnit
    rows: list[dict[str, Any]] = field(default_factory=list)
    stop: str | None = None
    message: str | None = None


@dataclass(frozen=True)
class QuerySettings:
    """How one worker queries: the provider, retries, its share of the job's concurrency, and
    how the noisy images are made (sigma, noise kind, the denoiser's precision). Made once by
    the job's sampler; the Ray actor passes it through unchanged."""

    api: ApiSettings
    retry: RetrySettings
    concurrency: int
    sigma: float
    name: str = "api-0"
    precision: str = "fp32"
    noise: str = "gaussian"  # the smoothing noise kind (pipeline.sampling.noise)


class QueryWorker:
    """Runs work units against one API client. Units may run in several threads at once; they
    share the client and the stop flag, so one authentication failure stops every thread before
    its next call. Every call is permitted, journaled and paced by the job's ledger (`permit` /
    `answered` callables), so limits and accounting hold across all actors of a job.

    The client is built here, once, in the querying process and from that process's environment
    (credentials never travel); a client that cannot be built (missing credentials...) is kept
    as the problem every unit reports."""

    def __init__(self, settings: QuerySettings, denoiser: nn.Module | None = None) -> None:
        self.settings = settings
        self.api, self.retry = settings.api, settings.retry
        self.sigma, self.precision, self.noise = settings.sigma, settings.precision, settings.noise
        self.denoiser = denoiser.eval() if denoiser is not None else None
        self.name = name = settings.name
        self._lock = threading.Lock()
        self._stopped: tuple[str, str] | None = None
        self._rng = random.Random(name)  # back-off jitter only; the noise comes from each unit's address
        self._pool = ThreadPoolExecutor(max_workers=settings.concurrency, thread_name_prefix=f"{name}-query")
        self.client: LabelClient | None = None
        self.problem: tuple[str, str] | None = None  # (kind, message) when no client can be built
        try:
            self.client = make_client(self.api, self.retry.timeout_s, pool_size=settings.concurrency)
        except FatalError as error:
            self.problem = error.kind, describe(error)
        except ApiError as error:
            self.problem = "rejected", describe(error)
        except Exception as error:  # noqa: BLE001 - reported, scrubbed
            self.problem = "error", describe(error)

    def stop(self, kind: str, message: str) -> None:
        with self._lock:
            if self._stopped is None:
                self._stopped = (kind, message)

    def images_for(self, unit: WorkUnit, image: torch.Tensor) -> list[torch.Tensor]:
        if unit.phase == CLEAN:
            return [image]
        return list(noisy_images(image, unit.chunk, unit.rows, self.sigma, self.denoiser, precision=self.precision,
                                 noise=self.noise))

    def run_unit(self, unit: WorkUnit, image: torch.Tensor, image_name: str, permit: PermitOf,
                 answered: Answered, reslot: Callable[[], float]) -> UnitResult:
        result = UnitResult(unit)
        if self.problem is not None:
            self.stop(*self.problem)
        if self._stopped is not None:
            result.stop, result.message = self._stopped
            return result
        try:
            images = self.images_for(unit, image)
        except Exception as error:  # noqa: BLE001 - e.g. a denoiser that does not fit the image
            result.stop, result.message = "error", describe(error)
            return result
        client = self.client
        with self._lock:
            seeds = [self._rng.random() for _ in unit.samples]

        def ask(sample: int, noisy: torch.Tensor, seed: float) -> Any:
            def grant(attempt: int) -> Any:
                if self._stopped is not None:
                    return Permit("stop", reason=self._stopped[0])
                return permit(unit.image_id, image_name, unit.phase, sample, attempt, self.name)

            def record(call: str, status: str, **fields: Any) -> Any:
                return answered(call, unit.image_id, unit.phase, sample, status, **fields)

            outcome = query_with_retries(client, encode_png(noisy), grant, record, self.retry, random.Random(seed),
                                         reslot=reslot)
            if outcome.state == FATAL:  # stop here, in the pool thread, before it takes the next query
                self.stop(outcome.reason or "error", outcome.error or "")
            return outcome

        # The pool is shared by every unit of this worker and serves in submission order,
        # so the queries of earlier images go first and images complete early.
        futures = [self._pool.submit(ask, s, x, seed) for s, x, seed in zip(unit.samples, images, seeds)]
        for sample, future in zip(unit.samples, futures):
            outcome = future.result()  # a FATAL one has stopped the worker already, in `ask`
            if outcome.state == STOPPED:
                if result.stop is None:
                    result.stop, result.message = outcome.reason or "budget", "budget exhausted"
                continue
            result.rows.append({
                "image_id": unit.image_id, "image_name": image_name, "phase": unit.phase, "sample": sample,
                "status": OK if outcome.state == OK else (outcome.status or "error"),
                "top_label": outcome.top_label,
                "labels": [label.name for label in outcome.labels],
                "scores": [label.score for label in outcome.labels],
                "attempts": outcome.attempts, "latency_s": outcome.latency_s, "error": outcome.error,
                "reused": outcome.reused,
            })
        if self._stopped is not None:
            result.stop, result.message = self._stopped
        return result

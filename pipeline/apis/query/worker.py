"""Runs work units against one API client: noise, denoiser, PNG, query, one row per query.

Plain Python (no Ray): `actors/api_actor.py` wraps one QueryWorker per Ray actor. Units
may run in several threads at once; they share the client and the stop flag, so one
authentication failure stops every thread before its next call. Every call is permitted,
journaled and paced by the job's ledger (`permit` / `answered` callables), so limits and
accounting hold across all actors of a job.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pipeline.apis.config import ApiSettings, RetrySettings
from pipeline.apis.query.encoding import encode_png
from pipeline.apis.errors import ApiError, FatalError
from pipeline.apis.query.units import CLEAN, WorkUnit
from pipeline.apis.providers import LabelClient, make_client
from pipeline.apis.query.retry import FATAL, OK, STOPPED, query_with_retries
from pipeline.apis.query.retry import Permit as Grant  # `Permit` here names the callable that gives one
from pipeline.apis.query.noisy_images import noisy_images
from pipeline.apis.secrets import describe

Permit = Callable[..., Any]  # (image_id, image_name, phase, sample, attempt, worker) -> Permit
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
    def __init__(self, settings: QuerySettings, denoiser: nn.Module | None = None) -> None:
        self.settings = settings
        self.api, self.retry = settings.api, settings.retry
        self.sigma, self.precision, self.noise = settings.sigma, settings.precision, settings.noise
        self.denoiser = denoiser.eval() if denoiser is not None else None
        self.name = name = settings.name
        self._concurrency = concurrency = settings.concurrency
        self._client: LabelClient | None = None
        self._lock = threading.Lock()
        self._stopped: tuple[str, str] | None = None
        self._rng = random.Random(name)  # back-off jitter only; the noise comes from each unit's address
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=f"{name}-query")

    def client(self) -> LabelClient:
        """Built on first use, in the querying process, from that process's environment."""
        with self._lock:
            if self._client is None:
                self._client = make_client(self.api, self.retry.timeout_s, pool_size=self._concurrency)
            return self._client

    def check(self) -> tuple[str, str] | None:
        """(kind, message) when no client can be built (missing credentials...), else None."""
        try:
            self.client()
        except FatalError as error:
            return error.kind, describe(error)
        except ApiError as error:
            return "rejected", describe(error)
        except Exception as error:  # noqa: BLE001 - reported, scrubbed
            return "error", describe(error)
        return None

    def stop(self, kind: str, message: str) -> None:
        with self._lock:
            if self._stopped is None:
                self._stopped = (kind, message)

    def images_for(self, unit: WorkUnit, image: torch.Tensor) -> list[torch.Tensor]:
        if unit.phase == CLEAN:
            return [image]
        return list(noisy_images(image, unit.chunk, unit.rows, self.sigma, self.denoiser, precision=self.precision,
                                 noise=self.noise))

    def run_unit(self, unit: WorkUnit, image: torch.Tensor, image_name: str, permit: Permit,
                 answered: Answered, reslot: Callable[[], float]) -> UnitResult:
        result = UnitResult(unit)
        problem = self.check()
        if problem is not None:
            self.stop(*problem)
        if self._stopped is not None:
            result.stop, result.message = self._stopped
            return result
        try:
            images = self.images_for(unit, image)
        except Exception as error:  # noqa: BLE001 - e.g. a denoiser that does not fit the image
            result.stop, result.message = "error", describe(error)
            return result
        client = self.client()
        with self._lock:
            seeds = [self._rng.random() for _ in unit.samples]

        def ask(sample: int, noisy: torch.Tensor, seed: float) -> Any:
            def grant(attempt: int) -> Any:
                if self._stopped is not None:
                    return Grant("stop", reason=self._stopped[0])
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

"""Runs work units against one API client: noise, denoiser, PNG, query, query-log rows.

Plain Python (no Ray): `actors/api_actor.py` wraps one QueryWorker per Ray actor. Units
may run in several threads at once; they share the client, the rate limiter and the
stop flag, so one authentication failure stops every thread before its next call.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import torch
from torch import nn

from pipeline.apis.config import ApiSettings, RetrySettings
from pipeline.apis.encoding import encode_png
from pipeline.apis.errors import ApiError, FatalError
from pipeline.apis.plan import CLEAN, WorkUnit
from pipeline.apis.providers import LabelClient, make_client, top_label
from pipeline.apis.querylog import FAILED
from pipeline.apis.ratelimit import RateLimiter
from pipeline.apis.retry import BUDGET, FATAL, query_with_retries
from pipeline.apis.sampling import noisy_images
from pipeline.apis.secrets import describe


@dataclass
class UnitResult:
    """Query-log rows of a unit (answered or given up) and why it stopped early, if it did.

    stop: None (every sample queried), "budget", or a fatal kind ("auth", "rejected",
    "error"); `message` is already scrubbed of secrets.
    """

    unit: WorkUnit
    rows: list[dict[str, Any]] = field(default_factory=list)
    stop: str | None = None
    message: str | None = None


class QueryWorker:
    def __init__(
        self,
        api: ApiSettings,
        retry: RetrySettings,
        qps: float,
        concurrency: int,
        price_per_1000: float,
        sigma: float,
        denoiser: nn.Module | None = None,
        name: str = "api-0",
    ) -> None:
        self.api, self.retry = api, retry
        self.limiter = RateLimiter(qps, concurrency)
        self.price_per_call = price_per_1000 / 1000.0
        self.sigma = sigma
        self.denoiser = denoiser.eval() if denoiser is not None else None
        self.name = name
        self._concurrency = concurrency
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
        return list(noisy_images(image, unit.chunk, unit.rows, self.sigma, self.denoiser))

    def run_unit(
        self, unit: WorkUnit, image: torch.Tensor, image_name: str, reserve: Callable[[], bool]
    ) -> UnitResult:
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

        def ask(noisy: torch.Tensor, seed: float) -> Any:
            return query_with_retries(
                client, encode_png(noisy), reserve, self.limiter, self.retry, random.Random(seed),
                stopped=lambda: self._stopped is not None,
            )

        # The pool is shared by every unit of this worker and serves in submission order,
        # so the queries of earlier images go first and images complete early.
        futures = [self._pool.submit(ask, noisy, seed) for noisy, seed in zip(images, seeds)]
        for sample, future in zip(unit.samples, futures):
            outcome = future.result()
            if outcome.attempts:
                result.rows.append(self._row(unit, sample, image_name, outcome))
            if outcome.status == FATAL:
                self.stop(outcome.fatal_kind or "error", outcome.error or "")
            if outcome.status in (BUDGET, FATAL) and result.stop is None:
                result.stop, result.message = ("budget", "budget exhausted")
        if self._stopped is not None and result.stop is not None:
            result.stop, result.message = self._stopped
        return result

    def _row(self, unit: WorkUnit, sample: int, image_name: str, outcome: Any) -> dict[str, Any]:
        status = outcome.status if outcome.status in ("ok", "malformed") else FAILED
        return {
            "provider": self.api.provider,
            "image_id": unit.image_id,
            "image_name": image_name,
            "phase": unit.phase,
            "sample": sample,
            "status": status,
            "top_label": top_label(outcome.labels) if status == "ok" else None,
            "labels": [label.name for label in outcome.labels] if status == "ok" else [],
            "scores": [label.score for label in outcome.labels] if status == "ok" else [],
            "attempts": outcome.attempts,
            "latency_s": outcome.latency_s,
            "elapsed_s": outcome.elapsed_s,
            "cost": outcome.attempts * self.price_per_call,
            "error": outcome.error,
            "worker": self.name,
            "finished_at": datetime.now(timezone.utc),
        }

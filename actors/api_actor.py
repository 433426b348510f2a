"""Ray actors for API certification: one per API client, and one budget shared by all.

Thin wrappers: the work is `pipeline.apis.worker.QueryWorker` and `pipeline.apis.budget`.
The API actor is threaded (max_concurrency = its share of the job's concurrency), so
several work units query at once under one rate limiter. Credentials are read by the
client inside the actor's process, from the environment the Ray workers inherited; they
are never task arguments, so they never enter Ray's object store or logs.
"""

from __future__ import annotations

from typing import Any

import ray
import torch
from torch import nn

from pipeline.apis.budget import Budget, BudgetSnapshot
from pipeline.apis.config import ApiSettings, RetrySettings
from pipeline.apis.plan import WorkUnit
from pipeline.apis.worker import QueryWorker, UnitResult


@ray.remote(num_cpus=0)
class BudgetActor:
    """The job's single budget: every attempt of every actor reserves here first."""

    def __init__(self, max_queries: int | None, max_cost: float | None, price_per_1000: float) -> None:
        self._budget = Budget(max_queries, max_cost, price_per_1000)

    def reserve(self) -> bool:
        return self._budget.reserve()

    def halt(self, reason: str) -> None:
        self._budget.halt(reason)

    def snapshot(self) -> BudgetSnapshot:
        return self._budget.snapshot()


@ray.remote
class ApiActor:
    """Queries one provider for work units; see pipeline.apis.worker."""

    def __init__(
        self,
        api: ApiSettings,
        retry: RetrySettings,
        qps: float,
        concurrency: int,
        price_per_1000: float,
        sigma: float,
        budget: Any,
        denoiser: nn.Module | None = None,
        name: str = "api-0",
    ) -> None:
        torch.set_num_threads(1)  # threads query in parallel; one BLAS thread each is plenty
        self._budget = budget
        self._worker = QueryWorker(api, retry, qps, concurrency, price_per_1000, sigma, denoiser, name)

    def _reserve(self) -> bool:
        return bool(ray.get(self._budget.reserve.remote()))

    def check(self) -> tuple[str, str] | None:
        """Build the client now: (kind, message) if credentials are missing or unusable."""
        return self._worker.check()

    def run_unit(self, unit: WorkUnit, image: torch.Tensor, image_name: str) -> UnitResult:
        try:
            result = self._worker.run_unit(unit, image, image_name, self._reserve)
        except Exception as error:  # noqa: BLE001 - never let Ray print an unscrubbed traceback
            from pipeline.apis.secrets import describe

            result = UnitResult(unit, stop="error", message=describe(error))
        if result.stop not in (None, "budget"):
            self._budget.halt.remote(result.stop)  # every other actor stops before its next call
        return result

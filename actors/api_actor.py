"""Ray actors for API certification: the job's ledger, and one actor per API client.

Thin wrappers: the work is `pipeline.apis.books.ledger.Ledger` and `pipeline.apis.query.worker.QueryWorker`.
The ledger actor is threaded (every call of every API actor asks it first and reports to it
after) and pinned to the driver's node, where the run directory is written; API actors find
it by name. An API actor is threaded too (max_concurrency = its share of the job's
concurrency). Credentials are read by the client inside the actor's process, from the
environment the Ray workers inherited; they are never task arguments, so they never enter
Ray's object store or logs. Constructor arguments are small plain values (names, hashes),
so a restarted actor never depends on objects that may be gone (ray-project/ray#53727).
"""

from __future__ import annotations

from typing import Any

import ray
import torch

from actors.blob_store import BlobKey, fetch_blob, on_driver_node
from pipeline.apis.books.budget import Budget
from pipeline.apis.books.ledger import Ledger
from pipeline.apis.query.retry import Permit
from pipeline.apis.query.units import WorkUnit
from pipeline.apis.ratelimit import RateLimiter
from pipeline.apis.query.worker import QuerySettings, QueryWorker, UnitResult


@ray.remote(num_cpus=0, max_restarts=0, max_concurrency=512)
class LedgerActor:
    def __init__(self, run: str, provider: str, budget: dict[str, Any], limits: dict[str, Any],
                 answered: dict, invocation: str) -> None:
        """`limits`: the RateLimiter's arguments (qps, requests_per_minute, tokens_per_minute)."""
        self._ledger = Ledger(run, provider, Budget(**budget), RateLimiter(**limits), answered, invocation)

    def reserve(self, *args: Any) -> Permit:
        return self._ledger.reserve(*args)

    def answered(self, *args: Any, **fields: Any) -> dict[str, Any]:
        return self._ledger.answered(*args, **fields)

    def reslot(self) -> float:
        return self._ledger.reslot()

    def halt(self, kind: str, message: str) -> None:
        self._ledger.halt(kind, message)

    def snapshot(self) -> dict[str, Any]:
        return self._ledger.snapshot()

    def close(self) -> None:
        self._ledger.close()


def start_ledger(name: str, run: str, provider: str, budget: dict[str, Any], limits: dict[str, Any],
                 answered: dict, invocation: str) -> Any:
    """The job's ledger, on the driver's node, found by API actors under `name`."""
    return LedgerActor.options(name=name, **on_driver_node()).remote(run, provider, budget, limits, answered,
                                                                      invocation)


@ray.remote
class ApiActor:
    """Queries one provider for work units; see pipeline.apis.query.worker."""

    def __init__(self, settings: QuerySettings, ledger: str, store: str | None = None,
                 denoiser: BlobKey | None = None) -> None:
        torch.set_num_threads(1)  # threads query in parallel; one BLAS thread each is plenty
        model = None
        if denoiser is not None:
            from pipeline.certify.pair import ModelBytes, load_from_bytes
            from pipeline.models import freeze

            model, meta = load_from_bytes(ModelBytes(denoiser.source, fetch_blob(store, denoiser)))
            if meta.sigma_independent:  # a diffusion model: the run's sigma picks its timestep
                model.set_sigma(settings.sigma)  # (checked when the job prepared the denoiser)
            model = freeze(model)
        self._ledger = ray.get_actor(ledger)
        self._worker = QueryWorker(settings, model)

    def describe(self) -> str:
        """The readiness ping: answers once the actor is built."""
        return self._worker.name

    def check(self) -> tuple[str, str] | None:
        """Build the client now: (kind, message) if credentials are missing or unusable."""
        return self._worker.check()

    def run_unit(self, unit: WorkUnit, image: torch.Tensor, image_name: str) -> UnitResult:
        def permit(*args: Any) -> Permit:
            return ray.get(self._ledger.reserve.remote(*args))

        def answered(*args: Any, **fields: Any) -> Any:
            return ray.get(self._ledger.answered.remote(*args, **fields))

        def reslot() -> float:
            return ray.get(self._ledger.reslot.remote())

        try:
            result = self._worker.run_unit(unit, image, image_name, permit, answered, reslot)
        except Exception as error:  # noqa: BLE001 - never let Ray print an unscrubbed traceback
            from pipeline.apis.secrets import describe

            result = UnitResult(unit, stop="error", message=describe(error))
        if result.stop not in (None, "budget"):
            self._ledger.halt.remote(result.stop, result.message or "")  # every other actor stops too
        return result

"""The API sampler of a `pipeline.certify.run.CertifyRun`, both sides of it: the driver's
`ApiSampler` (a pool of `ApiActor`s that ask a vision API the queries of each work item) and
the Ray actors it starts -- the job's `LedgerActor` (budget, rate limit, call journal) and
one `ApiActor` per client. One module because the driver side and the actors are one sampler,
written against each other (what a work item becomes, what a unit's result holds).

Driver: work items become query units (`pipeline.apis.query.WorkUnit`, one noise chunk's
unanswered queries each); answers are kept in the run's `QueryState`, and a work item is
finished when its answers are complete: an image's every query (fixed n), its clean query
(the label a sequential run tests), or one estimation chunk (sequential). Ray, the ledger, the
blob store and the pool are started on entry and stopped on exit.

Actors: thin wrappers of `pipeline.apis.books.ledger.Ledger` and
`pipeline.apis.query.QueryWorker`. The ledger actor is threaded (every call of every API actor
asks it first and reports to it after) and pinned to the driver's node, where the run
directory is written; API actors find it by name. An API actor is threaded too
(max_concurrency = its share of the job's concurrency). Credentials are read by the client,
made in the actor's constructor, inside the actor's process, from the environment the Ray
workers inherited; they are never task arguments, so they never enter Ray's object store or
logs. Constructor arguments are small plain values (names, hashes), so a restarted actor never
depends on objects that may be gone (ray-project/ray#53727).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import ray
import torch

from actors.driver_side import BlobKey, fetch_blob, on_driver_node
from pipeline.apis.books.ledger import Budget, Ledger
from pipeline.apis.query import (
    CLEAN,
    OK,
    Permit,
    QuerySettings,
    QueryWorker,
    RateLimiter,
    UnitResult,
    WorkUnit,
)
from pipeline.apis.run.modes import CLEAN_QUERIES, FIXED, SEQUENTIAL
from pipeline.apis.run.state import (
    chunk_answers,
    chunk_unit,
    chunk_vote_row,
    clean_label,
    label_votes,
)
from pipeline.certify.run import Finished, Item, RunContext, Work

log = logging.getLogger("dsmooth")


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
    """Queries one provider for work units; see pipeline.apis.query.QueryWorker."""

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


class ApiSampler:
    """See the module doc. `mode` says what a work item is: FIXED (all of an image's
    queries), CLEAN_QUERIES (its clean query) or SEQUENTIAL (estimation chunks); the same
    pool serves one mode after another (a sequential run asks the labels first)."""

    def __init__(self, context: RunContext, dataset: Any, state: Any, denoiser: Any, price: float, summary: Any,
                 address: str | None, invocation: str, test: Any = None) -> None:
        self.context, self.dataset, self.state, self.denoiser = context, dataset, state, denoiser
        self.config, self.price, self.summary, self.address = context.settings, price, summary, address
        self.invocation, self.test = invocation, test
        self.mode = FIXED
        self.row_of = {image_id: row for row, image_id in enumerate(context.image_ids)}
        self.refs: dict[int, Any] = {}  # image id -> its pixels in the object store, while its work is out
        self.open: dict[Work, set[Any]] = {}  # work -> keys of its units still out
        self.work_of: dict[Any, Work] = {}
        self.failed: set[int] = set()  # rows whose queries failed every retry (this invocation)
        self.stop_kind: str | None = None
        self.snapshot: dict[str, Any] = {}

    @property
    def stopped(self) -> bool:
        return self.stop_kind is not None

    # -- lifetime

    def __enter__(self) -> ApiSampler:
        from actors.driver_side import put_blob, start_blob_store
        from actors.pool import Demand, WorkPool
        from actors.ray_env import connect
        from pipeline.apis.books.querylog import spend

        config = self.config
        self.started_here = connect(self.address)
        rate = config.rate
        per_actor = max(1, rate.concurrency // rate.actors)
        ledger_name = f"dsmooth-ledger-{self.invocation}"
        before = spend(config.output)
        budget = {**config.budget.limits(), "price_per_1000": self.price, "run_queries_before": before.calls}
        if config.api.provider == "openai":  # money is tokens (pipeline.apis.books.ledger)
            from pipeline.apis.chat_settings import token_budget

            budget.update(token_budget(config, before, self.state))
        limits = {"qps": rate.qps, **rate.per_minute.model_dump()}
        self.ledger = start_ledger(ledger_name, str(config.output), config.api.provider, budget, limits,
                                   self.state.answered_map(), self.invocation)
        self.store, store_name, denoiser_key = None, None, None
        if self.denoiser is not None:
            self.store, store_name = start_blob_store()
            denoiser_key = put_blob(self.store, self.denoiser.data, self.denoiser.source)
        self.pool = WorkPool(
            lambda index: ApiActor.options(num_cpus=rate.actor_cpus, max_concurrency=per_actor + 2, max_restarts=2,
                                           max_task_retries=0).remote(
                QuerySettings(config.api, config.retry, per_actor, config.sigma, f"api-{index}", config.precision,
                              config.noise), ledger_name, store_name, denoiser_key),
            Demand(rate.actors, rate.actor_cpus, 0.0), per_actor=per_actor, wait_timeout_s=config.wait_timeout,
        )
        return self

    def __exit__(self, *_: Any) -> None:
        """Stop the actors; the invocation's calls, cost and retries from the ledger."""
        summary = self.summary
        self.pool.shutdown()
        try:
            final = ray.get(self.ledger.snapshot.remote(), timeout=60)
            ray.get(self.ledger.close.remote(), timeout=120)
            budget_now = final["budget"]
            summary.attempts, summary.cost, summary.billable = budget_now.queries, budget_now.cost, final["billable"]
            summary.tokens = budget_now.tokens
            summary.retried = {k: v for k, v in final["statuses"].items() if k != "ok"}
            summary.limits = budget_now.describe()
            if summary.status == "budget" or self.stop_kind == "budget":
                summary.message = f"budget spent: {budget_now.describe()}"
        finally:
            for actor in (self.ledger, self.store):
                if actor is not None:
                    ray.kill(actor)
            if self.started_here:
                ray.shutdown()

    def spent(self) -> str:
        """The progress line's cost part."""
        budget_now = self.snapshot.get("budget")
        if not budget_now:
            return "$0 spent"
        return f"${budget_now.cost:.4f} spent" + (f" of {budget_now.describe()}" if budget_now else "")

    # -- the Sampler protocol

    def read(self, row: int) -> Any:
        return self.dataset.load(row)

    def submit(self, work: Work, pixels: dict[int, Any]) -> tuple[list[Item], list[Finished]]:
        units = []
        if self.mode == FIXED:
            units = [u for row in work.rows for u in self.state.units(self.context.image_ids[row])]
        elif self.mode == CLEAN_QUERIES:
            units = [WorkUnit(self.context.image_ids[row], CLEAN, (0,)) for row in work.rows]
        else:
            (task,) = work.tasks
            unit = chunk_unit(self.test, self.config.seed, self.context.image_ids[task.row], task.chunk,
                              done=self._answers(task.row).keys())
            if unit is None:  # answered in full already (before a gap): nothing to send
                return [], [self._chunk(work)]
            units = [unit]
        if not units:
            return [], [Finished(work)]
        self.open[work] = set()
        items = []
        for unit in units:
            image_id = unit.image_id
            if image_id not in self.refs:
                self.refs[image_id] = ray.put(pixels[image_id])
            key = (image_id, unit.phase, unit.samples[0])
            self.open[work].add(key)
            self.work_of[key] = work
            name = self.context.records[self.row_of[image_id]].name
            items.append((key, lambda actor, u=unit, ref=self.refs[image_id], n=name: actor.run_unit.remote(u, ref, n)))
        return items, []

    def take(self, key: Any, result: Any) -> list[Finished]:
        summary = self.summary
        for row in result.rows:
            if row["status"] == OK and not row.get("reused"):
                summary.answered += 1
            elif row["status"] != OK:
                summary.failed += 1
        if result.stop is not None and self.stop_kind in (None, "budget"):
            self.stop_kind, summary.message = result.stop, result.message
            if result.stop != "budget":
                self.ledger.halt.remote(result.stop, result.message or "")
        work = self.work_of.pop(key)
        self.open[work].discard(key)
        last = not self.open[work]
        if last:
            del self.open[work]
        failed = any(r["status"] != OK for r in result.rows)
        completed = self.state.record(result.rows)
        if self.mode == FIXED:
            done = [Finished(Work((self.row_of[i],)), rows, worker="certify-api") for i, rows in completed]
        elif self.mode == CLEAN_QUERIES:
            if failed:
                self.failed.add(self.row_of[result.unit.image_id])
            done = [Finished(work)] if last else []
        else:
            done = [self._chunk(work, failed)]
        if last:
            for row in work.rows:
                if self.mode != SEQUENTIAL:
                    self.refs.pop(self.context.image_ids[row], None)
        return done

    def _answers(self, row: int) -> dict:
        return self.state.images[self.context.image_ids[row]].rows

    def _chunk(self, work: Work, failed: bool = False) -> Finished:
        """A sequential chunk back: its vote row and the votes for the clean answer, or held
        when a query of it has no answer (retries spent, or the budget)."""
        (task,) = work.tasks
        answers = self._answers(task.row)
        complete = chunk_answers(self.test, answers, task.chunk)
        if complete is None:
            if failed:
                self.failed.add(task.row)
            return Finished(work, held=True)
        row = chunk_vote_row(answers, complete, task.chunk, self.state.identity, self.state.run_id)
        return Finished(work, [row], [label_votes(complete, clean_label(answers))], worker="certify-api")

    def release(self, rows: list[int]) -> None:
        """Images decided: their pixels leave the object store."""
        for row in rows:
            self.refs.pop(self.context.image_ids[row], None)

    def lost(self, key: Any) -> Work | None:
        work = self.work_of.pop(key, None)
        if work is not None:
            self.open.get(work, set()).discard(key)
        return work

    def in_flight(self) -> tuple[int, int]:
        try:
            self.snapshot.update(ray.get(self.ledger.snapshot.remote(), timeout=5))
        except Exception:  # noqa: BLE001 - progress is best effort
            pass
        return 0, 0

    def drive(self, items: Iterator[Item | None], on_result: Any, on_lost: Any, tick: Any,
              settled: Any = None) -> None:
        """`settled` is not used: a query sent is paid, its answer is kept (the journal)."""
        from actors.pool import drive

        error = drive(self.pool, items, on_result, tick=tick)
        if error is not None:
            raise error
        if self.stop_kind is not None:
            self.summary.status = self.stop_kind

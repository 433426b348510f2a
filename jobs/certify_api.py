"""Certify a commercial vision API (AWS Rekognition, Google Cloud Vision, Azure AI Vision,
Clarifai) with denoised smoothing, under hard query and cost budgets.

For each image: one clean query (its label, as in Salman et al.), then n0 selection and n
estimation queries on noisy copies x + delta (through the optional local denoiser, sent
as lossless PNG). The class of a query is the API's top label. Every call is written to the
run's call journal before it is sent and when it is answered, each finished image's vote
counts to RUN_DIR/votes/, so `dsmooth reduce RUN_DIR` gives certificates at any alpha -- and
a rerun of the same command resumes exactly where the last one stopped (even after a kill):
answered queries are never asked again, only calls that were in flight are repeated.

Sequential (--sequential --radius R, or `sequential: true` in the YAML): after the clean query,
each image is asked estimation chunks (8 queries by default) one at a time, only while it is
undecided, and stops as soon as an anytime-valid test decides whether its clean answer is
certified at R (README, "Sequential certification"); n_max (default 240) caps the queries.

Budget: budget.max_queries / max_cost bound what ONE invocation may send, run_max_queries /
run_max_cost the whole run; every call attempt (retries included) is reserved before it is
sent, so no limit can be passed. The rate limit holds job-wide (never more than rate.qps
starts in any second), slowing down after throttling. Credentials come from each
provider's standard variables, never from the config: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY
(boto3's chain), GOOGLE_API_KEY or GOOGLE_APPLICATION_CREDENTIALS, VISION_KEY + VISION_ENDPOINT
(Azure), CLARIFAI_PAT.

exit status: 0 all images certified; 3 stopped early (budget spent, or queries with no valid
answer after every retry): rerun to resume; 4 the provider refused (credentials or requests);
2 bad config or input, or the run is held by another job.

examples:
  dsmooth api-emulator --port 8790 &          # a local stand-in for the four APIs
  dsmooth certify-api --config examples/certify_api_emulated.yaml
  dsmooth certify-api --config my.yaml --max-cost 5 --dry-run   # what is left, and its price
  dsmooth reduce runs/api-emulated-aws --alpha 0.001"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any, TextIO

log = logging.getLogger("dsmooth")

EXIT_CODES = {"planned": 0, "complete": 0, "budget": 3, "failed": 3, "auth": 4, "rejected": 4, "error": 4}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from jobs.options import add_settings_arguments
    from jobs.ray_env import add_ray_arguments
    from pipeline.apis.config import CertifyApiConfig

    parser.add_argument("--config", metavar="FILE.yaml",
                        help="job config (see examples/certify_api_emulated.yaml); options below override its keys")
    parser.add_argument("--dry-run", action="store_true", help="print what is left to query and its price; send nothing")
    add_settings_arguments(parser, CertifyApiConfig)
    add_ray_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from jobs.options import load_settings
    from pipeline.apis.config import CertifyApiConfig

    config = load_settings(CertifyApiConfig, args)
    summary = certify_api(config, address=args.address, dry_run=args.dry_run)
    return EXIT_CODES[summary.status]


def certify_api(config: Any, address: str | None = None, dry_run: bool = False, out: TextIO | None = None) -> Any:
    """Run (or resume) one API certification; returns its pipeline.apis.runstate.Summary."""
    from pipeline.apis.prepare import api_identity, load_denoiser, select_images
    from pipeline.apis.querylog import compact
    from pipeline.apis.runstate import RunState, Summary, format_summary
    from pipeline.runs.fs import Location
    from pipeline.runs.lock import exclusive_run
    from pipeline.runs.storage import open_run

    out = out or sys.stdout
    split, dataset = select_images(config)
    denoiser = None
    arch = sha = None
    if config.denoiser is not None:
        denoiser, arch, sha = load_denoiser(config.denoiser, config.sigma, dataset)
    identity, extra = api_identity(config, split, arch, sha)
    run_dir = Location.of(config.output)
    price = config.budget.price(config.api.provider)
    with exclusive_run(run_dir, "dsmooth certify-api") as lease:
        record = open_run(run_dir, identity, extra)
        compact(run_dir)  # the journals of earlier invocations (killed ones included) into the log
        state = RunState(run_dir, record, [(r.image_id, r.name) for r in dataset.records])
        state.write_missing_votes()
        summary = Summary("complete", config.api.provider, images_total=len(dataset), price_per_1000=price)
        if config.sequential:
            work: Any = _SequentialWork(config, dataset, state, record)
            if dry_run or work.finished():
                work.summarise(summary)
                _finish(summary, state, run_dir, price, work)
                summary.status = "planned" if dry_run else summary.status
                print(format_summary(summary, run_dir), file=out, flush=True)
                return summary
            log.info("certify-api [%s] sequential: %d images (%d decided), sigma=%s, R=%s, n_max=%d, chunks of %d, "
                     "denoiser=%s -> %s", config.api.provider, len(dataset), len(dataset) - work.undecided(),
                     config.sigma, config.radius, work.test.n_max, work.test.chunk_size, arch or "none", run_dir)
            invocation = uuid.uuid4().hex[:12]
            try:
                _dispatch(config, dataset, state, denoiser, price, summary, address, invocation, lease, work)
            finally:
                compact(run_dir)
                work.summarise(summary)
                _finish(summary, state, run_dir, price, work)
            print(format_summary(summary, run_dir), file=out, flush=True)
            return summary
        if dry_run or state.pending_queries() == 0:
            _finish(summary, state, run_dir, price)
            if dry_run:
                summary.status = "planned"
            print(format_summary(summary, run_dir), file=out, flush=True)
            return summary
        log.info("certify-api [%s]: %d images (%d already done), sigma=%s, n0=%d, n=%d, denoiser=%s, "
                 "%d queries to go -> %s", config.api.provider, len(dataset), len(state.complete()), config.sigma,
                 config.n0, config.n, arch or "none", state.pending_queries(), run_dir)
        invocation = uuid.uuid4().hex[:12]
        try:
            _dispatch(config, dataset, state, denoiser, price, summary, address, invocation, lease)
        finally:
            compact(run_dir)
            _finish(summary, state, run_dir, price)
    print(format_summary(summary, run_dir), file=out, flush=True)
    return summary


def _finish(summary: Any, state: Any, run_dir: Any, price: float, work: Any = None) -> None:
    from pipeline.apis.querylog import spend

    if work is None:  # fixed n; a sequential run's figures come from its certifier (`summarise`)
        summary.images_complete = len(state.complete())
        summary.images_incomplete = state.incomplete_after_retries()
        summary.pending_queries = state.pending_queries()
    summary.run = spend(run_dir)
    _write_spend_record(run_dir, price)
    if summary.status == "complete" and summary.pending_queries:
        summary.status = "failed"


def _write_spend_record(run_dir: Any, price: float) -> None:
    """RUN/spend.json: what each invocation sent and owes, recomputed from the journal (so an
    invocation that was killed appears too), never below what it recorded before."""
    from pipeline.apis.querylog import write_spend_record

    write_spend_record(run_dir, price)


def _dispatch(config: Any, dataset: Any, state: Any, denoiser: Any, price: float, summary: Any,
              address: str | None, invocation: str, lease: Any, work: Any = None) -> None:
    """Feed work units to the API actors through the shared pool; log what returns; stop
    cleanly on budget or auth."""
    import ray

    from actors.api_actor import ApiActor, start_ledger
    from actors.blob_store import put_blob, start_blob_store
    from actors.pool import Demand, WorkPool, drive
    from jobs.ray_env import connect
    from pipeline.apis.querylog import spend
    from pipeline.progress import Progress

    started_here = connect(address)
    rate = config.rate
    per_actor = max(1, rate.concurrency // rate.actors)
    ledger_name = f"dsmooth-ledger-{invocation}"
    budget = {**config.budget.limits(), "price_per_1000": price, "run_queries_before": spend(config.output).calls}
    ledger = start_ledger(ledger_name, str(config.output), config.api.provider, budget, rate.qps,
                          state.answered_map(), invocation)
    store, store_name, denoiser_key = None, None, None
    if denoiser is not None:
        store, store_name = start_blob_store()
        denoiser_key = put_blob(store, denoiser.data, denoiser.source)
    demand = Demand(rate.actors, rate.actor_cpus, 0.0)
    pool = WorkPool(
        lambda index: ApiActor.options(num_cpus=rate.actor_cpus, max_concurrency=per_actor + 2, max_restarts=2,
                                       max_task_retries=0).remote(
            config.api, config.retry, per_actor, config.sigma, ledger_name, store_name, denoiser_key, f"api-{index}"),
        demand, per_actor=per_actor, wait_timeout_s=config.wait_timeout,
    )
    if work is None:
        work = _FixedWork(dataset, state)
    snapshot: dict[str, Any] = {}

    def spent() -> str:
        budget_now = snapshot.get("budget")
        return f"${budget_now.cost:.4f} spent" + (f" of {budget_now.describe()}" if budget_now else "") \
            if budget_now else "$0 spent"

    progress = Progress("certify-api", work.total, unit="images", rate_unit="queries", extra=spent)
    stop: dict[str, Any] = {"kind": None}
    try:
        def on_result(_key: Any, result: Any) -> bool:
            finished = work.take(result)
            for row in result.rows:
                if row["status"] == "ok" and not row.get("reused"):
                    summary.answered += 1
                elif row["status"] != "ok":
                    summary.failed += 1
            progress.update(done=finished, work=sum(row["attempts"] for row in result.rows))
            if result.stop is not None and stop["kind"] in (None, "budget"):
                stop["kind"], summary.message = result.stop, result.message
                if result.stop != "budget":
                    ledger.halt.remote(result.stop, result.message or "")
            lease.check()
            return stop["kind"] is None

        def tick() -> None:
            try:
                snapshot.update(ray.get(ledger.snapshot.remote(), timeout=5))
            except Exception:  # noqa: BLE001 - progress is best effort
                pass
            progress.set(progress.done)

        error = drive(pool, work.items(), on_result, tick=tick)
        if error is not None:
            raise error
        if stop["kind"] is not None:
            summary.status = stop["kind"]
    finally:
        progress.close()
        pool.shutdown()
        try:
            final = ray.get(ledger.snapshot.remote(), timeout=60)
            ray.get(ledger.close.remote(), timeout=120)
            budget_now = final["budget"]
            summary.attempts, summary.cost, summary.billable = budget_now.queries, budget_now.cost, final["billable"]
            summary.retried = {k: v for k, v in final["statuses"].items() if k != "ok"}
            summary.limits = budget_now.describe()
            if summary.status == "budget" or stop["kind"] == "budget":
                summary.message = f"budget spent: {budget_now.describe()}"
        finally:
            for actor in (ledger, store):
                if actor is not None:
                    ray.kill(actor)
            if started_here:
                ray.shutdown()


class _FixedWork:
    """Fixed n: every query each unvoted image still needs; an image is done once voted."""

    def __init__(self, dataset: Any, state: Any) -> None:
        self.dataset, self.state = dataset, state
        self.todo = [(p, r) for p, r in enumerate(dataset.records) if not state.images[r.image_id].voted]
        self.total = len(self.todo)

    def items(self) -> Iterator[tuple[Any, Any]]:
        return _units(self.dataset, self.state, self.todo)

    def take(self, result: Any) -> int:
        return len(self.state.record(result.rows))


class _SequentialWork:
    """Sequential (`pipeline.apis.sequential`): the clean query of every image first (its
    label), then estimation chunks of undecided images only, one chunk per work unit and one
    in flight per image (growth 0: every query is paid, none is spent after a decision). A chunk
    counts once every query in it is answered (the answers are in the journal already); its
    vote row is written, then the certifier decides in chunk order. An image with a query
    that got no answer after every retry waits for the next invocation."""

    def __init__(self, config: Any, dataset: Any, state: Any, record: dict) -> None:
        from pipeline.stats.sequential import SequentialTest

        self.config, self.dataset, self.state, self.record = config, dataset, state, record
        self.test = SequentialTest.from_settings(config)
        self.image_ids = [r.image_id for r in dataset.records]
        self.row_of = {image_id: row for row, image_id in enumerate(self.image_ids)}
        self.total = len(self.image_ids)
        self.clean_in_flight = 0
        self.failed: set[int] = set()  # rows whose queries failed every retry (this invocation)
        self._restart()
        self._write_missing_rows()

    def _restart(self) -> None:
        """The certifier from every answer so far (`replay`), and its scheduler: one chunk in
        flight per undecided image (growth 0, nothing ahead), so no query is paid after a
        decision."""
        from pipeline.apis.sequential import api_certifier
        from pipeline.certify.schedule import ChunkScheduler

        self.certifier = api_certifier(self.test, [self._answers(row) for row in range(self.total)])
        self.scheduler = ChunkScheduler(self.certifier, growth=0.0, ahead=1)

    def _answers(self, row: int) -> dict:
        return self.state.images[self.image_ids[row]].rows

    def needs_clean(self, row: int) -> bool:
        from pipeline.apis.plan import CLEAN

        return (CLEAN, 0) not in self._answers(row)

    def undecided(self) -> int:
        """Images still to decide: those sampling, and those still waiting for their label."""
        import numpy as np

        return int(np.count_nonzero(self.certifier.decisions().needs_samples)) + sum(
            self.needs_clean(row) for row in range(self.total))

    def finished(self) -> bool:
        return self.undecided() == 0

    def _write_missing_rows(self) -> None:
        """Chunks answered in full whose vote rows are missing (a kill in between): write them."""
        from pipeline.apis.sequential import chunk_answers, chunk_vote_row, clean_label
        from pipeline.runs.storage import read_votes, write_votes

        stored = read_votes(self.state.run_dir)
        have = set(zip(stored["image_id"], stored["chunk"])) if not stored.empty else set()
        rows = []
        for row, image_id in enumerate(self.image_ids):
            answers = self._answers(row)
            if clean_label(answers) is None:
                continue
            for k in range(int(self.certifier.next_chunk["estimation"][row])):
                if (image_id, k) not in have:
                    chunk = chunk_answers(self.test, answers, k)
                    rows.append(chunk_vote_row(answers, chunk, k, self.state.identity, self.state.run_id))
        write_votes(self.state.run_dir, rows, worker="certify-api")

    def items(self) -> Iterator[tuple[Any, Any] | None]:
        import numpy as np
        import ray

        from pipeline.apis.plan import CLEAN, WorkUnit
        from pipeline.apis.sequential import chunk_unit

        refs: dict[int, Any] = {}

        def submit(row: int, unit: Any) -> tuple[Any, Any]:
            if row not in refs:
                refs[row] = ray.put(self.dataset.load(row))
            name = self.dataset.records[row].name
            return (unit.image_id, unit.phase, unit.samples[0]), \
                lambda actor, u=unit, ref=refs[row], n=name: actor.run_unit.remote(u, ref, n)

        clean = [row for row in range(self.total) if self.needs_clean(row)]
        for row in clean:
            self.clean_in_flight += 1
            yield submit(row, WorkUnit(self.image_ids[row], CLEAN, (0,)))
        while self.clean_in_flight:
            yield None
        if clean:  # the new labels: the certifier starts again from every answer (no chunk is new yet)
            self._restart()
        while not self.scheduler.finished:
            tasks = self.scheduler.next_chunks(1)
            if not tasks:
                yield None
                continue
            for task in tasks:
                unit = chunk_unit(self.test, self.config.seed, self.image_ids[task.row], task.chunk,
                                  done=self._answers(task.row).keys())
                if unit is None:  # answered in full already (before a gap): nothing to send
                    self._accept(task.row, task.chunk)
                else:
                    yield submit(task.row, unit)
            for row in np.nonzero(~self.certifier.decisions().needs_samples)[0].tolist():
                refs.pop(row, None)

    def take(self, result: Any) -> int:
        """A returned unit: keep its answers; a complete chunk goes to Parquet, then to the
        certifier. Returns the images this decided."""
        from pipeline.apis.plan import CLEAN
        from pipeline.apis.querylog import OK
        from pipeline.apis.sequential import chunk_answers

        self.state.record(result.rows)
        unit = result.unit
        row = self.row_of[unit.image_id]
        if unit.phase == CLEAN:
            self.clean_in_flight -= 1
            if any(r["status"] != OK for r in result.rows):
                self.failed.add(row)
            return 0
        if chunk_answers(self.test, self._answers(row), unit.chunk.index) is None:
            # a query without an answer (retries spent, or the budget): not in this invocation
            if any(r["status"] != OK for r in result.rows):
                self.failed.add(row)
            self.scheduler.hold([row])
            return 0
        return self._accept(row, unit.chunk.index)

    def _accept(self, row: int, chunk: int) -> int:
        """An answered chunk: its vote row to Parquet, then its votes to the certifier."""
        from pipeline.apis.sequential import chunk_answers, chunk_vote_row, clean_label, label_votes
        from pipeline.runs.storage import write_votes

        answers = self._answers(row)
        complete = chunk_answers(self.test, answers, chunk)
        write_votes(self.state.run_dir, [chunk_vote_row(answers, complete, chunk, self.state.identity,
                                                        self.state.run_id)], worker="certify-api")
        votes = label_votes(complete, clean_label(answers))
        return self.scheduler.accept("estimation", [row], [chunk], [len(complete)], [votes])

    def summarise(self, summary: Any) -> None:
        """The run's sequential figures for the summary (every invocation: from the answers)."""
        import numpy as np

        decisions = self.certifier.decisions()
        decided = ~decisions.needs_samples & np.array([not self.needs_clean(r) for r in range(self.total)], bool)
        summary.images_complete = int(decided.sum())
        summary.images_incomplete = sorted(self.image_ids[r] for r in self.failed if not decided[r])
        summary.pending_queries = 0
        summary.undecided = self.total - summary.images_complete
        summary.certified = int(decisions.certified[decided].sum())
        summary.radius = self.test.radius
        drawn = decisions.samples + decisions.unused_samples
        summary.queries_per_image = float((drawn[decided] + 1).mean()) if decided.any() else 0.0
        summary.fixed_queries = self.config.n0 + self.config.n + 1
        if summary.undecided and summary.status == "complete":
            summary.status = "failed"


def _units(dataset: Any, state: Any, todo: list[tuple[int, Any]]) -> Iterator[tuple[Any, Any]]:
    """(key, submit) for every query still to ask, image by image; an image's pixels are put
    in the object store once, while its units run."""
    import ray

    for position, record in todo:
        units = state.units(record.image_id)
        if not units:
            continue
        image_ref = ray.put(dataset.load(position))
        for unit in units:
            key = (unit.image_id, unit.phase, unit.samples[0])
            yield key, lambda actor, u=unit, ref=image_ref, name=record.name: actor.run_unit.remote(u, ref, name)

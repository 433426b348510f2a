"""Certify a commercial vision API (AWS Rekognition, Google Cloud Vision, Azure AI Vision,
Clarifai) with denoised smoothing, under hard query and cost budgets.

For each image: one clean query (its label, as in Salman et al.), then n0 selection and n
estimation queries on noisy copies x + delta (through the optional local denoiser, sent
as lossless PNG). The class of a query is the API's top label. Every query is written to
RUN_DIR/queries/ as it returns, each finished image's vote counts to RUN_DIR/votes/, so
`dsmooth reduce RUN_DIR` gives certificates at any alpha -- and a rerun of the same command
resumes exactly where the last one stopped, never asking a query twice.

Budget: budget.max_queries and/or budget.max_cost bound what ONE invocation may send;
every call attempt (retries included) is reserved before it is sent, so the limits cannot
be passed. Credentials come from each provider's standard variables, never from the
config: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (boto3's chain), GOOGLE_API_KEY or
GOOGLE_APPLICATION_CREDENTIALS, VISION_KEY + VISION_ENDPOINT (Azure), CLARIFAI_PAT.

exit status: 0 all images certified; 3 stopped early (budget spent, or queries that failed
after every retry): rerun to resume; 4 the provider refused (credentials or requests);
2 bad config or input.

examples:
  dsmooth api-emulator --port 8790 &          # a local stand-in for the four APIs
  dsmooth certify-api --config examples/certify_api_emulated.yaml
  dsmooth certify-api --config my.yaml --max-cost 5 --dry-run   # what is left, and its price
  dsmooth reduce runs/api-emulated-aws --alpha 0.001"""

from __future__ import annotations

import argparse
import sys
from collections import deque
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

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
    from pipeline.apis.querylog import compact_queries
    from pipeline.apis.runstate import RunState, Summary, format_summary, record_spending, run_lock, spending_totals
    from pipeline.storage import open_run

    out = out or sys.stdout
    started_at = datetime.now(timezone.utc)
    split, dataset = select_images(config)
    denoiser, arch, sha = (None, None, None)
    if config.denoiser is not None:
        denoiser, arch, sha = load_denoiser(config.denoiser, config.sigma, dataset)
    identity, extra = api_identity(config, split, arch, sha)
    run_dir = Path(config.output)
    record = open_run(run_dir, identity, extra)
    price = config.budget.price(config.api.provider)
    with run_lock(run_dir):
        compact_queries(run_dir)
        state = RunState(run_dir, record, [(r.image_id, r.name) for r in dataset.records])
        state.write_missing_votes()
        summary = Summary(
            "complete", config.api.provider, images_total=len(dataset), price_per_1000=price,
            max_queries=config.budget.max_queries, max_cost=config.budget.max_cost,
        )
        if dry_run or state.pending_queries() == 0:
            _finish(summary, state, run_dir)
            if dry_run:
                summary.status = "planned"
            print(format_summary(summary, run_dir), file=out, flush=True)
            return summary
        print(
            f"certify-api [{config.api.provider}]: {len(dataset)} images ({len(state.complete())} already done), "
            f"sigma={config.sigma}, n0={config.n0}, n={config.n}, denoiser={arch or 'none'}, "
            f"{state.pending_queries()} queries to go -> {run_dir}",
            file=out, flush=True,
        )
        try:
            _dispatch(config, dataset, state, denoiser, price, summary, address)
        finally:
            compact_queries(run_dir)
            _finish(summary, state, run_dir)
            record_spending(run_dir, summary, started_at)
        summary.total_attempts, summary.total_cost = spending_totals(run_dir)
    print(format_summary(summary, run_dir), file=out, flush=True)
    return summary


def _finish(summary: Any, state: Any, run_dir: Path) -> None:
    from pipeline.apis.runstate import spending_totals

    summary.images_complete = len(state.complete())
    summary.pending_queries = state.pending_queries()
    summary.total_attempts, summary.total_cost = spending_totals(run_dir)
    if summary.status == "complete" and summary.pending_queries:
        summary.status = "failed"


def _dispatch(config: Any, dataset: Any, state: Any, denoiser: Any, price: float, summary: Any, address: str | None) -> None:
    """Feed work units to the API actors, log what returns, stop cleanly on budget or auth."""
    import ray

    from actors.api_actor import ApiActor, BudgetActor
    from jobs.ray_env import connect
    from pipeline.progress import Progress

    connect(address)
    rate = config.rate
    per_actor = max(1, rate.concurrency // rate.actors)
    budget = BudgetActor.remote(config.budget.max_queries, config.budget.max_cost, price)
    denoiser_ref = ray.put(denoiser) if denoiser is not None else None
    actors = [
        ApiActor.options(num_cpus=rate.actor_cpus, max_concurrency=per_actor + 1).remote(
            config.api, config.retry, rate.qps / rate.actors, per_actor, price, config.sigma,
            budget, denoiser_ref, f"api-{i}",
        )
        for i in range(rate.actors)
    ]
    try:
        problems = [p for p in ray.get([a.check.remote() for a in actors]) if p is not None]
        if problems:
            summary.status, summary.message = problems[0]
            return
        todo = [(position, record) for position, record in enumerate(dataset.records) if not state.images[record.image_id].voted]
        progress = Progress("certify-api", len(todo), unit="images", rate_unit="queries")
        units = _units(dataset, state, todo)
        in_flight: dict[Any, tuple[int, Any]] = {}
        load = [0] * len(actors)
        image_refs: dict[int, list[Any]] = {}  # image id -> [object ref, units outstanding]
        limit = len(actors) * (per_actor + 1)
        stop: str | None = None
        while True:
            while stop is None and len(in_flight) < limit and units:
                unit, position, name = units.popleft()
                if unit.image_id not in image_refs:
                    image_refs[unit.image_id] = [ray.put(dataset.load(position)), 0]
                image_refs[unit.image_id][1] += 1
                index = min(range(len(actors)), key=load.__getitem__)
                load[index] += 1
                ref = actors[index].run_unit.remote(unit, image_refs[unit.image_id][0], name)
                in_flight[ref] = (index, unit)
            if not in_flight:
                break
            (ready,), _ = ray.wait(list(in_flight), num_returns=1)
            index, unit = in_flight.pop(ready)
            load[index] -= 1
            result = ray.get(ready)
            entry = image_refs[unit.image_id]
            entry[1] -= 1
            if entry[1] == 0:
                del image_refs[unit.image_id]
            finished = state.record(result.rows)
            _count(summary, result.rows)
            progress.update(done=len(finished), work=len(result.rows))
            if result.stop is not None and (stop is None or stop == "budget"):
                stop = result.stop
                summary.message = result.message
                if stop != "budget":
                    budget.halt.remote(stop)
        if stop is not None:
            summary.status = stop
        snapshot = ray.get(budget.snapshot.remote())
        summary.attempts, summary.cost = snapshot.queries, snapshot.cost
        if stop == "budget":
            summary.message = _budget_message(snapshot)
    finally:
        for actor in [*actors, budget]:
            ray.kill(actor)


def _units(dataset: Any, state: Any, todo: list[tuple[int, Any]]) -> deque:
    """(unit, dataset position, image name) for every query still to ask, image by image."""
    queue: deque = deque()
    for position, record in todo:
        for unit in state.units(record.image_id):
            queue.append((unit, position, record.name))
    return queue


def _count(summary: Any, rows: list[dict[str, Any]]) -> None:
    for row in rows:
        summary.attempts += int(row["attempts"])  # the budget actor's count replaces this at the end
        summary.cost += float(row["cost"])
        if row["status"] == "ok":
            summary.answered += 1
        elif row["status"] == "malformed":
            summary.malformed += 1
        else:
            summary.failed += 1


def _budget_message(snapshot: Any) -> str:
    parts = []
    if snapshot.max_queries is not None:
        parts.append(f"{snapshot.queries}/{snapshot.max_queries} queries")
    if snapshot.max_cost is not None:
        parts.append(f"${snapshot.cost:.4f}/${snapshot.max_cost:.4f}")
    return "budget spent: " + ", ".join(parts)

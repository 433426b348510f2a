"""Certify a commercial vision API (AWS Rekognition, Google Cloud Vision, Azure AI Vision,
Clarifai), or a vision-language model behind an OpenAI-compatible chat API (--provider openai:
OpenAI, or vLLM / llama.cpp / Ollama serving one locally; docs/guides/vlm-chat-apis.md), with
denoised smoothing, under hard query, cost and token budgets.

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
(Azure), CLARIFAI_PAT, OPENAI_API_KEY (or --openai-key-env VAR).

exit status: 0 every image finished (fixed n: all its queries answered) or decided
(sequential); 3 stopped early (budget spent, or queries with no valid answer after every
retry): rerun to resume; 4 the provider refused (credentials or requests);
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
import uuid
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

    from pipeline.runs.claim import claimed_output, claimed_run

    output = claimed_output(args)
    if output is None:  # no --output anywhere: the settings say so, in one line
        load_settings(CertifyApiConfig, args)
    with claimed_run(output, "dsmooth certify-api") as lease:  # before the settings' checks import scipy
        config = load_settings(CertifyApiConfig, args)
        summary = certify_api(config, address=args.address, dry_run=args.dry_run, lease=lease)
    return EXIT_CODES[summary.status]


def certify_api(config: Any, address: str | None = None, dry_run: bool = False, out: TextIO | None = None,
                lease: Any = None) -> Any:
    """Run (or resume) one API certification; returns its pipeline.apis.run.modes.Summary. The
    run's lock comes first: a second writer is refused before the images or the denoiser load."""
    from contextlib import nullcontext

    from pipeline.runs.claim import claimed_run

    with (nullcontext(lease) if lease is not None else claimed_run(config.output, "dsmooth certify-api")) as lease:
        summary = _certify_api(config, address, dry_run, lease)
    print(summary_text(summary, config.output), file=out or sys.stdout, flush=True)
    return summary


def summary_text(summary: Any, run_dir: Any) -> str:
    from pipeline.apis.run.modes import format_summary

    return format_summary(summary, run_dir)


def _certify_api(config: Any, address: str | None, dry_run: bool, lease: Any) -> Any:
    """Wire one `CertifyRun`: the API sampler with the fixed or the sequential schedule."""
    from pipeline.apis.run.prepare import api_identity, read_api_denoiser, select_images
    from pipeline.apis.books.querylog import compact
    from pipeline.apis.run.modes import FixedPlan, SequentialPlan, Summary
    from pipeline.apis.run.state import QueryState
    from pipeline.certify.run import RunContext

    split, dataset = select_images(config)
    denoiser = None
    arch = sha = None
    if config.denoiser is not None:
        denoiser, arch, sha = read_api_denoiser(config.denoiser, config.sigma, dataset, config.noise,
                                                config.allow_foreign_denoiser)
    identity, extra = api_identity(config, split, arch, sha)
    price = config.budget.price(config.api.provider)
    context = RunContext.open(config.output, identity, extra, dataset.records, lease, config)
    run_dir, record = context.output, context.record
    compact(run_dir)  # the journals of earlier invocations (killed ones included) into the log
    state = QueryState(run_dir, record, [(r.image_id, r.name) for r in dataset.records])
    state.write_missing_votes()
    summary = Summary("complete", config.api.provider, images_total=len(dataset), price_per_1000=price)
    plan = (SequentialPlan if config.sequential else FixedPlan)(config, context, state)
    if dry_run or plan.finished():
        plan.summarise(summary)
        _finish(summary, state, run_dir, price, plan)
        summary.status = "planned" if dry_run else summary.status
        return summary
    plan.announce(dataset, arch, run_dir)
    from actors.api_sampler import ApiSampler

    try:
        with ApiSampler(context, dataset, state, denoiser, price, summary, address, uuid.uuid4().hex[:12],
                        getattr(plan, "test", None)) as sampler:
            plan.run(sampler)
    finally:
        compact(run_dir)
        plan.progress.close()
        plan.summarise(summary)
        _finish(summary, state, run_dir, price, plan)
    return summary


def _finish(summary: Any, state: Any, run_dir: Any, price: float, plan: Any) -> None:
    """The run's totals (from the journal) and spend.json; queries left make it `failed`."""
    from pipeline.apis.books.querylog import spend

    summary.run = spend(run_dir)
    _write_spend_record(run_dir, price)
    if summary.status == "complete" and summary.pending_queries:
        summary.status = "failed"


def _write_spend_record(run_dir: Any, price: float) -> None:
    """RUN/spend.json: what each invocation sent and owes, recomputed from the journal (so an
    invocation that was killed appears too), never below what it recorded before."""
    from pipeline.apis.books.querylog import write_spend_record

    write_spend_record(run_dir, price)



"""Train denoisers (and classifiers) with Ray Train over a sweep of sigmas, objectives,
denoiser architectures and surrogate sets.

Each combination of the sweep is one Ray Train run (TorchTrainer, DDP over --num-workers
workers, a GPU each when the cluster has GPUs), launched as a Ray Tune trial: Tune runs as
many at once as --max-concurrent (default: as many as the cluster's CPUs or GPUs fit),
places them and restarts a trial whose process died. STAB+MSE runs start from the MSE
denoiser of the same sweep, so they go in a later stage (one Tuner per stage). Every epoch
is checkpointed to the storage path (a folder or s3://...): rerunning the same command
resumes an interrupted run from its last epoch and skips finished ones. One line per epoch
per run shows progress (--verbose adds Ray's and Tune's own output). Results per run land
in OUTPUT_DIR/<run name>/ (model.pt, metrics.json, grid.png), and a summary table in
OUTPUT_DIR/summary.{md,csv} (also printed). Exit status 1 when a run failed or was skipped.

examples:
  dsmooth train --config examples/train_cifar10_small.yaml
  dsmooth train --config sweep.yaml --dry-run                 # validate, print the runs
  dsmooth train --config sweep.yaml --address auto --num-workers 4 --storage-path s3://bucket/dsmooth
  dsmooth train --config sweep.yaml --sigmas 0.25 0.5 --epochs 10 --use-gpu true

Every option below is also a key of the YAML file (dataset options under `dataset:`, sweep
options under `sweep:`); given on the command line it overrides the file."""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from jobs.ray_env import add_ray_arguments
from pipeline.runs.fs import atomic_open

log = logging.getLogger("dsmooth.train")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from jobs.options import add_settings_arguments
    from pipeline.training.config import TrainConfig

    parser.add_argument("--config", required=True, metavar="FILE.yaml", help=(
        "the sweep to train (see examples/); options below override its keys"))
    parser.add_argument("--dry-run", action="store_true", help="validate the config and list its runs; train nothing")
    add_ray_arguments(parser)
    add_settings_arguments(parser, TrainConfig)


def load_settings(args: argparse.Namespace) -> Any:
    """TrainConfig from --config plus flags, paths resolved and files checked; errors name
    the field and its flag."""
    from jobs.options import flags, overrides
    from pipeline.config import ConfigError
    from pipeline.training.config import TrainConfig, load_train_config

    try:
        return load_train_config(args.config, overrides(args, TrainConfig))
    except ConfigError as error:
        raise error.with_flag(flags(TrainConfig).get(error.field)) from None


def run(args: argparse.Namespace) -> int:
    from pipeline.training.sweep import plan_sweep

    config = load_settings(args)
    runs = plan_sweep(config)
    if args.dry_run:
        for line in describe_plan(config, runs):
            print(line)
        return 0
    rows = train_sweep(config, runs, address=args.address)
    return 1 if any(r["status"] in ("failed", "skipped") for r in rows) else 0


def describe_plan(config: Any, runs: list[Any]) -> list[str]:
    """One line per run: name, what it trains, its stage and what it waits for, whether it is done."""
    from pipeline.training.sweep import finished, stages

    grouped = stages(runs)
    lines = [f"{len(runs)} run(s) in {len(grouped)} stage(s); outputs in {config.output_dir}, "
             f"checkpoints in {config.storage()}"]
    stage_of = {run.name: number for number, stage in enumerate(grouped, 1) for run in stage}
    for run in runs:
        done = finished(config.output_dir / run.name, run.hparams["epochs"]) is not None
        after = f", after {run.depends_on}" if run.depends_on else ""
        lines.append(
            f"  {run.name}: {run.task} {run.arch} {run.objective} sigma={run.sigma:g} "
            f"surrogates={run.surrogate_label} epochs={run.hparams['epochs']} stage {stage_of[run.name]}"
            f"{after}{' [done]' if done else ''}"
        )
    return lines


def _write_atomic(path: Path, data: bytes) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def _resolve_gpu(config: Any, resources: dict[str, float]) -> bool:
    from pipeline.config import ConfigError

    gpus = float(resources.get("GPU", 0))
    if config.use_gpu == "auto":
        return gpus >= 1
    if config.use_gpu and gpus < 1:
        raise ConfigError("use_gpu", "is true but the Ray cluster has no GPUs")
    return bool(config.use_gpu)


def _capacity(config: Any, resources: dict[str, float], use_gpu: bool) -> int:
    """Runs at once: the configured number, else as many as the cluster's CPUs (GPUs) fit.
    (A Tune trial that drives a Train run reserves no CPU, so Tune cannot see this limit.)"""
    if config.max_concurrent:
        return config.max_concurrent
    fits = math.floor(float(resources.get("CPU", 0)) / (config.num_workers * config.cpus_per_worker) + 1e-9)
    if use_gpu:
        fits = min(fits, int(float(resources.get("GPU", 0)) // config.num_workers))
    if fits < 1:
        log.warning("one run needs %d workers x %g CPU%s, more than the cluster has now; waiting for resources",
                    config.num_workers, config.cpus_per_worker, " + 1 GPU" if use_gpu else "")
    return max(1, fits)


def _row(
    run: Any, summary: dict[str, Any], status: str, wall_s: float | None, checkpoint: str | None,
    error: str | None = None,
) -> dict[str, Any]:
    base = {"name": run.name, "task": run.task, "sigma": run.sigma, "objective": run.objective,
            "surrogates": run.surrogate_label, "arch": run.arch, "epoch": 0, "epochs": run.hparams["epochs"]}
    return {**base, **summary, "status": status, "wall_s": wall_s, "checkpoint": checkpoint, "error": error}


def train_sweep(config: Any, runs: list[Any] | None = None, address: str | None = None) -> list[dict[str, Any]]:
    """Train every run of the sweep that is not finished yet; one summary row per run,
    also written to OUTPUT_DIR/summary.{md,csv} and printed (the command's result).

    Finished runs (OUTPUT_DIR/<name>/metrics.json complete, model.pt present) are reported
    from their files without starting Ray.
    """
    from pipeline.training.summary import format_table, write_summary
    from pipeline.training.sweep import MODEL_FILE, finished, plan_sweep

    runs = plan_sweep(config) if runs is None else runs
    rows: dict[str, dict[str, Any]] = {}
    pending = []
    for run in runs:
        done = finished(config.output_dir / run.name, run.hparams["epochs"])
        if done is not None:
            rows[run.name] = _row(run, done.get("summary", {}), "done before", done.get("wall_s"),
                                  str(config.output_dir / run.name / MODEL_FILE))
            log.info("%s: finished before, not retrained", run.name)
        else:
            pending.append(run)

    if pending:
        with _no_colour_unless_terminal():
            _train_pending(config, pending, rows, address)

    ordered = [rows[r.name] for r in runs if r.name in rows]
    write_summary(ordered, config.output_dir)
    print(format_table(ordered), end="", flush=True)
    return ordered


def _train_pending(config: Any, pending: list[Any], rows: dict[str, dict[str, Any]], address: str | None) -> None:
    """Train the pending runs stage by stage, one Ray Tune experiment per stage; a run whose
    dependency did not complete is not started ("skipped" after a failure, else "waiting")."""
    import ray

    from actors.train_runner import run_stage
    from jobs.logs import verbose
    from actors.ray_env import connect
    from pipeline.training.sweep import stages, worker_spec

    started_ray = connect(address)
    try:
        resources = ray.cluster_resources()
        use_gpu = _resolve_gpu(config, resources)
        capacity = _capacity(config, resources, use_gpu)
        settings = {"num_workers": config.num_workers, "cpus_per_worker": config.cpus_per_worker,
                    "use_gpu": use_gpu, "storage_path": config.storage(), "max_failures": config.max_failures}
        grouped = stages(pending)
        log.info("%d run(s) to train%s, up to %d at once, %d worker(s) each on %s; checkpoints in %s",
                 len(pending), f" in {len(grouped)} stages" if len(grouped) > 1 else "", capacity,
                 config.num_workers, "GPUs" if use_gpu else "CPUs", config.storage())
        numbering = itertools.count(1)
        for number, stage in enumerate(grouped, 1):
            ready = []
            for run in stage:
                blocker = rows.get(run.depends_on or "", {}).get("status")
                if run.depends_on and blocker not in ("complete", "done before"):
                    status = "skipped" if blocker in ("failed", "skipped") else "waiting"
                    rows[run.name] = _row(run, {}, status, None, None)
                    log.warning("%s: %s: it starts from %s, which did not finish", run.name, status, run.depends_on)
                else:
                    ready.append(run)
            if not ready:
                continue
            by_name = {run.name: run for run in ready}

            def on_end(name: str, final: dict[str, Any]) -> None:
                rows[name] = _collect(config, by_name[name], final)

            run_stage([run.name for run in ready], {run.name: worker_spec(config, run) for run in ready}, settings,
                      experiment=f"{config.name}.tune-stage{number}", max_concurrent=capacity, on_end=on_end,
                      numbering=numbering, total=len(pending), verbose=verbose())
    finally:
        if started_ray:
            ray.shutdown()


@contextmanager
def _no_colour_unless_terminal() -> Iterator[None]:
    """Ray colours the worker-log lines it forwards (--verbose) and its "[repeated Nx across
    cluster]" notes whatever the stream: no colour prefixes (RAY_COLOR_PREFIX=0), and the
    escape codes stripped (colorama) from stdout / stderr when they are not terminals."""
    import ray  # noqa: F401 - Ray puts its own copy of colorama on sys.path
    import colorama

    from actors.ray_env import no_colour_reset_at_exit

    if not sys.stderr.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    colorama.init()  # wraps only a stream that is not a terminal, to strip escape codes
    try:
        yield
    finally:
        colorama.deinit()
        no_colour_reset_at_exit()


def _collect(config: Any, run: Any, final: dict[str, Any]) -> dict[str, Any]:
    """A run's end: its files copied from its last checkpoint to OUTPUT_DIR/<name>/ (metrics.json
    last: it marks the run done), and its summary row."""
    from actors.train_runner import read_checkpoint_files
    from pipeline.training.sweep import METRICS_FILE, MODEL_FILE

    wall_s = final.get("wall_s")
    if final.get("status") != "trained":
        return _row(run, {}, "failed", wall_s, None, final.get("error"))
    try:
        files = read_checkpoint_files(config.storage(), final["checkpoint_path"])
        metrics = json.loads(files[METRICS_FILE])
    except Exception as error:  # noqa: BLE001 - a lost checkpoint fails this run, not the sweep
        message = f"cannot read its last checkpoint {final.get('checkpoint_path')}: {type(error).__name__}: {error}"
        log.error("%s: failed: %s", run.name, message)
        return _row(run, {}, "failed", wall_s, None, message)
    folder = config.output_dir / run.name
    metrics["wall_s"] = wall_s
    storage = config.storage()
    scheme = storage.split("://", 1)[0] + "://" if "://" in storage else ""
    metrics["storage_checkpoint"] = scheme + final["checkpoint_path"]  # where Ray Train keeps it
    for file_name, data in files.items():
        if file_name != METRICS_FILE:
            _write_atomic(folder / file_name, data)
    _write_atomic(folder / METRICS_FILE, json.dumps(metrics, indent=2).encode())  # last: the "done" marker
    checkpoint = str(folder / MODEL_FILE)
    if metrics.get("complete"):
        log.info("%s: complete in %.0fs -> %s", run.name, wall_s or 0.0, checkpoint)
        status = "complete"
    else:
        log.info("%s: stopped after epoch %d of %d (stop_after_epochs); rerun to resume", run.name,
                 int(metrics.get("epoch", 0)), int(run.hparams["epochs"]))
        status = "stopped"
    return _row(run, metrics.get("summary", {}), status, wall_s, checkpoint)

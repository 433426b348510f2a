"""Train denoisers (and classifiers) with Ray Train over a sweep of sigmas, objectives,
denoiser architectures and surrogate sets.

Each combination of the sweep is one Ray Train run (TorchTrainer, DDP over --num-workers
workers, a GPU each when the cluster has GPUs); runs go concurrently as the cluster's
resources allow, STAB+MSE runs after the MSE denoiser they start from. Every epoch is
checkpointed to the storage path (a folder or s3://...): rerunning the same command
resumes an interrupted run from its last epoch and skips finished ones. Results per run
land in OUTPUT_DIR/<run name>/ (model.pt, metrics.json, grid.png), and a summary table
in OUTPUT_DIR/summary.{md,csv}.

examples:
  dsmooth train --config examples/train_cifar10_small.yaml
  dsmooth train --config sweep.yaml --dry-run                 # validate, print the runs
  dsmooth train --config sweep.yaml --address auto --num-workers 4 --storage-path s3://bucket/dsmooth
  dsmooth train --config sweep.yaml --sigmas 0.25 0.5 --epochs 10 --use-gpu true

Every option below is also a key of the YAML file (dataset options under `dataset:`, sweep
options under `sweep:`); given on the command line it overrides the file."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jobs.ray_env import add_ray_arguments
from pipeline.atomic import atomic_open


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
    """One line per run: name, what it trains, what it waits for, whether it is done."""
    from pipeline.training.sweep import finished

    lines = [f"{len(runs)} run(s); outputs in {config.output_dir}, checkpoints in {config.storage()}"]
    for run in runs:
        done = finished(config.output_dir / run.name, run.hparams["epochs"]) is not None
        after = f", after {run.depends_on}" if run.depends_on else ""
        lines.append(
            f"  {run.name}: {run.task} {run.arch} {run.objective} sigma={run.sigma:g} "
            f"surrogates={run.surrogate_label} epochs={run.hparams['epochs']}{after}{' [done]' if done else ''}"
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


def _capacity(config: Any, resources: dict[str, float], use_gpu: bool, log: Callable[[str], None]) -> int:
    """Runs at once: the configured number, else as many as the cluster's CPUs (GPUs) fit."""
    if config.max_concurrent:
        return config.max_concurrent
    fits = math.floor(float(resources.get("CPU", 0)) / (config.num_workers * config.cpus_per_worker) + 1e-9)
    if use_gpu:
        fits = min(fits, int(float(resources.get("GPU", 0)) // config.num_workers))
    if fits < 1:
        log(f"[train] warning: one run needs {config.num_workers} workers x {config.cpus_per_worker} CPU"
            f"{' + 1 GPU' if use_gpu else ''}, more than the cluster has now; waiting for resources")
    return max(1, fits)


def _row(
    run: Any, summary: dict[str, Any], status: str, wall_s: float | None, checkpoint: str | None
) -> dict[str, Any]:
    base = {"name": run.name, "task": run.task, "sigma": run.sigma, "objective": run.objective,
            "surrogates": run.surrogate_label, "arch": run.arch, "epoch": 0, "epochs": run.hparams["epochs"]}
    return {**base, **summary, "status": status, "wall_s": wall_s, "checkpoint": checkpoint}


def train_sweep(
    config: Any,
    runs: list[Any] | None = None,
    address: str | None = None,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Train every run of the sweep that is not finished yet; one summary row per run.

    Finished runs (OUTPUT_DIR/<name>/metrics.json complete, model.pt present) are reported
    from their files without starting Ray.
    """
    from pipeline.training.summary import format_table, write_summary
    from pipeline.training.sweep import MODEL_FILE, finished, plan_sweep

    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    runs = plan_sweep(config) if runs is None else runs
    rows: dict[str, dict[str, Any]] = {}
    complete: set[str] = set()
    pending = []
    for run in runs:
        done = finished(config.output_dir / run.name, run.hparams["epochs"])
        if done is not None:
            rows[run.name] = _row(run, done.get("summary", {}), "done before", done.get("wall_s"),
                                  str(config.output_dir / run.name / MODEL_FILE))
            complete.add(run.name)
            log(f"[train] {run.name}: finished before, not retrained")
        else:
            pending.append(run)

    if pending:
        _train_pending(config, pending, rows, complete, address, log)

    ordered = [rows[r.name] for r in runs if r.name in rows]
    write_summary(ordered, config.output_dir)
    print(format_table(ordered), end="", flush=True)
    return ordered


def _train_pending(
    config: Any,
    pending: list[Any],
    rows: dict[str, dict[str, Any]],
    complete: set[str],
    address: str | None,
    log: Callable[[str], None],
) -> None:
    """Launch runs as capacity and dependencies allow; collect each result as it lands."""
    import ray

    from actors.train_runner import fit_run
    from jobs.ray_env import connect
    from pipeline.training.sweep import METRICS_FILE as metrics_file
    from pipeline.training.sweep import MODEL_FILE as model_file
    from pipeline.training.sweep import worker_spec

    connect(address)
    resources = ray.cluster_resources()
    use_gpu = _resolve_gpu(config, resources)
    capacity = _capacity(config, resources, use_gpu, log)
    settings = {"num_workers": config.num_workers, "cpus_per_worker": config.cpus_per_worker, "use_gpu": use_gpu,
                "storage_path": config.storage(), "max_failures": config.max_failures}
    total = len(pending)
    log(f"[train] {total} run(s) to train, up to {capacity} at once, {config.num_workers} worker(s) each"
        f"{' on GPUs' if use_gpu else ' on CPUs'}; checkpoints in {config.storage()}")
    running: dict[Any, tuple[Any, float]] = {}
    blocked: set[str] = set()  # runs that failed, stopped early or were skipped
    started_count = 0
    while pending or running:
        for run in list(pending):
            if run.depends_on and run.depends_on in blocked:
                pending.remove(run)
                blocked.add(run.name)
                status = "skipped" if rows.get(run.depends_on, {}).get("status") in ("failed", "skipped") else "waiting"
                rows[run.name] = _row(run, {}, status, None, None)
                log(f"[train] {run.name}: {status}: it starts from {run.depends_on}, which did not finish")
                continue
            if len(running) >= capacity or (run.depends_on and run.depends_on not in complete):
                continue
            pending.remove(run)
            started_count += 1
            log(f"[train] starting {started_count}/{total}: {run.name} ({run.objective}, {run.arch}, "
                f"sigma {run.sigma:g}, surrogates {run.surrogate_label})")
            running[fit_run.remote(worker_spec(config, run), settings)] = (run, time.monotonic())
        if not running:
            break
        ready, _ = ray.wait(list(running), num_returns=1)
        run, started = running.pop(ready[0])
        try:
            result = ray.get(ready[0])
        except Exception as error:  # noqa: BLE001 - the task itself died (node lost, OOM)
            result = {"status": "failed", "error": f"{type(error).__name__}: {error}"}
        wall_s = result.get("wall_s", time.monotonic() - started)
        status = result["status"]
        checkpoint = None
        if result.get("files"):
            folder = config.output_dir / run.name
            metrics = json.loads(result["files"][metrics_file])
            metrics["wall_s"] = wall_s
            metrics["storage_checkpoint"] = result.get("storage_checkpoint")
            for file_name, data in result["files"].items():
                if file_name != metrics_file:
                    _write_atomic(folder / file_name, data)
            _write_atomic(folder / metrics_file, json.dumps(metrics, indent=2).encode())  # last: the "done" marker
            checkpoint = str(folder / model_file)
        rows[run.name] = _row(run, result.get("summary", {}), status, wall_s, checkpoint)
        if status == "complete":
            complete.add(run.name)
            log(f"[train] {run.name}: complete in {wall_s:.0f}s -> {checkpoint}")
        else:
            blocked.add(run.name)
            detail = result.get("error") or "stopped early (stop_after_epochs); rerun to resume"
            log(f"[train] {run.name}: {status}: {detail}")

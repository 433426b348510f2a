"""One sweep run = one Ray Train TorchTrainer, launched from a Ray task.

Ray Train V2 (the default in Ray >= 2.5x) has no Tuner(trainer); its recommended way to
run several trainers at once is one TorchTrainer.fit() per Ray task. The task itself
needs no CPU (the trainer's workers hold the resources), and returns the final model,
metrics and grid as bytes, so the driver writes them wherever it runs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import ray

from pipeline.training.sweep import GRID_FILE, METRICS_FILE, MODEL_FILE


def scaling_config(settings: dict[str, Any]) -> Any:
    """Workers, CPUs (and one GPU each when use_gpu) per run."""
    from ray.train import ScalingConfig

    resources = {"CPU": float(settings["cpus_per_worker"])}
    if settings["use_gpu"]:
        resources["GPU"] = 1.0
    return ScalingConfig(
        num_workers=int(settings["num_workers"]), use_gpu=bool(settings["use_gpu"]), resources_per_worker=resources
    )


@ray.remote(num_cpus=0, max_retries=0)
def fit_run(spec: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """Train spec's run to completion (or to stop_after_epochs), resuming from its storage."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from actors.train_worker import train_loop_per_worker

    name = spec["run"]["name"]
    started = time.monotonic()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=spec,
        scaling_config=scaling_config(settings),
        run_config=RunConfig(
            name=name,
            storage_path=settings["storage_path"],
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=int(settings["max_failures"])),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as error:  # noqa: BLE001 - one failed run must not stop the sweep
        return {"name": name, "status": "failed", "error": f"{type(error).__name__}: {error}"[:4000],
                "wall_s": time.monotonic() - started}
    if result.checkpoint is None:
        return {"name": name, "status": "failed", "error": "the run reported no checkpoint",
                "wall_s": time.monotonic() - started}
    files: dict[str, bytes] = {}
    with result.checkpoint.as_directory() as folder:
        for file_name in (MODEL_FILE, METRICS_FILE, GRID_FILE):
            path = Path(folder) / file_name
            if path.is_file():
                files[file_name] = path.read_bytes()
    metrics = json.loads(files[METRICS_FILE])
    return {
        "name": name,
        "status": "complete" if metrics.get("complete") else "stopped",
        "summary": metrics.get("summary", {}),
        "files": files,
        "storage_checkpoint": result.checkpoint.path,
        "wall_s": time.monotonic() - started,
    }

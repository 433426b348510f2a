"""Ray Train's per-worker function: pipeline.training.loops.train_run with Ray's hooks.

Ray supplies the rank and device, DDP (prepare_model), the checkpoint to resume from
(get_checkpoint: the latest one this run reported, also after the whole job was killed
and restarted with the same run name and storage path) and the per-epoch report.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any


class _Stdout:
    """sys.stdout under another name: Ray Train V2 patches print() to also log every line
    (so each would show twice on the driver) unless the file is not sys.stdout itself."""

    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()


def train_loop_per_worker(spec: dict[str, Any]) -> None:
    """Entry point given to TorchTrainer; `spec` comes from pipeline.training.sweep.worker_spec."""
    import ray.train
    import ray.train.torch

    from pipeline.training.loops import WorkerHooks, train_run

    context = ray.train.get_context()
    checkpoint = ray.train.get_checkpoint()

    def report(metrics: dict[str, Any], folder: Path | None) -> None:
        saved = ray.train.Checkpoint.from_directory(str(folder)) if folder is not None else None
        ray.train.report(metrics, checkpoint=saved)

    with tempfile.TemporaryDirectory(prefix="dsmooth-restore-") as scratch:
        restore = Path(checkpoint.to_directory(str(Path(scratch) / "checkpoint"))) if checkpoint else None
        hooks = WorkerHooks(
            rank=context.get_world_rank(),
            world_size=context.get_world_size(),
            device=ray.train.torch.get_device(),
            wrap_model=ray.train.torch.prepare_model,
            report=report,
            restore_dir=restore,
            stream=_Stdout(),
        )
        train_run(spec, hooks)

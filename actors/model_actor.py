"""The Ray actor that holds one denoiser-classifier pair and counts votes for batches of images.

All the work is `pipeline.model_pair.PairCounter` (the batched, buffer-reusing,
inference-mode engine, mixed precision on GPU); the actor only decides the device, holds the
model between calls, and is created with Ray's fault tolerance: a crashed actor process is
restarted (`max_restarts`) and the call it was running is retried (`max_task_retries`), and
since every request carries its noise address (seed, image, phase, chunk) the retried
counts are identical.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import ray

from pipeline.data.specs import DataDescription
from pipeline.model_pair import ModelBytes, PairCounter, PairInfo
from pipeline.noise import SampleRequest


@ray.remote
class ModelActor:
    """One f∘D on one device (the GPU Ray assigned, else CPU)."""

    def __init__(
        self,
        name: str,
        classifier: ModelBytes,
        denoiser: ModelBytes | None,
        expected: PairInfo,
        data: DataDescription,
        settings: Mapping[str, Any],
        num_threads: int = 1,
    ) -> None:
        import torch

        use_gpu = bool(ray.get_gpu_ids()) and torch.cuda.is_available()
        device = "cuda" if use_gpu else "cpu"
        if not use_gpu:
            # One intra-op thread per CPU Ray gave us: more would fight the other actors.
            torch.set_num_threads(max(1, num_threads))
        self.counter = PairCounter(classifier, denoiser, expected, data, device=device, **dict(settings))
        self.worker = f"{name}@{socket.gethostname()}:{os.getpid()}/{device}"

    def describe(self) -> dict[str, Any]:
        """Who and where this actor is (also the readiness ping: it answers once loaded)."""
        return {"worker": self.worker, "device": str(self.counter.device), "pid": os.getpid()}

    def count(
        self, requests: Sequence[SampleRequest], images: Mapping[int, np.ndarray]
    ) -> tuple[np.ndarray, float, str]:
        """(counts [len(requests), classes], compute seconds, worker label) for uint8 images by id."""
        counts, seconds = self.counter.count(requests, images)
        return counts, seconds, self.worker


def start_model_actor(
    index: int,
    *,
    classifier_ref: ray.ObjectRef,
    denoiser_ref: ray.ObjectRef | None,
    expected: PairInfo,
    data: DataDescription,
    settings: Mapping[str, Any],
    num_cpus: float,
    num_gpus: float,
    max_restarts: int,
) -> Any:
    """A new ModelActor with Ray-level restarts and call retries."""
    return ModelActor.options(
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        max_restarts=max_restarts,
        max_task_retries=max_restarts,
    ).remote(
        f"actor-{index}",
        classifier_ref,
        denoiser_ref,
        expected,
        data,
        dict(settings),
        max(1, int(num_cpus)),
    )

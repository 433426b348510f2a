"""The Ray actor that holds one denoiser-classifier pair and counts votes for batches of images.

All the work is `pipeline.certify.pair.PairCounter` (the batched, buffer-reusing,
inference-mode engine, mixed precision on GPU); the actor only decides the device and holds
the model between calls. Ray restarts a crashed actor process (`max_restarts`); its
constructor takes only small plain arguments (the name of the job's `BlobStore` among them)
and fetches the checkpoint bytes from that store, so a restart never depends on objects that may be gone. Work lost with an actor
is resubmitted by `actors.pool.WorkPool`, and since every request carries its noise address
(seed, image, phase, chunk) the recomputed counts are identical.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

from actors.blob_store import BlobKey, fetch_blob
from actors.progress_counter import Reporter
from pipeline.data.specs import DataDescription
from pipeline.certify.pair import ModelBytes, PairInfo, PairSettings
from pipeline.sampling.noise import SampleRequest


@dataclass(frozen=True)
class PairLoad:
    """What a model actor loads, all small and plain (a restart fetches the bytes again): the
    job's `BlobStore` name, the two checkpoints' keys in it, the pair the driver checked, the
    data it must fit and how to run it."""

    store: str
    classifier: BlobKey
    denoiser: BlobKey | None
    expected: PairInfo
    data: DataDescription
    settings: PairSettings


@ray.remote
class ModelActor:
    """One f∘D on one device (the GPU Ray assigned, else CPU)."""

    def __init__(self, name: str, load: PairLoad, num_threads: int = 1) -> None:
        import torch

        use_gpu = bool(ray.get_gpu_ids()) and torch.cuda.is_available()
        device = "cuda" if use_gpu else "cpu"
        if not use_gpu:
            # One intra-op thread per CPU Ray gave us: more would fight the other actors.
            torch.set_num_threads(max(1, num_threads))
        f = ModelBytes(load.classifier.source, fetch_blob(load.store, load.classifier))
        d = (ModelBytes(load.denoiser.source, fetch_blob(load.store, load.denoiser))
             if load.denoiser is not None else None)
        self.counter = load.settings.counter(f, d, load.expected, load.data, device)
        self.worker = f"{name}@{socket.gethostname()}:{os.getpid()}/{device}"

    def describe(self) -> dict[str, Any]:
        """Who and where this actor is (also the readiness ping: it answers once loaded)."""
        return {"worker": self.worker, "device": str(self.counter.device), "pid": os.getpid(),
                "node": ray.get_runtime_context().get_node_id()}

    def count(
        self,
        requests: Sequence[SampleRequest],
        images: Mapping[int, np.ndarray],
        progress: Any = None,
        key: Any = None,
    ) -> tuple[np.ndarray, float, str]:
        """(counts [len(requests), classes], compute seconds, worker label) for uint8 images by
        id; each finished image is reported to the `progress` counter under `key`."""
        reporter = Reporter(progress, key)
        counts, seconds = self.counter.count(requests, images, on_image=lambda _, samples: reporter.add(1, samples))
        reporter.flush()
        return counts, seconds, self.worker


def start_model_actor(
    index: int,
    load: PairLoad,
    *,
    num_cpus: float,
    num_gpus: float,
    max_restarts: int,
    resources: Mapping[str, float] | None = None,
) -> Any:
    """A new ModelActor; Ray restarts its process, the pool resubmits its lost work."""
    return ModelActor.options(
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        resources=dict(resources or {}),
        max_restarts=max_restarts,
        max_task_retries=0,  # the pool resubmits lost work at once, to any ready actor
    ).remote(f"actor-{index}", load, max(1, int(num_cpus)))

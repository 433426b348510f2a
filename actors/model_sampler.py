"""The model sampler of a `pipeline.certify.run.CertifyRun`: the driver's side, a pool of
`ModelActor`s (one denoiser-classifier pair each) that counts the votes of each work item, and
that actor (below), so one file holds both ends of a model actor call.

Ray, the checkpoints in a blob store, the actors and a progress counter are started on
entry and stopped on exit; the run itself (what to draw, what to write) is Ray-free.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

from actors.driver_side import BlobKey, Reporter, fetch_blob
from pipeline.certify.pair import ModelBytes, PairInfo, PairSettings
from pipeline.certify.run import Finished, Item, RunContext, Work, raise_run_error, vote_rows_of
from pipeline.data.specs import DataDescription
from pipeline.sampling.noise import SampleRequest

log = logging.getLogger("dsmooth")


class ModelSampler:
    """Work items to model actors; counts back as `VoteRow`s (one per request)."""

    stopped = False

    def __init__(self, context: RunContext, selected: Any, classifier: Any, denoiser: Any, info: Any,
                 address: str | None, per_chunk: bool) -> None:
        self.context, self.selected, self.classifier, self.denoiser = context, selected, classifier, denoiser
        self.info, self.address, self.per_chunk = info, address, per_chunk
        self.config = context.settings
        self.pending: dict[int, Work] = {}
        self._key = 0
        self._last_poll = 0.0
        self._in_flight = (0, 0)
        self.rows = vote_rows_of(context, info, selected.classes, per_chunk)

    # -- lifetime

    def __enter__(self) -> ModelSampler:
        from actors.driver_side import put_blob, start_blob_store, start_progress_counter
        from actors.pool import PlacementError, WorkPool, placement_problem
        from actors.ray_env import connect

        config = self.config
        self.started_here = connect(self.address)
        self._actors: list[Any] = []
        try:
            self.demand = demand(config)
            problem, _ = placement_problem(self.demand)
            if problem and self.started_here:
                raise PlacementError(f"{problem} (set --gpus-per-actor / --cpus-per-actor, or give --address of a "
                                     "cluster)")
            store, store_name = start_blob_store()
            self._actors.append(store)
            classifier_key = put_blob(store, self.classifier.data, self.classifier.source)
            denoiser_key = put_blob(store, self.denoiser.data, self.denoiser.source) if self.denoiser else None
            self.counter = start_progress_counter()
            self._actors.append(self.counter)
            settings = config.pair_settings(self.classifier)
            load = PairLoad(store_name, classifier_key, denoiser_key, self.info, self.selected.describe(), settings)
            self.pool = WorkPool(
                lambda index: start_model_actor(index, load, num_cpus=self.demand.cpus, num_gpus=self.demand.gpus,
                                                max_restarts=config.max_restarts),
                self.demand,
                wait_timeout_s=config.wait_timeout,
            )
        except BaseException:
            self._stop_ray()
            raise
        return self

    def __exit__(self, *_: Any) -> None:
        try:
            self.pool.shutdown()
        finally:
            self._stop_ray()

    def _stop_ray(self) -> None:
        for actor in self._actors:
            ray.kill(actor)
        if self.started_here:
            ray.shutdown()

    @property
    def slots(self) -> int:
        """Work items the pool keeps out at once (actors x calls in flight per actor)."""
        return self.demand.actors * self.pool.per_actor

    # -- the Sampler protocol

    def read(self, row: int) -> Any:
        return self.selected.by_ids([self.context.records[row].image_id]).as_uint8()[0]

    def submit(self, work: Work, pixels: dict[int, Any]) -> tuple[list[Item], list[Finished]]:
        key, self._key = self._key, self._key + 1
        self.pending[key] = work
        requests, images = list(work.requests), ray.put(pixels)
        counter = None if self.per_chunk else self.counter  # per-image progress of fixed-n items
        return [(key, lambda actor, r=requests, ref=images: actor.count.remote(r, ref, counter, key))], []

    def take(self, key: Any, result: Any) -> list[Finished]:
        counts, compute_s, worker = result
        work = self.pending.pop(key)
        if not self.per_chunk:  # only fixed-n items report progress (one remote call less per chunk item)
            self.counter.forget.remote(key)
        rows = self.rows(work, counts, compute_s, worker)
        self._last_poll = 0.0  # the counter forgot this item: ask it again at the next tick
        return [Finished(work, rows, counts, worker=worker.split("@")[0])]

    def release(self, rows: list[int]) -> None:
        """Pixels travel with each item: nothing is held per image."""

    def lost(self, key: Any) -> Work | None:
        self.counter.forget.remote(key)
        return self.pending.pop(key, None)

    def in_flight(self) -> tuple[int, int]:
        """Images and samples finished inside items still running (the progress counter)."""
        import time

        now = time.monotonic()
        if not self.per_chunk and now - self._last_poll >= 1.0:
            self._last_poll = now
            try:
                self._in_flight = ray.get(self.counter.totals.remote(), timeout=5)
            except Exception:  # noqa: BLE001 - progress is best effort
                self._in_flight = (0, 0)
        return self._in_flight

    def drive(self, items: Iterator[Item | None], on_result: Any, on_lost: Any, tick: Any,
              settled: Any = None) -> None:
        from actors.pool import drive

        self.pool.on_requeue = lambda key: self.counter.forget.remote(key)
        raise_run_error(drive(self.pool, items, on_result, on_lost=on_lost, tick=tick, settled=settled))


def demand(config: Any) -> Any:
    """Actors and what each asks for, defaults from the cluster's resources."""
    from actors.pool import Demand

    resources = ray.cluster_resources()
    total_gpus, total_cpus = resources.get("GPU", 0.0), resources.get("CPU", 0.0)
    gpus = config.gpus_per_actor if config.gpus_per_actor is not None else (1.0 if total_gpus >= 1 else 0.0)
    cpus = config.cpus_per_actor
    if config.actors is not None:
        actors = config.actors
    elif gpus > 0:
        actors = max(1, int(total_gpus // gpus))
    else:
        actors = max(1, int(total_cpus // cpus))
    return Demand(actors, cpus, gpus)


# -- the actor: one denoiser-classifier pair, counting votes for batches of images -------------
#
# All the work is `pipeline.certify.pair.PairCounter` (the batched, buffer-reusing,
# inference-mode engine, mixed precision on GPU); the actor only decides the device and holds
# the model between calls. Ray restarts a crashed actor process (`max_restarts`); its
# constructor takes only small plain arguments (the name of the job's `BlobStore` among them)
# and fetches the checkpoint bytes from that store, so a restart never depends on objects that
# may be gone. Work lost with an actor is resubmitted by `actors.pool.WorkPool`, and since every
# request carries its noise address (seed, image, phase, chunk) the recomputed counts are
# identical.


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

"""The job's two small actors kept beside its driver (no CPU, pinned to the driver's node: if
that node goes, the job has gone with it anyway): the checkpoint bytes of actors that must
survive restarts, and the progress of work items still running.

**Blob store.** An actor restarted by Ray (`max_restarts`) is rebuilt from its constructor
arguments; if those live in the object store they can be lost or go out of scope, and the
restart fails (ray-project/ray#53727, which Ray warns about). So model actors get only small
plain arguments -- the store's name and the SHA-256 of what to load -- and fetch the bytes in
their constructor (even an actor handle as a constructor argument counts as an object-store
argument).

**Progress counter.** A work item (a shard of images, a unit of API queries) can run for
minutes; its results are written only when it returns. To show progress image by image,
actors report each finished image here (fire-and-forget, at most a few times a second), keyed
by item; the driver adds these in-flight figures to what is already written, and forgets an
item once it is written or lost (a lost item's images are done again elsewhere, so they must
not count twice).
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


@dataclass(frozen=True)
class BlobKey:
    """What an actor asks the store for: the content hash, and where it came from (messages)."""

    sha256: str
    source: str


@ray.remote(num_cpus=0, max_restarts=0)
class BlobStore:
    """Content-addressed bytes by SHA-256."""

    def __init__(self) -> None:
        self._blobs: dict[str, bytes] = {}

    def put(self, data: bytes) -> str:
        key = hashlib.sha256(data).hexdigest()
        self._blobs[key] = data
        return key

    def get(self, key: str) -> bytes:
        return self._blobs[key]


def on_driver_node(**options) -> dict:
    """Ray options pinning an actor to the node this driver runs on."""
    node = ray.get_runtime_context().get_node_id()
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node, soft=False), **options}


def start_named(actor_class, prefix: str, **options):
    """(handle, name) of a new actor pinned to the driver's node, found by others by name."""
    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    return actor_class.options(name=name, **on_driver_node(**options)).remote(), name


def start_blob_store() -> tuple[object, str]:
    return start_named(BlobStore, "dsmooth-blobs")


def put_blob(store, data: bytes, source: str) -> BlobKey:
    return BlobKey(ray.get(store.put.remote(data)), source)


def fetch_blob(store_name: str, key: BlobKey) -> bytes:
    """The bytes of `key`, checked against their hash (a store can only be wrong by a bug)."""
    data = ray.get(ray.get_actor(store_name).get.remote(key.sha256))
    if hashlib.sha256(data).hexdigest() != key.sha256:
        raise RuntimeError(f"{key.source}: the bytes received do not match their SHA-256")
    return data


# -- the progress counter ------------------------------------------------------------------------


@ray.remote(num_cpus=0, max_restarts=0)
class ProgressCounter:
    def __init__(self) -> None:
        self._items: dict[Hashable, tuple[int, int]] = {}

    def add(self, key: Hashable, images: int, work: int) -> None:
        done, samples = self._items.get(key, (0, 0))
        self._items[key] = (done + images, samples + work)

    def forget(self, key: Hashable) -> None:
        self._items.pop(key, None)

    def totals(self) -> tuple[int, int]:
        return sum(v[0] for v in self._items.values()), sum(v[1] for v in self._items.values())


def start_progress_counter() -> Any:
    return ProgressCounter.options(**on_driver_node()).remote()


class Reporter:
    """Batches an actor's reports for one item: sends at most every `every_s` seconds."""

    def __init__(self, counter: Any, key: Hashable, every_s: float = 0.5) -> None:
        self.counter, self.key, self.every_s = counter, key, every_s
        self._images = self._work = 0
        self._last = time.monotonic()

    def add(self, images: int, work: int) -> None:
        self._images += images
        self._work += work
        if time.monotonic() - self._last >= self.every_s:
            self.flush()

    def flush(self) -> None:
        if self.counter is not None and (self._images or self._work):
            self.counter.add.remote(self.key, self._images, self._work)
        self._images = self._work = 0
        self._last = time.monotonic()

"""Checkpoint bytes for actors that must survive restarts, kept beside the job's driver.

An actor restarted by Ray (`max_restarts`) is rebuilt from its constructor arguments; if
those live in the object store they can be lost or go out of scope, and the restart fails
(ray-project/ray#53727, which Ray warns about). So model actors get only small plain arguments --
the store's name and the SHA-256 of what to load -- and fetch the bytes in their constructor
(even an actor handle as a constructor argument counts as an object-store argument). The store holds no CPU and is pinned to the driver's node: if that node goes,
the job has gone with it anyway.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass

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

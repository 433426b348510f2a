"""Progress from inside running work items: images finished before their item returns.

A work item (a shard of images, a unit of API queries) can run for minutes; its results are
written only when it returns. To show progress image by image, actors report each finished
image here (fire-and-forget, at most a few times a second), keyed by item; the driver adds
these in-flight figures to what is already written, and forgets an item once it is written
or lost (a lost item's images are done again elsewhere, so they must not count twice).
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from typing import Any

import ray

from actors.blob_store import on_driver_node


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

"""The model sampler's work counted in this process, without Ray.

Why it exists: what a run draws, writes, resumes, skips and decides is the run's
(`CertifyRun`) and its schedule's, not Ray's. The same run driven by this sampler writes the
same vote rows as the pool of `ModelActor`s (every request carries its noise address, so
where a count is computed cannot change it), in one process and in milliseconds for a small
pair: `dsmooth.certify(..., in_process=True)` for a notebook or a debugger, and the test suite
for every rule that needs no cluster. What only Ray can show (placement, actor death, the
object store, job submission) stays with `actors.model_sampler.ModelSampler`.

`in_flight` items are kept taken from the schedule before the oldest is counted, as a pool
of actors keeps work queued, so a schedule is exercised with work outstanding.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
import time
from typing import Any

import numpy as np

from pipeline.certify.run import Finished, Item, RunContext, Work, raise_run_error
from pipeline.sampling.noise import SampleRequest

Count = Callable[[Sequence[SampleRequest], dict[int, np.ndarray]], np.ndarray]


class InProcessSampler:
    """The `Sampler` protocol in this process: `count(requests, images)` -> counts
    [len(requests), classes] (a `PairCounter`'s count, or any base classifier's)."""

    stopped = False

    def __init__(self, context: RunContext, read: Callable[[int], np.ndarray], count: Count,
                 rows: Callable[[Work, np.ndarray, float, str], list], in_flight: int = 2,
                 worker: str = "in-process") -> None:
        self.context, self._read, self._count, self._rows = context, read, count, rows
        self.in_flight_items, self.worker = max(1, in_flight), worker
        self.pending: dict[int, tuple[Work, dict[int, np.ndarray]]] = {}
        self._key = 0

    @property
    def slots(self) -> int:
        """Work items kept out at once (as `ModelSampler.slots`)."""
        return self.in_flight_items

    def read(self, row: int) -> np.ndarray:
        return self._read(row)

    def submit(self, work: Work, pixels: dict[int, Any]) -> tuple[list[Item], list[Finished]]:
        key, self._key = self._key, self._key + 1
        self.pending[key] = (work, dict(pixels))
        return [(key, None)], []

    def take(self, key: Any, result: Any) -> list[Finished]:
        work, _ = self.pending.pop(key)
        counts, seconds = result
        return [Finished(work, self._rows(work, counts, seconds, self.worker), counts, worker=self.worker)]

    def lost(self, key: Any) -> Work | None:
        entry = self.pending.pop(key, None)
        return entry[0] if entry else None

    def in_flight(self) -> tuple[int, int]:
        return 0, 0

    def release(self, rows: list[int]) -> None:
        """Pixels travel with each item: nothing is held per image."""

    def drive(self, items: Iterator[Item | None], on_result: Any, on_lost: Any, tick: Any,
              settled: Any = None) -> None:
        """As the actor pool drives (`actors.pool.drive`): on the first error -- an image that
        cannot be read, an item's own exception -- stop taking work, finish what was taken,
        then raise it (`raise_run_error`)."""
        queue: deque[Any] = deque()
        feeding, error = True, None
        while True:
            while feeding and error is None and len(queue) < self.in_flight_items:
                try:
                    item = next(items)
                except StopIteration:
                    feeding = False
                    break
                except Exception as failure:  # noqa: BLE001 - stop taking work, keep what was taken
                    error = failure
                    break
                if item is None:  # the schedule waits for a result
                    break
                queue.append(item[0])
            if not queue:
                if feeding and error is None:
                    raise RuntimeError("the schedule waits for a result but nothing is in flight")
                raise_run_error(error)
                return
            key = queue.popleft()
            work, pixels = self.pending[key]
            started = time.perf_counter()
            try:
                counts = np.asarray(self._count(list(work.requests), pixels))
            except Exception as failure:  # noqa: BLE001 - the item's own error ends the run
                on_lost(key)
                error = error or failure
                continue
            if on_result(key, (counts, time.perf_counter() - started)) is False:
                feeding = False
            if settled is not None and settled():  # what is queued can change no decision
                raise_run_error(error)
                return
            tick()

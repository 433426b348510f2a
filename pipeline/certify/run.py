"""One certification run: how one image is certified, for models and APIs alike.

A run is one context (the selection, the run record, the lease and the settings) driven by
two orthogonal parts:

- a *schedule* says what to draw next: `FixedSchedule` (every image's n0 + n samples, in
  shards) or `SequentialSchedule` (noise chunks of undecided images, decided in chunk order);
- a *sampler* turns that work into actor calls and their results into `VoteRow`s: a pool of
  model actors (`actors.model_sampler`) or of API actors (`actors.api_sampler`).

`CertifyRun` is the one driver between them, and the one place for what every run does:
read each image once, just in time, and skip (or stop at) an unreadable one before any of
its samples is drawn or paid; write each result's vote rows durably (lease checked) before
the schedule counts them; record skipped images in run.json; report progress. Models x APIs
x fixed x sequential are four pairings of a sampler and a schedule, not four drivers.

Plain Python: no Ray here (the samplers own the actors).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from typing import Any, Protocol

import numpy as np

from pipeline.certify.schedule import ChunkScheduler, ChunkTask
from pipeline.data.core import ImageRecord
from pipeline.runs.fs import Location
from pipeline.runs.storage import VoteRow
from pipeline.sampling.noise import SampleRequest

log = logging.getLogger("dsmooth")

Item = tuple[Any, Any]  # (key, submit): what the sampler's pool runs
MAX_UNSAVED_ROWS = 50_000  # a batched part is written at this many rows, whatever its age
# Model runs (benchmarks/scale.py measured them; docs/guides/cluster-sizing.md): votes written
# as at most one part per WRITE_EVERY_S seconds; a sequential item holds about
# `item_seconds(actors)` of an actor's work. DRIVER_CALLS_PER_S: the actor calls a second one
# driver is asked for at most, about a third of what it can answer (4-6 ms of CPU a call), so
# that results never wait for it: items grow with the pool. Not fewer: a sequential run's last
# images advance one item per round trip, and longer items leave the other GPUs waiting
# (64 simulated GPUs: 54 % busy at 30 calls/s, 82 % at 60).
WRITE_EVERY_S = 5.0
ITEM_SECONDS = 1.0
DRIVER_CALLS_PER_S = 60


def item_seconds(actors: int) -> tuple[float, float]:
    """(about, at least) seconds of an actor's work per sequential item for a pool of
    `actors`: at least actors / DRIVER_CALLS_PER_S, so the pool never asks the driver for
    more calls a second than that, even while work is spread thin."""
    least = actors / DRIVER_CALLS_PER_S
    return max(ITEM_SECONDS, 4 * least), least


# -- shards and chunks: how the images of a run are cut into work ------------------------------

@dataclass(frozen=True)
class Shard:
    """Images certified together by one actor call and written together as one Parquet part."""

    index: int
    records: tuple[ImageRecord, ...]

    @property
    def image_ids(self) -> list[int]:
        return [r.image_id for r in self.records]


def plan_shards(records: Sequence[ImageRecord], shard_size: int, actors: int = 0) -> list[Shard]:
    """Cut the images still to do into shards of `shard_size`, in data-set order.

    With `actors` (a pool of that many, sizing the shards itself), the shards taper at the end:
    each is at most 1/(2 x actors) of the images still unassigned, down to one image (guided
    self-scheduling, "factoring"), so the run does not end on a last round of full shards that
    keeps most actors idle (100 shards on 16 actors: a seventh round with 4 busy)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    shards, start = [], 0
    while start < len(records):
        left = len(records) - start
        size = min(shard_size, max(1, -(-left // (2 * actors)))) if actors > 0 else shard_size
        shards.append(Shard(len(shards), tuple(records[start : start + size])))
        start += size
    return shards


def chunk_requests(seed: int, image_ids: Sequence[int], tasks: Sequence[Any], chunk_size: int,
                   first_chunks: tuple[int, ...] = ()) -> list[SampleRequest]:
    """One one-chunk SampleRequest per `pipeline.certify.schedule.ChunkTask` (image row ->
    `image_ids[row]`): the same noise addresses as the fixed-n draw of the same plan."""
    return [SampleRequest(seed, image_ids[t.row], t.phase, t.total, chunk_size, first_chunk=t.chunk,
                          stop_chunk=t.chunk + 1, first_chunks=first_chunks) for t in tasks]


def shard_requests(shard: Shard, *, seed: int, phases: Sequence[tuple[str, int]], chunk_size: int
                   ) -> list[SampleRequest]:
    """The sample requests of a shard, image by image, `phases` ((phase, samples), in a fixed
    order); each carries the full noise address (seed, image, phase, chunks) of its samples."""
    return [SampleRequest(seed, record.image_id, phase, num, chunk_size)
            for record in shard.records for phase, num in phases]


# -- the run ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Work:
    """What a schedule hands out: images (rows of the selection) and what to draw for them
    (`requests`, one per image phase or noise chunk; `tasks`: the chunks of a sequential run)."""

    rows: tuple[int, ...]
    requests: tuple[SampleRequest, ...] = ()
    tasks: tuple[ChunkTask, ...] = ()

    def only(self, rows: Sequence[int], image_ids: Sequence[int]) -> Work:
        """This work for `rows` alone (the others could not be read)."""
        keep = set(rows)
        ids = {image_ids[r] for r in keep}
        return Work(tuple(r for r in self.rows if r in keep), tuple(q for q in self.requests if q.image_id in ids),
                    tuple(t for t in self.tasks if t.row in keep))


@dataclass
class Finished:
    """Votes that came back complete: `rows` to store, then `counts` (one per task of
    `work`, for a sequential schedule) for the schedule. `held`: the work could not be
    completed in this invocation (an API query without an answer); its images wait."""

    work: Work
    rows: list[VoteRow] = field(default_factory=list)
    counts: Any = None
    worker: str = "main"
    held: bool = False


# -- the vote rows of a model sampler's counts --------------------------------------------------

def model_vote_rows(
    *,
    run_id: str,
    config: Any,
    records: Sequence[ImageRecord],
    requests: Sequence[SampleRequest],
    counts: np.ndarray,
    compute_s: float,
    worker: str,
    finished_at: datetime,
    classifier: Any,
    denoiser: Any,
    class_names: Sequence[str] | None,
    per_chunk: bool = False,
) -> list[VoteRow]:
    """The `VoteRow`s of one work item's counts (row i <-> requests[i]) from model actors
    (`classifier`, `denoiser`: their `pipeline.certify.pair.ModelIdentity`).

    `per_chunk` (sequential runs): every request is one noise chunk, and its row records the
    chunk's index, so the run can be replayed chunk by chunk (`pipeline.certify.schedule`).

    `elapsed_s` is the row's share of the item's compute time, split by samples drawn, so
    summing it over a run gives the actors' busy time.
    """
    if counts.shape[0] != len(requests):
        raise ValueError(f"{counts.shape[0]} count rows for {len(requests)} sample requests")
    by_id: Mapping[int, ImageRecord] = {r.image_id: r for r in records}
    total_samples = max(1, sum(request.num_samples for request in requests))
    rows = []
    for request, row in zip(requests, counts):
        if per_chunk and len(request.chunks()) != 1:
            raise ValueError(f"a per-chunk row needs a one-chunk request, got {request}")
        record = by_id[request.image_id]
        label_name = (
            class_names[record.label] if class_names is not None and 0 <= record.label < len(class_names) else None
        )
        rows.append(VoteRow(
            run_id=run_id, image_id=record.image_id, image_name=record.name, label=record.label,
            label_name=label_name, phase=request.phase, n=request.num_samples, classes=None,
            counts=[int(c) for c in row], sigma=config.sigma, seed=request.seed, chunk_size=request.chunk_size,
            model=classifier.name, model_sha256=classifier.sha256,
            denoiser=denoiser.name if denoiser else None, denoiser_sha256=denoiser.sha256 if denoiser else None,
            worker=worker, elapsed_s=compute_s * request.num_samples / total_samples, finished_at=finished_at,
            chunk=request.first_chunk if per_chunk else None,
        ))
    return rows


def vote_rows_of(context: Any, info: Any, class_names: Sequence[str] | None, per_chunk: bool):
    """(work, counts, compute seconds, worker) -> that work's `VoteRow`s: what a model sampler
    (on Ray or in this process) turns one item's counts into, for the run `context`
    (`pipeline.certify.run.RunContext`: its settings and selected images)."""
    config, records = context.settings, context.records

    def rows(work: Any, counts: np.ndarray, compute_s: float, worker: str) -> list[VoteRow]:
        return model_vote_rows(
            run_id=context.run_id, config=config, records=[records[r] for r in work.rows], requests=work.requests,
            counts=counts, compute_s=compute_s, worker=worker, finished_at=datetime.now(timezone.utc),
            classifier=info.classifier, denoiser=info.denoiser, class_names=class_names, per_chunk=per_chunk)

    return rows


@dataclass
class RunContext:
    """What one run holds: where it writes, its record (run.json), the selected images
    (row i <-> records[i]), the lease that makes it the only writer, and its settings."""

    output: Location
    record: dict[str, Any]
    records: Sequence[Any]  # ImageRecord-like: image_id, name, label
    lease: Any
    settings: Any
    on_bad_image: str = "fail"
    skipped: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def open(cls, output: str | Location, identity: Mapping[str, Any], extra: Mapping[str, Any] | None,
             records: Sequence[Any], lease: Any, settings: Any) -> RunContext:
        """The one start of a run, for both jobs: its record opened (created, or checked
        against `identity` on a resume: `pipeline.runs.storage.open_run`), then its context."""
        from pipeline.runs.storage import open_run

        output = Location.of(output)
        record = open_run(output, identity, extra)
        return cls(output, record, records, lease, settings, getattr(settings, "on_bad_image", "fail"))

    @property
    def run_id(self) -> str:
        return self.record["run_id"]

    @cached_property
    def rows_of(self) -> dict[int, int]:
        """image id -> row of the selection."""
        return {image_id: row for row, image_id in enumerate(self.image_ids)}

    @cached_property
    def image_ids(self) -> list[int]:
        """The selection's image ids, row by row (computed once: the records never change, and
        both samplers look rows up by id per image)."""
        return [r.image_id for r in self.records]


class Sampler(Protocol):
    """A pool of actors that draws the votes of `Work` (see `actors.model_sampler`,
    `actors.api_sampler`)."""

    stopped: bool

    def read(self, row: int) -> Any: ...  # the image's pixels; DatasetError when unreadable

    def submit(self, work: Work, pixels: dict[int, Any]) -> tuple[list[Item], list[Finished]]: ...

    def take(self, key: Any, result: Any) -> list[Finished]: ...

    def lost(self, key: Any) -> Work | None: ...

    def in_flight(self) -> tuple[int, int]: ...  # (images, samples) finished in flight, best effort

    def release(self, rows: list[int]) -> None: ...  # these images are done: drop what is held for them

    def drive(self, items: Iterator[Item | None], on_result: Any, on_lost: Any, tick: Any,
              settled: Callable[[], bool] | None = None) -> None: ...  # settled(): drop what is in flight


class FixedSchedule:
    """Fixed n: the shards of pending images (`pipeline.certify.run.plan_shards`), one work
    item each, in selection order; `requests(shard)` says what to draw for one (a model
    sampler: `shard_requests` of its settings; an API sampler asks what the journal lacks, so none)."""

    def __init__(self, shards: Sequence[Shard], rows_of: Mapping[int, int],
                 requests: Callable[[Shard], Sequence[SampleRequest]] = lambda shard: ()) -> None:
        self.shards, self.rows_of, self.requests = shards, rows_of, requests
        self.total = sum(len(shard.records) for shard in shards)

    @classmethod
    def of(cls, context: RunContext, records: Sequence[Any], shard_size: int,
           requests: Callable[[Shard], Sequence[SampleRequest]] = lambda shard: (), actors: int = 0) -> FixedSchedule:
        """`records` (of `context`'s selection) in shards of `shard_size` images (tapering at
        the end for a pool of `actors`: `plan_shards`)."""
        return cls(plan_shards(records, shard_size, actors), context.rows_of, requests)

    def items(self) -> Iterator[Work | None]:
        for shard in self.shards:
            yield Work(tuple(self.rows_of[i] for i in shard.image_ids), tuple(self.requests(shard)))

    def accept(self, done: Finished) -> list[int]:
        """The images `done` finished (all of its work's)."""
        return list(done.work.rows)

    def withdraw(self, rows: Sequence[int]) -> None:
        self.total -= len(rows)

    def forget(self, work: Work) -> None:
        """A failed item is not retried (its error ends the run)."""

    def hold(self, rows: Sequence[int]) -> None:
        """Nothing more is asked of a held image in a fixed run (its work is all out)."""

    @property
    def settled(self) -> bool:
        """Every item in flight is still needed (its images' votes)."""
        return False


class SequentialSchedule:
    """Sequential: chunks of undecided images (`ChunkScheduler`), about `item_samples`
    samples per work item; results decide in chunk order. `None` = nothing to send until a
    result comes back.

    Paced (`item_seconds`): once results report how fast an actor draws, an item holds about
    `item_seconds` of its work (at least `least_seconds`), and what may go out now is spread
    over the pool's `slots` (calls in flight) -- so every actor gets work in the early rounds,
    where a few thousand samples are all there is, and no actor returns faster than the
    driver can answer. Only the grouping of chunks into items changes: the chunks, their
    sizes and their noise are the plan's."""

    def __init__(self, scheduler: ChunkScheduler, image_ids: Sequence[int], seed: int, chunk_size: int,
                 item_samples: int, *, slots: int = 1, item_seconds: float | None = None,
                 least_seconds: float = 0.0) -> None:
        self.scheduler, self.image_ids = scheduler, image_ids
        self.seed, self.chunk_size, self.item_samples = seed, chunk_size, item_samples
        self.slots, self.item_seconds, self.least_seconds = slots, item_seconds, least_seconds
        self.total = int(np.count_nonzero(scheduler.cert.decisions().needs_samples))
        self._drawn = 0  # samples and compute seconds of the results so far: an actor's rate
        self._busy = 0.0

    def item_size(self) -> tuple[int, int]:
        """(most, least) samples of the next item: `item_samples` until an actor's rate is
        known, then `item_seconds` (`least_seconds`) of its work."""
        if not self.item_seconds or self._busy <= 0 or self._drawn <= 0:
            return self.item_samples, 0
        rate = self._drawn / self._busy
        return max(1, int(rate * self.item_seconds)), int(rate * self.least_seconds)

    def items(self) -> Iterator[Work | None]:
        from pipeline.certify.run import chunk_requests

        while not self.scheduler.finished:
            most, least = self.item_size()
            tasks = self.scheduler.next_chunks(most, spread=self.slots, least=least)
            if not tasks:
                yield None  # every undecided image has chunks in flight: wait for a result
                continue
            yield Work(tuple(dict.fromkeys(t.row for t in tasks)),
                       tuple(chunk_requests(self.seed, self.image_ids, tasks, self.chunk_size,
                                            self.scheduler.cert.test.first_chunks)), tuple(tasks))

    def accept(self, done: Finished) -> list[int]:
        """Feed the chunks' votes to the certifier (in chunk order); the images it decided."""
        tasks, counts = done.work.tasks, np.asarray(done.counts)
        self._drawn += sum(r.n for r in done.rows)
        self._busy += sum(r.elapsed_s or 0.0 for r in done.rows)
        before = self.scheduler.cert.decisions().needs_samples.copy()
        for phase in dict.fromkeys(t.phase for t in tasks):
            mine = [i for i, t in enumerate(tasks) if t.phase == phase]
            self.scheduler.accept(phase, [tasks[i].row for i in mine], [tasks[i].chunk for i in mine],
                                  [done.work.requests[i].num_samples for i in mine], counts[mine])
        after = self.scheduler.cert.decisions().needs_samples
        return np.nonzero(before & ~after)[0].tolist()

    def split(self) -> tuple[int, int, int]:
        """(certified, not certified, undecided) over every selected image, as the Ctrl-C line says."""
        decisions = self.scheduler.cert.decisions()
        certified, undecided = int(decisions.certified.sum()), int(decisions.needs_samples.sum())
        return certified, len(decisions.status) - certified - undecided, undecided

    def withdraw(self, rows: Sequence[int]) -> None:
        self.scheduler.cert.withdraw(np.asarray(rows, dtype=np.int64))
        self.total -= len(rows)

    def forget(self, work: Work) -> None:
        self.scheduler.forget(work.tasks)

    def hold(self, rows: Sequence[int]) -> None:
        self.scheduler.hold(rows)

    @property
    def settled(self) -> bool:
        """Every image decided: the chunks still in flight (drawn ahead) can change nothing."""
        return self.scheduler.finished


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run: says how many images this invocation saved (what the bar counted)."""

    def __init__(self, saved: int, total: int, sequential: bool = False,
                 split: tuple[int, int, int] | None = None) -> None:
        super().__init__(saved, total, sequential)
        self.saved, self.total, self.sequential = saved, total, sequential
        self.split = split  # a sequential run's selected images: (certified, not certified, undecided)

    def __str__(self) -> str:
        if self.sequential:
            where = ""
            if self.split is not None:
                certified, not_certified, undecided = self.split
                where = (f" (of the run's {sum(self.split)} selected images: {certified} certified, "
                         f"{not_certified} not certified, {undecided} undecided)")
            return (f"interrupted: {self.saved} of {self.total} images decided by this invocation{where}; the "
                    "votes of every finished chunk are saved and a rerun of the same command resumes from them")
        return (f"interrupted: {self.saved} of {self.total} images finished and saved by this invocation; "
                "a rerun of the same command resumes the rest")


class CertifyRun:
    """The one driver: a schedule's work through a sampler, votes to the run, until the
    schedule is done or the sampler stops (budget, credentials). See the module doc."""

    def __init__(self, context: RunContext, sampler: Sampler, schedule: FixedSchedule | SequentialSchedule,
                 label: str = "certify", progress: Any = None, write_every_s: float = 0.0) -> None:
        from pipeline.progress import Progress

        self.context, self.sampler, self.schedule = context, sampler, schedule
        self.pixels: dict[int, Any] = {}  # images read, kept while their work is out
        self.finished = self.samples = 0
        # write_every_s > 0: votes go out as at most one part per that many seconds (see
        # `_accept`); 0: one part per result, written before the schedule counts it.
        self.write_every_s = write_every_s
        self._unsaved: list[VoteRow] = []
        self._unsaved_finished = 0  # images those rows finish: counted as saved once written
        self._last_write = float("-inf")
        self.own_progress = progress is None  # a caller's progress spans several runs: it closes it
        sequential = isinstance(schedule, SequentialSchedule)
        self.progress = progress or Progress(label, total=schedule.total, unit="images decided" if sequential else
                                             "images", eta=not sequential)

    # -- what goes out

    def items(self) -> Iterator[Item | None]:
        from pipeline.data.core import DatasetError

        ids = self.context.image_ids
        for work in self.schedule.items():
            if work is None:
                yield None
                continue
            readable: list[int] = []
            for row in work.rows:
                try:
                    if self._readable(row):
                        readable.append(row)
                except DatasetError:
                    if readable:  # what was readable before it still goes out
                        yield from self._submit(work.only(readable, ids))
                    raise
            if readable:
                yield from self._submit(work if len(readable) == len(work.rows) else work.only(readable, ids))

    def _submit(self, work: Work) -> Iterator[Item]:
        items, ready = self.sampler.submit(work, {self.context.image_ids[r]: self.pixels[r] for r in work.rows})
        for done in ready:
            self._accept(done)
        yield from items

    def _readable(self, row: int) -> bool:
        """Read an image the first time it is drawn; an unreadable one stops the run (after
        what was written) or, with on_bad_image: skip, is withdrawn without a certificate --
        before any of its samples is drawn or queried."""
        from pipeline.data.core import DatasetError

        if row in self.pixels:
            return True
        record = self.context.records[row]
        try:
            self.pixels[row] = self.sampler.read(row)
            return True
        except DatasetError as error:
            if self.context.on_bad_image == "fail":
                raise
            log.warning("skipping %s: %s", record.name, error)
            self.context.skipped.append({"image_id": record.image_id, "name": record.name, "error": str(error)[:300]})
            self.schedule.withdraw([row])
            self.progress.total -= 1
            return False

    # -- what comes back

    def on_result(self, key: Any, result: Any) -> bool:
        for done in self.sampler.take(key, result):
            self._accept(done)
        self.tick()
        return not self.sampler.stopped

    def _accept(self, done: Finished) -> None:
        """Store a result's votes and let the schedule count them.

        One part per result (write_every_s = 0) is written before the schedule counts it.
        Batched (write_every_s > 0, model runs), the schedule counts the votes at once -- a
        sequential image takes its next chunks without waiting for a write -- and the rows
        are written at most one part per `write_every_s` seconds: at once when the last part
        is older (results that come seldom are saved as before), else together once it is,
        and always before the run returns (Ctrl-C and errors included). An image counts as
        saved (the bar, what Ctrl-C reports) only once its rows are written. What a crash
        loses is at most those seconds of draws, redrawn on resume with the same noise, so
        the same votes: the statistics do not depend on when votes are written."""
        if done.held:
            self.schedule.hold(done.work.rows)
            return
        if done.rows and not self.write_every_s:
            from pipeline.runs.storage import write_votes

            self.context.lease.check()
            write_votes(self.context.output, done.rows, worker=done.worker)  # durable before it counts
        finished = self.schedule.accept(done)
        for row in finished:
            self.pixels.pop(row, None)
        self.sampler.release(finished)
        self.samples += sum(r.n for r in done.rows)
        if not self.write_every_s:
            self.finished += len(finished)
            return
        self._unsaved += done.rows
        self._unsaved_finished += len(finished)
        self._write_if_due()

    def _write_if_due(self) -> None:
        if self._unsaved and (time.monotonic() - self._last_write >= self.write_every_s
                              or len(self._unsaved) >= MAX_UNSAVED_ROWS):
            self.write()

    def write(self) -> None:
        """Write the votes not yet written as one part (lease checked); their images count as saved."""
        from pipeline.runs.storage import write_votes

        if self._unsaved:
            self.context.lease.check()
            write_votes(self.context.output, self._unsaved, worker="driver")
            self._last_write = time.monotonic()
        self.finished += self._unsaved_finished
        self._unsaved, self._unsaved_finished = [], 0
        self.progress.set(self.finished)  # the bar counts what is saved: now this too

    def on_lost(self, key: Any) -> None:
        """An item that failed for good: its chunks may be handed out again."""
        work = self.sampler.lost(key)
        if work is not None:
            self.schedule.forget(work)

    def tick(self) -> None:
        """The bar counts saved images only (what Ctrl-C keeps); samples drawn in flight still
        count towards the rate."""
        self._write_if_due()  # a quiet spell still writes what came back
        _, samples = self.sampler.in_flight()
        self.progress.set(self.finished, self.samples + samples)

    # -- the run

    def run(self) -> None:
        """Drive the schedule to its end (or the sampler's stop); skipped images go to run.json
        whatever happens."""
        try:
            self.sampler.drive(self.items(), self.on_result, self.on_lost, self.tick,
                               settled=lambda: self.schedule.settled)
            self.write()
        except KeyboardInterrupt as stop:
            self._write_what_came_back()
            sequential = isinstance(self.schedule, SequentialSchedule)
            raise Interrupted(self.finished, self.progress.total, sequential,
                              self.schedule.split() if sequential else None) from stop
        except BaseException:
            self._write_what_came_back()
            raise
        finally:
            if self.own_progress:
                self.progress.close()
            self._record_skipped()

    def _write_what_came_back(self) -> None:
        """On the way out of a failed or interrupted run: keep the votes that came back
        (unless the lease is lost: then nothing more is written)."""
        try:
            self.write()
        except Exception as error:  # noqa: BLE001 - the run's own error is the one to report
            log.warning("could not write the last %d vote rows: %s", len(self._unsaved), error)

    def _record_skipped(self) -> None:
        from pipeline.runs.storage import update_run_record

        if not self.context.skipped:
            return
        before = self.context.record.get("skipped_images", [])
        known = {s["image_id"] for s in before}
        new = [s for s in self.context.skipped if s["image_id"] not in known]
        if new:
            self.context.record = update_run_record(self.context.output, skipped_images=before + new)


def raise_run_error(error: BaseException | None) -> None:
    """How a model sampler ends on the first error of a run (after what was in flight is
    saved): a job's own errors as they are (a one-line exit 2), anything else as a failure."""
    if error is None:
        return
    if isinstance(error, (ValueError, KeyError, FileNotFoundError, PermissionError)):
        raise error
    raise RuntimeError(f"certification failed: {error}") from error


from pipeline.runs.claim import claimed_run  # noqa: E402,F401 - its home is light (taken before heavy imports)

"""Driving a sequential certifier from a job: which chunks to sample next, and the votes that
come back, fed to `pipeline.stats.sequential` in chunk order. Plain Python, shared by `certify`
(model actors) and `certify-api` (API actors).

Why a layer between the certifier and the jobs: the jobs keep many work items in flight
across actors, and items come back in any order (a lost actor's items are redone later,
a fast actor overtakes a slow one). The certifier must see each image's chunks in order,
so `ChunkScheduler` keeps the chunks that came back early until their predecessors arrive,
and hands out new chunks only to undecided images -- an image decided frees its share of
the next work items at once. The stored votes are one row per (image, phase, chunk), so a
run is resumed, and `dsmooth reduce` recomputes it, by `replay` of those rows
(`chunk_votes_from_rows`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.stats.sequential import ESTIMATION, SELECTION, ChunkVotes, SequentialCertifier, Status

PHASE_ORDER = (SELECTION, ESTIMATION)
DEFAULT_GROWTH = 0.5  # pending(growth): at most ~50% of an image's samples drawn after its decision


@dataclass(frozen=True)
class ChunkTask:
    """One chunk to sample: chunk `chunk` of image row `row`'s `phase`, whose plan holds
    `total` samples (that fixes the chunk's size and noise, see `pipeline.sampling.noise`)."""

    row: int
    phase: str
    chunk: int
    total: int


class ChunkScheduler:
    """Hands out chunks of undecided images; feeds returned chunks to the certifier in order.

    `growth` is `SequentialCertifier.pending`'s: an image gets up to max(1, growth * chunks
    decided) chunks in flight. When that leaves no work while actors are idle (few undecided
    images), an image may run up to `ahead` times as many chunks ahead: samples possibly
    wasted on an image decided meanwhile, never a different decision. Not while an image is
    still in the growing first chunks (`SequentialTest.first_chunks`): that is where clear and
    hopeless images stop, and a chunk drawn ahead there would double what they cost (64 samples
    decide an all-one-class image; with its next chunk ahead it drew 128).
    """

    def __init__(self, certifier: SequentialCertifier, growth: float = DEFAULT_GROWTH, ahead: int = 2) -> None:
        self.cert = certifier
        self.growth = growth
        self.ahead = max(1, ahead)
        self.requested = {phase: certifier.next_chunk[phase].copy() for phase in PHASE_ORDER}
        self._early: dict[tuple[str, int], dict[int, tuple[int, np.ndarray]]] = {}
        self.held = np.zeros(len(certifier), dtype=bool)
        self.stored: set[tuple[str, int, int]] = set()  # (phase, row, chunk) in votes/ already: never drawn again
        self._ends: dict[str, np.ndarray] = {}  # phase -> samples before each chunk (and after the last)

    def resume(self, stored: Sequence[ChunkVotes]) -> None:
        """The run's stored chunk votes (those `replay` built the certifier from). A chunk
        stored past a missing one (a kill lost the one before it) waits here as if it had just
        come back, and is never drawn again: only the missing chunk is, so votes/ holds each
        (image, phase, chunk) once and plain readers (pandas, DuckDB) sum the samples drawn."""
        for votes in stored:
            for row, chunk, samples, count in zip(votes.image.tolist(), votes.chunk.tolist(),
                                                  votes.samples.tolist(), votes.counts):
                if chunk < int(self.cert.next_chunk[votes.phase][row]) or _past(self.cert, votes.phase, row):
                    continue  # in the certifier already, or never needed
                self._early.setdefault((votes.phase, row), {}).setdefault(chunk, (samples, np.asarray(count)))
                self.stored.add((votes.phase, row, chunk))

    @property
    def finished(self) -> bool:
        """No undecided image left to sample (held ones wait for the next invocation)."""
        return not bool(np.any((self.cert.status == Status.UNDECIDED) & ~self.held))

    def hold(self, rows: Sequence[int]) -> None:
        """Hand out no more chunks of these images in this run (a chunk of theirs could not be
        completed: an API query without an answer). They stay undecided; a rerun resumes them."""
        self.held[np.asarray(rows, dtype=np.int64)] = True

    def next_chunks(self, max_samples: int, spread: int = 1, least: int = 0) -> list[ChunkTask]:
        """Chunks for one work item of about `max_samples` samples (at least one chunk when
        there is work): images with nothing in flight first. [] = nothing to send now.

        `spread`: the work that may go out now is shared by about this many items (the
        pool's slots), so an item takes at most 1/spread of it -- but not under `least`
        samples (an item must keep its actor busy for longer than a round trip costs).
        Only how chunks are grouped into items changes, never which chunks exist."""
        for stretch in (1, self.ahead):
            tasks = self._plan(max_samples, stretch, max(1, spread), least)
            if tasks:
                return tasks
        return []

    def _plan(self, max_samples: int, stretch: int, spread: int = 1, least: int = 0) -> list[ChunkTask]:
        test = self.cert.test
        offers = []
        for work in self.cert.pending(self.growth):
            first, count = work.first_chunk, work.num_chunks
            # Ahead only past the growing first chunks, where images are the hard ones.
            reach = np.where(first >= len(test.first_chunks), stretch * count, count)
            limit = np.minimum(first + reach, test.num_chunks(work.phase))
            start = np.maximum(self.requested[work.phase][work.image], first)
            for row, begin, stop in zip(work.image.tolist(), start.tolist(), limit.tolist()):
                if begin < stop and not self.held[row]:
                    offers.append((begin - int(self.cert.next_chunk[work.phase][row]), row, work.phase, begin, stop))
        offers.sort()  # least in flight first, then by row
        if spread > 1 and offers:
            offered = sum(self._span(phase, begin, stop) for _, _, phase, begin, stop in offers)
            max_samples = min(max_samples, max(least, -(-offered // spread)))
        tasks: list[ChunkTask] = []
        samples = 0
        for _, row, phase, begin, stop in offers:
            total = test.total(phase)
            for chunk in range(begin, stop):
                if (phase, row, chunk) in self.stored:
                    self.requested[phase][row] = chunk + 1  # stored already: waiting in _early
                    continue
                if tasks and samples >= max_samples:
                    return tasks
                tasks.append(ChunkTask(row, phase, chunk, total))
                samples += test.chunk_samples(phase, chunk)
                self.requested[phase][row] = chunk + 1
        return tasks

    def _span(self, phase: str, begin: int, stop: int) -> int:
        """Samples in chunks [begin, stop) of `phase`."""
        ends = self._ends.get(phase)
        if ends is None:
            ends = self._ends[phase] = np.concatenate([[0], self.cert.test.chunk_ends(phase)])
        return int(ends[stop] - ends[begin])

    def forget(self, tasks: Sequence[ChunkTask]) -> None:
        """Chunks handed out that will not come back (their item failed): offer them again."""
        for task in tasks:
            self.requested[task.phase][task.row] = min(self.requested[task.phase][task.row], task.chunk)

    def accept(self, phase: str, rows: Sequence[int], chunks: Sequence[int], samples: Sequence[int],
               counts: np.ndarray) -> int:
        """Votes of chunks that came back (counts [rows] for the tested class, or [rows,
        classes]); each image's chunks reach the certifier in chunk order, early ones wait.
        Returns how many images this decided."""
        undecided = int(np.count_nonzero(self.cert.status == Status.UNDECIDED))
        for row, chunk, size, count in zip(rows, chunks, samples, np.asarray(counts)):
            self._early.setdefault((phase, int(row)), {}).setdefault(int(chunk), (int(size), np.asarray(count)))
        while self._drain():
            pass
        return undecided - int(np.count_nonzero(self.cert.status == Status.UNDECIDED))

    def _drain(self) -> bool:
        """Hand the certifier every waiting chunk it can take now; True when it took some."""
        moved = False
        for phase in PHASE_ORDER:
            code_live = _live(self.cert, phase)
            taken: list[tuple[int, int, int, np.ndarray]] = []
            for (chunk_phase, row), waiting in list(self._early.items()):
                if chunk_phase != phase:
                    continue
                if code_live[row]:
                    chunk = int(self.cert.next_chunk[phase][row])
                    while chunk in waiting:
                        taken.append((row, chunk, *waiting.pop(chunk)))
                        chunk += 1
                    waiting_done = [c for c in waiting if c < chunk]  # repeats of decided chunks
                    for c in waiting_done:
                        del waiting[c]
                elif _past(self.cert, phase, row):  # decided, or moved on: the certifier ignores them
                    taken += [(row, c, *waiting.pop(c)) for c in sorted(waiting)]
                if not waiting:
                    del self._early[(chunk_phase, row)]
            if taken:
                moved = True
                self.cert.decide(_chunk_votes(phase, taken))
        return moved


def _live(cert: SequentialCertifier, phase: str) -> np.ndarray:
    code = {SELECTION: 0, ESTIMATION: 1}[phase]
    return (cert.phase == code) & (cert.status == Status.UNDECIDED)


def _past(cert: SequentialCertifier, phase: str, row: int) -> bool:
    """The image will take no more chunks of `phase` (decided, or selection done)."""
    return cert.status[row] != Status.UNDECIDED or (phase == SELECTION and cert.phase[row] != 0)


def _chunk_votes(phase: str, taken: list[tuple[int, int, int, np.ndarray]]) -> ChunkVotes:
    counts = [c for *_, c in taken]
    if counts[0].ndim == 0:
        matrix = np.array([int(c) for c in counts], dtype=np.int64)
    else:
        width = max(len(c) for c in counts)
        matrix = np.zeros((len(counts), width), dtype=np.int64)
        for i, c in enumerate(counts):
            matrix[i, : len(c)] = c
    return ChunkVotes(phase, np.array([t[0] for t in taken]), np.array([t[1] for t in taken]),
                      np.array([t[2] for t in taken]), matrix)


def is_label_row(classes: object) -> bool:
    """An API row: its counts are per label string (`classes`), not per class index."""
    return classes is not None and not (np.isscalar(classes) and pd.isna(classes))


def chunk_votes_from_rows(votes: pd.DataFrame, rows_of: dict[int, int]) -> list[ChunkVotes]:
    """Stored chunk rows (columns image_id, phase, chunk, n, counts, classes, label_name) ->
    ChunkVotes for `replay`, images mapped to certifier rows by `rows_of` (rows of other
    images ignored). Model rows give per-class-index counts; API rows (label strings) give
    the votes for the image's clean answer `label_name`, tested as column 0
    (`pipeline.apis.run.state`)."""
    out = []
    chunked = votes[votes["chunk"].notna() & votes["image_id"].isin(list(rows_of))]
    for phase in PHASE_ORDER:
        part = chunked[chunked["phase"] == phase]
        if part.empty:
            continue
        if "classes" in part and any(is_label_row(c) for c in part["classes"]):
            counts = np.array([dict(zip(classes, c)).get(name, 0) if name is not None else 0
                               for classes, c, name in zip(part["classes"], part["counts"], part["label_name"])],
                              dtype=np.int64)
        else:
            width = max(1, max(len(c) for c in part["counts"]))
            counts = np.zeros((len(part), width), dtype=np.int64)
            for i, c in enumerate(part["counts"]):
                counts[i, : len(c)] = np.asarray(c, dtype=np.int64)
        out.append(ChunkVotes(phase, np.array([rows_of[int(i)] for i in part["image_id"]], dtype=np.int64),
                              part["chunk"].astype(np.int64).to_numpy(), part["n"].astype(np.int64).to_numpy(),
                              counts))
    return out

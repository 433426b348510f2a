"""The driver's view of an API run (no Ray): what each image needs, the answers it has, and
the vote rows those answers make.

One module because these are one image's account, asked by one loop: which queries an image
needs (one clean query -- its label, as in the paper --, n0 selection and n estimation
samples) cut into work units of one noise chunk each; the answers taken back (`QueryState`,
from the query log at the start, from each unit's rows after); and, once an image (fixed n) or
an estimation chunk (sequential) is answered in full, its vote rows. A sequential run tests
each image's clean answer as its label, each chunk's answers being one chunk of votes -- how
many of them name that label; everything there is a function of the answered queries (durable
in the journal before any answer is used), so a resumed run rebuilds the certifier by `replay`
of the chunks those answers complete, and asks only what is missing.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pandas as pd

from pipeline.apis.books.querylog import read_query_log
from pipeline.apis.query import CLEAN, OK, WorkUnit
from pipeline.runs.fs import Location
from pipeline.runs.storage import VoteRow, completed_images, read_run_record, write_votes
from pipeline.sampling.noise import SampleRequest
from pipeline.stats.sequential import (
    ESTIMATION,
    ChunkVotes,
    SequentialCertifier,
    SequentialTest,
    replay,
)

log = logging.getLogger("dsmooth")

Key = tuple[str, int]  # (phase, sample index); the clean query is (CLEAN, 0)
LABEL_COLUMN = 0  # the sequential certifier tests column 0 of an image: "the clean answer"


# -- what an image needs -----------------------------------------------------------------------


def phase_sizes(n0: int, n: int) -> dict[str, int]:
    return {CLEAN: 1, "selection": n0, "estimation": n}


def needed_keys(n0: int, n: int) -> list[Key]:
    return [(phase, k) for phase, size in phase_sizes(n0, n).items() for k in range(size)]


def plan_image(image_id: int, n0: int, n: int, chunk_size: int, seed: int,
               done: Collection[Key] = ()) -> list[WorkUnit]:
    """Work units for the queries of one image not in `done`, in phase order; each noisy unit
    carries its chunk's full noise address (seed included)."""
    units: list[WorkUnit] = []
    if (CLEAN, 0) not in done:
        units.append(WorkUnit(image_id, CLEAN, (0,)))
    for phase, size in phase_sizes(n0, n).items():
        if phase == CLEAN:
            continue
        for chunk in SampleRequest(seed, image_id, phase, size, chunk_size).chunks():
            start = chunk.index * chunk_size
            pending = tuple(k for k in range(start, start + chunk.size) if (phase, k) not in done)
            if pending:
                units.append(WorkUnit(image_id, phase, pending, chunk, tuple(k - start for k in pending)))
    return units


# -- the answers taken back ---------------------------------------------------------------------


@dataclass
class ImageState:
    image_id: int
    name: str
    rows: dict[Key, dict[str, Any]] = field(default_factory=dict)  # answered (ok) queries
    voted: bool = False
    failed: set[Key] = field(default_factory=set)  # queries that failed every retry this run


class QueryState:
    """Answered queries per image (from the query log); an image's vote rows once complete."""

    def __init__(
        self, run_dir: str | Location, record: Mapping[str, Any], images: Iterable[tuple[int, str]],
        worker: str = "certify-api",
    ) -> None:
        self.run_dir = Location.of(run_dir)
        self.identity = record["identity"]
        self.run_id = record["run_id"]
        self.n0, self.n = int(self.identity["n0"]), int(self.identity["n"])
        self.chunk_size = int(self.identity["chunk_size"])
        self.seed = int(self.identity["seed"])
        self.worker = worker
        self.needed = set(needed_keys(self.n0, self.n))
        self.images = {image_id: ImageState(image_id, name) for image_id, name in images}
        voted = completed_images(self.run_dir, ["selection", "estimation"])
        log_frame = read_query_log(self.run_dir)
        for row in log_frame[log_frame["status"] == OK].to_dict("records"):
            state = self.images.get(int(row["image_id"]))
            if state is not None:
                state.rows[(str(row["phase"]), int(row["sample"]))] = row
        for state in self.images.values():
            state.voted = state.image_id in voted
        lost = [s.image_id for s in self.images.values() if s.voted and not self.needed <= s.rows.keys()]
        if lost:
            # Votes stand (reduce uses them); only recomputing them from answers is impossible.
            log.warning("%d image(s) have votes but their answers are missing from the query log (a lost or "
                        "damaged log part); their certificates stand and nothing is asked again, but "
                        "`votes_from_queries` cannot rebuild them", len(lost))

    def units(self, image_id: int) -> list[WorkUnit]:
        state = self.images[image_id]
        if state.voted:
            return []
        return plan_image(image_id, self.n0, self.n, self.chunk_size, self.seed, done=state.rows.keys())

    def pending_queries(self) -> int:
        return sum(len(self.needed - s.rows.keys()) for s in self.images.values() if not s.voted)

    def complete(self) -> list[int]:
        return sorted(i for i, s in self.images.items() if s.voted)

    def incomplete_after_retries(self) -> list[int]:
        return sorted(i for i, s in self.images.items() if s.failed and not s.voted)

    def answered_map(self) -> dict[tuple[int, str, int], dict[str, Any]]:
        """(image, phase, sample) -> answer, for the ledger (never ask these again)."""
        return {(i, phase, sample): {k: row.get(k) for k in ("top_label", "labels", "scores", "status")}
                for i, s in self.images.items() for (phase, sample), row in s.rows.items()}

    def write_missing_votes(self) -> list[int]:
        """Images answered in full but without vote rows (a crash in between): write them."""
        written = []
        for image_id in self.images:
            rows = self.complete_rows(image_id)
            if rows:
                write_votes(self.run_dir, rows, worker=self.worker)
                written.append(image_id)
        return written

    def record(self, rows: list[dict[str, Any]]) -> list[tuple[int, list[VoteRow]]]:
        """Take a returned unit's rows (its answers are in the journal already); returns
        (image, vote rows) of every image this completed, for the run to write."""
        touched = set()
        for row in rows:
            state = self.images.get(int(row["image_id"]))
            if state is None:
                continue
            key = (row["phase"], int(row["sample"]))
            if row["status"] == OK:
                state.rows.setdefault(key, row)
                state.failed.discard(key)
                touched.add(state.image_id)
            else:
                state.failed.add(key)
        done = [(i, self.complete_rows(i)) for i in sorted(touched)]
        return [(i, rows) for i, rows in done if rows]

    def complete_rows(self, image_id: int) -> list[VoteRow] | None:
        """The vote rows of an image answered in full and not voted yet (it counts as voted
        from here on); None otherwise."""
        state = self.images[image_id]
        if state.voted or not self.needed <= state.rows.keys():
            return None
        rows = answer_vote_rows(list(state.rows.values()), self.identity, self.run_id, self.n0, self.n)
        if rows is None:
            return None
        state.voted = True
        return rows


# -- the votes answers make -------------------------------------------------------------------


def present(label: Any) -> bool:
    return label is not None and not (isinstance(label, float) and pd.isna(label))


def answer_vote_rows(
    queries: Sequence[Mapping[str, Any]],
    identity: Mapping[str, Any],
    run_id: str,
    n0: int,
    n: int,
) -> list[VoteRow] | None:
    """The selection and estimation `VoteRow`s of ONE image from its
    answered queries, using samples 0..n0-1 and 0..n-1; None while any of them is missing.

    Every sample counts in `n`, so an answer without a label counts against the top class
    instead of shrinking the sample.
    """
    by_key = {(str(q["phase"]), int(q["sample"])): q for q in queries if q.get("status") == OK}
    clean = by_key.get((CLEAN, 0))
    if clean is None:
        return None
    rows = []
    for phase, size in phase_sizes(n0, n).items():
        if phase == CLEAN:
            continue
        chosen = [by_key.get((phase, k)) for k in range(size)]
        if any(q is None for q in chosen):
            return None
        rows.append(answer_vote_row(clean, chosen, phase, identity, run_id))
    return rows


def answer_vote_row(clean: Mapping[str, Any], chosen: Sequence[Mapping[str, Any]], phase: str,
                    identity: Mapping[str, Any], run_id: str, chunk: int | None = None) -> VoteRow:
    """The `VoteRow` of answered queries `chosen` of one image and phase (a whole phase, or
    one noise chunk of a sequential run); label_name is the clean answer. Every query counts
    in `n`, so an answer without a label counts against every class."""
    votes = Counter(q["top_label"] for q in chosen if present(q.get("top_label")))
    classes = sorted(votes)
    return VoteRow(
        run_id=run_id, image_id=int(clean["image_id"]), image_name=clean.get("image_name"), label=-1,
        label_name=clean["top_label"] if present(clean.get("top_label")) else None, phase=phase, n=len(chosen),
        classes=classes, counts=[votes[c] for c in classes], sigma=float(identity["sigma"]),
        seed=int(identity["seed"]), chunk_size=int(identity["chunk_size"]), model=_model_name(identity),
        model_sha256=None, denoiser=identity.get("denoiser"), denoiser_sha256=identity.get("denoiser_sha256"),
        worker="certify-api", elapsed_s=float(sum(float(q.get("latency_s") or 0.0) for q in chosen)),
        finished_at=max(_timestamp(q.get("answered_at")) for q in chosen), chunk=chunk,
    )


def votes_from_queries(run_dir: str | Location, n0: int | None = None, n: int | None = None) -> list[VoteRow]:
    """Vote rows for every image whose first n0 selection and n estimation samples (and
    clean query) are answered; n0/n default to the run's, and may not exceed them."""
    record = read_run_record(run_dir)
    identity, run_id = record["identity"], record["run_id"]
    n0 = int(identity["n0"]) if n0 is None else int(n0)
    n = int(identity["n"]) if n is None else int(n)
    if not 1 <= n0 <= int(identity["n0"]) or not 1 <= n <= int(identity["n"]):
        raise ValueError(f"n0={n0}, n={n}: must lie in [1, run's n0={identity['n0']}] and [1, run's n={identity['n']}]")
    frame = read_query_log(run_dir)
    rows: list[VoteRow] = []
    for _, group in frame.groupby("image_id", sort=True):
        image_rows = answer_vote_rows(group.to_dict("records"), identity, run_id, n0, n)
        if image_rows is not None:
            rows.extend(image_rows)
    return rows


def _timestamp(value: Any) -> datetime:
    if value is None or (not isinstance(value, (datetime, str)) and pd.isna(value)):
        return datetime.now(timezone.utc)
    return pd.Timestamp(value).to_pydatetime()


def _model_name(identity: Mapping[str, Any]) -> str:
    provider = str(identity.get("provider"))
    if identity.get("openai_model"):  # a chat model: its name and its prompt's (tables, figures)
        return f"api:{provider}:{identity['openai_model']}:prompt-{identity.get('prompt_sha256')}"
    detail = identity.get("clarifai_model") or identity.get("azure_api_version")
    return f"api:{provider}" + (f":{detail}" if detail else "")


# -- sequential runs: the clean label, a chunk's votes ------------------------------------------


def clean_label(rows: Mapping[tuple[str, int], Mapping[str, Any]]) -> Any:
    """The clean answer's top label (None: not answered yet, or answered without a label)."""
    clean = rows.get((CLEAN, 0))
    return clean.get("top_label") if clean is not None and present(clean.get("top_label")) else None


def chunk_unit(test: SequentialTest, seed: int, image_id: int, chunk: int,
               done: Collection[tuple[str, int]] = ()) -> WorkUnit | None:
    """The queries of estimation chunk `chunk` not in `done` (answered by an earlier
    invocation, or before a kill); None when every one is answered."""
    (address,) = SampleRequest(seed, image_id, ESTIMATION, test.n_max, test.chunk_size, first_chunk=chunk,
                               stop_chunk=chunk + 1).chunks()
    start = chunk * test.chunk_size
    pending = tuple(k for k in range(start, start + address.size) if (ESTIMATION, k) not in done)
    if not pending:
        return None
    return WorkUnit(image_id, ESTIMATION, pending, address, tuple(k - start for k in pending))


def chunk_answers(test: SequentialTest, rows: Mapping[tuple[str, int], Mapping[str, Any]],
                  chunk: int) -> list[Mapping[str, Any]] | None:
    """The answered queries of an estimation chunk, in sample order; None while one is missing."""
    start = chunk * test.chunk_size
    size = min(test.chunk_size, test.n_max - start)
    chosen = [rows.get((ESTIMATION, k)) for k in range(start, start + size)]
    return None if any(q is None or q.get("status") != OK for q in chosen) else chosen


def label_votes(answers: Sequence[Mapping[str, Any]], label: Any) -> int:
    return sum(1 for q in answers if present(q.get("top_label")) and q["top_label"] == label)


def api_certifier(test: SequentialTest, answered: Sequence[Mapping[tuple[str, int], Mapping[str, Any]]]
                  ) -> SequentialCertifier:
    """The certifier of these images (row i <-> answered[i], its answered queries by (phase,
    sample)) after every chunk their answers complete: `replay`, so chunks after a missing
    one wait for it. An image without a clean label is never certified."""
    labels = np.array([LABEL_COLUMN if clean_label(rows) is not None else -1 for rows in answered], dtype=np.int64)
    image, chunk, samples, counts = [], [], [], []
    for row, rows in enumerate(answered):
        label = clean_label(rows)
        if label is None:
            continue
        for k in range(test.num_chunks(ESTIMATION)):
            answers = chunk_answers(test, rows, k)
            if answers is None:
                continue
            image.append(row), chunk.append(k), samples.append(len(answers)), counts.append(label_votes(answers, label))
    votes = [ChunkVotes(ESTIMATION, np.array(image, dtype=np.int64), np.array(chunk, dtype=np.int64),
                        np.array(samples, dtype=np.int64), np.array(counts, dtype=np.int64))] if image else []
    return replay(test, votes, labels=labels)


def chunk_vote_row(rows: Mapping[tuple[str, int], Mapping[str, Any]], answers: Sequence[Mapping[str, Any]],
                   chunk: int, identity: Mapping[str, Any], run_id: str) -> VoteRow:
    """The Parquet vote row of one answered chunk (what `dsmooth reduce` replays)."""
    return answer_vote_row(rows[(CLEAN, 0)], answers, ESTIMATION, identity, run_id, chunk=chunk)

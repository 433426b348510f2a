"""Sequential certification of an API (issue 12), the plain part: the label of an image is
the API's answer on the clean image (as in Salman et al.), and each estimation noise chunk's
answers are one chunk of votes -- how many of them name that label.

Everything here is a function of the answered queries (the run's query log, durable before
any answer is used), so a resumed run rebuilds the certifier by `replay` of the chunks those
answers complete, and asks only what is missing.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np

from pipeline.apis.query.units import CLEAN, WorkUnit
from pipeline.apis.books.querylog import OK, answer_vote_row
from pipeline.runs.storage import VoteRow
from pipeline.sampling.noise import SampleRequest
from pipeline.stats.sequential import ESTIMATION, ChunkVotes, SequentialCertifier, SequentialTest, replay

LABEL_COLUMN = 0  # the certifier tests column 0 of an image: "the clean answer"


def present(label: Any) -> bool:
    return label is not None and not (isinstance(label, float) and np.isnan(label))


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

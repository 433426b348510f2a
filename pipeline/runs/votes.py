"""One vote row: the unit every certification run stores and `dsmooth reduce` reads.

`VoteRow` is the one definition of a row's fields; the Parquet schema (`VOTE_SCHEMA`) is
derived from it, and both samplers (model actors and API actors) build their rows as
`VoteRow`s, so a field cannot be added to one path and forgotten in the other.

One row per (image, phase), or per (image, phase, chunk) in a sequential run. `counts` is
dense over class indices for local models; for APIs, `classes` names the label string of
each entry of `counts` (null for local models).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any

import pyarrow as pa


def _column(arrow: pa.DataType, note: str = "") -> Any:
    return field(metadata={"arrow": arrow, "note": note})


@dataclass(frozen=True)
class VoteRow:
    """The votes of one image's phase (or one noise chunk of it), with everything a
    certificate needs offline: n, sigma, seed, chunk size and the models' identity."""

    run_id: str = _column(pa.string())
    image_id: int = _column(pa.int64())
    image_name: str | None = _column(pa.string())
    label: int = _column(pa.int64(), "-1 when unknown (APIs use label_name)")
    label_name: str | None = _column(pa.string())
    phase: str = _column(pa.string(), "selection | estimation | prediction")
    n: int = _column(pa.int64(), "samples drawn; > sum(counts) when some samples gave no vote")
    classes: list[str] | None = _column(pa.list_(pa.string()))
    counts: list[int] = _column(pa.list_(pa.int64()))
    sigma: float = _column(pa.float64())
    seed: int = _column(pa.int64())
    chunk_size: int = _column(pa.int64())
    model: str = _column(pa.string())
    model_sha256: str | None = _column(pa.string())
    denoiser: str | None = _column(pa.string())
    denoiser_sha256: str | None = _column(pa.string())
    worker: str = _column(pa.string())
    elapsed_s: float = _column(pa.float64())
    finished_at: datetime = _column(pa.timestamp("ms", tz="UTC"))
    # Sequential runs store one row per noise chunk: its index in the phase (n = its samples).
    # Null for a fixed-n row, which holds the whole phase; parts written before this column
    # existed read it as null.
    chunk: int | None = _column(pa.int64(), "noise chunk of a sequential run; null for a whole phase")

    def get(self, name: str, default: Any = None) -> Any:
        return getattr(self, name, default)

    def __getitem__(self, name: str) -> Any:
        """Read like the Parquet row it becomes (`row["counts"]`)."""
        try:
            return getattr(self, name)
        except AttributeError:
            raise KeyError(name) from None


VOTE_SCHEMA = pa.schema([(f.name, f.metadata["arrow"]) for f in fields(VoteRow)])
VOTE_KEY = ["image_id", "phase", "chunk"]  # one row per key; a repeated key is a rewritten copy

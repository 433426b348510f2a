"""The query log: one Parquet row per API query, written as queries return.

Paid answers are the expensive part of an API certification, so every one is kept with
the full label list and scores; vote counts, certificates at another alpha, or with a
smaller n0/n, are recomputed from this log without a new query (`votes_from_queries`).
The log is also what makes resumption exact: a (image, phase, sample) with a *done* row
(an answer, or an answer that was malformed) is never queried again.

Files: `RUN_DIR/queries/part-*.parquet`, each written atomically; `compact_queries`
merges them (at the end of a job) so a long run does not leave thousands of small files.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.apis.plan import CLEAN, Key, phase_sizes
from pipeline.storage import RUN_FILE, write_parquet_atomic

QUERIES_DIR = "queries"
OK, MALFORMED, FAILED = "ok", "malformed", "failed"
DONE_STATUSES = frozenset({OK, MALFORMED})  # answered: never to be asked again

QUERY_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("provider", pa.string()),
        ("image_id", pa.int64()),
        ("image_name", pa.string()),
        ("phase", pa.string()),  # clean | selection | estimation
        ("sample", pa.int64()),  # index within the phase (0 for the clean query)
        ("status", pa.string()),  # ok | malformed | failed (gave up: not done, asked again later)
        ("top_label", pa.string()),  # the query's class; null when no label came back
        ("labels", pa.list_(pa.string())),  # every returned label, in the provider's order
        ("scores", pa.list_(pa.float64())),  # their scores in [0, 1]
        ("attempts", pa.int64()),  # calls sent for this query, retries included
        ("latency_s", pa.float64()),  # of the last attempt
        ("elapsed_s", pa.float64()),  # all attempts and back-off
        ("cost", pa.float64()),  # attempts x price per call
        ("error", pa.string()),  # last error, scrubbed of secrets
        ("worker", pa.string()),
        ("finished_at", pa.timestamp("ms", tz="UTC")),
    ]
)


def write_queries(run_dir: str | Path, rows: Iterable[Mapping[str, Any]], worker: str = "main") -> Path | None:
    """Append query rows (dicts with QUERY_SCHEMA's fields) as one part file."""
    rows = list(rows)
    if not rows:
        return None
    columns = {field.name: [row.get(field.name) for row in rows] for field in QUERY_SCHEMA}
    table = pa.Table.from_pydict(columns, schema=QUERY_SCHEMA)
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in worker)[:40] or "worker"
    return write_parquet_atomic(table, Path(run_dir) / QUERIES_DIR / f"part-{safe}-{uuid.uuid4().hex}.parquet")


def query_parts(run_dir: str | Path) -> list[Path]:
    return sorted((Path(run_dir) / QUERIES_DIR).glob("part-*.parquet"))


def read_query_log(run_dir: str | Path, dedup: bool = True) -> pd.DataFrame:
    """The log as a DataFrame. dedup=True keeps one row per (image, phase, sample): the
    first done row if any, else the latest failure; dedup=False keeps every row (spending)."""
    parts = query_parts(run_dir)
    if not parts:
        return QUERY_SCHEMA.empty_table().to_pandas()
    frame = pa.concat_tables(pq.read_table(p, schema=QUERY_SCHEMA) for p in parts).to_pandas()
    if not dedup or frame.empty:
        return frame.reset_index(drop=True)
    frame = frame.assign(_done=frame["status"].isin(DONE_STATUSES))
    frame = frame.sort_values(
        ["image_id", "phase", "sample", "_done", "finished_at"], ascending=[True, True, True, False, True], kind="stable"
    )
    frame = frame.drop_duplicates(["image_id", "phase", "sample"], keep="first")
    return frame.drop(columns="_done").reset_index(drop=True)


def compact_queries(run_dir: str | Path) -> Path | None:
    """Merge all part files into one (every row kept), then remove the merged parts.

    A crash between the write and the removals leaves duplicates, which readers drop.
    """
    parts = query_parts(run_dir)
    if len(parts) <= 1:
        return parts[0] if parts else None
    table = pa.concat_tables(pq.read_table(p, schema=QUERY_SCHEMA) for p in parts)
    merged = write_parquet_atomic(table, Path(run_dir) / QUERIES_DIR / f"part-compact-{uuid.uuid4().hex}.parquet")
    for part in parts:
        part.unlink(missing_ok=True)
    return merged


def done_keys(frame: pd.DataFrame) -> dict[int, set[Key]]:
    """image id -> {(phase, sample)} already answered."""
    done = frame[frame["status"].isin(DONE_STATUSES)]
    result: dict[int, set[Key]] = {}
    for image_id, phase, sample in zip(done["image_id"], done["phase"], done["sample"]):
        result.setdefault(int(image_id), set()).add((str(phase), int(sample)))
    return result


def vote_rows(
    queries: Sequence[Mapping[str, Any]],
    identity: Mapping[str, Any],
    run_id: str,
    n0: int,
    n: int,
) -> list[dict[str, Any]] | None:
    """The selection and estimation vote rows (storage.VOTE_SCHEMA) of ONE image from its
    done query rows, using samples 0..n0-1 and 0..n-1; None while any of them is missing.

    Every sample counts in `n`, so a query without a label (malformed answer, or no label
    returned) counts against the top class instead of shrinking the sample.
    """
    by_key = {(str(q["phase"]), int(q["sample"])): q for q in queries if q["status"] in DONE_STATUSES}
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
        votes = Counter(q["top_label"] for q in chosen if q["status"] == OK and _present(q["top_label"]))
        classes = sorted(votes)
        rows.append(
            {
                "run_id": run_id,
                "image_id": int(clean["image_id"]),
                "image_name": clean.get("image_name"),
                "label": -1,
                "label_name": clean["top_label"] if clean["status"] == OK and _present(clean["top_label"]) else None,
                "phase": phase,
                "n": size,
                "classes": classes,
                "counts": [votes[c] for c in classes],
                "sigma": float(identity["sigma"]),
                "seed": int(identity["seed"]),
                "chunk_size": int(identity["chunk_size"]),
                "model": _model_name(identity),
                "model_sha256": None,
                "denoiser": identity.get("denoiser"),
                "denoiser_sha256": identity.get("denoiser_sha256"),
                "worker": "certify-api",
                "elapsed_s": float(sum(float(q.get("elapsed_s") or 0.0) for q in chosen)),
                "finished_at": max(_timestamp(q.get("finished_at")) for q in chosen),
            }
        )
    return rows


def votes_from_queries(run_dir: str | Path, n0: int | None = None, n: int | None = None) -> list[dict[str, Any]]:
    """Vote rows for every image whose first n0 selection and n estimation samples (and
    clean query) are answered; n0/n default to the run's, and may not exceed them."""
    record = json.loads((Path(run_dir) / RUN_FILE).read_text())
    identity, run_id = record["identity"], record["run_id"]
    n0 = int(identity["n0"]) if n0 is None else int(n0)
    n = int(identity["n"]) if n is None else int(n)
    if not 1 <= n0 <= int(identity["n0"]) or not 1 <= n <= int(identity["n"]):
        raise ValueError(f"n0={n0}, n={n}: must lie in [1, run's n0={identity['n0']}] and [1, run's n={identity['n']}]")
    frame = read_query_log(run_dir)
    rows: list[dict[str, Any]] = []
    for _, group in frame.groupby("image_id", sort=True):
        image_rows = vote_rows(group.to_dict("records"), identity, run_id, n0, n)
        if image_rows is not None:
            rows.extend(image_rows)
    return rows


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and pd.isna(value))


def _timestamp(value: Any) -> datetime:
    if value is None or (not isinstance(value, datetime) and pd.isna(value)):
        return datetime.now(timezone.utc)
    return pd.Timestamp(value).to_pydatetime()


def _model_name(identity: Mapping[str, Any]) -> str:
    provider = str(identity.get("provider"))
    detail = identity.get("clarifai_model") or identity.get("azure_api_version")
    return f"api:{provider}" + (f":{detail}" if detail else "")

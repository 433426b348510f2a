"""Run directories and the Parquet vote stream.

A run directory holds `run.json` (the settings that define the run: change one of them and
the old votes no longer mean the same thing) and `votes/part-*.parquet`, each written
atomically (temporary file in the same folder, fsync, rename), so a reader never sees half a
file and a crash loses at most the parts not yet renamed. Each vote row holds everything a
certificate needs offline: image, phase, per-class counts, n, sigma, seed and model identity,
so `dsmooth reduce` can recompute at any alpha without new samples.
"""

from __future__ import annotations

import json
import tempfile
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.atomic import atomic_open

RUN_FILE = "run.json"
VOTES_DIR = "votes"

# One row per (image, phase). `counts` is dense over class indices for local models; for
# APIs, `classes` names the label string of each entry of `counts` (null for local models).
VOTE_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("image_id", pa.int64()),
        ("image_name", pa.string()),
        ("label", pa.int64()),  # -1 when unknown (APIs use `label_name`)
        ("label_name", pa.string()),
        ("phase", pa.string()),  # selection | estimation | prediction
        ("n", pa.int64()),  # samples drawn; > sum(counts) when some samples gave no vote
        ("classes", pa.list_(pa.string())),
        ("counts", pa.list_(pa.int64())),
        ("sigma", pa.float64()),
        ("seed", pa.int64()),
        ("chunk_size", pa.int64()),
        ("model", pa.string()),
        ("model_sha256", pa.string()),
        ("denoiser", pa.string()),
        ("denoiser_sha256", pa.string()),
        ("worker", pa.string()),
        ("elapsed_s", pa.float64()),
        ("finished_at", pa.timestamp("ms", tz="UTC")),
    ]
)


class RunMismatchError(ValueError):
    """The directory holds a run made with other settings; mixing would corrupt both."""


def write_parquet_atomic(table: pa.Table, path: str | Path) -> Path:
    """Write `table` to `path` so that the file either exists complete or not at all."""
    with atomic_open(path, "wb") as handle:
        pq.write_table(table, handle)
    return Path(path)


def write_json_atomic(data: Any, path: str | Path) -> Path:
    with atomic_open(path, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True, default=str)
    return Path(path)


def open_run(run_dir: str | Path, identity: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> dict:
    """Create a run directory, or reopen one made with the same `identity` (resume).

    `identity` holds every setting that changes what the votes mean (data set, models and
    their hashes, sigma, n0, n, seed, chunk size...). Settings that only change speed (batch
    size, number of actors) belong in `extra` and may differ between resumptions.
    Raises RunMismatchError naming each differing setting.
    """
    run_dir = Path(run_dir)
    _check_writable(run_dir)
    run_file = run_dir / RUN_FILE
    identity = json.loads(json.dumps(dict(identity), default=str))  # normalise types as JSON does
    if run_file.exists():
        existing = json.loads(run_file.read_text())
        differences = {
            key: (existing["identity"].get(key), identity.get(key))
            for key in sorted(set(existing["identity"]) | set(identity))
            if existing["identity"].get(key) != identity.get(key)
        }
        if differences:
            lines = ", ".join(f"{k}: run has {old!r}, now {new!r}" for k, (old, new) in differences.items())
            raise RunMismatchError(
                f"{run_dir} holds a run with other settings ({lines}); use another output directory "
                "or the original settings"
            )
        return existing
    record = {"run_id": uuid.uuid4().hex[:12], "identity": identity, "extra": dict(extra or {})}
    write_json_atomic(record, run_file)
    return record


def _check_writable(run_dir: Path) -> None:
    """Fail before any work when results could not be saved."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as error:
        raise PermissionError(f"output directory {run_dir} is not writable: {error.strerror or error}") from None


def new_part_path(run_dir: str | Path, worker: str) -> Path:
    """A fresh, never-reused name for one part file of the vote stream."""
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in worker)[:40] or "worker"
    return Path(run_dir) / VOTES_DIR / f"part-{safe}-{uuid.uuid4().hex}.parquet"


def write_votes(run_dir: str | Path, rows: Iterable[Mapping[str, Any]], worker: str = "main") -> Path | None:
    """Append rows (dicts with VOTE_SCHEMA's fields; missing ones become null) as one part."""
    rows = list(rows)
    if not rows:
        return None
    columns = {field.name: [row.get(field.name) for row in rows] for field in VOTE_SCHEMA}
    table = pa.Table.from_pydict(columns, schema=VOTE_SCHEMA)
    return write_parquet_atomic(table, new_part_path(run_dir, worker))


def vote_parts(run_dir: str | Path) -> list[Path]:
    return sorted((Path(run_dir) / VOTES_DIR).glob("part-*.parquet"))


def read_votes(run_dir: str | Path) -> pd.DataFrame:
    """All vote rows of a run, one per (image_id, phase); later duplicates are dropped."""
    parts = vote_parts(run_dir)
    if not parts:
        return VOTE_SCHEMA.empty_table().to_pandas()
    frame = pa.concat_tables(pq.read_table(p, schema=VOTE_SCHEMA) for p in parts).to_pandas()
    frame = frame.sort_values(["image_id", "phase", "finished_at"], kind="stable")
    return frame.drop_duplicates(["image_id", "phase"], keep="first").reset_index(drop=True)


def completed_images(run_dir: str | Path, phases: Iterable[str]) -> set[int]:
    """Image ids that have a row for every one of `phases` (finished work)."""
    frame = read_votes(run_dir)
    if frame.empty:
        return set()
    phases = set(phases)
    have = frame.groupby("image_id")["phase"].agg(set)
    return {int(image_id) for image_id, got in have.items() if phases <= got}

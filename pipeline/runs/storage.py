"""Run directories, the vote rows they hold and their Parquet part streams, on a local disk or
object storage.

A run directory holds `run.json` (the settings that define the run: change one of them and
the old results no longer mean the same thing) and part streams such as `votes/part-*.parquet`
(and an API run's `queries/`). Every part is written atomically, so a reader never sees half
a file and a crash loses at most the parts not yet written; a small manifest per part, in
`RUN/manifests/<stream>/`, says which images it holds, so that a part damaged later can be
named with its images and the way to recover them. The manifests live outside the stream's
folder so that `votes/` is a plain Parquet dataset: pandas, pyarrow.dataset, DuckDB, Polars
and Spark read the directory as it is. Runs written before kept each manifest beside its part
(`votes/part-*.parquet.json`); those are still found, and deleted with their part. Each vote
row holds everything a certificate needs offline: image, phase, per-class counts, n, sigma,
seed, chunk size and model identity, so `dsmooth reduce` recomputes at any alpha without new
samples; it reports the intact images of a run with a damaged part (`read_intact_votes`),
while resume refuses it (`read_votes`).

All paths are `pipeline.runs.fs.Location`s: `runs/x`, `s3://bucket/runs/x`, `gs://bucket/runs/x`.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.runs.fs import Location, StorageError, check_writable  # noqa: F401 - declared beside Location
from pipeline.runs.lock import check_held

RUN_FILE = "run.json"
VOTES_DIR = "votes"
MANIFEST_SUFFIX = ".json"
MANIFESTS_DIR = "manifests"  # RUN/manifests/<stream folder>/<part name>.json


# One vote row: the unit every certification run stores and `dsmooth reduce` reads.
#
# `VoteRow` is the one definition of a row's fields; the Parquet schema (`VOTE_SCHEMA`) is
# derived from it, and both samplers (model actors and API actors) build their rows as
# `VoteRow`s, so a field cannot be added to one path and forgotten in the other.
#
# One row per (image, phase), or per (image, phase, chunk) in a sequential run. `counts` is
# dense over class indices for local models; for APIs, `classes` names the label string of
# each entry of `counts` (null for local models).

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



class RunMismatchError(ValueError):
    """The directory holds a run made with other settings; mixing would corrupt both."""


class CorruptPartError(ValueError):
    """A part file cannot be read; the message names its images and how to recover them."""


@dataclass(frozen=True)
class DamagedPart:
    """An unreadable part, the images its manifest lists, and why it could not be read."""

    part: Location
    images: tuple[int, ...]
    message: str


# -- run records --------------------------------------------------------------------------------


def write_json(data: Any, where: str | Location) -> Location:
    """Write JSON atomically (sorted keys, so equal data gives equal bytes)."""
    location = Location.of(where)
    check_held(location)  # never into a run whose lease this job lost
    location.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    return location


def read_run_record(run: str | Location) -> dict:
    """run.json of a run directory; FileNotFoundError when there is none."""
    location = Location.of(run) / RUN_FILE
    try:
        return json.loads(location.read_text())
    except ValueError as error:
        raise StorageError(f"{location} is not valid JSON ({error}); it cannot be used") from None


def is_run(where: str | Location) -> bool:
    return (Location.of(where) / RUN_FILE).is_file()


def open_run(run: str | Location, identity: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> dict:
    """Create a run directory, or reopen one made with the same `identity` (resume).

    `identity` holds every setting that changes what the results mean (see
    pipeline.runs.identity); speed settings belong in `extra` and may differ between
    resumptions. Raises RunMismatchError naming each differing setting.
    """
    run = Location.of(run)
    check_writable(run)
    identity = _normalised(identity)
    differences = run_differences(run, identity)
    if differences:
        lines = ", ".join(f"{k}: run has {old!r}, now {new!r}" for k, (old, new) in differences.items())
        raise RunMismatchError(
            f"{run} holds a run with other settings ({lines}); use another output directory "
            "or the original settings"
        )
    if (run / RUN_FILE).exists():
        return read_run_record(run)
    from pipeline.runs.identity import max_radius  # scipy, only when a run is created

    record = {"run_id": uuid.uuid4().hex[:12], "identity": identity, "extra": dict(extra or {})}
    record["max_radius"] = max_radius(record)  # what no image of the run can be certified beyond
    write_json(record, run / RUN_FILE)
    return record


def _normalised(identity: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(dict(identity), default=str))  # types as JSON stores them


def run_differences(run: str | Location, identity: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """setting -> (the run's value, `identity`'s) for each setting that keeps `run` from being
    resumed with `identity`; empty when there is no run yet or it matches. What `open_run`
    refuses on, readable before any work starts (the demo checks its options with it)."""
    run = Location.of(run)
    if not (run / RUN_FILE).exists():
        return {}
    existing = read_run_record(run)["identity"]
    identity = _normalised(identity)
    return {key: (existing.get(key), identity.get(key)) for key in sorted(set(existing) | set(identity))
            if existing.get(key) != identity.get(key)}


def update_run_record(run: str | Location, **fields: Any) -> dict:
    """Set top-level fields of run.json (the run is exclusive to its writer, see runlock)."""
    run = Location.of(run)
    record = read_run_record(run)
    record.update(fields)
    write_json(record, run / RUN_FILE)
    return record


# -- part streams --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PartStream:
    """Rows of one `schema` written as atomic Parquet parts into `folder` of a run.

    Each part `part-<worker>-<uuid>.parquet` gets a manifest `manifests/<folder>/<part>.json`
    written first, listing the images it holds; a manifest without its part (a crash in
    between) is ignored.
    """

    folder: str
    schema: pa.Schema

    def location(self, run: str | Location) -> Location:
        return Location.of(run) / self.folder

    def parts(self, run: str | Location) -> list[Location]:
        return [p for p in self.location(run).files() if p.name.startswith("part-") and p.name.endswith(".parquet")]

    def write(self, run: str | Location, rows: Iterable[Mapping[str, Any]], worker: str = "main") -> Location | None:
        """Append rows (dicts with the schema's fields; missing ones become null) as one part."""
        rows = list(rows)
        if not rows:
            return None
        columns = {f.name: [row.get(f.name) for row in rows] for f in self.schema}
        table = pa.Table.from_pydict(columns, schema=self.schema)
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in worker)[:40] or "worker"
        part = self.location(run) / f"part-{safe}-{uuid.uuid4().hex}.parquet"
        images = sorted({int(row["image_id"]) for row in rows if row.get("image_id") is not None})
        check_held(part)  # never into a run whose lease this job lost
        write_json({"images": images, "rows": len(rows)}, _manifest(part))
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        part.write_bytes(buffer.getvalue())
        return part

    def read_part(self, part: Location) -> pa.Table:
        try:
            return pq.read_table(io.BytesIO(part.read_bytes()), schema=self.schema)
        except (OSError, ValueError, pa.ArrowException) as error:
            raise CorruptPartError(_corruption_message(part, error)) from None

    def read(self, run: str | Location) -> pd.DataFrame:
        """Every row of every part (duplicates included); CorruptPartError for a damaged part."""
        parts = self.parts(run)
        if not parts:
            return self.schema.empty_table().to_pandas()
        return pa.concat_tables(self.read_part(p) for p in parts).to_pandas()

    def read_intact(self, run: str | Location) -> tuple[pd.DataFrame, list[DamagedPart]]:
        """The rows of the images no damaged part holds, and the damaged parts. An image of a
        damaged part loses its rows in intact parts too (a sequential image would otherwise be
        replayed from some of its chunks). CorruptPartError when a damaged part's manifest is
        gone as well: which images are incomplete is then unknown."""
        tables, damaged = [], []
        for part in self.parts(run):
            try:
                tables.append(self.read_part(part))
            except CorruptPartError as error:
                manifest = read_manifest(part)
                if manifest is None:
                    raise
                damaged.append(DamagedPart(part, tuple(int(i) for i in manifest.get("images", [])), str(error)))
        if not tables:
            return self.schema.empty_table().to_pandas(), damaged
        frame = pa.concat_tables(tables).to_pandas()
        lost = {image for d in damaged for image in d.images}
        if lost and "image_id" in frame:
            frame = frame[~frame["image_id"].isin(lost)].reset_index(drop=True)
        return frame, damaged


def _manifest(part: Location) -> Location:
    """Where a new part's manifest goes: RUN/manifests/<stream folder>/<part>.json."""
    stream = part.parent
    return stream.parent / MANIFESTS_DIR / stream.name / (part.name + MANIFEST_SUFFIX)


def _manifests(part: Location) -> list[Location]:
    """Every place a part's manifest may be: the manifests folder, then beside the part
    (runs written before the manifests folder)."""
    return [_manifest(part), part.parent / (part.name + MANIFEST_SUFFIX)]


def read_manifest(part: Location) -> dict[str, Any] | None:
    """A part's manifest ({"images": [...], "rows": n}); None when it is missing or unreadable."""
    for manifest in _manifests(part):
        try:
            return json.loads(manifest.read_text())
        except FileNotFoundError:
            continue
        except (OSError, ValueError, StorageError):
            return None
    return None


def _corruption_message(part: Location, error: BaseException) -> str:
    manifest = read_manifest(part)
    if manifest is not None:
        images = manifest.get("images", [])
        held = f"it held images {', '.join(map(str, images[:20]))}{' ...' if len(images) > 20 else ''}"
    else:
        held = "its manifest is missing too, so which images it held is unknown"
    return (
        f"{part} is unreadable ({type(error).__name__}: {str(error).splitlines()[0][:200]}); {held}. "
        f"To recover: delete it and rerun the same command, which certifies those images again"
    )


VOTES = PartStream(VOTES_DIR, VOTE_SCHEMA)


def write_votes(run: str | Location, rows: Iterable[Mapping[str, Any]], worker: str = "main") -> Location | None:
    return VOTES.write(run, rows, worker)


def read_votes(run: str | Location) -> pd.DataFrame:
    """All vote rows of a run, one per VOTE_KEY (image_id, phase[, chunk]); later duplicates
    are dropped. CorruptPartError for a damaged part: resume must not redo work around it."""
    return _unique_votes(VOTES.read(run))


def read_intact_votes(run: str | Location) -> tuple[pd.DataFrame, list[DamagedPart]]:
    """read_votes without the images of damaged parts, and those parts (what `dsmooth reduce`
    reports, naming them); see PartStream.read_intact."""
    frame, damaged = VOTES.read_intact(run)
    return _unique_votes(frame), damaged


def _unique_votes(frame: pd.DataFrame) -> pd.DataFrame:
    if frame.empty:
        return frame
    frame = frame.sort_values(["image_id", "phase", "chunk", "finished_at"], kind="stable")
    return frame.drop_duplicates(VOTE_KEY, keep="first").reset_index(drop=True)


def completed_images(run: str | Location, phases: Iterable[str]) -> set[int]:
    """Image ids that have a row for every one of `phases` (finished work)."""
    frame = read_votes(run)
    if frame.empty:
        return set()
    phases = set(phases)
    have = frame.groupby("image_id")["phase"].agg(set)
    return {int(image_id) for image_id, got in have.items() if phases <= got}

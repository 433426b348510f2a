"""Run directories and their Parquet part streams, on a local disk or object storage.

A run directory holds `run.json` (the settings that define the run: change one of them and
the old results no longer mean the same thing) and part streams such as `votes/part-*.parquet`
(and an API run's `queries/`). Every part is written atomically, so a reader never sees half
a file and a crash loses at most the parts not yet written; a small manifest beside each part
says which images it holds, so that a part damaged later can be named with its images and
the way to recover them. Each vote row holds everything a certificate needs offline: image,
phase, per-class counts, n, sigma, seed, chunk size and model identity, so `dsmooth reduce`
recomputes at any alpha without new samples.

All paths are `pipeline.runs.fs.Location`s: `runs/x`, `s3://bucket/runs/x`, `gs://bucket/runs/x`.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.runs.fs import Location, StorageError
from pipeline.runs.votes import VOTE_KEY, VOTE_SCHEMA, VoteRow  # noqa: F401 - the row type lives there

RUN_FILE = "run.json"
VOTES_DIR = "votes"
MANIFEST_SUFFIX = ".json"


class RunMismatchError(ValueError):
    """The directory holds a run made with other settings; mixing would corrupt both."""


class CorruptPartError(ValueError):
    """A part file cannot be read; the message names its images and how to recover them."""


# -- run records --------------------------------------------------------------------------------


def write_json(data: Any, where: str | Location) -> Location:
    """Write JSON atomically (sorted keys, so equal data gives equal bytes)."""
    location = Location.of(where)
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
    record = {"run_id": uuid.uuid4().hex[:12], "identity": identity, "extra": dict(extra or {})}
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


def check_writable(run: Location) -> None:
    """Fail before any work when results could not be saved."""
    probe = run / f".write-test-{uuid.uuid4().hex}"
    try:
        run.mkdir()
        probe.write_bytes(b"")
        probe.delete()
    except (OSError, StorageError, PermissionError) as error:
        raise PermissionError(f"output directory {run} is not writable: {error}") from None


# -- part streams --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PartStream:
    """Rows of one `schema` written as atomic Parquet parts into `folder` of a run.

    Each part `part-<worker>-<uuid>.parquet` gets a manifest `<part>.json` written first,
    listing the images it holds; a manifest without its part (a crash in between) is ignored.
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


def _manifest(part: Location) -> Location:
    return part.parent / (part.name + MANIFEST_SUFFIX)


def _corruption_message(part: Location, error: BaseException) -> str:
    try:
        images = json.loads(_manifest(part).read_text()).get("images", [])
        held = f"it held images {', '.join(map(str, images[:20]))}{' ...' if len(images) > 20 else ''}"
    except (OSError, ValueError, StorageError):
        held = "its manifest is missing too, so which images it held is unknown"
    return (
        f"{part} is unreadable ({type(error).__name__}: {str(error).splitlines()[0][:200]}); {held}. "
        f"To recover: delete it (and {part.name}{MANIFEST_SUFFIX}) and rerun the same command, which "
        "certifies those images again"
    )


VOTES = PartStream(VOTES_DIR, VOTE_SCHEMA)


def write_votes(run: str | Location, rows: Iterable[Mapping[str, Any]], worker: str = "main") -> Location | None:
    return VOTES.write(run, rows, worker)


def vote_parts(run: str | Location) -> list[Location]:
    return VOTES.parts(run)


def read_votes(run: str | Location) -> pd.DataFrame:
    """All vote rows of a run, one per VOTE_KEY (image_id, phase[, chunk]); later duplicates
    are dropped."""
    frame = VOTES.read(run)
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

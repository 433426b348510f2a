"""Run directories and the Parquet vote stream: round trip, atomicity, resume identity."""

from __future__ import annotations

import os
import stat
from datetime import datetime, timezone

import pyarrow as pa
import pytest

from pipeline.progress import Progress, format_duration
from pipeline.storage import (
    RunMismatchError,
    completed_images,
    open_run,
    read_votes,
    vote_parts,
    write_parquet_atomic,
    write_votes,
)


def vote(image_id: int, phase: str, counts: list[int], **extra) -> dict:
    return {
        "image_id": image_id, "phase": phase, "counts": counts, "n": sum(counts), "label": 1,
        "sigma": 0.25, "seed": 0, "finished_at": datetime.now(timezone.utc), **extra,
    }


def test_votes_round_trip_through_parquet(tmp_path):
    open_run(tmp_path, {"sigma": 0.25})
    write_votes(tmp_path, [vote(0, "selection", [1, 99]), vote(0, "estimation", [10, 990])], worker="actor/0")
    write_votes(tmp_path, [vote(5, "selection", [50, 50])])
    api = vote(7, "estimation", [3, 1], classes=["cat", "dog"], label_name="cat")
    api["n"] = 5
    write_votes(tmp_path, [api])
    frame = read_votes(tmp_path)
    assert len(vote_parts(tmp_path)) == 3
    assert list(frame.image_id) == [0, 0, 5, 7]
    row = frame[(frame.image_id == 0) & (frame.phase == "estimation")].iloc[0]
    assert list(row.counts) == [10, 990] and row.n == 1000 and row.sigma == 0.25
    api_row = frame[frame.image_id == 7].iloc[0]
    assert list(api_row.classes) == ["cat", "dog"] and api_row.n == 5 and api_row.label_name == "cat"
    assert completed_images(tmp_path, ["selection", "estimation"]) == {0}


def test_duplicate_rows_are_read_once(tmp_path):
    write_votes(tmp_path, [vote(1, "selection", [1, 2])])
    write_votes(tmp_path, [vote(1, "selection", [1, 2])])
    assert len(read_votes(tmp_path)) == 1


def test_failed_write_leaves_no_file(tmp_path):
    table = pa.table({"x": [1, 2]})
    write_parquet_atomic(table, tmp_path / "ok.parquet")

    class Boom(Exception):
        pass

    class Exploding:
        """A table whose serialisation fails half-way, like a crash mid-write."""

        schema = table.schema

        def __getattr__(self, name):
            raise Boom()

    with pytest.raises(Exception):
        write_parquet_atomic(Exploding(), tmp_path / "bad.parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.parquet"]


def test_resume_refuses_other_settings(tmp_path):
    first = open_run(tmp_path, {"sigma": 0.25, "n": 100}, extra={"batch_size": 10})
    again = open_run(tmp_path, {"sigma": 0.25, "n": 100}, extra={"batch_size": 99})
    assert again["run_id"] == first["run_id"]
    with pytest.raises(RunMismatchError, match="sigma: run has 0.25, now 0.5"):
        open_run(tmp_path, {"sigma": 0.5, "n": 100})


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_directory_is_refused_before_work(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    with pytest.raises(PermissionError, match="not writable"):
        open_run(locked / "run", {"sigma": 0.25})


def test_unwritable_path_is_refused_even_for_root(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(PermissionError, match="not writable"):
        open_run(blocker / "run", {"sigma": 0.25})


def test_progress_lines(capsys):
    import io

    stream = io.StringIO()
    progress = Progress("certify", total=4, every_s=0.0, stream=stream)
    progress.update(1, work=100)
    progress.update(3, work=300)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("certify: 1/4 images (25.0%)") and "ETA" in lines[0] and "samples/s" in lines[0]
    assert lines[-1].startswith("certify: 4/4 images (100.0%)") and "elapsed" in lines[-1]
    assert format_duration(3725) == "1h02m05s"

"""Run directories and part streams, on a local disk and on a real S3 server (moto on
127.0.0.1): round trip, atomicity, corrupt parts, resume identity, exclusive runs, umask."""

from __future__ import annotations

import io
import json
import logging
import os
import stat
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pytest

from pipeline.runs.fs import Location, StorageError
from pipeline.progress import Progress, format_duration
from pipeline.runs.lock import LeaseLost, RunLease, RunLockedError, exclusive_run
from pipeline.runs.storage import (
    VOTES,
    CorruptPartError,
    RunMismatchError,
    completed_images,
    open_run,
    read_votes,
    write_votes,
)
from s3_support import new_bucket

REPO = Path(__file__).resolve().parents[1]


def vote(image_id: int, phase: str, counts: list[int], **extra) -> dict:
    return {
        "image_id": image_id, "phase": phase, "counts": counts, "n": sum(counts), "label": 1,
        "sigma": 0.25, "seed": 0, "finished_at": datetime.now(timezone.utc), **extra,
    }


@pytest.fixture(params=["local", "s3"])
def run_dir(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "run")
    return f"s3://{new_bucket()}/runs/run"


def test_votes_round_trip_through_parquet(run_dir):
    open_run(run_dir, {"sigma": 0.25})
    write_votes(run_dir, [vote(0, "selection", [1, 99]), vote(0, "estimation", [10, 990])], worker="actor/0")
    write_votes(run_dir, [vote(5, "selection", [50, 50])])
    api = vote(7, "estimation", [3, 1], classes=["cat", "dog"], label_name="cat")
    api["n"] = 5
    write_votes(run_dir, [api])
    frame = read_votes(run_dir)
    assert len(VOTES.parts(run_dir)) == 3
    assert list(frame.image_id) == [0, 0, 5, 7]
    row = frame[(frame.image_id == 0) & (frame.phase == "estimation")].iloc[0]
    assert list(row.counts) == [10, 990] and row.n == 1000 and row.sigma == 0.25
    api_row = frame[frame.image_id == 7].iloc[0]
    assert list(api_row.classes) == ["cat", "dog"] and api_row.n == 5 and api_row.label_name == "cat"
    assert completed_images(run_dir, ["selection", "estimation"]) == {0}
    # dsmooth reduce reads the same run where it lies.
    from pipeline.reduce import ReduceWarning, load_inputs

    with pytest.warns(ReduceWarning, match="have no"):
        (certificates,) = load_inputs([run_dir], 0.001)
    assert sorted(certificates["image_id"]) == [0]


def test_duplicate_rows_are_read_once(run_dir):
    write_votes(run_dir, [vote(1, "selection", [1, 2])])
    write_votes(run_dir, [vote(1, "selection", [1, 2])])
    assert len(read_votes(run_dir)) == 1


def test_a_failed_write_leaves_no_part(run_dir):
    write_votes(run_dir, [vote(1, "selection", [1, 2])])
    with pytest.raises(Exception):
        write_votes(run_dir, [vote(2, "selection", [1, 2]), {"image_id": 3, "counts": "not a list"}])
    assert len(VOTES.parts(run_dir)) == 1 and set(read_votes(run_dir).image_id) == {1}


def test_a_corrupt_part_names_its_images_and_the_recovery(run_dir):
    write_votes(run_dir, [vote(3, "selection", [1, 2]), vote(3, "estimation", [4, 5]),
                          vote(8, "selection", [1, 2]), vote(8, "estimation", [4, 5])])
    good = write_votes(run_dir, [vote(9, "selection", [1, 2]), vote(9, "estimation", [4, 5])])
    bad = next(p for p in VOTES.parts(run_dir) if p != good)
    bad.write_bytes(bad.read_bytes()[:40])  # a truncated file, as a disk fault leaves it
    with pytest.raises(CorruptPartError) as caught:
        read_votes(run_dir)
    message = str(caught.value)
    assert bad.name in message and "it held images 3, 8" in message and "delete it" in message
    assert "rerun the same command" in message
    # Following the advice recovers: the other part is intact, images 3 and 8 are to be redone.
    bad.delete()
    assert completed_images(run_dir, ["selection", "estimation"]) == {9}


def test_votes_and_queries_folders_are_plain_parquet_datasets(tmp_path):
    """pandas, pyarrow.dataset and DuckDB read a run's votes/ (and an API run's queries/)
    directory as it is: nothing but parts lies there (the manifests are in RUN/manifests/)."""
    import duckdb
    import pandas as pd
    import pyarrow.dataset as ds

    from pipeline.apis.books.querylog import CALLS, compact
    from pipeline.apis.books.ledger import Journal, answer_record, sent_record

    run = tmp_path / "run"
    open_run(run, {"sigma": 0.25})
    write_votes(run, [vote(0, "selection", [1, 99]), vote(0, "estimation", [10, 990])], worker="actor/0")
    write_votes(run, [vote(5, "selection", [50, 50]), vote(5, "estimation", [3, 7])])
    journal = Journal(run, invocation="inv1")
    for sample in range(3):
        journal.append(sent_record(f"c{sample}", "inv1", "google", 4, "img4", "selection", sample, 1, "w"))
        journal.append(answer_record(f"c{sample}", "ok", top_label="cat", labels=["cat"], scores=[0.9]))
    journal.close()
    assert compact(run) == 3 and len(CALLS.parts(run)) == 1
    for folder, rows, ids in (("votes", 4, {0, 5}), ("queries", 3, {4})):
        directory = str(run / folder)
        frame = pd.read_parquet(directory)
        assert len(frame) == rows and set(frame.image_id) == ids
        assert ds.dataset(directory, format="parquet").count_rows() == rows
        with duckdb.connect() as db:
            for pattern in (directory, f"{directory}/**"):
                assert db.execute(f"select count(*) from read_parquet('{pattern}')").fetchall() == [(rows,)]
    assert sorted(p.name for p in (run / "manifests" / "votes").iterdir()) == sorted(
        p.name + ".json" for p in (run / "votes").iterdir())


def test_runs_with_manifests_beside_their_parts_are_read_as_before(tmp_path):
    """A run written before the manifests folder: its parts read, a damaged one is named with
    its images from the old manifest, and deleting a part deletes that manifest too."""
    run = tmp_path / "run"
    old = write_votes(run, [vote(3, "selection", [1, 2]), vote(3, "estimation", [4, 5])])
    new_place = Path(str(old).replace("/votes/", "/manifests/votes/") + ".json")
    old_place = Path(str(old) + ".json")
    new_place.rename(old_place)  # the old layout
    write_votes(run, [vote(9, "selection", [1, 2]), vote(9, "estimation", [4, 5])])  # a resume
    assert completed_images(run, ["selection", "estimation"]) == {3, 9}
    old.write_bytes(old.read_bytes()[:40])
    with pytest.raises(CorruptPartError, match="it held images 3"):
        read_votes(run)
    old.delete()  # the recovery a user makes (its stale manifest is never read again)
    assert completed_images(run, ["selection", "estimation"]) == {9}


def test_reduce_reports_intact_images_and_names_damaged_ones_while_resume_refuses(tmp_path, capsys):
    """A damaged part costs `dsmooth reduce` only its images (named on stderr, left out of the
    table, also their rows in intact parts); resume keeps refusing until the part is deleted."""
    from jobs.cli import main
    from pipeline.reduce import UnusableInput, load_input
    from pipeline.runs.storage import read_intact_votes

    run = tmp_path / "run"
    open_run(run, {"sigma": 0.25, "n": 1000})
    sure = [980, 20]
    write_votes(run, [vote(0, "selection", [95, 5]), vote(0, "estimation", sure), vote(1, "selection", [95, 5])])
    bad = write_votes(run, [vote(1, "estimation", sure), vote(2, "selection", [95, 5]), vote(2, "estimation", sure)])
    write_votes(run, [vote(3, "selection", [5, 95]), vote(3, "estimation", sure[::-1])])
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(CorruptPartError, match="it held images 1, 2"):
        completed_images(run, ["selection", "estimation"])  # what resume reads
    frame, damaged = read_intact_votes(run)
    assert set(frame.image_id) == {0, 3} and [(d.part, d.images) for d in damaged] == [(bad, (1, 2))]
    assert main(["reduce", str(run), "--format", "csv", "--radii", "0"]) == 0
    out, err = capsys.readouterr()
    assert "2 image(s) left out" in err and bad.name in err and "it held images 1, 2" in err
    table = pd.read_csv(io.StringIO(out))
    assert table.certified_accuracy.item() == pytest.approx(0.5)  # image 3 right, image 0 wrong: of 2, not 4
    # With its manifest gone too, which images are incomplete is unknown: the run is skipped.
    Location.of(str(bad).replace("/votes/", "/manifests/votes/") + ".json").delete()
    with pytest.raises(UnusableInput, match="its manifest is missing too"):
        load_input(run, 0.001)


def test_resume_refuses_other_settings(run_dir):
    first = open_run(run_dir, {"sigma": 0.25, "n": 100}, extra={"batch_size": 10})
    again = open_run(run_dir, {"sigma": 0.25, "n": 100}, extra={"batch_size": 99})
    assert again["run_id"] == first["run_id"]
    with pytest.raises(RunMismatchError, match="sigma: run has 0.25, now 0.5"):
        open_run(run_dir, {"sigma": 0.5, "n": 100})


def test_unknown_schemes_are_refused():
    with pytest.raises(StorageError, match="unknown storage scheme 'ftp'"):
        Location.of("ftp://host/runs/x")
    from pipeline.certify.plan import CertifyConfig
    from pipeline.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="'output': unknown storage scheme 'hdfs'"):
        parse_config(CertifyConfig, {"dataset": "cifar10", "data_root": "d", "classifier": "c", "sigma": 0.5,
                                     "output": "hdfs://cluster/runs/x"})


def test_s3_output_is_not_a_local_folder(tmp_path, monkeypatch):
    """`--output s3://bucket/x` once wrote a local folder named `s3:`."""
    bucket = new_bucket()
    monkeypatch.chdir(tmp_path)
    open_run(f"s3://{bucket}/runs/x", {"sigma": 0.25})
    assert not (tmp_path / "s3:").exists()
    assert Location.of(f"s3://{bucket}/runs/x/run.json").is_file()


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


def test_run_files_respect_the_umask(tmp_path):
    """Files of a run on shared storage are as readable as the umask allows (not 0600)."""
    code = (
        "import os, sys; os.umask(0o002); sys.path.insert(0, sys.argv[2]);"
        "from pipeline.runs.storage import open_run, write_votes;"
        "open_run(sys.argv[1], {'sigma': 0.25});"
        "write_votes(sys.argv[1], [{'image_id': 0, 'phase': 'selection', 'counts': [1], 'n': 1}])"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "run"), str(REPO)], check=True, timeout=120)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert len(files) == 3 and {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o664}


# -- exclusive runs ---------------------------------------------------------------------------


HOLD = """
import sys, time
sys.path.insert(0, sys.argv[2])
from pipeline.runs.lock import exclusive_run
with exclusive_run(sys.argv[1], "holder", lease_s=float(sys.argv[3])):
    print("held", flush=True)
    time.sleep(float(sys.argv[4]))
"""


def hold(run: str, lease_s: float = 3.0, seconds: float = 60.0) -> subprocess.Popen:
    """Another process holding `run` (started and confirmed before returning)."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, run, str(REPO), str(lease_s), str(seconds)],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_writer_is_refused_at_once_and_admitted_after(run_dir):
    holder = hold(run_dir)
    try:
        started = time.monotonic()
        with pytest.raises(RunLockedError, match=r"being written by another job, holder \(pid \d+"):
            with exclusive_run(run_dir, "second"):
                pass
        assert time.monotonic() - started < 10
    finally:
        holder.terminate()
        holder.wait(timeout=30)
    if run_dir.startswith("s3://"):
        time.sleep(3.5)  # a terminated holder's lease runs out (a clean exit releases it at once)
    with exclusive_run(run_dir, "third") as lease:
        lease.check()


@pytest.mark.slow
def test_a_dead_holders_lease_expires_and_a_live_one_is_renewed(tmp_path):
    """S3 leases: a live holder's heartbeat keeps the run; a SIGKILLed holder's lease runs out and the run
    can be taken."""
    run = f"s3://{new_bucket()}/runs/leased"
    holder = hold(run, lease_s=2.0)
    try:
        time.sleep(3.0)  # longer than the lease: only the heartbeat keeps it
        with pytest.raises(RunLockedError):
            with exclusive_run(run, "second", lease_s=2.0):
                pass
    finally:
        holder.kill()  # SIGKILL: no release, the lease must run out by itself
        holder.wait(timeout=30)
    time.sleep(2.5)
    with exclusive_run(run, "taker", lease_s=2.0) as lease:
        lease.check()
        record = json.loads(Location.of(f"{run}/.lock.json").read_text())
        assert record["job"] == "taker"


@pytest.mark.slow
def test_a_local_lock_dies_with_its_holder(tmp_path):
    """A local run lock held by a SIGKILLed process is free at once (the kernel releases the flock)."""
    run = str(tmp_path / "run")
    holder = hold(run)
    holder.kill()
    holder.wait(timeout=30)
    with exclusive_run(run, "next") as lease:  # no waiting: the kernel released the flock
        lease.check()


def test_a_lease_taken_over_stops_the_old_holder():
    """A holder that stalled past its lease (a paused VM) finds the run taken at its next
    heartbeat and stops writing, instead of writing beside the new holder."""
    run = Location.of(f"s3://{new_bucket()}/runs/stolen")
    old = RunLease(run, "old", lease_s=1.5).acquire()
    old._stop.set()
    old._thread.join()  # stalled: no heartbeat
    old.check()
    time.sleep(2.0)
    with exclusive_run(run, "new", lease_s=30):
        assert old.beat() is False
        with pytest.raises(LeaseLost, match="another job took over"):
            old.check()


def test_a_holder_that_slept_past_its_lease_learns_it_before_writing():
    """The heartbeat has not run since the lease ran out (a paused process): check() alone,
    from the lease's own expiry, renews it when nobody took it and raises when someone did."""
    run = Location.of(f"s3://{new_bucket()}/runs/slept")
    lease = RunLease(run, "sleeper", lease_s=1.5).acquire()
    lease._stop.set()
    lease._thread.join()  # no heartbeat from now on
    written = json.loads(Location.of(f"{run}/.lock.json").read_text())["expires_at"]
    time.sleep(2.0)
    lease.check()  # nobody took it: renewed on the spot, writing may go on
    assert json.loads(Location.of(f"{run}/.lock.json").read_text())["expires_at"] >= written + 2.0
    time.sleep(2.0)
    other = RunLease(run, "taker", lease_s=30).acquire()
    try:
        with pytest.raises(LeaseLost, match="another job took over"):
            lease.check()
    finally:
        other.release()


PAUSED_WRITER = """
import sys, time
sys.path.insert(0, sys.argv[2])
from datetime import datetime, timezone
from pipeline.runs.lock import exclusive_run
from pipeline.runs.storage import write_votes
with exclusive_run(sys.argv[1], "paused", lease_s=2.0):
    for image in range(10_000):  # no explicit lease check: the storage layer checks every write
        write_votes(sys.argv[1], [{"image_id": image, "phase": "selection", "counts": [1], "n": 1,
                                   "finished_at": datetime.now(timezone.utc)}])
        print("wrote", flush=True)
        time.sleep(0.5)
"""


@pytest.mark.slow
def test_a_paused_s3_writer_writes_nothing_after_losing_its_lease():
    """The reproduction of issue 21: SIGSTOP a writer past its lease, let another job take the
    run, SIGCONT it: it stops with LeaseLost and no part appears after the takeover."""
    import signal

    run = f"s3://{new_bucket()}/runs/paused"
    writer = subprocess.Popen([sys.executable, "-c", PAUSED_WRITER, run, str(REPO)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "wrote"
        writer.send_signal(signal.SIGSTOP)  # asleep between two writes
        time.sleep(3.0)
        with exclusive_run(run, "new", lease_s=30):
            parts = set(VOTES.parts(run))
            writer.send_signal(signal.SIGCONT)
            try:
                writer.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
            assert set(VOTES.parts(run)) == parts
    finally:
        writer.kill()
        _, stderr = writer.communicate(timeout=30)
    assert "LeaseLost" in stderr and "another job took over" in stderr, stderr[-2000:]


# -- progress ---------------------------------------------------------------------------------


def test_progress_lines_are_logged_off_a_terminal():
    stream = io.StringIO()  # not a terminal: plain lines through logging, no bar
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("dsmooth")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        progress = Progress("certify", total=4, every_s=0.0, stream=stream)
        progress.update(1, work=100)
        progress.update(3, work=300)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    lines = [r.getMessage() for r in records]
    assert lines[0].startswith("certify: 1/4 images (25.0%)") and "ETA" in lines[0] and "samples/s" in lines[0]
    assert lines[-1].startswith("certify: 4/4 images (100.0%)") and "elapsed" in lines[-1]
    assert stream.getvalue() == "" and "\x1b[" not in "".join(lines)
    assert format_duration(3725) == "1h02m05s"

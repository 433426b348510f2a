"""API billing integrity: a certify-api process SIGKILLed at several points and resumed pays
again only for calls that were in flight, its run total matches what the provider counted,
and its certificates equal an uninterrupted run's; the rate limit holds in every 1-second
window at the provider; the AWS path also runs against moto's Rekognition server; a run held
by another job is refused in one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from api_support import FAKE_CREDENTIALS, GRAY_IDS, RGB_IDS, install_fake_credentials, job_config
from jobs.cli import main as cli_main
from pipeline.apis.emulator import EmulatorServer
from pipeline.apis.books.querylog import CALLS, read_calls, segments, spend
from pipeline.runs.storage import read_votes
from test_own_model_and_data import assert_api_votes_sum_right

REPO = Path(__file__).resolve().parents[1]
IDS = [RGB_IDS[0], GRAY_IDS[1], RGB_IDS[1]]
PER_IMAGE = 1 + 5 + 20
NEEDED = len(IDS) * PER_IMAGE
CONCURRENCY = 4

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def emulator():
    with EmulatorServer(seed=3) as server:
        yield server


def write_config(path: Path, url: str, output: Path, ids: list[int] = IDS, **overrides) -> Path:
    config = job_config("aws", url, output, ids, **{"rate.concurrency": CONCURRENCY, "rate.qps": 60, **overrides})
    path.write_text(yaml.safe_dump(config))
    return path


def start(config: Path, **env) -> subprocess.Popen:
    environment = {**os.environ, **FAKE_CREDENTIALS, "AWS_DEFAULT_REGION": "us-east-1", **env}
    return subprocess.Popen([sys.executable, "-m", "jobs.cli", "certify-api", "--config", str(config)],
                            cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def votes_by_key(run: Path) -> dict:
    frame = read_votes(run)
    return {(int(r.image_id), r.phase): dict(zip(r.classes, r.counts)) for r in frame.itertuples()}


@pytest.fixture(scope="module")
def uninterrupted(emulator, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("uninterrupted")
    process = start(write_config(folder / "c.yaml", emulator.url, folder / "run"))
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    return votes_by_key(folder / "run")


def wait_for(predicate, process: subprocess.Popen, timeout_s: float = 300, every_s: float = 0.01) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert process.poll() is None, f"the job ended before the kill point:\n{process.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(every_s)


def journaled(run: Path) -> bool:
    return any(s.local_path.stat().st_size > 0 for s in segments(run)) if (run / "journal").exists() else False


KILL_POINTS = {
    "before any answer": lambda run, emulator, base: journaled(run) and emulator.calls("aws") == base,
    "mid-run": lambda run, emulator, base: emulator.calls("aws") - base >= NEEDED // 2,
    "during compaction": lambda run, emulator, base: bool(CALLS.parts(run)) and bool(segments(run)),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_and_resume_pays_only_for_calls_in_flight(emulator, uninterrupted, tmp_path, point):
    """A certify-api process SIGKILLed at each kill point and resumed pays only for the calls that were in
    flight: the provider's count equals the run's books."""
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", emulator.url, run)
    emulator.reset()  # repeats are counted against this run's own earlier requests only
    base, repeated_before = emulator.calls("aws"), emulator.repeated("aws")
    # small compacted parts stretch the final compaction out, so the kill can land inside it
    process = start(config, DSMOOTH_QUERY_PART_CALLS="3")
    wait_for(lambda: KILL_POINTS[point](run, emulator, base), process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    time.sleep(2.0)  # calls the dying actors had in flight reach the emulator (or never do)
    killed = spend(run)
    seen_at_kill = emulator.calls("aws") - base

    resumed = start(config)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    provider = emulator.calls("aws") - base
    repeated = emulator.repeated("aws") - repeated_before
    total = spend(run)
    # Every call the provider saw is in the run's books; only the kill's in-flight calls can
    # be in the books without having arrived (unconfirmed), and only those are asked again.
    assert total.calls - total.unconfirmed <= provider <= total.calls
    assert total.unconfirmed == killed.unconfirmed <= CONCURRENCY
    assert repeated <= CONCURRENCY and provider - repeated == NEEDED
    print(f"[figures] kill {point}: needed {NEEDED}, provider saw {seen_at_kill} before the kill and "
          f"{provider} in all, repeated {repeated}, run total {total.calls} calls ({total.unconfirmed} unconfirmed)")
    assert f"run total: {total.calls} calls" in out
    assert seen_at_kill <= killed.calls
    # The same certificates as a run never interrupted.
    assert votes_by_key(run) == uninterrupted
    assert_api_votes_sum_right(run)  # no vote row twice: plain readers (pandas, DuckDB) sum what dsmooth reads
    assert not segments(run) or point == "during compaction"


def test_sigkill_of_a_sequential_run_and_resume_store_each_chunk_once(emulator, tmp_path):
    """`certify-api --sequential` SIGKILLed once some chunks' votes are saved, then rerun: only
    the calls in flight are asked again, votes/ holds each (image, phase, chunk) once (pandas
    and DuckDB sum the n dsmooth reduces) and the certificates are an uninterrupted run's."""
    from pipeline.reduce import load_run

    sequential = {"sequential": True, "radius": 0.125, "n": 100, "rate.qps": 20}
    ids = IDS + [GRAY_IDS[0]]
    reference = start(write_config(tmp_path / "r.yaml", emulator.url, tmp_path / "reference", ids, **sequential))
    _, err = reference.communicate(timeout=600)
    assert reference.returncode == 0, err[-3000:]
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", emulator.url, run, ids, **sequential)
    emulator.reset()
    process = start(config)
    wait_for(lambda: len(list((run / "votes").glob("*.parquet"))) >= 2 if (run / "votes").exists() else False,
             process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    time.sleep(2.0)
    seen_at_kill = emulator.calls("aws")
    resumed = start(config)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert emulator.repeated("aws") <= CONCURRENCY
    assert_api_votes_sum_right(run)
    columns = ["image_id", "predict", "radius", "samples", "abstained"]
    certificates = [load_run(where).sort_values("image_id")[columns].reset_index(drop=True)
                    for where in (run, tmp_path / "reference")]
    assert certificates[0].equals(certificates[1])
    print(f"[figures] sequential kill after {seen_at_kill} of {emulator.calls('aws')} calls, "
          f"{emulator.repeated('aws')} repeated")


def test_the_rate_limit_holds_in_every_second_across_actors(emulator, tmp_path):
    """qps 10 with 32 queries in flight over 2 actors and a slow (0.2 s) provider: the
    provider's own clock never sees more than 10 calls in any second."""
    install_fake_credentials()
    emulator.reset()
    emulator.set_faults("aws", latency_s=0.2)
    try:
        config = write_config(tmp_path / "c.yaml", emulator.url, tmp_path / "run",
                              **{"rate.qps": 10, "rate.concurrency": 32, "rate.actors": 2})
        process = start(config)
        out, err = process.communicate(timeout=600)
    finally:
        emulator.set_faults("aws")
    assert process.returncode == 0, err[-3000:]
    assert emulator.calls("aws") == NEEDED
    print(f"[figures] rate: qps 10, worst 1-second window {emulator.max_in_window('aws', 1.0)} calls, "
          f"{NEEDED} calls in {emulator.starts('aws')[-1] - emulator.starts('aws')[0]:.1f} s")
    assert emulator.max_in_window("aws", 1.0) <= 10
    starts = emulator.starts("aws")
    assert (len(starts) - 1) / (starts[-1] - starts[0]) > 6  # and it is not idle: close to the limit


def test_a_run_held_by_another_job_is_refused_in_one_line(emulator, tmp_path, capsys):
    """A certify-api run whose directory another job holds is refused in one line (exit 2)."""
    from pipeline.runs.lock import exclusive_run

    config = write_config(tmp_path / "c.yaml", emulator.url, tmp_path / "run")
    with exclusive_run(tmp_path / "run", "the other job"):
        code = cli_main(["certify-api", "--config", str(config)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(lines) == 1 and "being written by another job, the other job" in lines[0]


def test_a_paused_certify_api_on_s3_stops_in_one_line_after_losing_its_lease(emulator, tmp_path):
    """`kill -STOP` a certify-api writing to s3:// past its lease, let another job take the run,
    `kill -CONT` it: no vote or query-log part is written after the takeover, and the job ends
    with one error line (exit 2), no traceback."""
    from pipeline.runs.lock import exclusive_run
    from pipeline.runs.storage import VOTES
    from s3_support import new_bucket

    output = f"s3://{new_bucket()}/runs/paused"
    config = write_config(tmp_path / "c.yaml", emulator.url, output, **{"rate.qps": 4})
    process = start(config, DSMOOTH_LEASE_S="3")
    try:
        wait_for(lambda: bool(VOTES.parts(output)), process, every_s=0.05)
        process.send_signal(signal.SIGSTOP)
        time.sleep(5.0)  # past its 3 s lease
        with exclusive_run(output, "intruder", lease_s=120):
            parts = set(VOTES.parts(output)), set(CALLS.parts(output))
            process.send_signal(signal.SIGCONT)
            process.wait(timeout=300)
            assert (set(VOTES.parts(output)), set(CALLS.parts(output))) == parts
    finally:
        process.kill()
        _, err = process.communicate(timeout=60)
    errors = [line for line in err.splitlines() if line.startswith("dsmooth certify-api: error:")]
    assert process.returncode == 2 and len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert "another job took over this run's lease" in errors[0]


def test_the_aws_path_against_motos_rekognition_server(tmp_path):
    """A second, independent implementation of Rekognition's DetectLabels (moto's server):
    the real boto3 client, the whole job, a certificate at the end."""
    from moto.server import ThreadedMotoServer

    from pipeline.reduce import load_run

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        config = write_config(tmp_path / "c.yaml", f"http://{host}:{port}", tmp_path / "run",
                              ids=[RGB_IDS[0]])
        process = start(config)
        out, err = process.communicate(timeout=600)
    finally:
        server.stop()
    assert process.returncode == 0, err[-3000:]
    calls = read_calls(tmp_path / "run")
    assert len(calls) == PER_IMAGE and (calls.status == "ok").all() and calls.top_label.notna().all()
    certificates = load_run(tmp_path / "run", 0.001)
    assert len(certificates) == 1 and certificates.iloc[0]["correct"]  # moto answers the same label every time
    assert certificates.iloc[0]["radius"] > 0

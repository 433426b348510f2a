"""certify-api under budgets and faults, and with secrets in the environment: budgets are never
passed (the emulator counts), resumption never repeats a query, throttling, 5xx and
malformed answers do not change a certificate (they are retried), auth failures stop at
once, billing counts what the provider bills, and no credential reaches a file, a log or
the terminal."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import ray

from api_support import (
    FAKE_CREDENTIALS,
    GRAY_IDS,
    RGB_IDS,
    files_containing,
    job_config,
    normalise,
    oracle_labels,
    top_labels_in_log,
)
from jobs.certify_api import certify_api
from jobs.cli import main as cli_main
from pipeline.apis.emulator import EmulatorServer
from pipeline.apis.run.prepare import load_job_config
from pipeline.apis.books.querylog import read_query_log
from pipeline.runs.storage import read_votes

IDS = [RGB_IDS[0], GRAY_IDS[1]]
NEEDED = len(IDS) * (1 + 5 + 20)


pytestmark = pytest.mark.usefixtures("ray_local")  # the session's one Ray (tests/conftest.py)


@pytest.fixture()
def emulator():
    with EmulatorServer(seed=1) as server:
        yield server


@pytest.fixture(scope="module")
def oracle():
    return oracle_labels(IDS, sigma=0.25, n0=5, n=20, chunk_size=8)


def run(emulator, provider, out, ids=IDS, **overrides):
    return certify_api(load_job_config(job_config(provider, emulator.url, out, ids, **overrides)))


def test_query_budget_is_never_passed_and_a_resumed_run_repeats_nothing(emulator, tmp_path, oracle):
    first = run(emulator, "aws", tmp_path, **{"budget.max_queries": 30})
    assert emulator.calls("aws") == 30 == first.attempts  # exactly K: stopped by the budget, not before
    assert first.status == "budget" and first.pending_queries == NEEDED - 30
    assert first.estimated_cost_left == pytest.approx((NEEDED - 30) / 1000)
    assert len(read_query_log(tmp_path)) == 30

    second = run(emulator, "aws", tmp_path, **{"budget.max_queries": 1000})
    assert second.status == "complete" and second.attempts == NEEDED - 30
    assert emulator.calls("aws") == NEEDED and emulator.repeated("aws") == 0  # every query asked once
    log = read_query_log(tmp_path, dedup=False)
    assert len(log) == NEEDED and not log.duplicated(["image_id", "phase", "sample"]).any()
    assert {k: normalise(v) for k, v in top_labels_in_log(tmp_path).items()} == {k: normalise(v) for k, v in oracle.items()}
    record = json.loads((tmp_path / "spend.json").read_text())
    assert [entry["calls"] for entry in record["invocations"]] == [30, NEEDED - 30]
    assert record["total"]["calls"] == NEEDED == second.run.calls and second.run.unconfirmed == 0
    assert second.run_cost == pytest.approx(NEEDED / 1000)


@pytest.mark.slow
def test_run_budget_holds_across_invocations(emulator, tmp_path):
    """budget.run_max_queries bounds the whole run, however many invocations it takes."""
    first = run(emulator, "aws", tmp_path, **{"budget.max_queries": 20, "budget.run_max_queries": 35})
    second = run(emulator, "aws", tmp_path, **{"budget.max_queries": 20, "budget.run_max_queries": 35})
    third = run(emulator, "aws", tmp_path, **{"budget.max_queries": 20, "budget.run_max_queries": 35})
    assert (first.attempts, second.attempts, third.attempts) == (20, 15, 0)
    assert emulator.calls("aws") == 35 and third.status == "budget" and "run 35/35 queries" in third.message


def test_cost_budget_is_never_passed(emulator, tmp_path):
    # google at $1.50 per 1000: $0.0200 buys 13 calls ($0.0195), not 14 ($0.0210).
    summary = run(emulator, "google", tmp_path, **{"budget.max_queries": None, "budget.max_cost": 0.02})
    assert emulator.calls("google") == 13 == summary.attempts
    assert summary.cost == pytest.approx(0.0195) and summary.cost <= 0.02
    assert summary.status == "budget" and "$0.0195/$0.0200" in summary.message


def test_throttling_5xx_and_timeouts_change_no_certificate(emulator, tmp_path, oracle):
    emulator.set_faults("azure", throttle=0.25, server_error=0.15, latency_s=0.5, latency_rate=0.05)
    summary = run(emulator, "azure", tmp_path, **{"retry.timeout_s": 0.3, "retry.max_attempts": 12})
    assert summary.status == "complete" and summary.answered == NEEDED
    calls = emulator.calls("azure")
    assert calls > NEEDED  # faults were hit and retried...
    every = read_query_log(tmp_path, dedup=False)
    assert len(every) == calls == summary.attempts == summary.run.calls  # ...and every attempt was counted
    log = read_query_log(tmp_path)
    assert log.attempts.max() > 1 and (log.status == "ok").all() and len(log) == NEEDED
    # Billing: throttled and 5xx calls are not billed, answers (and timed-out calls) are.
    billed = int(every.status.isin(["ok", "malformed", "timeout"]).sum())
    assert summary.billable == billed == summary.run.billable < calls
    assert set(summary.retried) <= {"throttled", "server_error", "timeout"} and summary.retried
    # The same answers, hence the same votes and certificates, as a fault-free run.
    assert {k: normalise(v) for k, v in top_labels_in_log(tmp_path).items()} == {k: normalise(v) for k, v in oracle.items()}
    for row in read_votes(tmp_path).itertuples():
        expected = Counter(normalise(label) for (i, phase, _), label in oracle.items() if (i, phase) == (row.image_id, row.phase))
        assert dict(zip(row.classes, row.counts)) == dict(expected)


def test_queries_that_keep_failing_are_not_marked_done(emulator, tmp_path):
    emulator.set_faults("clarifai", server_error=1.0)
    summary = run(emulator, "clarifai", tmp_path, ids=IDS[:1], **{"retry.max_attempts": 2, "budget.max_queries": 6})
    assert summary.status == "budget" and emulator.calls("clarifai") == 6
    log = read_query_log(tmp_path)
    assert (log.status == "server_error").all() and log.error.str.contains("ServerError").all()
    emulator.set_faults("clarifai")
    resumed = run(emulator, "clarifai", tmp_path, ids=IDS[:1])
    assert resumed.status == "complete" and resumed.attempts == NEEDED // 2  # the failed ones were asked again
    assert len(read_query_log(tmp_path)) == NEEDED // 2 and (read_query_log(tmp_path).status == "ok").all()


def test_a_query_without_a_valid_answer_leaves_its_image_incomplete_not_wrong(emulator, tmp_path):
    emulator.set_faults("azure", malformed=1.0)
    summary = run(emulator, "azure", tmp_path, ids=IDS[:1], **{"retry.max_attempts": 2})
    assert summary.status == "failed" and summary.images_incomplete == [IDS[0]] and summary.images_complete == 0
    assert read_votes(tmp_path).empty  # no certificate (correct or wrong) from garbage answers
    assert summary.run.billable == emulator.calls("azure")  # malformed 200s are billed
    assert summary.retried == {"malformed": emulator.calls("azure")}


def test_auth_failure_stops_at_once_with_a_clear_message(emulator, tmp_path, capsys):
    emulator.set_faults("aws", auth_failure=True)
    code = cli_main(["certify-api", "--config", _write_config(tmp_path, "aws", emulator.url)])
    captured = capsys.readouterr()
    assert code == 4
    assert "refused the credentials" in captured.out and "UnrecognizedClientException" in captured.out
    assert emulator.calls("aws") <= 4  # only calls already in flight (concurrency 4)
    assert not read_query_log(tmp_path / "run").status.isin(["ok", "malformed"]).any()
    assert read_votes(tmp_path / "run").empty
    _assert_no_secret(tmp_path, captured.out + captured.err)


def test_missing_credentials_stop_before_any_call(emulator, tmp_path):
    # Credentials are read inside the actor process; a provider whose variable is unset
    # there (CLARIFAI_PAT renamed in the config) must fail before sending anything.
    summary = run(emulator, "clarifai", tmp_path, **{"api.clarifai_pat_env": "DSMOOTH_TEST_UNSET_PAT"})
    assert summary.status == "auth" and "DSMOOTH_TEST_UNSET_PAT" in summary.message
    assert emulator.calls("clarifai") == 0


@pytest.mark.parametrize("rate", [0.1, 0.3])
def test_malformed_answers_are_retried_and_change_no_certificate(emulator, tmp_path, oracle, rate):
    """10-30% garbled 200s: each is retried (and paid), and the certificates equal a fault-free
    run's -- including the clean query that fixes each image's label."""
    emulator.set_faults("google", malformed=rate)
    summary = run(emulator, "google", tmp_path, **{"retry.max_attempts": 12})
    assert summary.status == "complete" and summary.images_complete == len(IDS)
    calls = emulator.calls("google")
    print(f"[figures] malformed {rate:.0%}: {calls} calls for {NEEDED} needed, "
          f"{summary.retried.get('malformed')} retried; votes compared with the fault-free oracle below")
    assert calls > NEEDED and summary.retried.get("malformed") == calls - NEEDED
    assert {k: normalise(v) for k, v in top_labels_in_log(tmp_path).items()} == {k: normalise(v) for k, v in oracle.items()}
    for row in read_votes(tmp_path).itertuples():
        expected = Counter(normalise(label) for (i, phase, _), label in oracle.items() if (i, phase) == (row.image_id, row.phase))
        assert {normalise(c): n for c, n in zip(row.classes, row.counts)} == dict(expected)
        assert row.label_name is not None
    resumed = run(emulator, "google", tmp_path)
    assert resumed.attempts == 0


def test_no_secret_reaches_files_logs_or_terminal(emulator, tmp_path, capfd):
    # Auth errors echo the presented key (as some real services do); a throttled,
    # failing and malformed run fills the log with error texts.
    emulator.set_faults("google", throttle=0.2, server_error=0.1, malformed=0.1)  # errors quote URLs
    run(emulator, "google", tmp_path / "google", ids=[GRAY_IDS[0]], **{"retry.max_attempts": 3})
    for provider in ("aws", "google", "azure", "clarifai"):
        emulator.set_faults(provider, auth_failure=True)
        run(emulator, provider, tmp_path / f"{provider}-auth", ids=[GRAY_IDS[0]])
    captured = capfd.readouterr()
    errors = " ".join(
        str(e) for p in ("aws", "google", "azure", "clarifai")
        for e in read_query_log(tmp_path / f"{p}-auth", dedup=False).error
    )
    assert "***" in errors  # the echoed keys were there, and were scrubbed
    _assert_no_secret(tmp_path, captured.out + captured.err)
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    assert files_containing(session / "logs", list(FAKE_CREDENTIALS.values())) == []


def _write_config(tmp_path: Path, provider: str, url: str) -> str:
    import yaml

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(job_config(provider, url, tmp_path / "run", IDS)))
    return str(path)


def _assert_no_secret(root: Path, text: str) -> None:
    secrets = list(FAKE_CREDENTIALS.values())
    assert files_containing(root, secrets) == []
    assert not [s for s in secrets if s in text]

"""certify-api under budgets and faults, and with secrets in the environment: budgets are never
passed (the emulator counts), resumption never repeats a query, throttling and 5xx do not
change a certificate, auth failures stop at once, malformed answers are failures, and no
credential reaches a file, a log or the terminal."""

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
    install_fake_credentials,
    job_config,
    normalise,
    oracle_labels,
    top_labels_in_log,
)
from jobs.certify_api import certify_api
from jobs.cli import main as cli_main
from pipeline.apis.emulator import EmulatorServer
from pipeline.apis.prepare import load_job_config
from pipeline.apis.querylog import read_query_log
from pipeline.storage import read_votes

IDS = [RGB_IDS[0], GRAY_IDS[1]]
NEEDED = len(IDS) * (1 + 5 + 20)


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    install_fake_credentials()
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


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
    assert emulator.calls("aws") == NEEDED  # every query asked exactly once over both runs
    log = read_query_log(tmp_path, dedup=False)
    assert len(log) == NEEDED and not log.duplicated(["image_id", "phase", "sample"]).any()
    assert {k: normalise(v) for k, v in top_labels_in_log(tmp_path).items()} == {k: normalise(v) for k, v in oracle.items()}
    ledger = json.loads((tmp_path / "spend.json").read_text())
    assert [entry["attempts"] for entry in ledger] == [30, NEEDED - 30]
    assert second.total_attempts == NEEDED and second.total_cost == pytest.approx(NEEDED / 1000)


def test_cost_budget_is_never_passed(emulator, tmp_path):
    # google at $1.50 per 1000: $0.0200 buys 13 calls ($0.0195), not 14 ($0.0210).
    summary = run(emulator, "google", tmp_path, **{"budget.max_queries": None, "budget.max_cost": 0.02})
    assert emulator.calls("google") == 13 == summary.attempts
    assert summary.cost == pytest.approx(0.0195) and summary.cost <= 0.02
    assert summary.status == "budget" and "$0.0195/$0.0200" in summary.message


def test_throttling_5xx_and_timeouts_change_no_certificate(emulator, tmp_path, oracle):
    emulator.set_faults("azure", throttle=0.25, server_error=0.15, latency_s=0.5, latency_rate=0.05)
    summary = run(emulator, "azure", tmp_path, **{"retry.timeout_s": 0.3, "retry.max_attempts": 12})
    assert summary.status == "complete" and summary.answered == NEEDED and summary.malformed == 0
    calls = emulator.calls("azure")
    assert calls > NEEDED  # faults were hit and retried...
    log = read_query_log(tmp_path, dedup=False)
    assert int(log.attempts.sum()) == calls == summary.attempts  # ...and every attempt was counted
    assert log.attempts.max() > 1 and (log.status == "ok").all()
    errors = " ".join(e for e in log.error if isinstance(e, str))
    assert errors == ""  # a final success leaves no error on the row
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
    assert (log.status == "failed").all() and log.error.str.contains("ServerError").all()
    emulator.set_faults("clarifai")
    resumed = run(emulator, "clarifai", tmp_path, ids=IDS[:1])
    assert resumed.status == "complete" and resumed.attempts == NEEDED // 2  # the failed ones were asked again
    assert len(read_query_log(tmp_path)) == NEEDED // 2 and (read_query_log(tmp_path).status == "ok").all()


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


def test_malformed_answers_are_failures_not_labels(emulator, tmp_path, oracle):
    emulator.set_faults("google", malformed=0.3)
    summary = run(emulator, "google", tmp_path)
    assert summary.status == "complete" and summary.malformed > 0
    assert emulator.calls("google") == NEEDED  # a malformed answer is final: never retried
    log = read_query_log(tmp_path)
    bad = log[log.status == "malformed"]
    assert len(bad) == summary.malformed and bad.top_label.isna().all()
    assert all(len(labels) == 0 for labels in bad.labels)
    votes = read_votes(tmp_path)
    for row in votes.itertuples():
        missing = ((log.image_id == row.image_id) & (log.phase == row.phase) & (log.status == "malformed")).sum()
        assert sum(row.counts) + missing == row.n  # failures count in n, against the top class
    resumed = run(emulator, "google", tmp_path)
    assert resumed.attempts == 0  # malformed answers were answered: not asked again


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

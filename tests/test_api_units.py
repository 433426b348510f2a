"""The API job's parts without Ray: secrets scrubbing, rate limit, back-off, budget, PNG
encoding, work planning and noise addressing, the query log, config validation, CLI help,
dry runs and the run lock."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from api_support import IMAGES, RGB_IDS, job_config
from pipeline.apis.budget import Budget
from pipeline.apis.config import RetrySettings
from pipeline.apis.encoding import decode_png, encode_png, to_uint8
from pipeline.apis.plan import CLEAN, needed_keys, plan_image
from pipeline.apis.prepare import load_job_config
from pipeline.apis.querylog import compact_queries, query_parts, read_query_log, vote_rows, write_queries
from pipeline.apis.ratelimit import RateLimiter
from pipeline.apis.retry import backoff_delay
from pipeline.apis.runstate import RunLockedError, run_lock
from pipeline.apis.sampling import noisy_images
from pipeline.apis.secrets import describe, scrub
from pipeline.config import ConfigError
from pipeline.noise import SampleRequest

from noise_support import direct_noise
from pipeline.storage import RunMismatchError

# -- secrets ---------------------------------------------------------------------------------


def test_scrub_removes_credential_values_and_shapes(monkeypatch):
    monkeypatch.setenv("CLARIFAI_PAT", "pat-value-123456")
    text = (
        "headers={'Authorization': 'AWS4-HMAC-SHA256 Credential=AKIAABCDEFGHIJKLMNOP/2024/us-east-1/x, "
        "Signature=deadbeef'} url=https://h/v1/images:annotate?key=AIzaSecret123&alt=json "
        "x-goog-api-key: AIzaOther456 Ocp-Apim-Subscription-Key=azkey789 token pat-value-123456 "
        "Authorization: Key abcdefghijkl path=/v1 compat=yes"
    )
    clean = scrub(text)
    for secret in ("AKIAABCDEFGHIJKLMNOP", "deadbeef", "AIzaSecret123", "AIzaOther456", "azkey789",
                   "pat-value-123456", "abcdefghijkl"):
        assert secret not in clean
    assert "path=/v1" in clean and "compat=yes" in clean  # ordinary text survives
    assert describe(ValueError("x" * 2000)).endswith("...") and len(describe(ValueError("x" * 2000))) <= 500


# -- rate limit and back-off ---------------------------------------------------------------


def test_rate_limiter_spaces_starts_and_caps_concurrency():
    limiter = RateLimiter(qps=40, concurrency=2)
    active, peak, starts = [0], [0], []
    lock = threading.Lock()

    def work():
        with limiter.slot():
            with lock:
                starts.append(time.monotonic())
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            time.sleep(0.03)
            with lock:
                active[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(21)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == 2
    starts.sort()
    assert starts[-1] - starts[0] >= 20 / 40 - 0.01  # 21 starts at 40/s span at least 0.5 s


def test_backoff_is_full_jitter_within_its_ceiling():
    settings = RetrySettings(base_delay_s=0.1, max_delay_s=10.0)
    rng = random.Random(0)
    delays = np.array([backoff_delay(3, settings, rng) for _ in range(2000)])
    assert delays.min() >= 0 and delays.max() <= 0.8
    assert stats.kstest(delays / 0.8, "uniform").pvalue > 1e-3  # uniform on [0, base * 2^3]
    assert max(backoff_delay(30, settings, rng) for _ in range(200)) <= 10.0  # capped
    assert backoff_delay(0, settings, rng, floor_s=2.0) >= 2.0  # Retry-After respected
    assert backoff_delay(0, settings, rng, floor_s=99.0) == 10.0  # ...but never above the cap


# -- budget --------------------------------------------------------------------------------


def test_budget_grants_exactly_its_limit_under_contention():
    budget = Budget(max_queries=137, max_cost=None, price_per_1000=1.5)
    granted = []

    def hammer():
        granted.append(sum(budget.reserve() for _ in range(100)))

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snapshot = budget.snapshot()
    assert sum(granted) == 137 == snapshot.queries and snapshot.exhausted
    assert snapshot.cost == pytest.approx(137 * 0.0015) and snapshot.queries_left == 0


def test_cost_limit_is_exact_and_halt_stops_everything():
    budget = Budget(max_queries=None, max_cost=0.003, price_per_1000=1.0)  # $0.001 a call
    assert [budget.reserve() for _ in range(4)] == [True, True, True, False]
    other = Budget(max_queries=10, max_cost=None, price_per_1000=1.0)
    other.halt("auth")
    assert not other.reserve() and other.snapshot().halted == "auth" and other.snapshot().queries == 0
    with pytest.raises(ValueError):
        Budget(None, None, 1.0)


# -- encoding, planning, noise addressing ----------------------------------------------------


def test_png_encoding_clips_rounds_and_is_lossless():
    image = torch.tensor([[[-0.5, 0.0, 0.2 / 255, 0.6 / 255], [0.5, 1.0, 1.7, 254.4 / 255]]] * 3)
    pixels = to_uint8(image)
    assert pixels.dtype == np.uint8 and pixels.shape == (2, 4, 3)
    assert pixels[..., 0].tolist() == [[0, 0, 0, 1], [128, 255, 255, 254]]
    noisy = torch.rand(3, 17, 23) * 1.6 - 0.3
    assert np.array_equal(decode_png(encode_png(noisy)), to_uint8(noisy))


def test_plan_covers_every_query_once_and_skips_done_ones():
    units = plan_image(7, n0=5, n=20, chunk_size=8, seed=0)
    keys = [(u.phase, s) for u in units for s in u.samples]
    assert sorted(keys) == sorted(needed_keys(5, 20)) and len(keys) == len(set(keys)) == 26
    assert [len(u.samples) for u in units] == [1, 5, 8, 8, 4]
    done = {(CLEAN, 0), ("selection", 1), ("estimation", 9), ("estimation", 19)}
    later = plan_image(7, 5, 20, 8, 0, done=done)
    assert sorted((u.phase, s) for u in later for s in u.samples) == sorted(set(needed_keys(5, 20)) - done)


def test_each_sample_gets_its_own_addressed_noise():
    image = torch.rand(3, 8, 8)
    units = [u for u in plan_image(3, 5, 20, 8, seed=11) if u.phase == "estimation"]
    batches = {s: x for u in units for s, x in zip(u.samples, noisy_images(image, u.chunk, u.rows, 0.5))}
    for sample in (0, 7, 8, 19):
        chunk, row = SampleRequest(11, 3, "estimation", 20, 8).chunk_of(sample)
        expected = image + direct_noise(11, 3, "estimation", chunk.index, chunk.size, (3, 8, 8), 0.5)[row]
        assert torch.equal(batches[sample], expected)
    # Re-planning after a partial run re-creates the same noisy image for a sample.
    unit = plan_image(3, 5, 20, 8, 11, done={("estimation", k) for k in range(8, 20) if k != 13})[-1]
    (again,) = noisy_images(image, unit.chunk, unit.rows, 0.5)
    assert unit.samples == (13,) and torch.equal(again, batches[13])
    # Another seed: other noise for every sample.
    other = [u for u in plan_image(3, 5, 20, 8, seed=12) if u.phase == "estimation"]
    assert not torch.equal(noisy_images(image, other[0].chunk, other[0].rows, 0.5)[0], batches[0])


# -- query log -------------------------------------------------------------------------------


def _query(image_id, phase, sample, status="ok", label="Sky", **extra):
    return {
        "run_id": "r", "provider": "aws", "image_id": image_id, "image_name": f"img{image_id}", "phase": phase,
        "sample": sample, "status": status, "top_label": label if status == "ok" else None,
        "labels": [label] if status == "ok" else [], "scores": [0.9] if status == "ok" else [], "attempts": 1,
        "latency_s": 0.01, "elapsed_s": 0.01, "cost": 0.001, "error": None, "worker": "w",
        "finished_at": datetime.now(timezone.utc), **extra,
    }


def test_query_log_round_trip_dedup_and_compaction(tmp_path):
    write_queries(tmp_path, [_query(0, "selection", 0, status="failed"), _query(0, "selection", 1)])
    write_queries(tmp_path, [_query(0, "selection", 0, label="Snow")])
    write_queries(tmp_path, [_query(0, "selection", 0, label="Late duplicate")])
    assert len(query_parts(tmp_path)) == 3
    frame = read_query_log(tmp_path)
    assert len(frame) == 2
    assert frame.set_index("sample").loc[0, "top_label"] == "Snow"  # first *done* row wins over a failure
    assert list(frame.labels[frame["sample"] == 1].iloc[0]) == ["Sky"]
    compact_queries(tmp_path)
    assert len(query_parts(tmp_path)) == 1 and len(read_query_log(tmp_path, dedup=False)) == 4
    assert read_query_log(tmp_path).equals(frame)


def test_vote_rows_count_failures_in_n_and_need_every_sample():
    identity = {"sigma": 0.25, "seed": 0, "chunk_size": 8, "provider": "google", "denoiser": None}
    rows = [_query(1, CLEAN, 0, label="Cat")]
    rows += [_query(1, "selection", k, label="Cat") for k in range(3)]
    rows += [_query(1, "estimation", k, label="Cat" if k < 6 else "Dog") for k in range(7)]
    rows.append(_query(1, "estimation", 7, status="malformed"))
    votes = vote_rows(rows, identity, "r", n0=3, n=8)
    selection, estimation = votes
    assert selection["classes"] == ["Cat"] and selection["counts"] == [3] and selection["n"] == 3
    assert estimation["classes"] == ["Cat", "Dog"] and estimation["counts"] == [6, 1] and estimation["n"] == 8
    assert estimation["label_name"] == "Cat" and estimation["model"] == "api:google"
    assert vote_rows(rows[:-1], identity, "r", n0=3, n=8) is None  # sample 7 missing: not complete
    failed = rows[:-1] + [_query(1, "estimation", 7, status="failed")]
    assert vote_rows(failed, identity, "r", n0=3, n=8) is None  # given up: not done


# -- config, CLI, dry run, locking -----------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,field_name",
    [
        ({"api.provider": "bing"}, "api.provider"),
        ({"budget.max_queries": None}, "budget.max_queries"),
        ({"budget.max_queries": -1}, "budget.max_queries"),
        ({"budget.price_per_1000": {"ibm": 1.0}}, "budget.price_per_1000.ibm"),
        ({"rate.qps": 0}, "rate.qps"),
        ({"retry.max_attempts": 0}, "retry.max_attempts"),
        ({"sigma": -0.25}, "sigma"),
        ({"skip": 2}, "ids"),
        ({"api.endpont": "http://127.0.0.1:1"}, "api.endpont"),
        ({"api.endpoint": "127.0.0.1:8790"}, "api.endpoint"),
        ({"api.colour": "red"}, "api.colour"),
    ],
)
def test_config_errors_name_the_bad_field(tmp_path, overrides, field_name):
    with pytest.raises(ConfigError) as error:
        load_job_config(job_config("aws", "http://127.0.0.1:9", tmp_path, [0], **overrides))
    assert error.value.field == field_name


def test_example_config_parses_with_dotted_overrides():
    example = Path(__file__).resolve().parents[1] / "examples" / "certify_api_emulated.yaml"
    config = load_job_config(example, {"budget.max_queries": 7, "api.endpoint": None})
    assert config.api.provider == "aws" and config.budget.max_queries == 7 and config.n0 == 20 and config.n == 100
    assert config.api.endpoint == "http://127.0.0.1:8790"  # None overrides leave the file's value


@pytest.mark.parametrize("command,words", [("certify-api", ["budget", "resumes", "CLARIFAI_PAT", "exit status"]),
                                           ("api-emulator", ["127.0.0.1", "--throttle", "_emulator/calls"])])
def test_help_explains_the_commands(command, words):
    result = subprocess.run([sys.executable, "-m", "jobs.cli", command, "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert all(word in result.stdout for word in words)


def test_dry_run_prices_what_is_left_and_sends_nothing(tmp_path, capsys):
    from jobs.certify_api import certify_api

    config = load_job_config(job_config("clarifai", "http://127.0.0.1:9", tmp_path, RGB_IDS))
    summary = certify_api(config, dry_run=True)
    assert summary.status == "planned" and summary.attempts == 0
    assert summary.pending_queries == 2 * 26 and summary.estimated_cost_left == pytest.approx(52 * 1.2 / 1000)
    assert "left to do: 52 queries" in capsys.readouterr().out
    changed = load_job_config(job_config("clarifai", "http://127.0.0.1:9", tmp_path, RGB_IDS, sigma=0.5))
    with pytest.raises(RunMismatchError, match="sigma"):
        certify_api(changed, dry_run=True)


def test_one_job_per_run_directory(tmp_path):
    with run_lock(tmp_path):
        with pytest.raises(RunLockedError):
            with run_lock(tmp_path):
                pass
    with run_lock(tmp_path):  # released
        pass


def test_data_folder_is_the_shared_benchmark():
    assert len(list(IMAGES.glob("*.png"))) == 100

"""The API job's parts without Ray: secrets scrubbing, rate limit, back-off, budget, PNG
encoding, work planning and noise addressing, the query log, config validation, CLI help,
dry runs and the run lock."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from api_support import IMAGES, RGB_IDS, job_config
from pipeline.apis.emulator.server import max_in_window
from pipeline.apis.books.ledger import Budget
from pipeline.apis.config import RetrySettings
from api_support import decode_png
from pipeline.apis.query import encode_png, to_uint8
from pipeline.apis.query import CLEAN
from pipeline.apis.run.state import needed_keys, plan_image
from pipeline.apis.run.prepare import load_job_config
from pipeline.apis.books.ledger import Journal, answer_record, sent_record
from pipeline.apis.books.ledger import Ledger
from pipeline.apis.books.querylog import (
    CALLS,
    Spend,
    _normalise,
    calls_from_records,
    compact,
    read_calls,
    read_query_log,
    read_segment,
    segments,
    spend,
)
from pipeline.apis.run.state import answer_vote_rows as vote_rows
from pipeline.apis.query import LATE_S, RateLimiter, start_at
from pipeline.apis.query import backoff_delay
from pipeline.runs.lock import RunLockedError, exclusive_run
from pipeline.apis.query import noisy_images
from pipeline.apis.secrets import describe, scrub
from pipeline.config import ConfigError
from pipeline.sampling.noise import SampleRequest

from noise_support import chunk_of, direct_noise
from pipeline.runs.storage import RunMismatchError

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


class FakeClock:
    """A clock that moves only when told to (or when a caller sleeps)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds




TRIP_SPREAD_S = 0.25  # the promise: calls whose trips to the provider differ by up to this


@pytest.mark.parametrize("qps", [10, 4, 2.5, 0.5])
def test_starts_hold_the_rate_in_every_window_whatever_the_delays(qps):
    """Many workers, bursts of demand, stalls, throttling, and workers that reach their slot
    late by a random delay (re-slotting when more than LATE_S late): the *sends* never
    exceed qps in any 1-second window (qps < 1: one start per 1/qps seconds) -- and neither
    do the *arrivals* on the provider's clock when each call's trip takes anything from 0 to
    TRIP_SPREAD_S (the slowest and fastest trips are drawn most often: the worst case)."""
    clock = FakeClock()
    limiter = RateLimiter(qps, clock=clock)
    rng = random.Random(int(qps * 10))
    sends, arrivals, reslots = [], [], [0]

    def reslot() -> float:
        reslots[0] += 1
        return limiter.slot()

    for _ in range(400):
        slot = limiter.slot()
        delay = rng.choice([0.0, 0.0, rng.uniform(0, LATE_S), rng.uniform(LATE_S, 0.5)])  # some arrive late

        def late_clock(slot=slot, delay=delay) -> float:
            return max(clock.now, slot) + delay

        def sleep(seconds: float) -> None:
            clock.now += seconds

        sends.append(start_at(slot, reslot, clock=late_clock, sleep=sleep))
        arrivals.append(sends[-1] + rng.choice([0.0, TRIP_SPREAD_S, rng.uniform(0, TRIP_SPREAD_S)]))
        clock.now = max(clock.now, sends[-1])
        if rng.random() < 0.05:
            clock.now += rng.uniform(0, 3)  # a stall: demand then comes back in a burst
        limiter.feedback(throttled=rng.random() < 0.1)
    assert reslots[0] > 0  # late workers were really sent back for a new slot
    assert max_in_window(sends, max(1.0, 1.0 / qps)) <= max(1, int(qps))
    assert max_in_window(arrivals, max(1.0, 1.0 / qps)) <= max(1, int(qps))


def test_rate_limiter_slows_down_on_throttling_and_recovers():
    clock = FakeClock()
    limiter = RateLimiter(20, clock=clock)
    for _ in range(3):
        limiter.feedback(throttled=True)
    assert limiter.rate == pytest.approx(2.5)
    first = limiter.slot()
    second = limiter.slot()
    assert second - first == pytest.approx(1 / 2.5)  # spaced by the slower rate
    for _ in range(40):
        limiter.feedback(throttled=False)
    assert limiter.rate == pytest.approx(20)  # back to the ceiling, never above
    for _ in range(30):
        limiter.feedback(throttled=True)
    assert limiter.rate == pytest.approx(2.0)  # never below a tenth


def test_rate_limiter_is_thread_safe():
    limiter = RateLimiter(qps=40)
    slots: list[float] = []
    lock = threading.Lock()

    def work():
        granted = limiter.slot()
        with lock:
            slots.append(granted)

    threads = [threading.Thread(target=work) for _ in range(60)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max_in_window(slots, 1.0 + LATE_S) <= 40 and len(slots) == 60


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
    assert sum(granted) == 137 == snapshot.queries and snapshot.exhausted == "max_queries"
    assert snapshot.cost == pytest.approx(137 * 0.0015) and snapshot.queries == snapshot.max_queries


def test_cost_limit_is_exact_and_halt_stops_everything():
    budget = Budget(max_queries=None, max_cost=0.003, price_per_1000=1.0)  # $0.001 a call
    assert [budget.reserve() for _ in range(4)] == [True, True, True, False]
    other = Budget(max_queries=10, max_cost=None, price_per_1000=1.0)
    other.halt("auth")
    assert not other.reserve() and other.snapshot().halted == "auth" and other.snapshot().queries == 0
    with pytest.raises(ValueError):
        Budget(None, None, 1.0)


def test_run_budget_counts_every_earlier_invocation():
    """A run that already sent 95 calls (killed runs included) may send 5 more under a run
    limit of 100, whatever this invocation's own limit."""
    budget = Budget(max_queries=50, max_cost=None, price_per_1000=2.0, run_max_queries=100, run_queries_before=95)
    assert sum(budget.reserve() for _ in range(20)) == 5
    snapshot = budget.snapshot()
    assert snapshot.exhausted == "run_max_queries" and snapshot.run_queries == 100 and snapshot.queries == 5
    cost = Budget(None, None, 1.0, run_max_cost=0.010, run_queries_before=7)  # $0.001 a call
    assert sum(cost.reserve() for _ in range(10)) == 3 and cost.snapshot().exhausted == "run_max_cost"


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
        chunk, row = chunk_of(SampleRequest(11, 3, "estimation", 20, 8), sample)
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
        "image_id": image_id, "image_name": f"img{image_id}", "phase": phase,
        "sample": sample, "status": status, "top_label": label if status == "ok" else None,
        "labels": [label] if status == "ok" else [], "scores": [0.9] if status == "ok" else [],
        "latency_s": 0.01, "error": None, **extra,
    }


def journal_call(journal: Journal, image_id: int, phase: str, sample: int, status: str | None, label="Sky"):
    """One call as the ledger records it: `sent` first, then (unless None) its answer."""
    call = uuid.uuid4().hex
    journal.append(sent_record(call, journal.invocation, "aws", image_id, f"img{image_id}", phase, sample, 1, "w"))
    if status is not None:
        journal.append(answer_record(call, status, top_label=label if status == "ok" else None,
                                     labels=[label] if status == "ok" else [], scores=[0.9] if status == "ok" else []))
    return call


@pytest.mark.parametrize("where", ["local", "s3"])
def test_call_journal_replay_compaction_and_the_query_view(tmp_path, where):
    from s3_support import new_bucket

    run = str(tmp_path / "run") if where == "local" else f"s3://{new_bucket()}/run"
    first = Journal(run)
    journal_call(first, 0, "selection", 0, "throttled")
    journal_call(first, 0, "selection", 0, "malformed")
    journal_call(first, 0, "selection", 0, "ok", label="Snow")
    journal_call(first, 0, "selection", 1, "ok")
    journal_call(first, 0, "selection", 2, None)  # killed in flight: no answer recorded
    first.close()
    calls = read_calls(run)
    assert len(calls) == 5 and calls["status"].isna().sum() == 1
    assert spend(run) == Spend(calls=5, unconfirmed=1, billable=4)  # throttled: not billed; unconfirmed: may be
    view = read_query_log(run).set_index("sample")
    assert view.loc[0, "top_label"] == "Snow" and view.loc[0, "attempts"] == 3 and view.loc[1, "status"] == "ok"
    assert pd.isna(view.loc[2, "status"])
    answered = read_query_log(run).query("status == 'ok'")
    assert {(int(i), p, int(k)) for i, p, k in zip(answered["image_id"], answered["phase"], answered["sample"])} == {
        (0, "selection", 0), (0, "selection", 1)}
    second = Journal(run)  # the next invocation: compacts the first one's journal, keeps its own
    journal_call(second, 1, "clean", 0, "ok", label="Cat")
    moved = compact(run, keep_invocation=second.invocation)
    second.close()
    assert moved == 5 and len(CALLS.parts(run)) == 1
    assert segments(run) and all(second.invocation in s.name for s in segments(run))
    assert len(read_calls(run)) == 6 and spend(run).calls == 6
    compact(run)
    assert len(segments(run)) == 0 and len(CALLS.parts(run)) == 2
    assert read_query_log(run).equals(read_query_log(run))
    assert len(read_calls(run)) == 6  # nothing lost, nothing doubled


def test_a_crash_during_compaction_loses_and_doubles_nothing(tmp_path):
    run = tmp_path / "run"
    journal = Journal(run)
    for sample in range(4):
        journal_call(journal, 0, "estimation", sample, "ok")
    journal.close()
    before = read_calls(run)
    segment = segments(run)[0]
    # compaction writes the part, then deletes the segment: a crash in between leaves both.
    rows = calls_from_records(read_segment(segment))
    CALLS.write(run, [_normalise(r) for r in rows], worker="compact")
    assert len(read_calls(run)) == len(before) == 4
    compact(run)
    assert len(read_calls(run)) == 4 and len(segments(run)) == 0


def test_deleting_a_damaged_query_part_keeps_earlier_invocations_spend(tmp_path):
    """A query-log part damaged after its invocation is refused (named) until deleted; once
    deleted, its answers are gone but its calls stay in spend.json and in the run total."""
    import json

    from pipeline.apis.books.querylog import SPEND_FILE, write_spend_record
    from pipeline.runs.storage import CorruptPartError

    run = tmp_path / "run"
    first = Journal(run)
    for sample in range(3):
        journal_call(first, 0, "selection", sample, "ok")
    journal_call(first, 0, "selection", 3, "throttled")  # sent, not billed
    first.close()
    compact(run)
    write_spend_record(run, 2.0)  # what certify-api writes as an invocation ends
    damaged = CALLS.parts(run)[0]
    second = Journal(run)
    journal_call(second, 1, "selection", 0, "ok")
    second.close()
    compact(run)
    write_spend_record(run, 2.0)
    assert spend(run) == Spend(calls=5, unconfirmed=0, billable=4)
    damaged.write_bytes(damaged.read_bytes()[:50])
    with pytest.raises(CorruptPartError, match="it held images 0"):
        read_query_log(run)  # what a resume reads: refused until the part is deleted
    damaged.delete()  # the recovery a user makes
    assert set(read_calls(run)["image_id"]) == {1}  # the answers are gone...
    assert spend(run) == Spend(calls=5, unconfirmed=0, billable=4)  # ...not what they cost
    write_spend_record(run, 2.0)
    record = json.loads((run / SPEND_FILE).read_text())
    entries = {e["invocation"]: e for e in record["invocations"]}
    assert entries[first.invocation]["calls"] == 4 and entries[first.invocation]["calls_not_in_log"] == 4
    assert entries[first.invocation]["cost"] == pytest.approx(3 * 2.0 / 1000)
    assert entries[second.invocation]["calls"] == 1 and "calls_not_in_log" not in entries[second.invocation]
    assert record["total"] == {"calls": 5, "billable": 4, "unconfirmed": 0, "cost": pytest.approx(4 * 2.0 / 1000)}


def test_a_torn_last_record_is_ignored_and_durable_appends_are_on_disk(tmp_path):
    run = tmp_path / "run"
    journal = Journal(run)
    journal_call(journal, 0, "clean", 0, "ok")
    segment = segments(run)[0]
    assert b'"k":"answer"' in segment.read_bytes()  # durable: on disk before append returned
    journal.close()
    with open(segment.local_path, "ab") as handle:
        handle.write(b'{"k":"sent","call":"tor')  # a crash mid-append
    assert len(read_calls(run)) == 1


def test_the_ledger_journals_before_sending_and_never_resends_an_answer(tmp_path):
    run = tmp_path / "run"
    ledger = Ledger(run, "aws", Budget(max_queries=3, max_cost=None, price_per_1000=1.0), RateLimiter(1000),
                    answered={(5, "estimation", 2): {"top_label": "Dog", "labels": ["Dog"], "scores": [0.8]}})
    again = ledger.reserve(5, "img5", "estimation", 2, 1, "w")
    assert again.kind == "answered" and again.answer["top_label"] == "Dog"
    first = ledger.reserve(5, "img5", "estimation", 3, 1, "w")
    assert first.kind == "send" and read_calls(run)["call"].tolist() == [first.call]  # journaled already
    ledger.answered(first.call, 5, "estimation", 3, "ok", top_label="Cat", labels=["Cat"], scores=[0.9])
    assert ledger.reserve(5, "img5", "estimation", 3, 2, "w").kind == "answered"
    assert [ledger.reserve(6, "img6", "clean", 0, 1, "w").kind for _ in range(3)] == ["send", "send", "stop"]
    ledger.halt("auth", "bad key")
    assert ledger.reserve(7, "img7", "clean", 0, 1, "w").reason == "auth"
    ledger.close()
    assert spend(run) == Spend(calls=3, unconfirmed=2, billable=3)


def test_vote_rows_count_failures_in_n_and_need_every_sample():
    identity = {"sigma": 0.25, "seed": 0, "chunk_size": 8, "provider": "google", "denoiser": None}
    rows = [_query(1, CLEAN, 0, label="Cat")]
    rows += [_query(1, "selection", k, label="Cat") for k in range(3)]
    rows += [_query(1, "estimation", k, label="Cat" if k < 6 else "Dog") for k in range(7)]
    rows.append(_query(1, "estimation", 7, label=None))  # answered, but no label came back
    rows[-1]["top_label"] = None
    votes = vote_rows(rows, identity, "r", n0=3, n=8)
    selection, estimation = votes
    assert selection["classes"] == ["Cat"] and selection["counts"] == [3] and selection["n"] == 3
    assert estimation["classes"] == ["Cat", "Dog"] and estimation["counts"] == [6, 1] and estimation["n"] == 8
    assert estimation["label_name"] == "Cat" and estimation["model"] == "api:google"
    assert vote_rows(rows[:-1], identity, "r", n0=3, n=8) is None  # sample 7 missing: not complete
    for status in ("malformed", "server_error"):  # no valid answer after every retry: not done
        failed = rows[:-1] + [_query(1, "estimation", 7, status=status)]
        assert vote_rows(failed, identity, "r", n0=3, n=8) is None


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
    with exclusive_run(tmp_path, "first"):
        with pytest.raises(RunLockedError):
            with exclusive_run(tmp_path, "second"):
                pass
    with exclusive_run(tmp_path, "third"):  # released
        pass


def test_test_images_are_laid_out_like_the_paper_s_api_benchmark():
    """The images the API tests make stand for the paper's 100 ImageNet validation images:
    as many, named and sized alike, grayscale where the tests expect it."""
    from PIL import Image

    from api_support import GRAY_IDS, RGB_IDS
    from data_support import shared_data

    made = sorted(IMAGES.glob("*.png"))
    assert len(made) == 100 and all(p.name.startswith("ILSVRC2012_val_") for p in made)
    assert [Image.open(made[i]).mode for i in RGB_IDS + GRAY_IDS] == ["RGB"] * len(RGB_IDS) + ["L"] * len(GRAY_IDS)
    real = sorted(shared_data("imagenet-val-100").glob("*.png"))
    assert len(real) == len(made) and Image.open(real[0]).size == Image.open(made[0]).size

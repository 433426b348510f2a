"""Chat-API certification, slow tier: a certify-api process SIGKILLed mid-run and resumed pays
only for the calls it needs plus those in flight, its run total matches the provider's count,
tokens and money included; sequential certification needs at most a quarter of the queries of
fixed n for the same certified set on 20 images."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from api_support import FAKE_CREDENTIALS
from openai_support import REPO, chat_config, token_cost
from pipeline.apis.emulator import EmulatorServer
from pipeline.apis.books.querylog import read_calls, spend

pytestmark = pytest.mark.slow

IDS = [0, 60, 120]
NEEDED = len(IDS) * (1 + 5 + 20)
CONCURRENCY = 4


def start(config: Path) -> subprocess.Popen:
    environment = {**os.environ, **FAKE_CREDENTIALS, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "jobs.cli", "certify-api", "--config", str(config)],
                            cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_and_resume_pays_each_call_once_in_tokens_and_money(tmp_path):
    """A chat-API certify-api process SIGKILLed mid-run and resumed: the provider sees no more calls than
    the run needs plus those in flight, and the run total equals the provider's count, in calls, tokens and
    money."""
    with EmulatorServer(seed=2) as emulator:
        emulator.set_faults("openai", latency_s=0.03, refusal=0.05, throttle=0.03, retry_after_s=0.01)
        run = tmp_path / "run"
        config = tmp_path / "c.yaml"
        config.write_text(yaml.safe_dump(chat_config(emulator.url, run, IDS, **{"rate.concurrency": CONCURRENCY,
                                                                                 "rate.qps": 60})))
        process = start(config)
        deadline = time.monotonic() + 300
        while emulator.calls("openai") < NEEDED // 2:
            assert process.poll() is None, process.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "kill point never reached"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        time.sleep(2.0)  # calls the dying actors had in flight reach the emulator (or never do)
        killed, seen_at_kill = spend(run), emulator.calls("openai")

        resumed = start(config)
        out, err = resumed.communicate(timeout=600)
        assert resumed.returncode == 0, err[-3000:]
        provider = emulator.calls("openai")
        repeated = emulator.repeated("openai")
    total = spend(run)
    calls = read_calls(run)
    throttled = int((calls["status"] == "throttled").sum())
    # every call the provider saw is in the books; only the kill's in-flight calls may be there unseen
    assert total.calls - total.unconfirmed <= provider <= total.calls
    assert total.unconfirmed == killed.unconfirmed <= CONCURRENCY
    # no more calls than the run needs, plus retries of 429s, plus those in flight at the kill
    assert provider <= NEEDED + throttled + CONCURRENCY and repeated <= throttled + CONCURRENCY
    assert f"run total: {total.calls} calls, {total.tokens} tokens, ${total.cost(0.0):.4f}" in out
    answered = calls[calls["status"].notna()]
    used = int((answered.prompt_tokens.fillna(0) + answered.completion_tokens.fillna(0)).sum())
    held = int(calls.loc[calls["status"].isna(), "reserved_tokens"].fillna(0).sum())
    assert total.tokens == used + held > 0  # an unconfirmed call stays charged at its reservation
    assert total.token_cost == pytest.approx(
        sum(token_cost(p, c) for p, c in zip(answered.prompt_tokens.fillna(0), answered.completion_tokens.fillna(0)))
        + calls.loc[calls["status"].isna(), "reserved_cost"].fillna(0).sum())
    record = json.loads((run / "spend.json").read_text())
    assert record["total"]["calls"] == total.calls and len(record["invocations"]) == 2
    print(f"[figures] chat kill+resume: needed {NEEDED}, provider saw {seen_at_kill} before the kill and {provider} "
          f"in all ({throttled} throttled retries, {repeated} repeated requests), run total {total.calls} calls "
          f"({total.unconfirmed} unconfirmed), {total.tokens} tokens, ${total.token_cost:.4f}")


def test_sequential_needs_a_quarter_of_the_queries_of_fixed_n_for_the_same_certificates(ray_local, tmp_path):
    """20 images of the shipped CIFAR-10 sample, the emulated chat model: fixed n0 = 20, n = 200
    (221 queries an image) against sequential at R = 0.125 (chunks of 8, n_max 240)."""
    from jobs.certify_api import certify_api
    from pipeline.apis.run.prepare import load_job_config
    from pipeline.reduce import load_run

    radius, ids = 0.125, list(range(0, 500, 25))
    base = {"n0": 20, "n": 200, "alpha": 0.001, "rate.qps": 500, "rate.concurrency": 8}
    with EmulatorServer(seed=1) as emulator:
        fixed = certify_api(load_job_config(chat_config(emulator.url, tmp_path / "fixed", ids, **base)))
        fixed_calls = emulator.calls("openai")
        config = chat_config(emulator.url, tmp_path / "seq", ids, sequential=True, radius=radius, **base)
        config.pop("chunk_size")  # the API default for sequential runs
        seq = certify_api(load_job_config(config))
        seq_calls = emulator.calls("openai") - fixed_calls
    assert fixed.status == seq.status == "complete" and seq.undecided == 0

    def certified(run: Path) -> set[int]:
        certs = pd.DataFrame(load_run(run, 0.001)).set_index("image_id")
        return set(certs.index[certs["correct"] & (certs["radius"] >= radius)])

    same = certified(tmp_path / "fixed")
    assert certified(tmp_path / "seq") == same and len(same) >= 10
    print(f"[figures] chat sequential vs fixed on 20 images: {seq_calls} vs {fixed_calls} queries "
          f"({fixed_calls / seq_calls:.1f}x fewer), {len(same)} certified at R = {radius} by both")
    assert seq_calls * 4 <= fixed_calls

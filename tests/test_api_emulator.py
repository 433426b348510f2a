"""The local API emulator with the real client libraries (no Ray): answers, error mapping for
every fault, call counting, the retry loop, the control endpoint and the command line."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from scipy.stats import binomtest

from api_support import GRAY_IDS, IMAGES, RGB_IDS, install_fake_credentials
from pipeline.apis.config import ApiSettings, RetrySettings
from pipeline.apis.emulator import CheckpointClassifier, ColourClassifier, EmulatorServer, FaultSettings
from pipeline.apis.emulator.faults import FaultInjector
from api_support import decode_png
from pipeline.apis.errors import AuthError, MalformedResponse, QueryTimeout, ServerError, ThrottledError
from pipeline.apis.providers import make_client
from pipeline.apis.providers.base import top_label
from pipeline.apis.query import query_with_retries

PROVIDERS = ["aws", "google", "azure", "clarifai"]
FILES = sorted(IMAGES.glob("*.png"))


@pytest.fixture(scope="module", autouse=True)
def credentials():
    install_fake_credentials()


@pytest.fixture()
def emulator():
    with EmulatorServer() as server:
        yield server


def client(provider: str, url: str, timeout_s: float = 5.0):
    return make_client(ApiSettings(provider=provider, endpoint=url), timeout_s)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_real_client_reads_the_emulated_labels(emulator, provider):
    classifier = ColourClassifier()
    api = client(provider, emulator.url)
    for position in (RGB_IDS[0], GRAY_IDS[0]):
        png = FILES[position].read_bytes()
        labels = api.labels(png)
        expected = classifier.labels(decode_png(png))
        assert [label.name.lower() for label in labels] == [name.lower() for name, _ in expected]
        assert [label.score for label in labels] == pytest.approx([score for _, score in expected], abs=1e-4)
        assert top_label(labels).lower() == expected[0][0].lower()
    assert emulator.calls(provider) == 2 and emulator.calls()["aws" if provider != "aws" else "google"] == 0


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize(
    "fault,error",
    [
        ({"throttle": 1.0}, ThrottledError),
        ({"server_error": 1.0}, ServerError),
        ({"malformed": 1.0}, MalformedResponse),
        ({"auth_failure": True}, AuthError),
    ],
)
def test_each_fault_maps_to_its_error_in_one_call(emulator, provider, fault, error):
    emulator.set_faults(provider, **fault)
    with pytest.raises(error):
        client(provider, emulator.url).labels(FILES[0].read_bytes())
    assert emulator.calls(provider) == 1  # the library did not retry behind our back


@pytest.mark.parametrize("provider", ["aws", "google"])
def test_slow_answers_time_out(emulator, provider):
    emulator.set_faults(provider, latency_s=1.0)
    with pytest.raises(QueryTimeout):
        client(provider, emulator.url, timeout_s=0.2).labels(FILES[0].read_bytes())


def test_requests_without_credentials_are_refused(emulator):
    answer = requests.post(f"{emulator.url}/computervision/imageanalysis:analyze",
                           params={"api-version": "2023-10-01", "features": "tags"}, data=FILES[0].read_bytes(),
                           headers={"Content-Type": "application/octet-stream"}, timeout=5)
    assert answer.status_code == 401
    answer = requests.post(f"{emulator.url}/v2/models/general-image-recognition/outputs", json={}, timeout=5)
    assert answer.status_code == 401 and answer.json()["status"]["code"] == 11102


def test_fault_rates_are_the_requested_probabilities():
    injector = FaultInjector(seed=3)
    injector.set(FaultSettings(throttle=0.3, server_error=0.1, malformed=0.05))
    draws = [injector.draw("aws")[0] for _ in range(4000)]
    for name, p in (("throttle", 0.3), ("server_error", 0.1), ("malformed", 0.05)):
        assert binomtest(draws.count(name), len(draws), p).pvalue > 1e-3, name
    with pytest.raises(ValueError, match="probability"):
        FaultSettings(throttle=1.5)


def test_retry_loop_retries_transient_and_malformed_answers_and_books_every_call(emulator):
    from pipeline.apis.books.ledger import Permit

    api = client("aws", emulator.url)
    settings = RetrySettings(max_attempts=4, base_delay_s=0.0, max_delay_s=0.0)
    png = FILES[0].read_bytes()
    booked: list[str] = []

    def permit_all(attempt):
        return Permit("send", call=f"c{attempt}")

    def answered(call, status, **fields):
        booked.append(status)

    emulator.set_faults("aws", throttle=1.0)
    outcome = query_with_retries(api, png, permit_all, answered, settings, random.Random(0))
    assert outcome.state == "failed" and outcome.attempts == 4 == emulator.calls("aws")
    assert "ThrottledError" in outcome.error and booked == ["throttled"] * 4

    allowance = iter([Permit("send", call="a"), Permit("send", call="b")])
    outcome = query_with_retries(api, png, lambda attempt: next(allowance, Permit("stop", reason="budget")),
                                 answered, settings, random.Random(0))
    assert outcome.state == "stopped" and outcome.reason == "budget" and outcome.attempts == 2
    assert emulator.calls("aws") == 6

    booked.clear()
    emulator.set_faults("aws", malformed=1.0)
    outcome = query_with_retries(api, png, permit_all, answered, settings, random.Random(0))
    assert outcome.state == "failed" and outcome.attempts == 4 and booked == ["malformed"] * 4  # retried

    emulator.set_faults("aws", auth_failure=True)
    outcome = query_with_retries(api, png, permit_all, answered, settings, random.Random(0))
    assert outcome.state == "fatal" and outcome.reason == "auth" and outcome.attempts == 1

    emulator.set_faults("aws")
    answer = Permit("answered", answer={"top_label": "Sky", "labels": ["Sky"], "scores": [0.9]})
    before = emulator.calls("aws")
    outcome = query_with_retries(api, png, lambda attempt: answer, answered, settings, random.Random(0))
    assert outcome.state == "ok" and outcome.reused and outcome.top_label == "Sky" and emulator.calls("aws") == before


@pytest.mark.parametrize("provider", PROVIDERS)
def test_each_client_waits_for_its_slot_just_before_the_request_leaves(emulator, provider):
    """The rate-limit wait runs inside the client library, once per call, after the request
    is built and signed (so their time does not fall between the wait and the provider's
    clock); through the retry loop a call reaches the provider at its slot, not before."""
    from pipeline.apis.books.ledger import Permit
    from pipeline.apis.providers.base import SendGate
    from pipeline.apis.query import LATE_S

    api = client(provider, emulator.url)
    png = FILES[0].read_bytes()
    api.labels(png)  # connections and credentials warm: the timings below are the call's own
    waits: list[float] = []

    def wait() -> None:
        time.sleep(0.2)
        waits.append(time.time())

    with SendGate(wait):
        assert api.labels(png)
    assert api.gates_sends and len(waits) == 1, "the client did not call before_send()"
    assert emulator.starts(provider)[-1] >= waits[0]

    slot = time.time() + 0.3
    permits = iter([Permit("send", call="c", start_at=slot)])
    outcome = query_with_retries(api, png, lambda attempt: next(permits), lambda *a, **k: None,
                                 RetrySettings(max_attempts=1), random.Random(0))
    assert outcome.state == "ok" and emulator.calls(provider) == 3
    assert slot <= emulator.starts(provider)[-1] < slot + LATE_S + 1.0
    assert outcome.latency_s <= time.time() - slot  # timed from the slot, not from before the wait


@pytest.mark.slow
def test_rate_limit_holds_on_the_emulators_clock_on_a_loaded_machine(tmp_path):
    """8 threads share one limiter at qps 10 (as the API actors share the ledger's) while two
    busy processes load the CPUs; the emulator, in its own process as a provider would be,
    counts arrivals: never more than 10 in any 1-second window. Bounded: 60 calls, ~10 s."""
    from pipeline.apis.books.ledger import Permit
    from pipeline.apis.query import RateLimiter

    qps, total, threads = 10, 60, 8
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    emulator = subprocess.Popen([sys.executable, "-m", "jobs.cli", "api-emulator", "--port", "0"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
    burn = "import time\nend = time.time() + 60\nwhile time.time() < end: pass"
    load: list[subprocess.Popen] = []
    try:
        line = emulator.stdout.readline()
        assert "listening on http://127.0.0.1:" in line, line
        load = [subprocess.Popen([sys.executable, "-c", burn]) for _ in range(2)]
        url = line.split("listening on ")[1].split()[0]
        limiter, lock, left = RateLimiter(qps), threading.Lock(), [total]
        png = FILES[0].read_bytes()

        def permit(attempt: int) -> Permit:
            with lock:
                if left[0] == 0:
                    return Permit("stop", reason="budget")
                left[0] -= 1
            return Permit("send", call="c", start_at=limiter.slot())

        def work() -> None:
            api = client("aws", url, timeout_s=30)
            while query_with_retries(api, png, permit, lambda *a, **k: None, RetrySettings(max_attempts=1),
                                     random.Random(0), reslot=limiter.slot).state != "stopped":
                pass

        workers = [threading.Thread(target=work) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=120)
        stats = requests.get(f"{url}/_emulator/stats", timeout=30).json()
    finally:
        for process in load:
            process.kill()
        emulator.send_signal(signal.SIGTERM)
        emulator.communicate(timeout=30)
    print(f"[figures] qps {qps} under load: {stats['calls']['aws']} calls, "
          f"worst 1-second window {stats['max_calls_in_a_second']['aws']}")
    assert stats["calls"]["aws"] == total
    assert stats["max_calls_in_a_second"]["aws"] <= qps


def test_control_endpoint(emulator):
    assert requests.post(f"{emulator.url}/_emulator/faults", json={"provider": "google", "throttle": 1.0},
                         timeout=5).status_code == 200
    with pytest.raises(ThrottledError):
        client("google", emulator.url).labels(FILES[0].read_bytes())
    calls = requests.get(f"{emulator.url}/_emulator/calls", timeout=5).json()
    assert calls["google"] == 1 and calls["total"] == 1
    bad = requests.post(f"{emulator.url}/_emulator/faults", json={"throtle": 0.5}, timeout=5)
    assert bad.status_code == 400 and "throtle" in bad.json()["error"]
    requests.post(f"{emulator.url}/_emulator/reset", timeout=5)
    assert requests.get(f"{emulator.url}/_emulator/stats", timeout=5).json()["calls"]["total"] == 0
    assert client("google", emulator.url).labels(FILES[0].read_bytes())  # faults cleared too


def test_checkpoint_classifier_answers_with_its_class_names(tmp_path):
    from pipeline.models import ModelMeta, build_model, save_checkpoint

    path = tmp_path / "resnet20.pt"
    save_checkpoint(path, build_model("cifar_resnet20"), ModelMeta("cifar_resnet20", dataset="cifar10"))
    with EmulatorServer(CheckpointClassifier(path)) as server:
        labels = client("azure", server.url).labels(FILES[0].read_bytes())
    from pipeline.data import CIFAR10_CLASSES

    assert len(labels) == 10 and {label.name for label in labels} == set(CIFAR10_CLASSES)
    assert sum(label.score for label in labels) == pytest.approx(1.0, abs=1e-3)


def test_command_line_emulator_serves_counts_and_stops(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "api-emulator", "--port", "0", "--throttle", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=Path(__file__).resolve().parents[1],
    )
    try:
        line = process.stdout.readline()
        assert "listening on http://127.0.0.1:" in line, line + process.stderr.read()
        url = line.split("listening on ")[1].split()[0]
        with pytest.raises(ThrottledError):
            client("aws", url).labels(FILES[0].read_bytes())
        requests.post(f"{url}/_emulator/faults", data=json.dumps({}), timeout=5)
        assert client("aws", url).labels(FILES[0].read_bytes())
        assert requests.get(f"{url}/_emulator/calls", timeout=5).json()["aws"] == 2
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
    assert process.returncode == 0 and "stopped after 2 calls" in err


def test_command_line_emulator_refuses_a_rejected_checkpoint_in_one_line(tmp_path, capsys):
    """--classifier with a file the checkpoint loader refuses (a raw state dict, a corrupt
    file): one line naming the file and the reason, exit 2, no traceback."""
    import torch

    from jobs.cli import main as cli_main

    raw = tmp_path / "state_dict.pt"
    torch.save({"weight": torch.zeros(3)}, raw)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    for path, reason in ((raw, "not a dsmooth checkpoint"), (corrupt, "not a PyTorch checkpoint")):
        assert cli_main(["api-emulator", "--port", "0", "--classifier", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("dsmooth api-emulator: error: ") and len(err.splitlines()) == 1, err
        assert path.name in err and reason in err

"""Vision-language models behind OpenAI-compatible chat APIs, certified as classifiers: the
real `openai` client against the emulator's /v1/chat/completions on 127.0.0.1 -- every reply
path (a class, outside the classes, refusal, garbage, cut off, free text), the errors
(429 with Retry-After, 5xx, garbled bodies, refused keys), money in tokens (reservations,
limits in money and tokens, requests and tokens per minute), an end-to-end certify-api run
with faults, and the statistical check that a model answering at random is still certified
correctly."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pandas as pd
import pytest

from api_support import FAKE_CREDENTIALS, files_containing
from openai_support import CLASSES, REPO, chat_config, png, token_cost
from pipeline.apis.books.ledger import Budget
from pipeline.apis.config import ApiSettings, RetrySettings
from pipeline.apis.emulator import EmulatorServer
from pipeline.apis.emulator.openai_chat import OpenAIChat as ChatProtocol
from pipeline.apis.emulator.openai_chat import RandomClassifier
from pipeline.apis.errors import AuthError, MalformedResponse, ServerError, ThrottledError
from pipeline.apis.books.ledger import Ledger
from pipeline.apis.providers import make_client
from pipeline.apis.providers.openai_chat import parse_reply
from pipeline.apis.books.querylog import read_calls, spend
from pipeline.apis.query import RateLimiter
from pipeline.apis.query import OK, query_with_retries

KEY = FAKE_CREDENTIALS["OPENAI_API_KEY"]
SKY = (140, 180, 230)  # the emulator's colour classifier calls this "Snow" first; see its ranking


@pytest.fixture(scope="module")
def emulator():
    with EmulatorServer(seed=5) as server:
        yield server


@pytest.fixture()
def key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


def client(emulator, **chat):
    settings = ApiSettings(provider="openai", endpoint=emulator.url + "/v1", chat={"classes": CLASSES, **chat})
    return make_client(settings, timeout_s=5)


# --------------------------------------------------------------------------- replies


def test_each_reply_is_a_class_or_a_recorded_no_class_vote(emulator, key):
    emulator.reset()
    structured, text = client(emulator), client(emulator, structured=False)
    best = emulator.classifier.labels(np.full((32, 32, 3), SKY, dtype=np.uint8))[0][0]
    answer = structured.labels(png(SKY))
    assert [label.name for label in answer] == [best] and answer.journal["no_class"] is None
    assert answer.journal["prompt_tokens"] > 85 and answer.journal["completion_tokens"] > 0  # usage is passed on
    assert [label.name for label in text.labels(png(SKY))] == [best]  # plain text, parsed strictly

    emulator.set_faults("openai", refusal=1.0)
    refused = structured.labels(png(SKY))
    assert list(refused) == [] and refused.journal["no_class"] == "refusal" and "sorry" in refused.journal["reply"]
    emulator.set_faults("openai", garbage=1.0)
    for each in (structured, text):
        garbage = each.labels(png(SKY))
        assert list(garbage) == [] and garbage.journal["no_class"] in ("unparseable", "outside")
    emulator.set_faults()
    outside = client(emulator, classes=["Airplane", "Ship"]).labels(png(SKY))  # the model's label is not offered
    assert list(outside) == [] and outside.journal["no_class"] == "outside"
    cut = client(emulator, answer_tokens=1).labels(png(SKY))
    assert list(cut) == [] and cut.journal["no_class"] == "truncated"
    free = make_client(ApiSettings(provider="openai", endpoint=emulator.url + "/v1"), timeout_s=5).labels(png(SKY))
    assert [label.name for label in free] == [best.lower()]  # no classes: the normalised text is the label
    assert emulator.calls("openai") == 8


@pytest.mark.parametrize("content, classes, structured, expected", [
    ('{"class": "Sky"}', CLASSES, True, ("Sky", None)),
    ('{"class": "sky "}', CLASSES, True, ("Sky", None)),
    ('{"class": "Sky", "why": "blue"}', CLASSES, True, (None, "unparseable")),
    ('{"class": "Banana"}', CLASSES, True, (None, "outside")),
    ("Sky", CLASSES, True, (None, "unparseable")),
    ("Sky.", CLASSES, False, ("Sky", None)),
    ("It is Sky", CLASSES, False, (None, "outside")),
    ("", CLASSES, False, (None, "unparseable")),
    (None, None, False, (None, "unparseable")),
    ("  A Tabby  Cat. ", None, False, ("a tabby cat", None)),
])
def test_strict_parse(content, classes, structured, expected):
    assert parse_reply(content, classes, structured) == expected


def test_errors_map_to_the_retry_rules_and_the_key_never_shows(emulator, key, monkeypatch):
    chat = client(emulator)
    emulator.set_faults("openai", throttle=1.0, retry_after_s=2.5)
    with pytest.raises(ThrottledError) as throttled:
        chat.labels(png())
    assert throttled.value.retry_after_s == 2.5
    for fault, error in (("server_error", ServerError), ("malformed", MalformedResponse)):
        emulator.set_faults("openai", **{fault: 1.0})
        with pytest.raises(error):
            chat.labels(png())
    emulator.set_faults("openai", auth_failure=True)
    with pytest.raises(AuthError) as refused:
        chat.labels(png())
    assert KEY not in str(refused.value) and "sk-" not in str(refused.value)
    emulator.set_faults()
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(AuthError, match="OPENAI_API_KEY"):
        client(emulator)


def test_a_429_is_retried_no_sooner_than_its_retry_after(emulator, key, tmp_path):
    emulator.reset()
    emulator.set_faults("openai", throttle=0.5, retry_after_s=0.4)
    ledger = Ledger(tmp_path / "run", "openai", Budget(None, 1.0, 0.0, token_prices=(2.5, 10.0), answer_tokens=50),
                    RateLimiter(1000))
    slept: list[float] = []
    settings = RetrySettings(max_attempts=20, base_delay_s=0.001, max_delay_s=5.0)
    for sample in range(6):
        outcome = query_with_retries(
            client(emulator), png(), lambda attempt, s=sample: ledger.reserve(1, "x", "estimation", s, attempt, "w"),
            lambda call, status, s=sample, **f: ledger.answered(call, 1, "estimation", s, status, **f),
            settings, random.Random(sample), sleep=slept.append)
        assert outcome.state == OK
    ledger.close()
    emulator.set_faults()
    calls = read_calls(tmp_path / "run")
    throttled = int((calls["status"] == "throttled").sum())
    assert throttled >= 1 and len(slept) == throttled and min(slept) >= 0.4  # honoured, not the 0.001 back-off
    assert (calls.loc[calls["status"] == "throttled", "cost"] == 0).all()  # a 429 costs nothing
    ok = calls[calls["status"] == "ok"]
    assert ok["cost"].sum() == pytest.approx(sum(token_cost(p, c) for p, c in zip(ok.prompt_tokens, ok.completion_tokens)))


# --------------------------------------------------------------------------- money is tokens


def test_reservations_keep_money_and_token_limits_with_calls_in_flight():
    # $2.5 / $10 per million: a call reserves 1,000 prompt + 50 answer tokens = $0.003 until it settles
    budget = Budget(None, 0.01, 0.0, token_prices=(2.5, 10.0), answer_tokens=50, prompt_tokens_guess=1000)
    assert [budget.reserve(f"c{i}") for i in range(4)] == [True, True, True, False]  # 4 x $0.003 > $0.01
    assert budget.snapshot().exhausted == "max_cost" and budget.snapshot().cost == pytest.approx(0.009)
    assert budget.settle("c0", 400, 5) == (400, 5, pytest.approx(0.00105))  # the real usage replaces it
    assert budget.settle("c1", None, None, billed=False) == (0, 0, 0.0)  # a 429: nothing
    assert budget.settle("c2", None, None) == (1000, 50, pytest.approx(0.003))  # billed, no usage: reservation
    granted = 0
    while budget.reserve(f"d{granted}"):
        granted += 1
    assert budget.held("d0")[:2] == (400, 50)  # from now on a call reserves the largest prompt seen, not the guess
    snap = budget.snapshot()
    assert snap.cost <= 0.01 and snap.cost + (400 * 2.5 + 50 * 10) / 1e6 > 0.01 and granted == 3

    tokens = Budget(None, None, 0.0, max_tokens=3000, token_prices=(0.0, 0.0), answer_tokens=100,
                    prompt_tokens_guess=900)
    assert sum(tokens.reserve(f"t{i}") for i in range(5)) == 3 and tokens.snapshot().exhausted == "max_tokens"
    run = Budget(None, None, 0.0, run_max_cost=0.01, token_prices=(2.5, 10.0), answer_tokens=50,
                 prompt_tokens_seen=400, run_cost_before=0.008)
    assert [run.reserve("r0"), run.reserve("r1")] == [True, False]  # $0.008 before + $0.0015 fits, twice not


def test_an_unconfirmed_call_stays_charged_at_its_reservation(tmp_path):
    """A call sent but never answered (killed in flight) may have been billed: the run's books
    charge it its reservation, and the next invocation's run limits start from there."""
    run = tmp_path / "run"
    budget = Budget(None, None, 0.0, run_max_cost=1.0, token_prices=(2.5, 10.0), answer_tokens=50,
                    prompt_tokens_guess=1000)
    ledger = Ledger(run, "openai", budget, RateLimiter(1000))
    answered = ledger.reserve(1, "x", "clean", 0, 1, "w")
    in_flight = ledger.reserve(1, "x", "selection", 0, 1, "w")
    ledger.answered(answered.call, 1, "clean", 0, "ok", top_label="Sky", prompt_tokens=400, completion_tokens=6)
    ledger.close()  # the kill: `in_flight` has no answer
    books = spend(run)
    assert (books.calls, books.unconfirmed) == (2, 1)
    assert books.tokens == 406 + 1050 and books.token_cost == pytest.approx(token_cost(400, 6) + token_cost(1000, 50))
    calls = read_calls(run).set_index("call")
    assert calls.loc[in_flight.call, "reserved_tokens"] == 1050 and pd.isna(calls.loc[in_flight.call, "status"])


def test_requests_and_tokens_per_minute():
    now = [1000.0]
    rpm = RateLimiter(100, clock=lambda: now[0], requests_per_minute=3)
    starts = [rpm.slot() for _ in range(7)]
    assert max(sum(1 for t in starts if s <= t < s + 60) for s in starts) == 3
    assert starts[3] - starts[0] >= 60
    tpm = RateLimiter(100, clock=lambda: now[0], tokens_per_minute=1000)
    starts = [tpm.slot(400) for _ in range(5)]  # two fit in a minute (800), a third would pass 1000
    assert starts[2] - starts[0] >= 60 and starts[1] - starts[0] < 60
    with pytest.raises(ValueError, match="tokens_per_minute"):
        tpm.slot(1001)


# --------------------------------------------------------------------------- end to end


def test_certify_api_with_a_chat_model_end_to_end(ray_local, emulator, tmp_path):
    """Fixed n through Ray with refusals, garbage, throttling (Retry-After) and 5xx: every
    image finished, the provider's count equals the run's, spend.json holds tokens and their
    cost, no-class votes count in n, the identity holds model, prompt, temperature and seed,
    and no file holds the key."""
    from jobs.certify_api import certify_api
    from pipeline.apis.run.prepare import load_job_config
    from pipeline.runs.storage import read_votes

    emulator.reset()
    emulator.set_faults("openai", refusal=0.1, garbage=0.1, throttle=0.05, server_error=0.05, retry_after_s=0.02)
    run = tmp_path / "run"
    config = chat_config(emulator.url, run, [0, 60, 120], **{"api.chat.temperature": 0.0, "api.chat.chat_seed": 7})
    summary = certify_api(load_job_config(config))
    emulator.set_faults()
    assert summary.status == "complete" and summary.images_complete == 3
    calls = read_calls(run)
    assert emulator.calls("openai") == len(calls) == summary.run.calls == summary.attempts
    answered = calls[calls["status"] == "ok"]
    assert answered["no_class"].isin(["refusal", "unparseable"]).sum() >= 1  # faults became no-class votes
    assert answered.loc[answered["no_class"].notna(), "top_label"].isna().all()
    assert (calls["status"] == "throttled").sum() >= 1
    record = json.loads((run / "spend.json").read_text())
    tokens = int((calls.prompt_tokens.fillna(0) + calls.completion_tokens.fillna(0)).sum())
    cost = sum(token_cost(p, c) for p, c in zip(calls.prompt_tokens.fillna(0), calls.completion_tokens.fillna(0)))
    assert record["total"]["tokens"] == tokens == summary.run.tokens > 0
    assert record["total"]["cost"] == pytest.approx(cost) == pytest.approx(summary.run_cost)
    votes = read_votes(run)
    estimation = votes[votes["phase"] == "estimation"]
    assert (estimation["n"] == 20).all()
    no_class = answered[(answered["phase"] == "estimation") & answered["top_label"].isna()]
    assert int(estimation["n"].sum() - estimation["counts"].map(sum).sum()) == len(no_class)
    identity = json.loads((run / "run.json").read_text())["identity"]
    assert (identity["openai_model"], identity["temperature"], identity["chat_seed"]) == ("emu-vlm", 0.0, 7)
    assert "{classes}" in identity["prompt"] and identity["classes"] == CLASSES
    assert "emu-vlm" in votes["model"].iloc[0] and identity["prompt_sha256"] in votes["model"].iloc[0]
    assert not files_containing(run, [KEY])
    # another prompt or temperature is another experiment: the run refuses to resume under it
    from pipeline.config import ConfigError

    for changed in ({"api.chat.prompt": "Which one of {classes}?"}, {"api.chat.temperature": 0.7}):
        with pytest.raises((ConfigError, ValueError)):
            certify_api(load_job_config(chat_config(emulator.url, run, [0, 60, 120], **changed)))


def test_a_money_budget_stops_before_it_is_exceeded(ray_local, emulator, tmp_path):
    from jobs.certify_api import certify_api
    from pipeline.apis.run.prepare import load_job_config

    emulator.reset()
    run = tmp_path / "run"
    limit = 0.01  # each call about $0.0011 here: the run stops after some 9 calls of the 26 it needs
    summary = certify_api(load_job_config(chat_config(emulator.url, run, [60], **{"budget.max_cost": limit})))
    assert summary.status == "budget"
    total = spend(run)
    assert 0 < total.token_cost <= limit and summary.cost <= limit
    assert emulator.calls("openai") == total.calls == summary.attempts
    assert f"${limit:.4f}" in summary.message  # "budget spent: $0.0099/$0.0100"


# --------------------------------------------------------------------------- a randomised model


def test_a_model_that_answers_at_random_is_certified_with_the_promised_error_rate(monkeypatch):
    """Cohen et al.'s guarantee for a randomised base classifier (providers/openai_chat.py's
    doc): the emulated model answers Sky w.p. 0.62, Water w.p. 0.2 and a class outside the
    set ("Banana": a no-class vote) w.p. 0.18, whatever the image, so its smoothed classifier
    is Sky with p_A = 0.62 exactly. Over many certifications -- each reply through the
    emulator's chat protocol, the `openai` client's types and dsmooth's strict parse and vote
    rows -- a certificate wrong for it (another class, or a radius above
    sigma * Phi^-1(0.62)) must come at most at rate alpha."""
    from openai.types.chat import ChatCompletion
    from scipy.stats import norm

    from pipeline.apis.run.state import answer_vote_row
    from pipeline.stats.smoothing import ABSTAIN, certify_counts

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    probabilities = {"Sky": 0.62, "Water": 0.2, "Banana": 0.18}
    model, protocol = RandomClassifier(probabilities, seed=11), ChatProtocol()
    chat = make_client(ApiSettings(provider="openai", endpoint="http://127.0.0.1:9/v1", chat={"classes": CLASSES}), 5)
    options = {"model": "random", "prompt": "", "classes": CLASSES, "json": True, "temperature": 0.0, "seed": None,
               "max_tokens": 50, "prompt_tokens": 10, "digest": ""}
    sigma, alpha, n0, n, trials = 0.5, 0.1, 5, 30, 800
    identity = {"sigma": sigma, "seed": 0, "chunk_size": 8, "provider": "openai", "denoiser": None}

    def ask(k: int) -> dict:
        body = protocol.answer(model.labels(None), options, (32, 32)).body
        answer = chat._answer(ChatCompletion.model_validate(json.loads(body)))
        return {"image_id": 0, "top_label": answer[0].name if answer else None, "latency_s": 0.0, "answered_at": None}

    clean = {"image_id": 0, "top_label": "Sky"}
    true_radius = sigma * norm.ppf(0.62)
    wrong = no_class_votes = 0
    for _ in range(trials):
        selection = answer_vote_row(clean, [ask(k) for k in range(n0)], "selection", identity, "r")
        estimation = answer_vote_row(clean, [ask(k) for k in range(n)], "estimation", identity, "r")
        no_class_votes += estimation.n - sum(estimation.counts)
        picked, radius = certify_counts(dict(zip(selection.classes, selection.counts)) or {"Sky": 0},
                                        dict(zip(estimation.classes, estimation.counts)), sigma, alpha, n=estimation.n)
        wrong += picked != ABSTAIN and (picked != "Sky" or radius > true_radius + 1e-12)
    assert no_class_votes / (trials * n) == pytest.approx(0.18, abs=0.02)  # outside the set: no class
    bound = alpha * trials + 3 * math.sqrt(trials * alpha * (1 - alpha))
    print(f"[figures] randomised model: {wrong} wrong certificates in {trials} (alpha bound {bound:.0f})")
    assert wrong <= bound, (wrong, bound)
    assert wrong >= 0.2 * alpha * trials  # the test has power: the bound is nearly tight


def test_the_emulator_cli_and_config_accept_the_chat_settings(tmp_path):
    from pipeline.apis.run.prepare import load_job_config
    from pipeline.config import ConfigError

    names = tmp_path / "classes.txt"
    names.write_text("cat\ndog\n\n")
    loaded = load_job_config(chat_config("http://127.0.0.1:1", tmp_path / "r", [0],
                                         **{"api.chat.classes": None, "api.chat.class_names": str(names)}))
    assert loaded.api.chat.resolve_classes() == ["cat", "dog"]
    names.write_text("cat\nCat\n")
    with pytest.raises(ConfigError, match="repeat"):
        load_job_config(chat_config("http://127.0.0.1:1", tmp_path / "r", [0],
                                    **{"api.chat.classes": None, "api.chat.class_names": str(names)})
                        ).api.chat.resolve_classes()
    with pytest.raises(ConfigError, match="placeholder"):
        load_job_config(chat_config("http://127.0.0.1:1", tmp_path / "r", [0], **{"api.chat.prompt": "pick {x}"}))
    aws = chat_config("http://127.0.0.1:1", tmp_path / "r", [0], **{"api.provider": "aws", "budget.max_tokens": 10})
    with pytest.raises(ConfigError, match="per call, not per token"):
        load_job_config(aws)
    example = load_job_config(REPO / "examples" / "certify_api_chat_emulated.yaml")  # the shipped example loads
    assert example.api.provider == "openai" and example.budget.tokens.input_per_million == 0.15
    assert example.rate.per_minute.tokens_per_minute == 200_000

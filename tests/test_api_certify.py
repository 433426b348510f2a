"""certify-api end to end: the real client library of each provider, through Ray actors, against
the local emulator, on real images (grayscale ones included); then offline recomputation."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from api_support import (
    GRAY_IDS,
    RGB_IDS,
    job_config,
    normalise,
    oracle_labels,
    top_labels_in_log,
)
from jobs.certify_api import certify_api
from pipeline.apis.emulator import EmulatorServer
from pipeline.apis.run.prepare import load_job_config
from pipeline.apis.books.querylog import read_query_log
from pipeline.apis.run.state import votes_from_queries
from pipeline.config import ConfigError
from pipeline.reduce.votes import load_run
from pipeline.stats.smoothing import ABSTAIN, certify_counts
from pipeline.runs.storage import read_votes

IDS = [RGB_IDS[0], GRAY_IDS[0], RGB_IDS[1]]
QUERIES_PER_IMAGE = 1 + 5 + 20  # clean + n0 + n


pytestmark = pytest.mark.usefixtures("ray_local")  # the session's one Ray (tests/conftest.py)


@pytest.fixture(scope="module")
def emulator():
    with EmulatorServer() as server:
        yield server


@pytest.fixture(scope="module")
def oracle():
    return oracle_labels(IDS, sigma=0.25, n0=5, n=20, chunk_size=8)


@pytest.fixture(scope="module")
def runs(emulator, tmp_path_factory):
    """One full run per provider, shared by the assertions below."""
    results = {}
    for provider in ("aws", "google", "azure", "clarifai"):
        before = emulator.calls(provider)
        out = tmp_path_factory.mktemp(f"run-{provider}")
        summary = certify_api(load_job_config(job_config(provider, emulator.url, out, IDS)))
        results[provider] = (out, summary, emulator.calls(provider) - before)
    return results


@pytest.mark.parametrize("provider", ["aws", "google", "azure", "clarifai"])
def test_each_provider_certifies_through_its_real_client(runs, oracle, provider):
    run_dir, summary, calls = runs[provider]
    assert summary.status == "complete" and summary.images_complete == len(IDS)
    assert calls == summary.attempts == len(IDS) * QUERIES_PER_IMAGE  # no hidden library retries
    assert summary.cost == pytest.approx(calls * {"aws": 1.0, "google": 1.5, "azure": 1.0, "clarifai": 1.2}[provider] / 1000)

    # Every answer is the one the emulator's classifier gives the same noisy PNG locally:
    # noise addressing, PNG rounding, wire format and the client's parsing all agree.
    logged = top_labels_in_log(run_dir)
    assert {key: normalise(label) for key, label in logged.items()} == {k: normalise(v) for k, v in oracle.items()}
    log = read_query_log(run_dir)
    assert (log.status == "ok").all() and (log.attempts == 1).all()
    assert all(len(labels) == len(scores) >= 2 for labels, scores in zip(log.labels, log.scores))
    assert all(0.0 <= s <= 1.0 for scores in log.scores for s in scores)

    # Vote rows for `dsmooth reduce`: label strings, n = queries made, clean label = API's.
    votes = read_votes(run_dir)
    assert sorted(set(votes.image_id)) == sorted(IDS) and set(votes.phase) == {"selection", "estimation"}
    for row in votes.itertuples():
        assert row.n == (5 if row.phase == "selection" else 20) and sum(row.counts) == row.n
        assert normalise(row.label_name) == normalise(oracle[(row.image_id, "clean", 0)])
    certificates = load_run(run_dir, alpha=0.01)
    assert set(certificates.image_id) == set(IDS)
    assert (certificates.radius > 0).any(), "nothing certified: the emulator's answers should be stable"
    # What a table or plot of this run says: the provider as the model, n = 20 bounding the radii.
    assert f"{provider} API" in certificates.model and certificates.n == 20 and certificates.alpha == 0.01
    assert certificates.radius.max() <= certificates.max_radius + 1e-12


def test_grayscale_images_are_sent_as_rgb_and_answered(runs, oracle):
    run_dir, _, _ = runs["aws"]
    log = read_query_log(run_dir)
    gray = log[log.image_id == GRAY_IDS[0]]
    assert len(gray) == QUERIES_PER_IMAGE and (gray.status == "ok").all()
    assert oracle[(GRAY_IDS[0], "clean", 0)] in set(gray.top_label)


def test_all_providers_agree_on_every_query(runs):
    """Four wire formats, one classifier: the parsed answers must be identical."""
    logs = {p: {k: normalise(v) for k, v in top_labels_in_log(runs[p][0]).items()} for p in runs}
    assert logs["aws"] == logs["google"] == logs["azure"] == logs["clarifai"]


def test_certificates_match_the_smoothing_rules(runs):
    run_dir, _, _ = runs["google"]
    votes = read_votes(run_dir)
    certificates = load_run(run_dir, alpha=0.01).set_index("image_id")
    for image_id in IDS:
        rows = {r.phase: r for r in votes[votes.image_id == image_id].itertuples()}
        selection = dict(zip(rows["selection"].classes, rows["selection"].counts))
        estimation = dict(zip(rows["estimation"].classes, rows["estimation"].counts))
        label, radius = certify_counts(selection, estimation, 0.25, 0.01, n=20)
        assert certificates.loc[image_id, "radius"] == pytest.approx(radius)
        predicted = certificates.loc[image_id, "predict"]
        assert (str(predicted) == str(ABSTAIN)) if label == ABSTAIN else (predicted == label)


def test_votes_are_recomputed_offline_with_a_smaller_n(runs):
    run_dir, _, _ = runs["aws"]
    log = read_query_log(run_dir)
    rows = votes_from_queries(run_dir, n0=3, n=10)
    assert len(rows) == 2 * len(IDS)
    for row in rows:
        size = 3 if row["phase"] == "selection" else 10
        chosen = log[(log.image_id == row["image_id"]) & (log.phase == row["phase"]) & (log["sample"] < size)]
        assert row["n"] == size and dict(zip(row["classes"], row["counts"])) == dict(Counter(chosen.top_label))
    full = votes_from_queries(run_dir)
    stored = read_votes(run_dir)
    for row in full:
        match = stored[(stored.image_id == row["image_id"]) & (stored.phase == row["phase"])].iloc[0]
        assert list(match.classes) == row["classes"] and list(match.counts) == row["counts"]
    with pytest.raises(ValueError, match="n0"):
        votes_from_queries(run_dir, n0=6)


def test_a_rerun_of_a_finished_run_sends_nothing(runs, emulator):
    run_dir, _, _ = runs["azure"]
    before = emulator.calls("azure")
    summary = certify_api(load_job_config(job_config("azure", emulator.url, run_dir, IDS)))
    assert summary.status == "complete" and summary.attempts == 0
    assert emulator.calls("azure") == before


def test_denoiser_runs_before_each_query(emulator, tmp_path):
    from pipeline.models import ModelMeta, build_model, save_checkpoint

    torch.manual_seed(0)
    denoiser = build_model("dncnn_small")
    checkpoint = tmp_path / "dncnn_small-untrained-0.25.pt"
    sha = save_checkpoint(checkpoint, denoiser, ModelMeta("dncnn_small", sigma=0.25, objective="untrained"))
    ids = [GRAY_IDS[0]]  # a grayscale image whose answers this untrained denoiser changes
    config = job_config("clarifai", emulator.url, tmp_path / "run", ids, denoiser=str(checkpoint),
                        **{"rate.actors": 2})  # two API actors share the work (and one budget)
    summary = certify_api(load_job_config(config))
    assert summary.status == "complete"
    votes = read_votes(tmp_path / "run")
    assert set(votes.denoiser) == {"dncnn_small"} and set(votes.denoiser_sha256) == {sha}

    expected = oracle_labels(ids, 0.25, 5, 20, 8, denoiser=denoiser.eval())
    without = oracle_labels(ids, 0.25, 5, 20, 8)
    logged = {k: normalise(v) for k, v in top_labels_in_log(tmp_path / "run").items()}
    assert logged == {k: normalise(v) for k, v in expected.items()}
    assert expected != without, "this denoiser should change some answers, or the test proves nothing"

    with pytest.raises(ConfigError, match="sigma"):
        certify_api(load_job_config(job_config("clarifai", emulator.url, tmp_path / "r2", ids,
                                               denoiser=str(checkpoint), sigma=0.5)))


def test_denoiser_precision_reaches_the_api_actors(emulator, tmp_path):
    """--precision bf16 end to end: the run records it in its identity and the answers are those
    of the bf16 oracle (that the arithmetic is bf16: tests/test_precision.py; this colour
    classifier's answers rarely move with it). 32 px images keep emulated bf16 cheap."""
    from pipeline.models import ModelMeta, build_model, save_checkpoint
    from pipeline.runs.storage import read_run_record

    torch.manual_seed(0)
    denoiser = build_model("dncnn_small")
    checkpoint = tmp_path / "dncnn_small-untrained-0.25.pt"
    save_checkpoint(checkpoint, denoiser, ModelMeta("dncnn_small", sigma=0.25, objective="untrained"))
    ids = [0, 1, 2]
    config = job_config("aws", emulator.url, tmp_path / "run", ids, denoiser=str(checkpoint), precision="bf16",
                        image_size=32)
    assert certify_api(load_job_config(config)).status == "complete"
    assert read_run_record(tmp_path / "run")["identity"]["precision"] == "bf16"
    bf16 = oracle_labels(ids, 0.25, 5, 20, 8, denoiser=denoiser.eval(), precision="bf16", image_size=32)
    logged = {k: normalise(v) for k, v in top_labels_in_log(tmp_path / "run").items()}
    assert logged == {k: normalise(v) for k, v in bf16.items()}


def test_uniform_noise_reaches_the_api_and_certifies_l1(emulator, tmp_path):
    """--noise uniform end to end: every query carries the uniform draw of its address (the
    emulator answers what the uniform oracle predicts, not the Gaussian one), the run records the
    noise, and its radii are uniform's l1 radii 4 sigma (p_A - 1/2)."""
    from pipeline.runs.storage import read_run_record

    ids = [0, 1, 2]
    config = job_config("google", emulator.url, tmp_path / "run", ids, noise="uniform", image_size=32, n=60)
    assert certify_api(load_job_config(config)).status == "complete"
    assert read_run_record(tmp_path / "run")["identity"]["noise"] == "uniform"
    uniform = oracle_labels(ids, 0.25, 5, 60, 8, image_size=32, noise="uniform")
    gaussian = oracle_labels(ids, 0.25, 5, 60, 8, image_size=32)
    logged = {k: normalise(v) for k, v in top_labels_in_log(tmp_path / "run").items()}
    assert logged == {k: normalise(v) for k, v in uniform.items()}
    assert uniform != gaussian, "the two noises should move some answers, or the test proves nothing"

    certificates = load_run(tmp_path / "run")
    assert certificates.noise == "uniform" and len(certificates) == len(ids)
    decided = certificates[~certificates.abstained]
    assert len(decided), "some image should be certified, or the radius check proves nothing"
    assert np.allclose(decided.radius, 4 * 0.25 * (decided.p_a_lower - 0.5))  # not sigma * Phi^-1(p)


def test_rate_limit_caps_calls_in_flight(emulator, tmp_path):
    emulator.reset()
    config = job_config("aws", emulator.url, tmp_path / "run", [RGB_IDS[0]],
                        **{"rate.concurrency": 2, "rate.qps": 100})
    emulator.set_faults("aws", latency_s=0.02)
    try:
        summary = certify_api(load_job_config(config))
    finally:
        emulator.set_faults("aws")
    assert summary.status == "complete"
    assert 1 <= emulator.stats()["max_in_flight"]["aws"] <= 2
    assert np.isfinite(read_query_log(tmp_path / "run").latency_s).all()


@pytest.mark.slow
def test_resume_from_another_working_directory(emulator, tmp_path, monkeypatch):
    """The run names its images by the data root's base name and listing, not the path: a run
    stopped by its budget resumes from another directory holding its own copy of the images
    (as `ray job submit --working-dir` unpacks one per job), and asks no query twice."""
    import shutil

    from api_support import IMAGES

    first, second = tmp_path / "a" / "b", tmp_path / "c"
    for folder in (first, second):
        shutil.copytree(IMAGES, folder / IMAGES.name)
    run_dir = tmp_path / "run"
    needed = len(IDS) * QUERIES_PER_IMAGE
    before = emulator.calls("aws")
    monkeypatch.chdir(first)
    partial = certify_api(load_job_config(job_config(
        "aws", emulator.url, run_dir, IDS, data_root=IMAGES.name, **{"budget.max_queries": 30})))
    assert partial.status == "budget" and partial.attempts == 30
    monkeypatch.chdir(second)
    rest = certify_api(load_job_config(job_config("aws", emulator.url, run_dir, IDS, data_root=IMAGES.name)))
    assert rest.status == "complete" and rest.images_complete == len(IDS)
    assert rest.attempts == needed - 30 and emulator.calls("aws") - before == needed

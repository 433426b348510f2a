"""`import dsmooth`: the documented Python API, on the shipped models, real Ray and real Parquet.

The API is a front over the library and the jobs, so each test checks it against the code it
must call: `Smooth` against the engine's counts and `pipeline.stats.smoothing`'s CERTIFY/PREDICT,
`dsmooth.certify` against the run directory it wrote (reduced by `dsmooth.reduce`) and
against `Smooth` at the same noise addresses; and the docs' Python API example is executed.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch

import dsmooth
from jobs.demo import MODELS, SAMPLE
from pipeline.config import ConfigError
from pipeline.data import open_dataset
from pipeline.certify.smooth import SmoothedClassifier
from pipeline.sampling.engine import VoteCounter
from pipeline.models import CheckpointMismatchError, DataMismatchError
from pipeline.sampling.noise import SampleRequest
from pipeline.stats.smoothing import certify_counts, predict_counts

from ray_support import forbid_ray_start
from test_certify_job import cifar_root  # noqa: F401 - fixture: 20 CIFAR-10 test images (the shipped sample)

REPO = Path(__file__).resolve().parents[1]
SIGMA = 0.25
CLASSIFIER = MODELS / "classifier.pt"
DENOISER = MODELS / "denoiser_stab_mse_s0.25.pt"
N0, N = 10, 40  # small: every sample is a DnCNN + ResNet-20 forward pass on 2 shared cores


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return dsmooth.load_model(CLASSIFIER, DENOISER, dataset="cifar10", sigma=SIGMA)


@pytest.fixture(scope="module")
def images() -> list[torch.Tensor]:
    sample = open_dataset("cifar10", SAMPLE, "test")
    return [sample.load(i) for i in (0, 120, 260, 410)]


def test_package_surface():
    assert dsmooth.__version__ and dsmooth.__version__ != "unknown"
    assert dsmooth.ABSTAIN == -1 == dsmooth.Smooth.ABSTAIN
    for name in dsmooth.__all__:
        assert hasattr(dsmooth, name), name
    # the statistics are pipeline.stats.smoothing's, not a second copy
    assert dsmooth.certify_counts is certify_counts and dsmooth.predict_counts is predict_counts
    assert dsmooth.Smooth.__module__ == "pipeline.certify.smooth"  # moved beside the run (issue 19)


def test_load_model_checks_what_the_cli_checks(model):
    assert not model.training
    with torch.inference_mode():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(CheckpointMismatchError, match="sigma"):
        dsmooth.load_model(CLASSIFIER, DENOISER, dataset="cifar10", sigma=0.5)
    with pytest.raises(DataMismatchError, match="cifar10"):
        dsmooth.load_model(CLASSIFIER, dataset="imagenet")
    with pytest.raises(CheckpointMismatchError, match="not a classifier"):
        dsmooth.load_model(DENOISER, dataset="cifar10")
    with pytest.raises(ValueError, match="sigma is required"):
        dsmooth.load_model(CLASSIFIER, DENOISER, dataset="cifar10")
    with pytest.raises(ValueError, match="dataset"):
        dsmooth.load_model(CLASSIFIER, dataset="cifar100")


def test_smooth_is_the_engine_and_pipeline_smoothing(model, images):
    """Cohen's calls on the batched engine: the k-th call samples image address k; the
    decision is pipeline.stats.smoothing's on the engine's counts; batch size changes nothing."""
    seed = 3
    smoothed = dsmooth.Smooth(model, 10, SIGMA, batch_size=64, seed=seed)
    x = images[0]
    certified = smoothed.certify(x, N0, N, 0.001)
    predicted = smoothed.predict(x, N, 0.001)

    counter = VoteCounter(model, 10, SIGMA, batch_size=400)
    selection, estimation = counter.count(
        {0: x}, [SampleRequest(seed, 0, "selection", N0), SampleRequest(seed, 0, "estimation", N)])
    (prediction_counts,) = counter.count({1: x}, [SampleRequest(seed, 1, "prediction", N)])
    assert certified == certify_counts(selection, estimation, SIGMA, 0.001)
    assert predicted == predict_counts(prediction_counts, 0.001)
    assert certified == SmoothedClassifier(counter, seed=seed).certify(0, x, N0, N, 0.001)

    # The k-th call draws the noise of address k: on an image whose certificate differs
    # between addresses 0 and 2, a fresh Smooth's third call gives address 2's, not 0's.
    def at(address: int, image) -> tuple[int, float]:
        sel, est = counter.count({address: image}, [SampleRequest(seed, address, "selection", N0),
                                                    SampleRequest(seed, address, "estimation", N)])
        return certify_counts(sel, est, SIGMA, 0.001)

    image = next(image for image in images if at(0, image) != at(2, image))
    fresh = dsmooth.Smooth(model, 10, SIGMA, batch_size=64, seed=seed)
    first = fresh.certify(image, N0, N, 0.001)
    fresh.predict(image, N, 0.001)
    third = fresh.certify(image, N0, N, 0.001)  # the third call: address 2, fresh noise
    assert first == at(0, image) and third == at(2, image) != first

    again = dsmooth.Smooth(model, 10, SIGMA, batch_size=400, seed=seed)  # new instance, other batch
    assert again.certify(x[None], N0, N, 0.001, batch_size=32) == certified  # Cohen passes batch_size
    assert again.predict(x, N, 0.001) == predicted
    assert again.certify(x, N0, N, 0.001, image_id=0) == certified  # a pinned address


def test_smooth_seed_decides_the_noise(model, images):
    """Another seed, other noise: some radius moves (the same seed repeating its answers is
    checked above)."""
    def answers(seed: int) -> list[tuple[int, float]]:
        smoothed = dsmooth.Smooth(model, 10, SIGMA, seed=seed)
        return [smoothed.certify(x, N0, N, 0.01) for x in images[:3]]

    first = answers(1)
    assert answers(2) != first, first


def test_certify_bad_argument_is_a_config_error_naming_the_field(cifar_root, tmp_path):  # noqa: F811
    common = dict(dataset="cifar10", data_root=str(cifar_root), classifier=str(CLASSIFIER), sigma=SIGMA,
                  output=str(tmp_path / "run"))
    started = time.monotonic()
    with forbid_ray_start():  # every bad setting is refused before Ray
        with pytest.raises(ConfigError) as error:
            dsmooth.certify(**common, n0=0, n=N)
        assert error.value.field == "n0"
        with pytest.raises(ConfigError) as error:
            dsmooth.certify(**{**common, "sigma": -1.0})
        assert error.value.field == "sigma"
        with pytest.raises(ConfigError, match="did you mean 'batch_size'") as error:
            dsmooth.certify(**common, batch=10)
        assert error.value.field == "batch"
        with pytest.raises(ConfigError) as error:
            dsmooth.certify(**common, n0=100, n=10)  # the settings' own cross-field rule
        assert error.value.field == "n0"
    assert time.monotonic() - started < 20
    assert not (tmp_path / "run").exists()


def test_progress_in_a_library_call_is_a_bar_or_nothing(capsys):
    """Issue 22 item 5: with no logger set up (a notebook), `shown(True)` still draws the
    bar; `shown(False)` writes nothing, even with the command line's logging on."""
    import logging

    from jobs import logs
    from pipeline.progress import Progress, shown

    logger = logging.getLogger("dsmooth")
    try:
        for on in (True, False):
            if not on:
                logs.setup(logs.NORMAL)  # INFO lines would reach stderr
            with shown(on):
                progress = Progress("certify", total=3)
                progress.set(2, 1000)
                progress.close()
            err = capsys.readouterr().err
            assert ("certify" in err and "3/3" not in err and "2/3" in err) if on else err == "", err
    finally:
        logger.handlers.clear()
        logger.setLevel(logging.NOTSET)
        logger.propagate = True


def test_certify_returns_the_runs_certificates(cifar_root, tmp_path, model, capsys, ray_local):  # noqa: F811
    """End to end on real Ray: the frame holds the selected images' certificates, equal to
    `dsmooth.reduce` of the run directory, and to `Smooth` at the same noise addresses."""

    output = tmp_path / "run"
    ids, seed = [0, 7, 13], 5
    certificates = dsmooth.certify(
        dataset="cifar10", data_root=str(cifar_root), ids=ids, classifier=str(CLASSIFIER), denoiser=str(DENOISER),
        sigma=SIGMA, n0=N0, n=N, alpha=0.01, seed=seed, batch_size=128, actors=1, optimize=False,
        output=str(output))
    assert re.search(r"certify: 100%.*3/3", capsys.readouterr().err)  # the progress bar, by default
    assert sorted(certificates["image_id"]) == ids
    assert certificates.sigma == SIGMA and certificates.n == N and certificates.alpha == 0.01
    record = json.loads((output / "run.json").read_text())
    assert (record["identity"]["seed"], record["identity"]["n0"], record["identity"]["n"]) == (seed, N0, N)
    assert (record["extra"]["batch_size"], record["extra"]["optimize"]) == (128, False)

    reduced = dsmooth.reduce([output], alpha=0.01)
    columns = ["image_id", "label", "predict", "p_a_lower", "radius", "correct", "abstained"]
    ours = certificates.sort_values("image_id").reset_index(drop=True)[columns]
    theirs = reduced.certificates.sort_values("image_id").reset_index(drop=True)[columns]
    assert theirs.equals(ours)
    assert reduced.table["images"].iloc[0] == len(ids)
    assert reduced.table.loc[reduced.table["radius"] == 0, "clean_accuracy"].iloc[0] == pytest.approx(
        float(ours["correct"].mean()))
    at_other_alpha = dsmooth.reduce(output, alpha=0.2).certificates
    assert (at_other_alpha["p_a_lower"].to_numpy() >= theirs["p_a_lower"].to_numpy()).all()

    data = open_dataset("cifar10", cifar_root, "test")
    smoothed = dsmooth.Smooth(model, 10, SIGMA, seed=seed)
    for row in ours.itertuples():
        prediction, radius = smoothed.certify(data.load(row.image_id), N0, N, 0.01, image_id=row.image_id)
        assert prediction == row.predict and radius == pytest.approx(row.radius, abs=1e-12), row


def test_reduce_refuses_nothing_to_reduce(tmp_path):
    (tmp_path / "table.md").write_text("| a |\n")
    with pytest.raises(ValueError, match="no usable runs"):
        dsmooth.reduce(tmp_path / "table.md")
    with pytest.raises(ValueError, match="alpha"):
        dsmooth.reduce(tmp_path / "table.md", alpha=1.5)


def readme_python_example() -> str:
    """The ```python example of the docs' Python API page (the first block there)."""
    text = (REPO / "docs" / "reference" / "python-api.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "the Python API page should hold an example"
    return blocks[0]


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys, ray_local):
    """The docs' Python API example, executed from the repository root with small n and its output
    in a temporary folder: the documented API is the one that runs."""

    code = readme_python_example()
    smaller = {"n0=100": f"n0={N0}", "n=1000": f"n={N}", "skip=100": "skip=250",
               '"runs/python-api"': repr(str(tmp_path / "python-api"))}
    for text, replacement in smaller.items():
        assert text in code, text
        code = code.replace(text, replacement)
    monkeypatch.chdir(REPO)
    exec(compile(code, "docs/reference/python-api.md", "exec"), {})
    out = capsys.readouterr().out
    assert "certified_accuracy" in out and "radius" in out
    assert (tmp_path / "python-api" / "run.json").is_file()

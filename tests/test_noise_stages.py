"""--noise through the stages: the run identity, the foreign-denoiser refusal (and its way out),
the training sweep's noise dimension, reduce's norm-named tables; and, end to end on real Ray,
a uniform-noise l1 certification of the shipped CIFAR sample with its own denoiser."""

from __future__ import annotations

import csv

import numpy as np
import pandas as pd
import pytest

from jobs.cli import main as dsmooth
from jobs.demo import MODELS, SAMPLE, UNIFORM_SETTINGS
from pipeline.reduce import accuracy_table, render
from pipeline.reduce.certificates import make_certificates

GAUSSIAN_DENOISER = MODELS / "denoiser_mse_s0.25.pt"
UNIFORM_DENOISER = MODELS / "denoiser_mse_uniform_s0.25.pt"


def certify_args(tmp_path, *extra: str) -> list[str]:
    return ["certify", "--dataset", "cifar10", "--data-root", str(SAMPLE), "--ids", "0", "1",
            "--classifier", str(MODELS / "classifier.pt"), "--sigma", "0.25", "--n0", "10", "--n", "100",
            "--output", str(tmp_path / "run"), *extra]


def config_of(tmp_path, **values):
    from pipeline.certify.config import CertifyConfig
    from pipeline.config import parse_config

    base = {"dataset": "cifar10", "data_root": str(SAMPLE), "ids": [0, 1], "classifier": str(MODELS / "classifier.pt"),
            "sigma": 0.25, "n0": 10, "n": 100, "output": str(tmp_path / "run")}
    return parse_config(CertifyConfig, {**base, **values})


def test_a_denoiser_is_refused_for_a_noise_it_was_not_trained_for(tmp_path, capsys):
    """One line, exit 2, before Ray: the shipped Gaussian denoiser (its checkpoint predates
    noise kinds: no recorded noise counts as Gaussian) under --noise uniform."""
    status = dsmooth(certify_args(tmp_path, "--denoiser", str(GAUSSIAN_DENOISER), "--noise", "uniform"))
    errors = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(errors) == 1 and "trained for gaussian noise" in errors[0] and "--allow-foreign-denoiser" in errors[0]
    assert "Traceback" not in errors[0]


def test_noise_and_the_foreign_way_out_enter_the_identity_only_when_set(tmp_path):
    from jobs.certify import prepare
    from pipeline.models import read_checkpoint

    assert read_checkpoint(GAUSSIAN_DENOISER)["meta"].get("noise") is None  # an old checkpoint
    plain = prepare(config_of(tmp_path, denoiser=str(GAUSSIAN_DENOISER))).identity
    assert "noise" not in plain and "allow_foreign_denoiser" not in plain  # old runs keep their identity
    foreign = prepare(config_of(tmp_path, denoiser=str(GAUSSIAN_DENOISER), noise="uniform",
                                allow_foreign_denoiser=True)).identity
    assert foreign["noise"] == "uniform" and foreign["allow_foreign_denoiser"] is True
    assert {k: v for k, v in foreign.items() if k not in ("noise", "allow_foreign_denoiser")} == plain
    bare = prepare(config_of(tmp_path, noise="laplace")).identity  # no denoiser: nothing to refuse
    assert bare["noise"] == "laplace"


def test_a_sequential_identity_names_a_non_gaussian_noise(tmp_path):
    from pipeline.runs.identity import sequential_identity

    gaussian = sequential_identity(config_of(tmp_path, sequential=True, radius=0.1))
    uniform = sequential_identity(config_of(tmp_path, sequential=True, radius=0.1, noise="uniform"))
    assert "noise" not in gaussian["sequential"] and uniform["sequential"]["noise"] == "uniform"


def test_an_unreachable_l1_radius_is_refused_in_one_line(tmp_path, capsys):
    """Uniform noise cannot certify an l1 radius at or beyond lambda = 2 sigma."""
    status = dsmooth(certify_args(tmp_path, "--noise", "uniform", "--sequential", "--radius", "0.5"))
    errors = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(errors) == 1 and "radius" in errors[0]


def test_the_sweep_takes_noise_as_a_dimension(tmp_path):
    from pipeline.config import parse_config
    from pipeline.training.config import TrainConfig
    from pipeline.training.sweep import plan_sweep

    config = parse_config(TrainConfig, {
        "task": "denoiser", "name": "t", "dataset": {"kind": "cifar10", "root": str(SAMPLE)},
        "sweep": {"sigmas": [0.25], "noises": ["gaussian", "uniform"], "objectives": ["mse"],
                  "archs": ["dncnn_small"]}, "output_dir": str(tmp_path)})
    runs = plan_sweep(config)
    assert [r.noise for r in runs] == ["gaussian", "uniform"]
    assert "uniform" in runs[1].name and "uniform" not in runs[0].name and runs[0].name != runs[1].name


def certificates(noise: str, name: str):
    frame = pd.DataFrame({"image_id": [0, 1, 2], "label": [1, 2, 3], "predict": [1, 2, -1],
                          "p_a_lower": [0.9, 0.7, np.nan], "radius": [0.4, 0.2, 0.0],
                          "correct": [True, True, False], "abstained": [False, False, True], "time_s": 0.0})
    return make_certificates(frame, name=name, sigma=0.25, alpha=0.001, n=1000, noise=noise)


def test_tables_name_the_norm_and_refuse_to_mix_l1_with_l2():
    l1 = render(accuracy_table([certificates("uniform", "u")], [0.0, 0.1, 0.3]), "markdown")
    assert "ℓ1 r = 0.1" in l1.splitlines()[0] and "ℓ1 radius" in l1
    l2 = render(accuracy_table([certificates("gaussian", "g")], [0.0, 0.1]), "markdown")
    assert "| r = 0.1 |" in l2.splitlines()[0] and "ℓ2 radius" in l2 and "ℓ1" not in l2
    with pytest.raises(ValueError, match="ℓ1 and ℓ2 certificates cannot share"):
        accuracy_table([certificates("uniform", "u"), certificates("gaussian", "g")])


@pytest.mark.slow
def test_uniform_noise_certifies_the_sample_end_to_end_in_l1(tmp_path, capsys, ray_local):
    """Real Ray, real Parquet: `demo --noise uniform` certifies 10 sample images with the
    classifier alone and behind the shipped uniform-noise denoiser, and `dsmooth reduce` of the
    two runs gives a table whose radii are l1 (and whose radii come from the uniform formula:
    no certified radius reaches lambda = 0.5)."""

    from pipeline.reduce import load_run
    from pipeline.runs.storage import read_run_record

    output = tmp_path / "demo"
    status = dsmooth(["demo", "--noise", "uniform", "--images", "10", "--n0", "10", "--n", "100",
                      "--output", str(output)])
    assert status == 0
    runs = [output / f"{s.slug}-uniform" for s in UNIFORM_SETTINGS]
    assert all(read_run_record(run)["identity"]["noise"] == "uniform" for run in runs)
    capsys.readouterr()
    assert dsmooth(["reduce", *map(str, runs), "--radii", "0", "0.1", "0.2"]) == 0
    table = capsys.readouterr().out
    assert "ℓ1 r = 0.1" in table.splitlines()[0] and "certified accuracy (%) at ℓ1 radius" in table
    denoised = load_run(runs[1])
    certified = denoised[~denoised["abstained"]]
    assert len(certified) and (certified["radius"] < 0.5).all()
    # the uniform radius of each bound, not the Gaussian one (which differs at every p_A in (1/2, 1))
    np.testing.assert_allclose(certified["radius"], 4 * 0.25 * (certified["p_a_lower"] - 0.5))
    with open(output / "table_uniform.csv") as handle:
        assert [r["run"] for r in csv.DictReader(handle)][::5] == [s.label for s in UNIFORM_SETTINGS]


def test_smooth_certifies_l1_radii_under_uniform_noise():
    """`dsmooth.Smooth(..., noise="uniform")`: the uniform draw and the l1 radius of its bound
    (a constant classifier: every vote for class 1, so p_A's bound is alpha^(1/n))."""
    import torch

    import dsmooth

    class Constant(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot(torch.ones(len(x), dtype=torch.long), 3).float() + 0 * x.sum()

    image = torch.zeros(3, 4, 4)
    smooth = dsmooth.Smooth(Constant(), num_classes=3, sigma=0.25, noise="uniform")
    label, radius = smooth.certify(image, n0=10, n=1000, alpha=0.001)
    assert smooth.noise == "uniform" and label == 1
    assert radius == pytest.approx(4 * 0.25 * (0.001 ** (1 / 1000) - 0.5))
    gaussian = dsmooth.Smooth(Constant(), num_classes=3, sigma=0.25).certify(image, n0=10, n=1000, alpha=0.001)[1]
    assert gaussian != pytest.approx(radius)


def test_api_queries_carry_the_runs_noise():
    """certify-api's noisy images (`pipeline.apis.query`) draw the run's noise kind at the
    same addresses as the model engine."""
    import torch

    from pipeline.apis.query import noisy_images
    from pipeline.sampling.noise import Chunk, chunk_noise

    image, chunk = torch.full((3, 4, 4), 0.5), Chunk(0, 3, "estimation", 0, 8)
    uniform = noisy_images(image, chunk, [1, 5], 0.25, noise="uniform")
    assert torch.equal(uniform, image + chunk_noise(chunk, (3, 4, 4), 0.25, noise="uniform")[[1, 5]])
    assert float((uniform - image).abs().max()) <= 0.5
    assert torch.equal(noisy_images(image, chunk, [1, 5], 0.25), image + chunk_noise(chunk, (3, 4, 4), 0.25)[[1, 5]])

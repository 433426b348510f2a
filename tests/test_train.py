"""`dsmooth train`: denoisers and classifiers trained with Ray Train on real CIFAR-10.

Small but real: a few hundred images from ../shared/data, tiny architectures, 2 Ray Train
workers (DDP over gloo) per run, each run a Ray Tune trial, a local Ray started once for the
module (the command-line test attaches `dsmooth train` processes to it).
The classifiers the denoiser tests defend are themselves trained here by the system
(standard and Gaussian-noise augmented), so nothing is mocked and no number is hard-coded.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from s3_support import new_bucket, s3_server

from pipeline.config import ConfigError
from pipeline.models import ModelMeta, build_model, load_checkpoint, save_checkpoint
from pipeline.training.config import load_train_config
from pipeline.training.evaluation import NoisyTestSet, evaluate_classifier, state_digest
from pipeline.training.loops import RunState, WorkerHooks, run_local
from pipeline.training.sweep import plan_sweep, stages, worker_spec

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
CIFAR = DATA / "cifar10-jpeg.tar.gz"

pytestmark = pytest.mark.skipif(not CIFAR.is_file(), reason=f"real data {CIFAR} is absent")

# Ray Train V2 polls workers every 2 s and starts a preemption watcher per run; faster
# polling and no watcher save ~5 s per run on a 2-CPU test machine. Behaviour is unchanged.
FAST_RAY_TRAIN = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
}
# What Ray prints on its own: Train's report objects, worker-log prefixes, colour codes.
RAY_NOISE = ("TrainingReport", "(pid=", "RayTrainWorker", "\x1b[")


def dataset(max_train: int = 500, max_test: int = 200) -> dict:
    return {"kind": "cifar10", "root": str(CIFAR), "max_train": max_train, "max_test": max_test}


def denoiser_config(out: Path, **fields) -> dict:
    config = {
        "task": "denoiser", "name": "t", "dataset": dataset(), "num_workers": 2, "batch_size": 32,
        "augment": False, "seed": 0, "output_dir": str(out), "grid_images": 4, "eval_batch_size": 200,
    }
    config.update(fields)
    return config


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def rows_by(rows: list[dict], **match) -> list[dict]:
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_ray(own_ray_module):
    """A local Ray of this module's own, started in Ray Train's fast-polling environment."""
    import ray

    from pipeline.data import open_dataset

    for split in ("train", "test"):  # extract + decode the archive once, before workers race for it
        open_dataset("cifar10", CIFAR, split)
    # In the environment of the whole local cluster, so that `dsmooth train` processes that
    # attach to it (tests below) get them too; so is the test S3 server's address.
    saved = {key: os.environ.get(key) for key in FAST_RAY_TRAIN}
    os.environ.update(FAST_RAY_TRAIN)
    s3_server()
    ray.init(address="local", num_cpus=2, include_dashboard=False)  # never a cluster someone else started
    yield
    ray.shutdown()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True)
def _no_stale_log_handler():
    """`dsmooth` commands run in-process attach a log handler to this test's captured stderr."""
    yield
    logging.getLogger("dsmooth").handlers.clear()


@pytest.fixture(scope="module")
def classifiers(train_ray, tmp_path_factory):
    """Two classifiers trained by `dsmooth train` itself, concurrently: A standard, B with
    Gaussian noise augmentation at sigma 0.25 (Cohen et al.'s baseline)."""
    from jobs.train import train_sweep

    out = tmp_path_factory.mktemp("classifiers")
    config = load_train_config({
        "task": "classifier", "name": "clf", "dataset": dataset(max_train=800, max_test=200),
        "sweep": {"sigmas": [0.0, 0.25], "archs": ["cifar_resnet20"]},
        "optimizer": {"xent": {"name": "adam", "lr": 0.002, "weight_decay": 0.0, "step_size": 6}},
        "epochs": 8, "batch_size": 64, "augment": True, "num_workers": 2, "cpus_per_worker": 0.5,
        "output_dir": str(out), "eval_batch_size": 200,
    })
    rows = train_sweep(config)
    assert [r["status"] for r in rows] == ["complete", "complete"], rows
    by_sigma = {r["sigma"]: r for r in rows}
    return {"A": Path(by_sigma[0.0]["checkpoint"]), "B": Path(by_sigma[0.25]["checkpoint"]), "rows": rows}


# -- config validation (no training) ------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    """Untrained checkpoints: a CIFAR-10 classifier, a 5-class one, an MSE denoiser."""
    folder = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    save_checkpoint(folder / "c10.pt", build_model("cifar_resnet20"), ModelMeta("cifar_resnet20", dataset="cifar10"))
    save_checkpoint(folder / "c5.pt", build_model("cifar_resnet20", num_classes=5),
                    ModelMeta("cifar_resnet20", dataset="other", num_classes=5, arch_kwargs={"num_classes": 5}))
    save_checkpoint(folder / "mse.pt", build_model("dncnn_small"),
                    ModelMeta("dncnn_small", sigma=0.25, objective="mse"))
    return folder


@pytest.mark.parametrize(
    "change,field_name,words",
    [
        ({"learning_rate": 0.1}, "learning_rate", "unknown field"),
        ({"sweep": {"sigmas": [0.25], "objectivs": ["mse"]}}, "sweep.objectivs", "unknown field"),
        ({"sweep": {"sigmas": [0.25, 0.0]}}, "sweep.sigmas[1]", "> 0"),
        ({"sweep": {"sigmas": [-0.5]}}, "sweep.sigmas[0]", ">= 0"),  # no task has negative noise
        ({"sweep": {"sigmas": [float("inf")]}}, "sweep.sigmas[0]", "finite"),
        ({"sweep": {"sigmas": []}}, "sweep.sigmas", "at least one"),
        ({"sweep": {"sigmas": [0.25], "sigams": [0.5]}}, "sweep.sigams", "did you mean 'sigmas'"),
        ({"sweep": {"sigmas": [0.25], "archs": []}}, "sweep.archs", "empty"),
        ({"sweep": {"sigmas": [0.25], "objectives": ["sgd"]}}, "sweep.objectives[0]", "not one of"),
        ({"name": "my run"}, "name", "letters, digits"),
        ({"epochs": 0}, "epochs", ">= 1"),
        ({"max_failures": -2}, "max_failures", ">= -1"),
        ({"cpus_per_worker": 0}, "cpus_per_worker", "> 0"),
        ({"dataset": {"root": "{d}", "max_test": 0}}, "dataset.max_test", ">= 1"),
        ({"sweep": {"sigmas": [0.25], "archs": ["dncnn_tiny"]}}, "sweep.archs[0]", "unknown model"),
        ({"sweep": {"sigmas": [0.25], "archs": ["cifar_resnet20"]}}, "sweep.archs[0]", "classifier"),
        ({"sweep": {"sigmas": [0.25], "objectives": ["xent"]}}, "sweep.objectives[0]", "does not train a denoiser"),
        ({"sweep": {"sigmas": [0.25], "objectives": ["stab"]}}, "classifier", "needs a classifier"),
        ({"classifier": "{d}/missing.pt", "sweep": {"sigmas": [0.25], "objectives": ["stab"]}},
         "classifier", "classifier not found"),
        ({"sweep": {"sigmas": [0.25], "objectives": ["stab"],
                    "surrogate_sets": [["{d}/c10.pt"], ["{d}/c10.pt", "{d}/c5.pt"]]}},
         "sweep.surrogate_sets[1][1]", "5 classes"),
        ({"sweep": {"sigmas": [0.25], "objectives": ["stab"], "surrogate_sets": [["{d}/c10.pt"], []]}},
         "sweep.surrogate_sets[1]", "at least one classifier"),
        # the check certify applies too: a CIFAR-10 classifier takes 32x32 images, not 64x64
        ({"classifier": "{d}/c10.pt", "sweep": {"sigmas": [0.25], "objectives": ["stab"]},
          "dataset": {"kind": "cifar10", "root": str(CIFAR), "image_size": 64}}, "classifier", "32x32"),
        ({"sweep": {"sigmas": [0.25], "objectives": ["stab"], "surrogate_sets": [["{d}/mse.pt"]]}},
         "sweep.surrogate_sets[0][0]", "not a classifier"),
        ({"classifier": "{d}/c10.pt", "sweep": {"sigmas": [0.5], "objectives": ["stab_mse"], "archs": ["dncnn_small"]},
          "init_checkpoints": ["{d}/mse.pt"]}, "init_checkpoints[0]", "matches no"),
        ({"optimizer": {"stab": {"lr": 0.1}}}, "optimizer.stab", "not an objective"),
        ({"optimizer": {"mse": {"lr": -1.0}}}, "optimizer.mse.lr", "> 0"),
        ({"optimizer": {"mse": {"momentum": 1.0}}}, "optimizer.mse.momentum", "< 1"),
        ({"optimizer": {"mse": {"gamma": 0}}}, "optimizer.mse.gamma", "> 0"),
        ({"task": "classifier", "sweep": {"sigmas": [0.0], "archs": ["cifar_resnet20"]},
          "classifier": "{d}/c10.pt"}, "classifier", "only applies to task 'denoiser'"),
        # any classifier spec certify takes, with certify's one-line errors
        ({"classifier": "timm:test_resnet", "sweep": {"sigmas": [0.25], "objectives": ["stab"]}},
         "classifier", "needs its weights"),
        ({"classifier": "no_such_package.models:make", "sweep": {"sigmas": [0.25], "objectives": ["stab"]}},
         "classifier", "cannot import no_such_package.models"),
        ({"sweep": {"sigmas": [0.25], "objectives": ["stab"], "surrogate_sets": [[{"classifier": "{d}/c10.pt",
                                                                                    "weights": "w.pth"}]]}},
         "sweep.surrogate_sets[0][0].weights", "unknown field"),
        ({"classifier_input_size": 64, "sweep": {"sigmas": [0.25]}}, "classifier_input_size", "give classifier too"),
        ({"dataset": {"root": "{d}/nowhere"}}, "dataset.root", "does not exist"),
        ({"use_gpu": "sometimes"}, "use_gpu", "auto, true or false"),
        ({"augment": "yes"}, "augment", "boolean"),
    ],
)
def test_config_errors_name_the_field(tmp_path, tiny_checkpoints, change, field_name, words):
    base = denoiser_config(tmp_path / "out", sweep={"sigmas": [0.25]})
    text = json.dumps(change).replace("{d}", str(tiny_checkpoints))
    base.update(json.loads(text))
    with pytest.raises(ConfigError) as error:
        load_train_config(base)
    assert error.value.field == field_name
    assert words in str(error.value)


def test_cli_rejects_a_bad_config_before_any_work(tmp_path, capsys):
    from jobs.cli import main

    out = tmp_path / "out"
    path = write_yaml(tmp_path / "bad.yaml", denoiser_config(out, sweep={"sigmas": [0.25, -1.0]}))
    assert main(["train", "--config", str(path)]) == 2
    assert "sweep.sigmas[1]" in capsys.readouterr().err
    assert not out.exists()


def test_flags_come_from_the_config_and_override_the_yaml(tmp_path, tiny_checkpoints):
    """Each setting is declared once: its YAML key, its flag (with help) and its checks."""
    from jobs import train
    from jobs.options import Parser
    from pipeline.config import to_dict

    parser = Parser(prog="dsmooth train")
    train.add_arguments(parser)
    assert all(action.help for action in parser._actions), [a.dest for a in parser._actions if not a.help]
    path = write_yaml(tmp_path / "sweep.yaml", denoiser_config(tmp_path / "out", sweep={"sigmas": [0.25]}))

    def load(*flags: str):
        return train.load_settings(parser.parse_args(["--config", str(path), *flags]))

    c10 = tiny_checkpoints / "c10.pt"
    config = load("--classifier", str(c10), "--output-dir", str(tmp_path / "other"), "--storage-path",
                  str(tmp_path / "store"), "--epochs", "7", "--num-workers", "1", "--max-concurrent", "2",
                  "--stop-after-epochs", "1", "--use-gpu", "false", "--sigmas", "0.25", "0.5", "--no-augment")
    assert (config.classifier, config.output_dir, config.storage_path) == (
        str(c10), tmp_path / "other", str(tmp_path / "store"))
    assert (config.epochs, config.num_workers, config.max_concurrent, config.stop_after_epochs) == (7, 1, 2, 1)
    assert (config.use_gpu, config.sweep.sigmas, config.augment) == (False, [0.25, 0.5], False)
    assert config.dataset.max_train == 500 and config.batch_size == 32  # the YAML's, untouched
    assert load("--use-gpu", "auto").use_gpu == "auto" and load().use_gpu == "auto"
    assert load_train_config(to_dict(config)) == config  # YAML-able round trip
    with pytest.raises(ConfigError, match=r"'classifier'.*classifier not found.*\(--classifier\)"):
        load("--classifier", str(tmp_path / "missing.pt"), "--objectives", "stab")
    with pytest.raises(ConfigError, match=r"'epochs': must be >= 1.*\(--epochs\)"):
        load("--epochs", "0")
    # a classifier may train without noise (sigma 0); a denoiser may not
    classifier = load("--task", "classifier", "--sigmas", "0", "--archs", "cifar_resnet20")
    assert classifier.sweep.sigmas == [0.0] and classifier.objectives == ["xent"]
    with pytest.raises(ConfigError, match=r"'sweep.sigmas\[0\]': a denoiser's noise level must be > 0"):
        load("--sigmas", "0")


def test_plan_dedupes_mse_orders_dependencies_and_names_stably(tmp_path, tiny_checkpoints):
    d = tiny_checkpoints
    raw = denoiser_config(tmp_path / "out", classifier=str(d / "c10.pt"), sweep={
        "sigmas": [0.25, 0.5], "archs": ["dncnn_small"], "objectives": ["stab_mse", "mse", "stab"],
        "surrogate_sets": [[str(d / "c10.pt")], [str(d / "c10.pt"), str(d / "c10.pt")]]})
    runs = plan_sweep(load_train_config(raw))
    names = [r.name for r in runs]
    assert len(set(names)) == len(names)
    # per sigma: one MSE run shared by everything, 2 STAB+MSE and 2 STAB runs (one per surrogate set)
    assert sorted(r.objective for r in runs) == sorted(["mse"] * 2 + ["stab_mse"] * 4 + ["stab"] * 4)
    for run in runs:
        if run.objective == "stab_mse":
            mse = next(r for r in runs if r.name == run.depends_on)
            assert (mse.objective, mse.sigma, mse.arch) == ("mse", run.sigma, run.arch)
            assert names.index(mse.name) < names.index(run.name)
            assert run.init_checkpoint == str(tmp_path / "out" / mse.name / "model.pt")
            assert run.surrogate_label.startswith("bb:")
    # Tune runs one stage at a time: MSE and STAB first, STAB+MSE (from its MSE denoiser) after
    grouped = stages(runs)
    assert [sorted(r.objective for r in stage) for stage in grouped] == [
        sorted(["mse"] * 2 + ["stab"] * 4), ["stab_mse"] * 4]
    assert stages([r for r in runs if r.objective == "stab_mse"]) == [[r for r in runs if r.objective == "stab_mse"]]
    # same config -> same names (resume); epochs do not rename; the learning rate does
    assert [r.name for r in plan_sweep(load_train_config(raw))] == names
    assert [r.name for r in plan_sweep(load_train_config({**raw, "epochs": 7}))] == names
    renamed = plan_sweep(load_train_config({**raw, "optimizer": {"stab": {"lr": 0.01}}}))
    assert {r.name for r in renamed if r.objective == "stab"}.isdisjoint(names)
    # a given MSE checkpoint replaces the MSE run for its (arch, sigma)
    given = plan_sweep(load_train_config({**raw, "init_checkpoints": [str(d / "mse.pt")],
                                          "sweep": {**raw["sweep"], "objectives": ["stab_mse"]}}))
    by_sigma = {s: [r for r in given if r.sigma == s] for s in (0.25, 0.5)}
    assert all(r.init_checkpoint == str(d / "mse.pt") and r.depends_on is None for r in by_sigma[0.25])
    assert [r.objective for r in by_sigma[0.5]] == ["mse", "stab_mse", "stab_mse"]
    assert [len(stage) for stage in stages(given)] == [3, 2]  # both sigma-0.25 runs need no MSE run


def test_frozen_classifier_never_changes_in_a_training_step(tmp_path, tiny_checkpoints):
    """In-process (no Ray): a STAB epoch updates the denoiser but no classifier parameter or
    BatchNorm buffer, even after someone calls .train() on the classifier."""
    path = str(tiny_checkpoints / "c10.pt")
    config = load_train_config(denoiser_config(
        tmp_path / "out", classifier=path, dataset=dataset(max_train=64, max_test=16),
        sweep={"sigmas": [0.25], "objectives": ["stab"], "archs": ["dncnn_small"]}, epochs=1))
    state = RunState(worker_spec(config, plan_sweep(config)[0]), WorkerHooks())
    classifier = state.classifiers[path]
    before = {k: v.clone() for k, v in classifier.state_dict().items()}
    denoiser_before = {k: v.clone() for k, v in state.model.state_dict().items()}
    classifier.train()
    state.train_epoch(1, *state.loader())
    assert all(torch.equal(v, before[k]) for k, v in classifier.state_dict().items())
    assert any(not torch.equal(v, denoiser_before[k]) for k, v in state.model.state_dict().items())
    assert state.check_classifiers()[0]["digest_after"] == state_digest(load_checkpoint(path)[0])


def test_frozen_classifiers_may_be_any_spec(tmp_path):
    """In-process (no Ray): the white-box classifier as `timm:NAME` + weights (with an input
    size flag) and a black-box surrogate as a `.pt2` archive, given as `certify` takes them,
    are checked against the data, loaded with their preprocessing inside, and frozen: one
    STAB step trains the denoiser through each and changes neither classifier."""
    from safetensors.torch import save_file

    from classifier_support import timm_net
    from pipeline.models.preprocess import Preprocess

    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in timm_net(10).state_dict().items()}, weights)
    torch.manual_seed(0)
    small = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 10)).eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    archive = tmp_path / "surrogate.pt2"
    torch.export.save(torch.export.export(small, (torch.rand(2, 3, 32, 32),), dynamic_shapes=({0: batch},)), archive)
    common = dict(dataset=dataset(max_train=16, max_test=8), batch_size=16, epochs=1,
                  sweep={"sigmas": [0.25], "objectives": ["stab"], "archs": ["dncnn_small"]})
    white = load_train_config(denoiser_config(tmp_path / "wb", classifier="timm:test_resnet",
                                              classifier_weights=str(weights), classifier_input_size=32, **common))
    common["sweep"]["surrogate_sets"] = [[{"classifier": str(archive), "classifier_mean": [0.5, 0.5, 0.5],
                                           "classifier_std": [0.25, 0.25, 0.25]}]]
    black = load_train_config(denoiser_config(tmp_path / "bb", **common))
    for config, label in ((white, "wb:timm-test_resnet"), (black, "bb:surrogate.pt2")):
        run = plan_sweep(config)[0]
        assert run.surrogate_label == label
        state = RunState(worker_spec(config, run), WorkerHooks())
        (classifier,) = state.loss_classifiers
        assert isinstance(classifier[0], Preprocess)  # the spec's preprocessing, inside f
        before = state.check_classifiers()
        denoiser_before = {k: v.clone() for k, v in state.model.state_dict().items()}
        state.train_epoch(1, *state.loader())
        assert state.check_classifiers() == before
        assert any(not torch.equal(v, denoiser_before[k]) for k, v in state.model.state_dict().items())
    # The same spec with other preprocessing is another classifier: another run.
    other = load_train_config(denoiser_config(tmp_path / "wb", classifier="timm:test_resnet",
                                              classifier_weights=str(weights), classifier_input_size=48, **{
                                                  **common, "sweep": {**common["sweep"], "surrogate_sets": []}}))
    assert plan_sweep(other)[0].name != plan_sweep(white)[0].name


def test_run_local_resumes_without_ray(tmp_path):
    """The plain-PyTorch loop alone: checkpoints per epoch, resume continues the history."""
    config = load_train_config(denoiser_config(
        tmp_path / "out", dataset=dataset(max_train=64, max_test=16), epochs=2, stop_after_epochs=1,
        sweep={"sigmas": [0.25], "archs": ["dncnn_small"]}))
    spec = worker_spec(config, plan_sweep(config)[0])
    assert run_local(spec, tmp_path / "store")["epoch"] == 1
    spec["stop_after_epochs"] = None
    summary = run_local(spec, tmp_path / "store")
    record = json.loads((tmp_path / "store" / "epoch_0002" / "metrics.json").read_text())
    assert summary["epoch"] == 2 and record["complete"]
    assert [s["start_epoch"] for s in record["sessions"]] == [1, 2]


def test_a_denoiser_trained_under_uniform_noise_records_it(tmp_path):
    """sweep.noises: the run trains on x + uniform noise, and its checkpoint records the noise
    (what certify checks a denoiser against)."""
    from pipeline.models import ModelMeta, read_checkpoint

    config = load_train_config(denoiser_config(
        tmp_path / "out", dataset=dataset(max_train=32, max_test=8), epochs=1,
        sweep={"sigmas": [0.25], "noises": ["uniform"], "archs": ["dncnn_small"]}))
    spec = worker_spec(config, plan_sweep(config)[0])
    assert spec["run"]["noise"] == "uniform"
    run_local(spec, tmp_path / "store")
    meta = ModelMeta.from_dict(read_checkpoint(tmp_path / "store" / "epoch_0001" / "model.pt")["meta"])
    assert meta.noise == "uniform" and meta.sigma == 0.25


def test_training_grid_is_labelled_and_readable(tmp_path):
    """The grid a denoiser run writes names its rows (clean, noisy at its sigma, denoised)
    and the run in its title, and draws the images large enough to see."""
    from pipeline.training.grids import denoising_grid, grid_figure, grid_title

    config = load_train_config(denoiser_config(
        tmp_path / "out", dataset=dataset(max_train=64, max_test=16), epochs=1,
        sweep={"sigmas": [0.5], "objectives": ["mse"], "archs": ["dncnn_small"]}))
    spec = worker_spec(config, plan_sweep(config)[0])
    images, _ = _test_images(16)
    torch.manual_seed(0)
    tiles = denoising_grid(build_model("dncnn_small"), images, 0.5, 0, 4, torch.device("cpu"))
    headline, detail = grid_title(spec["run"], "cifar10", 1, 1)
    figure = grid_figure(tiles, 4, spec["run"]["sigma"], headline, detail)
    assert [axes.get_ylabel() for axes in figure.axes] == ["clean", "noisy σ=0.5", "denoised"]
    title = figure.get_suptitle()
    for part in (spec["run"]["name"], "mse", "dncnn_small", "σ = 0.5", "epoch 1/1"):
        assert part in title, (part, title)
    assert figure.get_figwidth() * figure.dpi >= 800
    shown = np.asarray(figure.axes[1].images[0].get_array())[:, :32]  # the first noisy tile, as drawn
    np.testing.assert_allclose(shown, tiles[4].permute(1, 2, 0).numpy(), atol=1e-6)

    assert run_local(spec, tmp_path / "store")["epoch"] == 1  # and the training loop writes such a grid
    with Image.open(tmp_path / "store" / "epoch_0001" / "grid.png") as grid:
        assert grid.size[0] >= 800 and grid.size[1] >= 3 * 96


# -- Ray Train runs ------------------------------------------------------------------------------


@pytest.mark.slow
def test_classifiers_standard_and_gaussian_augmented(classifiers):
    """Both trained through Ray Train; the noise-trained one is the better one under noise."""
    test_x, test_y = _test_images(200)
    for key, sigma in (("A", 0.0), ("B", 0.25)):
        model, meta = load_checkpoint(classifiers[key])
        assert (meta.kind, meta.arch, meta.num_classes, meta.sigma, meta.objective) == (
            "classifier", "cifar_resnet20", 10, sigma, "xent")
    a = load_checkpoint(classifiers["A"])[0]
    b = load_checkpoint(classifiers["B"])[0]
    test = NoisyTestSet(test_x, test_y, 0.25, 0, 200, torch.device("cpu"))
    acc_a = evaluate_classifier(a, test)
    acc_b = evaluate_classifier(b, test)
    assert acc_a["acc_clean"] > 0.2  # chance is 0.1, held-out test images
    assert acc_a["acc_noisy"] < acc_a["acc_clean"] - 0.05  # noise hurts the standard classifier
    assert acc_b["acc_noisy"] > acc_a["acc_noisy"]  # Cohen et al.'s point


def _test_images(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    from pipeline.training.data import load_split

    images, labels, _ = load_split({"kind": "cifar10", "root": str(CIFAR)}, "test", count)
    return images, labels


@pytest.mark.slow
def test_stab_sweep_two_sigmas_two_surrogate_sets(classifiers, tmp_path):
    """2 sigmas x 2 surrogate sets ([A] white-box-like, [A, B] black-box) plan 4 STAB runs;
    two of them train here, at once: (0.25, [A]) and (0.5, [A, B]), so both noise levels and
    both surrogate sets go through Ray Train (the plan of all 4 is test_plan_dedupes_...'s).
    Each lifts A's accuracy under noise, none changes a classifier."""
    from jobs.train import train_sweep

    a, b = str(classifiers["A"]), str(classifiers["B"])
    config = load_train_config(denoiser_config(
        tmp_path / "out", classifier=a, epochs=3, cpus_per_worker=0.5, dataset=dataset(max_train=400),
        sweep={"sigmas": [0.25, 0.5], "objectives": ["stab"], "archs": ["dncnn_small"],
               "surrogate_sets": [[a], [a, b]]}))
    planned = plan_sweep(config)
    assert len(planned) == 4
    diagonal = [r for r in planned if (r.sigma == 0.25) == (r.surrogate_label.count("+") == 0)]
    rows = train_sweep(config, diagonal)
    assert len(rows) == 2 and all(r["status"] == "complete" for r in rows), rows
    checkpoints = {r["checkpoint"] for r in rows}
    assert len(checkpoints) == 2 and all(Path(c).is_file() for c in checkpoints)
    digest_a, digest_b = (state_digest(load_checkpoint(p)[0]) for p in (a, b))
    for row in rows:
        model, meta = load_checkpoint(row["checkpoint"])
        assert (meta.kind, meta.arch, meta.objective, meta.sigma) == ("denoiser", "dncnn_small", "stab", row["sigma"])
        assert meta.extra["surrogates"] == ([a] if row["sigma"] == 0.25 else [a, b])
        record = json.loads((Path(row["checkpoint"]).parent / "metrics.json").read_text())
        used = {c["path"]: c for c in record["classifiers"]}
        assert set(used) == set(meta.extra["surrogates"]) | {a}
        for path, c in used.items():
            assert c["digest_before"] == c["digest_after"] == (digest_a if path == a else digest_b)
        losses = [h["train_loss"] for h in record["history"]]
        assert losses[-1] < losses[0], losses  # the denoiser learns at both noise levels
        if row["sigma"] == 0.25:  # STAB from scratch is slow; 3 tiny epochs show it at 0.25
            assert row["acc_noisy_after"] > row["acc_noisy_before"] + 0.04, row
        with Image.open(Path(row["checkpoint"]).parent / "grid.png") as grid:
            assert grid.size[0] >= 800 and grid.size[1] >= 3 * 96  # clean / noisy / denoised rows, readable
    assert sorted((r["sigma"], r["surrogates"].count("+")) for r in rows) == [(0.25, 0), (0.5, 1)]
    table = (tmp_path / "out" / "summary.md").read_text().splitlines()
    assert len(table) == 2 + 2 and "noisy acc before" in table[0]


@pytest.mark.slow
def test_mse_then_stab_mse_with_resume_and_no_retraining(classifiers, tmp_path, capsys):
    """STAB+MSE needs an MSE denoiser: the sweep trains it first. The first invocation stops
    after one epoch; the rerun resumes MSE at epoch 2 (not from scratch), then fine-tunes
    STAB+MSE from it; a third invocation retrains nothing."""
    from jobs.cli import main
    from jobs.train import train_sweep

    a = str(classifiers["A"])
    out = tmp_path / "out"
    path = write_yaml(tmp_path / "sweep.yaml", denoiser_config(
        out, classifier=a, epochs=3, batch_size=16, storage_path=str(tmp_path / "ray"), dataset=dataset(max_train=256),
        sweep={"sigmas": [0.25], "objectives": ["stab_mse"], "archs": ["dncnn_small"]},
        optimizer={"stab_mse": {"lr": 1e-4}}))

    assert main(["train", "--config", str(path), "--stop-after-epochs", "1"]) == 0
    runs = plan_sweep(load_train_config(path))
    mse, stab = runs
    assert (mse.objective, stab.objective, stab.depends_on) == ("mse", "stab_mse", mse.name)
    first = json.loads((out / mse.name / "metrics.json").read_text())
    assert (first["epoch"], first["complete"]) == (1, False)
    assert not (out / stab.name).exists()  # waited for its MSE denoiser
    summary = (out / "summary.csv").read_text()
    assert "stopped" in summary and "waiting" in summary

    assert main(["train", "--config", str(path)]) == 0
    record = json.loads((out / mse.name / "metrics.json").read_text())
    assert record["complete"] and [h["epoch"] for h in record["history"]] == [1, 2, 3]
    assert [s["start_epoch"] for s in record["sessions"]] == [1, 2]
    assert record["history"][0] == first["history"][0]  # epoch 1 kept, not retrained
    assert {h["session"] for h in record["history"][1:]} == {record["sessions"][1]["session"]}
    final = record["summary"]
    assert final["test_mse"] < final["noisy_mse"]  # the MSE denoiser denoises
    assert final["test_psnr"] > final["noisy_psnr"]

    _, meta = load_checkpoint(out / stab.name / "model.pt")
    assert meta.extra["init_checkpoint"] == str(out / mse.name / "model.pt")
    tuned = json.loads((out / stab.name / "metrics.json").read_text())["summary"]
    assert tuned["acc_noisy_after"] > tuned["acc_noisy_before"] + 0.05, tuned

    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/model.pt")}
    capsys.readouterr()
    rows = train_sweep(load_train_config(path))
    assert [r["status"] for r in rows] == ["done before", "done before"]
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/model.pt")} == stamps
    assert "not retrained" in capsys.readouterr().err


def _csv_rows(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _dsmooth(*args: str, address: str) -> list[str]:
    """`dsmooth train ARGS` attached to the module's cluster (starting a Ray of its own would
    cost half a minute on a busy 2-core machine)."""
    return [sys.executable, "-m", "jobs.cli", "train", *args, "--address", address]


def _env() -> dict[str, str]:
    return {**os.environ, **FAST_RAY_TRAIN, "PYTHONUNBUFFERED": "1"}


def _assert_no_ray_noise(text: str) -> None:
    for noise in RAY_NOISE:
        assert noise not in text, f"{noise!r} in the output:\n{text}"


@pytest.mark.slow
def test_killed_sweep_resumes_a_failed_run_stops_nothing_and_output_is_dsmooths(train_ray, tiny_checkpoints, tmp_path):
    """`dsmooth train` as a user runs it, in its own process, with its checkpoints on S3 (the
    test server), on a sweep of two concurrent runs: an MSE denoiser, and a STAB+MSE one that
    starts from a checkpoint whose weights do not fit its architecture (the file passes the
    config checks, which read only its metadata), so it fails in its Ray Train worker every time.

    Run with --verbose (Ray's own output comes through) and SIGKILLed as soon as it has logged
    the MSE run's first epoch, the command leaves that epoch's checkpoint in storage; the same
    command again, with default output, resumes the run from there (epoch 1 not retrained) and
    finishes it, the failed run notwithstanding (exit status 1; the error in one line and in
    summary.csv). Its output is dsmooth's own lines (one per epoch; no Ray log line, no colour
    code) and, on stdout, the summary table."""
    import ray

    epochs = 3
    storage = f"s3://{new_bucket()}/train"
    bad = tmp_path / "bad_mse.pt"
    save_checkpoint(bad, build_model("dncnn"), ModelMeta("dncnn_small", sigma=0.25, objective="mse"))
    out = tmp_path / "out"
    path = write_yaml(tmp_path / "sweep.yaml", denoiser_config(
        out, classifier=str(tiny_checkpoints / "c10.pt"), init_checkpoints=[str(bad)], num_workers=1,
        epochs=epochs, batch_size=16, grid_images=2, dataset=dataset(max_train=128, max_test=32),
        storage_path=storage, sweep={"sigmas": [0.25], "objectives": ["mse", "stab_mse"], "archs": ["dncnn_small"]}))
    run, broken = plan_sweep(load_train_config(path))
    assert (run.objective, broken.objective, broken.init_checkpoint, broken.depends_on) == (
        "mse", "stab_mse", str(bad), None)  # one stage: both start at once

    # 1. --verbose, attached to the module's cluster, killed (with its process group) after epoch 1
    address = ray.get_runtime_context().gcs_address
    killed = subprocess.Popen(_dsmooth("--config", str(path), "--verbose", address=address), cwd=REPO, env=_env(),
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    seen = []
    try:
        for line in killed.stdout:
            seen.append(line)
            if f"dsmooth: [{run.name}] epoch 1/{epochs} | loss " in line:  # Ray's stdout lines interleave
                break
    finally:
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait(timeout=60)
    first = "".join(seen)
    assert f"dsmooth: [{run.name}] epoch 1/{epochs} |" in seen[-1], first
    assert "(RayTrainWorker pid=" in first and "\x1b[" not in first  # Ray's lines, not coloured: no terminal
    assert not (out / run.name / "metrics.json").exists()  # killed mid-run: no outputs yet

    # 2. the same command, default output: resumes after epoch 1 and completes
    again = subprocess.run(_dsmooth("--config", str(path), address=address), cwd=REPO, env=_env(), text=True,
                           capture_output=True, timeout=600)
    assert again.returncode == 1, again.stderr  # a run failed
    _assert_no_ray_noise(again.stdout + again.stderr)
    # Nothing but dsmooth's lines and its table; except Ray's own cluster warnings, which come
    # through a channel that log_to_driver does not close (e.g. "(raylet) WARNING: 8 PYTHON
    # worker processes have been started on node ..." on a small, busy node).
    foreign = [line for line in (again.stdout + again.stderr).splitlines()
               if not line.startswith(("dsmooth: ", "| ", "|-", "(raylet) "))]
    assert not foreign, again.stdout + again.stderr
    lines = again.stderr.splitlines()
    epoch_lines = [line for line in lines if line.startswith(f"dsmooth: [{run.name}] epoch ")]
    resumed = int(re.search(rf"dsmooth: {run.name}: resuming after epoch (\d+)", again.stderr).group(1))
    assert 1 <= resumed < epochs and len(epoch_lines) == epochs - resumed, again.stderr
    assert epoch_lines[-1].startswith(f"dsmooth: [{run.name}] epoch {epochs}/{epochs} | loss ")
    assert f"dsmooth: {run.name}: complete" in again.stderr
    failures = [line for line in lines if line.startswith(f"dsmooth: error: {broken.name}: failed: ")]
    assert len(failures) == 1 and "CheckpointMismatchError" in failures[0], again.stderr
    assert "weights do not fit architecture 'dncnn_small'" in failures[0]
    table = [line for line in again.stdout.splitlines() if line.startswith("|")]  # the command's result
    assert table[0].startswith("| sigma") and again.stdout.endswith(table[-1] + "\n")
    assert [re.search(r"\| (complete|failed) +\|", row).group(1) for row in table[2:]] == ["complete", "failed"]
    record = json.loads((out / run.name / "metrics.json").read_text())
    assert record["complete"] and [h["epoch"] for h in record["history"]] == list(range(1, epochs + 1))
    assert [s["start_epoch"] for s in record["sessions"]] == [1, resumed + 1]
    assert record["history"][0]["session"] == record["sessions"][0]["session"]  # epoch 1 kept, not retrained
    assert record["storage_checkpoint"].startswith(f"{storage}/{run.name}/checkpoint_")
    assert {p.name for p in (out / run.name).iterdir()} == {"model.pt", "metrics.json", "grid.png"}
    assert not (out / broken.name).exists()
    summary = {row["name"]: row for row in _csv_rows(out / "summary.csv")}
    assert (summary[run.name]["status"], summary[broken.name]["status"]) == ("complete", "failed")
    assert "weights do not fit" in summary[broken.name]["error"]


def test_bf16_training_autocasts_over_fp32_master_weights(tmp_path):
    """--precision bf16 (in-process, no Ray): the forward passes run in bf16, the weights and
    their updates stay fp32, and the run's identity says bf16 (fp32 runs keep theirs)."""
    def plan(**values):
        config = load_train_config(denoiser_config(
            tmp_path / "out", dataset=dataset(max_train=32, max_test=8), epochs=1,
            sweep={"sigmas": [0.25], "archs": ["dncnn_small"]}, **values))
        return worker_spec(config, plan_sweep(config)[0])

    fp32, bf16 = plan(), plan(precision="bf16")
    assert "precision" not in fp32["run"]["hparams"] and bf16["run"]["hparams"]["precision"] == "bf16"
    assert fp32["run"]["name"] != bf16["run"]["name"]
    state = RunState(bf16, WorkerHooks())
    seen = []
    for layer in state.model.modules():
        if isinstance(layer, torch.nn.Conv2d):
            layer.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    metrics = state.train_epoch(1, *state.loader())
    assert seen and set(seen) == {torch.bfloat16} and np.isfinite(metrics["train_loss"])
    after = state.model.state_dict()
    assert all(v.dtype == torch.float32 for v in after.values() if v.is_floating_point())
    assert any(not torch.equal(v, before[k]) for k, v in after.items())

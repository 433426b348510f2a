"""A user's own model and data, right by default: the classifier's preprocessing is always
known (read from the form, or refused before any sample), sigma is in pixel units, user
errors are one line, "certified" means one thing, one precision, votes/ sums right for any
reader after a resume, reports say what the run did, the lock comes first, and
`load_model` takes what `certify` takes.

Stand-ins are built here (tiny networks, PNGs made from the shipped CIFAR-10 sample); no
test needs ../shared/data."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from jobs.cli import main as cli_main
from pipeline.certify.pair import ModelBytes, load_pair
from pipeline.config import ConfigError
from pipeline.data.specs import DataDescription
from pipeline.models.preprocess import Preprocessing
from pipeline.models.sources import ClassifierSourceError, ClassifierSpec, resolve_classifier
from pipeline.models.sources.bundle import read_bundle

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "pipeline" / "assets" / "cifar10-sample"
MODELS = REPO / "pipeline" / "assets" / "models" / "cifar10"
CFG = {"input_size": (3, 40, 40), "mean": (0.4, 0.45, 0.5), "std": (0.2, 0.25, 0.3), "interpolation": "bilinear"}
FACTORY_MODULE = "dsmooth_issue_factories"
FACTORIES = '''
import torch

def tiny():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(4, 10)).eval()

def tiny_with_preprocessing():
    return tiny(), {"input_size": (3, 40, 40), "mean": (0.4, 0.45, 0.5), "std": (0.2, 0.25, 0.3)}
'''


def tiny_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(4, 10)).eval()


@pytest.fixture()
def factories(tmp_path, monkeypatch):
    (tmp_path / f"{FACTORY_MODULE}.py").write_text(textwrap.dedent(FACTORIES))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop(FACTORY_MODULE, None)


def png_folder(folder: Path, count: int = 5, side: int = 64) -> Path:
    """`count` unlabelled PNGs (the shipped sample's airplanes, upscaled), named img0.png ..."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted((SAMPLE / "test" / "airplane").glob("*.jpg"))[:count]
    for i, source in enumerate(sources):
        Image.open(source).convert("RGB").resize((side, side), Image.BILINEAR).save(folder / f"img{i}.png")
    return folder


def _preprocessing_of(source) -> dict:
    manifest, _ = read_bundle(source.data)
    return manifest["preprocessing"]


# ----------------------------------------------------------------------------- item 1: preprocessing


def test_every_form_carries_its_preprocessing_and_votes_the_same(tmp_path, factories):
    """One network as an object with its pretrained_cfg, a factory returning (module,
    preprocessing), a .pt2 and a TorchScript file written by `dsmooth.save_archive`, and the
    bare object with the same preprocessing as flags: all resolve to one preprocessing with
    no flag, and f gives the same logits on the data's own 32 px images. `save_archive` makes
    the folder it writes into."""
    import dsmooth

    with_cfg = tiny_net()
    with_cfg.pretrained_cfg = dict(CFG)  # what timm models carry
    pt2 = dsmooth.save_archive(tiny_net(), tmp_path / "deploy" / "net.pt2", CFG, torch.rand(2, 3, 40, 40))
    ts = dsmooth.save_archive(tiny_net(), tmp_path / "ts" / "net.ts", CFG, torch.rand(2, 3, 40, 40),
                              kind="torchscript")
    forms = {
        "flags": ClassifierSpec(tiny_net(), input_size=40, mean=CFG["mean"], std=CFG["std"]),
        "pretrained_cfg": ClassifierSpec(with_cfg),
        "factory": ClassifierSpec(f"{FACTORY_MODULE}:tiny_with_preprocessing"),
        "pt2": ClassifierSpec(str(pt2)),
        "torchscript": ClassifierSpec(str(ts)),
    }
    data = DataDescription(None, None, (32, 32))
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    logits, preprocessing = {}, {}
    for name, spec in forms.items():
        source = ModelBytes.classifier(spec)
        preprocessing[name] = _preprocessing_of(source)
        pair, _ = load_pair(source, None, data)
        with torch.inference_mode():
            logits[name] = pair(x)
    assert preprocessing["flags"]["mean"] == [0.4, 0.45, 0.5] and preprocessing["flags"]["crop"] == 40
    for name in forms:
        assert preprocessing[name] == preprocessing["flags"], name
        torch.testing.assert_close(logits[name], logits["flags"], rtol=1e-5, atol=1e-5)
    # The preprocessing ran: without it the network sees other inputs.
    assert not torch.allclose(tiny_net()(x), logits["flags"], atol=1e-3)


def test_a_form_without_preprocessing_is_refused_naming_the_flags(tmp_path, factories):
    """An archive, a factory and an object that carry no mean/std, with no flag: one line
    naming the flags and --classifier-preprocessing none; with `none`, accepted as it is."""
    bare_pt2 = tmp_path / "bare.pt2"
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.export.save(torch.export.export(tiny_net(), (torch.rand(2, 3, 32, 32),), dynamic_shapes=({0: batch},)),
                      bare_pt2)
    for spec in (ClassifierSpec(str(bare_pt2)), ClassifierSpec(f"{FACTORY_MODULE}:tiny"), ClassifierSpec(tiny_net())):
        with pytest.raises(ClassifierSourceError) as refused:
            resolve_classifier(spec)
        message = str(refused.value)
        assert "\n" not in message and "preprocessing is unknown" in message
        assert "--classifier-mean" in message and "--classifier-preprocessing none" in message
        accepted = resolve_classifier(dataclasses.replace(spec, preprocessing="none"))
        assert _preprocessing_of(accepted) == Preprocessing().to_dict()
    # An input size alone does not say how the network normalises.
    with pytest.raises(ClassifierSourceError, match="preprocessing is unknown"):
        resolve_classifier(ClassifierSpec(str(bare_pt2), input_size=32))
    with pytest.raises(ClassifierSourceError, match="contradict"):
        resolve_classifier(ClassifierSpec(str(bare_pt2), mean=(0.5,) * 3, std=(0.2,) * 3, preprocessing="none"))


def test_cli_refuses_an_unnormalised_archive_before_ray_and_any_sample(tmp_path, capsys):
    import ray

    data = png_folder(tmp_path / "images")
    bare = tmp_path / "bare.pt2"
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.export.save(torch.export.export(tiny_net(), (torch.rand(2, 3, 64, 64),), dynamic_shapes=({0: batch},)), bare)
    was_running = ray.is_initialized()
    code = cli_main(["certify", "--dataset", "folder", "--data-root", str(data), "--classifier", str(bare),
                     "--sigma", "0.25", "--n0", "2", "--n", "4", "--output", str(tmp_path / "out")])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(errors) == 1 and "--classifier-preprocessing none" in errors[0], errors
    assert not (tmp_path / "out").exists() and ray.is_initialized() == was_running


def test_preprocessing_objects_are_read():
    """torchvision weights (and their transforms), a Hugging Face image processor, timm's
    pretrained_cfg and dsmooth's own dict all give the Preprocessing they describe."""
    from torchvision.models import ResNet50_Weights
    from transformers import ViTImageProcessor

    from pipeline.models.sources import preprocessing_of

    weights = preprocessing_of(ResNet50_Weights.IMAGENET1K_V2)
    assert weights == preprocessing_of(ResNet50_Weights.IMAGENET1K_V2.transforms())
    assert weights.crop == 224 and weights.mean == (0.485, 0.456, 0.406) and weights.std == (0.229, 0.224, 0.225)
    hf = preprocessing_of(ViTImageProcessor(size={"height": 48, "width": 48}, image_mean=[0.1, 0.2, 0.3],
                                            image_std=[0.4, 0.5, 0.6]))
    assert hf.resize_exact == (48, 48) and hf.mean == (0.1, 0.2, 0.3)
    assert preprocessing_of(CFG).crop == 40
    assert preprocessing_of(hf.to_dict()) == hf
    with pytest.raises(ClassifierSourceError, match="cannot read a preprocessing"):
        preprocessing_of(3)


def test_python_api_takes_a_preprocessing_object_and_refuses_none_given(tmp_path):
    import dsmooth

    with pytest.raises(ClassifierSourceError, match="preprocessing is unknown"):
        dsmooth.load_model(tiny_net(), dataset="folder", image_size=32)
    model = dsmooth.load_model(tiny_net(), dataset="folder", image_size=32,
                               classifier_preprocessing=Preprocessing(mean=(0.5,) * 3, std=(0.25,) * 3))
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), tiny_net()((x - 0.5) / 0.25))


def test_refusals_name_flags_on_the_command_line_and_keywords_in_python(tmp_path, capsys, factories):
    """One check and one message per refusal, worded by the front end: `dsmooth certify` names
    its flags, `dsmooth.load_model` / `dsmooth.certify` the keyword arguments -- and a
    library call after a Python one names flags again (the wording does not leak)."""
    import dsmooth
    from pipeline.data.core import DatasetError
    from ray_support import forbid_ray_start

    with pytest.raises(ClassifierSourceError) as refused:
        dsmooth.load_model(tiny_net(), dataset="folder", image_size=32)
    message = str(refused.value)
    assert "classifier_mean=(M, M, M) and classifier_std=(S, S, S)" in message
    assert "classifier_input_size=PX" in message and 'classifier_preprocessing="none"' in message
    assert "--" not in message, message
    with pytest.raises(ClassifierSourceError) as refused:
        dsmooth.load_model(tiny_net(), dataset="folder", image_size=32, classifier_preprocessing="none",
                           classifier_mean=(0.5,) * 3, classifier_std=(0.2,) * 3)
    assert str(refused.value).startswith('classifier_preprocessing="none" and classifier_mean=/classifier_std= '
                                         "contradict"), refused.value
    with pytest.raises(ClassifierSourceError) as refused:  # the library itself, as the command line calls it
        resolve_classifier(ClassifierSpec(tiny_net()))
    assert "give --classifier-mean M M M and --classifier-std S S S" in str(refused.value)
    assert "--classifier-preprocessing none" in str(refused.value)

    images = png_folder(tmp_path / "val", count=2)
    labels = tmp_path / "labels.csv"
    labels.write_text("image,label\nimg0,tench\nimg1,hen\n")
    common = dict(dataset="folder", data_root=str(images), sigma=0.25, n0=2, n=4, labels=str(labels))
    with forbid_ray_start():
        with pytest.raises(DatasetError) as refused:
            dsmooth.certify(**common, classifier=tiny_net(), classifier_preprocessing="none",
                            output=str(tmp_path / "py"), progress=False)
        assert "give class_names=FILE" in str(refused.value) and "--" not in str(refused.value), refused.value
        with pytest.raises(ConfigError) as refused:
            dsmooth.certify(**common, classifier=tiny_net(), radius=0.25, output=str(tmp_path / "py"))
        assert "(sequential=True)" in str(refused.value) and "--" not in str(refused.value), refused.value
        with pytest.raises(ConfigError) as refused:
            dsmooth.certify(**{**common, "sigma": 25.0}, classifier=tiny_net(), output=str(tmp_path / "py"))
        assert "'sigma'" in str(refused.value) and "--" not in str(refused.value), refused.value
    capsys.readouterr()
    argv = ["certify", "--dataset", "folder", "--data-root", str(images), "--sigma", "0.25", "--n0", "2", "--n", "4",
            "--labels", str(labels), "--classifier", f"{FACTORY_MODULE}:tiny", "--output", str(tmp_path / "cli")]
    assert cli_main(argv) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert "give --classifier-mean M M M and --classifier-std S S S" in line and "classifier_mean" not in line
    assert cli_main(argv + ["--classifier-preprocessing", "none"]) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert "give --class-names FILE" in line, line
    assert cli_main(argv + ["--classifier-preprocessing", "none", "--radius", "0.25"]) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert "(--sequential)" in line, line


# ----------------------------------------------------------------------------- item 3: sigma


def test_sigma_over_two_is_refused_in_every_job_with_the_255_hint(tmp_path):
    """certify (every noise), certify-api, train (denoisers and noisy classifiers) and the
    Python API: one rule, sigma <= 2 in [0, 1] pixel units, with the /255 hint."""
    from pipeline.apis.config import CertifyApiConfig
    from pipeline.certify.config import CertifyConfig
    from pipeline.certify.smooth import Smooth
    from pipeline.config import Sigma, check_value, load_config
    from pipeline.training.config import TrainConfig

    base = {"dataset": "folder", "data_root": str(tmp_path), "classifier": "c.pt", "output": "o"}
    for noise in ("gaussian", "uniform", "laplace"):
        with pytest.raises(ConfigError, match=r"did you mean sigma/255 = 0\.098"):
            load_config(CertifyConfig, {**base, "sigma": 25.0, "noise": noise})
    with pytest.raises(ConfigError, match="did you mean sigma/255"):
        load_config(CertifyApiConfig, REPO / "examples" / "certify_api_emulated.yaml", {"sigma": 25.0})
    with pytest.raises(ValueError, match="did you mean sigma/255"):
        Smooth(tiny_net(), 10, sigma=12.0)
    train = REPO / "examples" / "train_cifar10_small.yaml"
    for task, objective in (("denoiser", "mse"), ("classifier", "xent")):
        with pytest.raises(ConfigError, match="did you mean sigma/255"):
            load_config(TrainConfig, train, {"task": task, "sweep.sigmas": [0.25, 64.0], "sweep.objectives": [objective]})
    assert check_value(Sigma, 2.0, "sigma") == 2.0 and check_value(Sigma, 1.0, "sigma") == 1.0
    load_config(CertifyConfig, {**base, "sigma": 1.0})


def test_sigma_in_255_units_is_one_line_on_the_command_line(tmp_path, capsys):
    code = cli_main(["certify", "--dataset", "folder", "--data-root", str(tmp_path), "--classifier", "c.pt",
                     "--sigma", "25", "--output", str(tmp_path / "out")])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(errors) == 1 and "did you mean sigma/255 = 0.098" in errors[0], errors
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- item 4: one-line errors


@pytest.mark.parametrize("argv, hint", [
    (["certify", "--sigam", "0.25"], "did you mean --sigma?"),
    (["certify", "--sigma", "abc"], "invalid float value"),
    (["certify", "--dataset", "cifar"], "did you mean cifar10?"),
    (["certifi"], "did you mean certify?"),
])
def test_argparse_errors_are_one_line_with_a_pointer_to_help(argv, hint, capsys):
    with pytest.raises(SystemExit) as stop:
        cli_main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert stop.value.code == 2 and len(lines) == 1, err
    assert hint in lines[0] and "--help" in lines[0]


def test_yaml_code_tags_are_one_line(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("sigma: !!python/object/apply:os.system ['true']\n")
    code = cli_main(["certify", "--config", str(config), "--output", str(tmp_path / "out")])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "is refused" in lines[0] and "line 1" in lines[0], lines


def test_a_pickled_checkpoint_is_refused_without_suggesting_weights_only_false(tmp_path, capsys):
    import os

    marker = tmp_path / "code-ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    torch.save({"meta": {}, "state_dict": {"w": Evil()}}, evil)
    code = cli_main(["certify", "--dataset", "cifar10", "--data-root", str(SAMPLE), "--classifier", str(evil),
                     "--sigma", "0.25", "--max", "1", "--output", str(tmp_path / "out")])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert "refused to load" in lines[0] and "weights_only" not in lines[0] and not marker.exists()


# ----------------------------------------------------------------------------- item 5: "certified"


def _certificates(rows: list[tuple[int, int, float, bool]], labels_from: str | None = None):
    """(label, predict, radius, abstained) rows as a Certificates frame."""
    from pipeline.reduce.certificates import make_certificates

    frame = pd.DataFrame({
        "image_id": range(len(rows)), "label": [r[0] for r in rows], "predict": [r[1] for r in rows],
        "p_a_lower": 0.9, "radius": [r[2] for r in rows], "correct": [r[0] == r[1] and not r[3] for r in rows],
        "abstained": [r[3] for r in rows], "time_s": 0.0})
    certificates = make_certificates(frame, name="run", sigma=0.25, alpha=0.001, n=1000)
    certificates.labels_from = labels_from
    return certificates


def test_certified_in_the_summary_is_what_the_table_counts():
    """5 images: 2 certified of the right class, 2 certificates of another class, 1 abstained.
    The summary says 2 certified (not 4), as the table's r = 0 cell (40 %)."""
    from jobs.certify import outcome_counts
    from pipeline.reduce import accuracy_table

    certificates = _certificates([(1, 1, 0.3, False), (2, 2, 0.1, False), (3, 4, 0.5, False), (0, 5, 0.2, False),
                                  (7, -1, 0.0, True)])
    line = outcome_counts(certificates, 5, [], list(range(5)), "certify", None)
    assert "2 of 5 images certified (the correct class), 1 abstained, 2 certified another class" in line
    table = accuracy_table([certificates], [0.0])
    assert table["certified_accuracy"].iloc[0] == pytest.approx(2 / 5)
    unlabelled = outcome_counts(_certificates([(1, 1, 0.3, False)], "the classifier's clean prediction"), 1, [], [0],
                                "certify", "the classifier's clean prediction")
    assert "agreed with the clean prediction" in unlabelled


def test_a_sequential_summary_counts_only_the_right_class():
    from jobs.certify import SequentialSummary
    from pipeline.stats.sequential import Status

    decisions = type("D", (), {})()
    decisions.status = np.array([Status.CERTIFIED, Status.CERTIFIED, Status.NOT_CERTIFIED, Status.UNDECIDED])
    decisions.certified = decisions.status == Status.CERTIFIED
    decisions.needs_samples = decisions.status == Status.UNDECIDED
    decisions.target = np.array([3, 5, 1, 0])
    decisions.radius = np.array([0.3, 0.4, 0.0, 0.0])
    decisions.samples = np.array([64, 96, 512, 256])
    decisions.unused_samples = np.zeros(4, dtype=int)
    summary = SequentialSummary.of(decisions, np.arange(4), 0.25, 2000, labels=np.array([3, 2, 1, 0]))
    assert summary.certified == 1
    line = summary.line()
    assert "1 of 4 images certified at R = 0.25, 2 not certified, 1 undecided" in line
    assert "vs the run's cap of 2,000" in line and f"{2000 / 232:.1f}x fewer" in line


# ----------------------------------------------------------------------------- item 6: precision


def test_precision_alone_decides_the_arithmetic():
    """No second switch: under fp32 a CUDA forward runs in fp32 (it ran fp16 under the old
    default --amp); a given --amp is read as --precision fp16 on CUDA, with one warning."""
    from pipeline.certify.config import CertifyConfig
    from pipeline.sampling.engine import _amp_dtype
    from pipeline.sampling.precision import amp_as_precision

    assert _amp_dtype(True, torch.device("cuda"), "fp32") is None
    assert _amp_dtype(False, torch.device("cuda"), "fp16") is torch.float16
    config = CertifyConfig(dataset="folder", data_root=".", classifier="c.pt", sigma=0.25, output="o")
    assert config.amp is None and config.precision == "fp32"
    assert "amp" not in dataclasses.asdict(config.pair_settings())
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("dsmooth")
    logger.addHandler(handler)
    try:
        assert amp_as_precision(True, "fp32", "cuda") == "fp16"
        assert amp_as_precision(True, "fp32", "cpu") == "fp32"  # it never changed a CPU run
        assert amp_as_precision(False, "fp32", "cuda") == "fp32"
    finally:
        logger.removeHandler(handler)
    warnings = [r.getMessage() for r in records if "--amp is deprecated" in r.getMessage()]
    assert len(warnings) == 2 and all("\n" not in w for w in warnings)
    old = CertifyConfig(dataset="folder", data_root=".", classifier="c.pt", sigma=0.25, output="o", amp=True)
    assert old.precision == ("fp16" if torch.cuda.is_available() else "fp32") and old.amp is None


# ----------------------------------------------------------------------------- item 8: reports


def test_l1_table_notes_give_the_noises_own_threshold():
    from pipeline.reduce import accuracy_table, render

    certificates = _certificates([(1, 1, 0.3, False), (2, 2, 0.0, True)])
    for noise, threshold, wrong in (("uniform", "½ + R/(4σ)", "Φ(R/σ)"), ("gaussian", "Φ(R/σ)", "½ + R/(4σ)")):
        certificates.noise, certificates.at_radius, certificates.sequence_shape = noise, 0.25, 1.0
        text = render(accuracy_table([certificates]), "markdown")
        assert f"p_A > {threshold}" in text and f"p_A > {wrong}" not in text, (noise, text)


def test_ctrl_c_line_splits_certified_not_certified_undecided():
    from pipeline.certify.run import Interrupted

    text = str(Interrupted(33, 40, sequential=True, split=(20, 13, 7)))
    assert "33 of 40 images decided" in text and "20 certified, 13 not certified, 7 undecided" in text


def test_an_interrupted_table_counts_every_selected_image():
    """Undecided images (in flight, or never started) are in the table as not certified."""
    from jobs.certify import _with_unstarted
    from pipeline.reduce import accuracy_table

    certificates = _certificates([(1, 1, 0.3, False), (2, 2, 0.0, True)])
    whole = _with_unstarted(certificates, [0, 1, 2, 3], [{"image_id": 3, "name": "x"}])
    assert sorted(whole["image_id"]) == [0, 1, 2] and whole.sigma == 0.25
    assert accuracy_table([whole], [0.0])["certified_accuracy"].iloc[0] == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------- item 9: the lock first


def test_a_second_writer_is_refused_before_torch_or_scipy_load(tmp_path):
    """The lock is taken before the settings' checks (scipy) and before torch: a second
    writer's refusal loads neither (a fresh interpreter, as `dsmooth certify` runs)."""
    from test_cli_light import probe

    from pipeline.runs.claim import claimed_run

    output = tmp_path / "run"
    with claimed_run(output, "first writer"):
        loaded, code, errors = probe("certify", "--dataset", "folder", "--data-root", str(tmp_path), "--classifier",
                                     "c.pt", "--sigma", "0.25", "--sequential", "--radius", "0.25",
                                     "--output", str(output))
    assert code == 2 and "being written by another job" in errors, errors
    assert not {"torch", "scipy", "ray", "pipeline.data"} & set(loaded), loaded


# ----------------------------------------------------------------------------- item 10: load_model


def test_load_model_takes_every_data_set_certify_takes(tmp_path):
    import dsmooth
    from pipeline.settings import KINDS

    assert "folder" in KINDS
    images = png_folder(tmp_path / "images", count=2, side=48)
    pre = Preprocessing(mean=(0.5,) * 3, std=(0.25,) * 3)
    for dataset, extra in (("folder", {}), ("folder", {"data_root": images}), ("cifar10", {})):
        model = dsmooth.load_model(tiny_net(), dataset=dataset, classifier_preprocessing=pre, **extra)
        assert model(torch.rand(1, 3, 32, 32)).shape == (1, 10), dataset
    with pytest.raises(ValueError, match="cifar10, imagenet, folder"):
        dsmooth.load_model(tiny_net(), dataset="cifar", classifier_preprocessing=pre)


# ----------------------------------------------------------------------------- item 7: votes/ after a resume


SEQ_IDS = [0, 60, 120]  # 60 takes five chunks of the shipped pair at R = 0.25; the others one


def _sequential_settings(output: Path, **overrides) -> dict:
    values = {"dataset": "cifar10", "data_root": str(SAMPLE), "ids": SEQ_IDS, "classifier": str(MODELS / "classifier.pt"),
              "denoiser": str(MODELS / "denoiser_mse_s0.25.pt"), "sigma": 0.25, "n": 600, "chunk_size": 32,
              "batch_size": 64, "actors": 1, "sequential": True, "radius": 0.25, "output": str(output)}
    return {**values, **overrides}


def _raw_votes(output: Path) -> pd.DataFrame:
    """Every row of every part, as a plain reader sees votes/ (no dsmooth code)."""
    import pyarrow.parquet as pq

    return pd.concat([pq.read_table(p).to_pandas() for p in sorted((output / "votes").glob("*.parquet"))],
                     ignore_index=True)


def assert_plain_readers_sum_right(output: Path) -> None:
    """No (image, phase, chunk) twice in votes/: pandas and DuckDB sum what dsmooth reads."""
    import duckdb

    from pipeline.runs.storage import read_votes

    raw = _raw_votes(output)
    assert not raw.duplicated(["image_id", "phase", "chunk"]).any(), \
        raw[raw.duplicated(["image_id", "phase", "chunk"], keep=False)][["image_id", "phase", "chunk"]]
    dsmooth_sums = read_votes(output).groupby("image_id")["n"].sum().sort_index()
    pandas_sums = raw.groupby("image_id")["n"].sum().sort_index()
    duck = duckdb.sql(f"SELECT image_id, SUM(n) AS n FROM read_parquet('{output}/votes/*.parquet') "
                      "GROUP BY image_id ORDER BY image_id").df().set_index("image_id")["n"]
    assert pandas_sums.tolist() == dsmooth_sums.tolist() == duck.astype(int).tolist()


def test_a_resumed_sequential_run_stores_each_chunk_once(ray_local, tmp_path):
    """What a kill leaves -- each image's first chunks, and one image with a chunk missing
    before a stored one -- resumed: the missing chunk is drawn, the stored one after it is
    not drawn again, so votes/ has no duplicate (image, phase, chunk) row and pandas, DuckDB
    and dsmooth sum the same n; the decisions are the uninterrupted run's."""
    from jobs.certify import certify
    from pipeline.certify.config import CertifyConfig
    import shutil

    from pipeline.runs.storage import VOTES, write_votes

    reference = certify(CertifyConfig(**_sequential_settings(tmp_path / "reference")))
    raw = _raw_votes(tmp_path / "reference")
    chunks = raw.groupby("image_id")["chunk"].transform("max") + 1
    longest = raw.loc[chunks.idxmax(), "image_id"]
    assert chunks.max() >= 3, "one image must take several chunks for a gap"
    keep = (raw["chunk"] < (chunks + 1) // 2) & ~((raw["image_id"] == longest) & (raw["chunk"] == 1))
    keep |= (raw["image_id"] == longest) & (raw["chunk"] == 2)
    output = tmp_path / "killed"
    shutil.copytree(tmp_path / "reference", output)
    for part in VOTES.parts(output):
        part.delete()
        (output / "votes" / (part.name + ".json")).unlink(missing_ok=True)
    write_votes(output, raw[keep].to_dict("records"))
    # Reduced as it is, the killed run counts its undecided images, as not certified.
    from pipeline.reduce import load_run
    from pipeline.reduce.certificates import ReduceWarning

    with pytest.warns(ReduceWarning, match="counted as not certified"):
        killed = load_run(output)
    assert sorted(killed["image_id"]) == SEQ_IDS and killed.loc[killed["image_id"] == longest, "abstained"].all()
    resumed = certify(CertifyConfig(**_sequential_settings(output)))
    assert resumed.sequential.drawn_now > 0
    assert np.array_equal(resumed.decisions.status, reference.decisions.status)
    assert np.array_equal(resumed.decisions.radius, reference.decisions.radius)
    assert_plain_readers_sum_right(output)


@pytest.mark.slow
def test_sigkill_and_resume_leave_no_duplicate_chunk_rows(own_ray, tmp_path):
    """A real kill: `dsmooth certify --sequential` SIGKILLed once some chunk parts are saved,
    then rerun: votes/ has each (image, phase, chunk) once, and pandas and DuckDB sum the n
    dsmooth reads."""
    import os
    import signal
    import subprocess
    import time

    output = tmp_path / "run"
    argv = [sys.executable, "-m", "jobs.cli", "certify", "--dataset", "cifar10", "--data-root", str(SAMPLE),
            "--skip", "25", "--classifier", str(MODELS / "classifier.pt"), "--denoiser",
            str(MODELS / "denoiser_mse_s0.25.pt"), "--sigma", "0.25", "--n", "1000", "--chunk-size", "32",
            "--batch", "64", "--actors", "2", "--sequential", "--radius", "0.25", "--output", str(output), "-q"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    # Votes are written in batched parts (at most one per WRITE_EVERY_S): kill once the first is saved.
    while not list((output / "votes").glob("*.parquet")) if (output / "votes").exists() else True:
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no votes saved in time"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    time.sleep(2.0)
    resumed = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_plain_readers_sum_right(output)


def assert_api_votes_sum_right(output: Path) -> None:
    """`assert_plain_readers_sum_right` for a certify-api run, and the estimation samples
    plain readers sum per image are those `dsmooth reduce` certified with."""
    from pipeline.reduce import load_run

    assert_plain_readers_sum_right(output)
    raw = _raw_votes(output)
    summed = raw[raw["phase"] == "estimation"].groupby("image_id")["n"].sum().sort_index()
    certificates = load_run(output).set_index("image_id").sort_index()
    reduced = certificates["samples"].tolist() if "samples" in certificates else [certificates.n] * len(certificates)
    assert summed.tolist() == reduced


@pytest.mark.parametrize("sequential", [False, True], ids=["fixed-n", "sequential"])
def test_a_resumed_certify_api_run_stores_each_vote_once(ray_local, tmp_path, sequential):
    """What a kill of `certify-api` leaves -- answers in the query log whose vote rows were
    never written (fixed n: an image's part; sequential: chunk parts, one of them before a
    chunk still stored) -- resumed: only the missing rows are written, from the answers (no
    query is sent again), so votes/ has no duplicate (image, phase, chunk) and pandas, DuckDB
    and dsmooth sum the same n."""
    import pyarrow.parquet as pq

    from api_support import GRAY_IDS, RGB_IDS, job_config
    from jobs.certify_api import certify_api
    from pipeline.apis.emulator import EmulatorServer
    from pipeline.apis.run.prepare import load_job_config

    ids = [RGB_IDS[0], GRAY_IDS[1], RGB_IDS[1]]
    settings = {"sequential": True, "radius": 0.125, "n": 100} if sequential else {}
    with EmulatorServer(seed=1) as emulator:
        def run():
            config = job_config("aws", emulator.url, tmp_path / "run", ids, **settings)
            if sequential:
                config.pop("chunk_size")  # the API's own default (8)
            return certify_api(load_job_config(config))

        assert run().status == "complete"
        calls = emulator.calls("aws")
        raw = _raw_votes(tmp_path / "run")
        if sequential:  # the longest image loses chunks 0 and 2 and keeps chunk 1
            chunks = raw.groupby("image_id")["chunk"].max()
            assert chunks.max() >= 2, "one image must take several chunks for a gap"
            lost = {(int(chunks.idxmax()), 0), (int(chunks.idxmax()), 2)}
        else:
            lost = {(ids[1], None)}
        # A kill between a part's manifest and the part itself: the manifest stays, the part is gone.
        for part in sorted((tmp_path / "run" / "votes").glob("*.parquet")):
            frame = pq.read_table(part).to_pandas()
            keys = {(int(i), None if pd.isna(c) else int(c)) for i, c in zip(frame["image_id"], frame["chunk"])}
            if keys & lost:
                assert keys <= lost, keys  # one image (fixed n) or one chunk (sequential) per part
                part.unlink()
        assert len(_raw_votes(tmp_path / "run")) == len(raw) - 2  # two chunks, or selection + estimation
        assert run().status == "complete"
        assert emulator.calls("aws") == calls  # the rows came from the answers: nothing asked again
    assert len(_raw_votes(tmp_path / "run")) == len(raw)
    assert_api_votes_sum_right(tmp_path / "run")


# ----------------------------------------------------------------------------- item 2: labels

NAMES = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead", "electric ray", "stingray", "cock",
         "hen", "ostrich"]


def test_unlabelled_images_plus_a_labels_file_give_clean_and_certified_accuracy(ray_local, tmp_path):
    """5 unlabelled images, a labels file (class names and indices mixed) and --class-names:
    the certificates carry the file's labels, so the table has a clean and a certified
    accuracy of the labels, not agreement with the classifier."""
    import dsmooth

    images = png_folder(tmp_path / "val")
    names = tmp_path / "names.txt"
    names.write_text("\n".join(NAMES) + "\n")
    labels = tmp_path / "labels.csv"
    truth = {"img0.png": "tench", "img1": "4", "img2.png": "ostrich", "img3.png": "1", "img4": "Great_White_Shark"}
    labels.write_text("image,label\n" + "".join(f"{k},{v}\n" for k, v in truth.items()))
    certificates = dsmooth.certify(
        dataset="folder", data_root=str(images), classifier=tiny_net(),
        classifier_preprocessing=Preprocessing(mean=(0.5,) * 3, std=(0.25,) * 3), labels=str(labels),
        class_names=str(names), sigma=0.25, n0=4, n=16, batch_size=64, output=str(tmp_path / "run"), progress=False)
    assert certificates.sort_values("image_id")["label"].tolist() == [0, 4, 9, 1, 2]
    assert (certificates["correct"] == ((certificates["predict"] == certificates["label"])
                                        & ~certificates["abstained"])).all()
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert "labels_sha256" in record["identity"] and "labels_from" not in record.get("extra", {})
    table = dsmooth.reduce([tmp_path / "run"]).table
    assert table["clean_accuracy"].iloc[0] == pytest.approx(certificates["correct"].mean())
    assert not table.attrs.get("label_notes")  # ground truth: no "agreement with the classifier" note


def test_labels_file_formats_and_errors(tmp_path):
    from pipeline.data import open_dataset
    from pipeline.data.core import DatasetError
    from pipeline.data.labels import apply_labels_file

    images = open_dataset("folder", png_folder(tmp_path / "val", count=3), "test")
    val_txt = tmp_path / "val.txt"
    val_txt.write_text("img0.png 7\nimg1.png 0\nimg2.png 3\n")
    assert [r.label for r in apply_labels_file(images, val_txt, None).records] == [7, 0, 3]
    kaggle = tmp_path / "LOC_val_solution.csv"
    kaggle.write_text("ImageId,PredictionString\nimg0,hen 1 2 3 4\nimg1,cock 1 2 3 4\nimg2,tench 5 6 7 8\n")
    assert [r.label for r in apply_labels_file(images, kaggle, NAMES).records] == [8, 7, 0]
    short = tmp_path / "short.csv"
    short.write_text("image,label\nimg0.png,1\n")
    with pytest.raises(DatasetError, match="no label for 2 of the 3 selected images"):
        apply_labels_file(images, short, NAMES)
    unknown = tmp_path / "unknown.csv"
    unknown.write_text("img0,1\nimg1,zebra\nimg2,2\n")
    with pytest.raises(DatasetError, match="'zebra' is none of the model's 10 class names"):
        apply_labels_file(images, unknown, NAMES)
    with pytest.raises(DatasetError, match="--class-names FILE"):
        apply_labels_file(images, unknown, None)


def _devkit_meta(path: Path, ids_to_wnids: dict[int, str]) -> Path:
    """A devkit `data/meta.mat` as scipy writes it: a `synsets` struct array (ILSVRC2012_ID,
    WNID, words, num_children), with one non-leaf synset as the real file has."""
    from scipy.io import savemat

    entries = [(i, wnid, f"class {wnid}", 0) for i, wnid in ids_to_wnids.items()] + [(1001, "n00001740", "entity", 5)]
    synsets = np.array(entries, dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")])
    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(str(path), {"synsets": synsets})
    return path


def test_imagenet_devkit_ground_truth_maps_ids_through_meta_mat(tmp_path, capsys, factories):
    """The devkit's ILSVRC2012_validation_ground_truth.txt (one ILSVRC2012_ID per line, for
    ILSVRC2012_val_00000001... in order): its IDs count in the devkit's own class order, so
    they are mapped to wnids by meta.mat (beside the file or in ../data/) and the wnids to the
    model's classes -- here ID order differs from sorted-wnid order, so reading an ID as a
    class index gives other labels. Without meta.mat: one line naming it."""
    from pipeline.data import open_dataset
    from pipeline.data.core import DatasetError
    from pipeline.data.labels import apply_labels_file

    wnids = ["n01440764", "n01443537", "n01484850", "n01491361", "n01494475", "n01496331", "n01498041",
             "n01514668", "n01514859", "n01518878"]  # the model's ten classes, in sorted-wnid order
    devkit_order = {1: wnids[3], 2: wnids[0], 3: wnids[4], 4: wnids[1], 5: wnids[2]}
    images = tmp_path / "val"
    images.mkdir()
    for position, source in enumerate(sorted(SAMPLE.glob("test/*/*.jpg"))[:4], 1):
        Image.open(source).convert("RGB").save(images / f"ILSVRC2012_val_{position:08d}.png")
    dataset = open_dataset("folder", images, "test")
    devkit = tmp_path / "ILSVRC2012_devkit_t12"
    truth = devkit / "data" / "ILSVRC2012_validation_ground_truth.txt"
    truth.parent.mkdir(parents=True)
    truth.write_text("1\n2\n5\n3\n")
    with pytest.raises(DatasetError, match=r"ILSVRC2012_IDs .*meta\.mat") as refused:
        apply_labels_file(dataset, truth, wnids)
    assert "\n" not in str(refused.value) and str(devkit / "data" / "meta.mat") in str(refused.value)
    _devkit_meta(devkit / "data" / "meta.mat", devkit_order)
    expected = [3, 0, 2, 4]  # wnids[3], wnids[0], wnids[2], wnids[4]: not the IDs 1, 2, 5, 3 less one
    assert [r.label for r in apply_labels_file(dataset, truth, wnids).records] == expected
    elsewhere = devkit / "evaluation" / "ILSVRC2012_validation_ground_truth.txt"  # meta.mat in ../data/
    elsewhere.parent.mkdir()
    elsewhere.write_text(truth.read_text())
    assert [r.label for r in apply_labels_file(dataset, elsewhere, wnids).records] == expected
    beside = tmp_path / "flat" / "ground_truth.txt"  # and beside the file
    _devkit_meta(beside.parent / "meta.mat", {**devkit_order, 1: wnids[1], 4: wnids[3]})
    beside.write_text(truth.read_text())
    assert [r.label for r in apply_labels_file(dataset, beside, wnids).records] == [1, 0, 2, 4]
    unknown = tmp_path / "flat" / "unknown.txt"
    unknown.write_text("1\n7\n2\n3\n")
    with pytest.raises(DatasetError, match="line 2: ILSVRC2012_ID 7 is not in"):
        apply_labels_file(dataset, unknown, wnids)
    # On the command line: the same refusal, one line and exit 2, before any sample.
    names = tmp_path / "wnids.txt"
    names.write_text("\n".join(wnids) + "\n")
    lone = tmp_path / "lone" / "ILSVRC2012_validation_ground_truth.txt"
    lone.parent.mkdir()
    lone.write_text(truth.read_text())
    code = cli_main(["certify", "--dataset", "folder", "--data-root", str(images), "--labels", str(lone),
                     "--class-names", str(names), "--classifier", f"{FACTORY_MODULE}:tiny",
                     "--classifier-preprocessing", "none", "--sigma", "0.25", "--output", str(tmp_path / "out")])
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 2 and len(lines) == 1 and "meta.mat" in lines[0], lines


def test_a_devkit_ground_truths_identity_holds_its_meta_mat(tmp_path):
    """The run identity's labels hash covers a devkit ground-truth file's meta.mat (another
    meta.mat gives the same IDs other labels, so a resumed run must not mix them); a CSV's hash
    is its bytes' alone, as before."""
    from pipeline.data.labels import labels_sha256

    truth = tmp_path / "data" / "ILSVRC2012_validation_ground_truth.txt"
    truth.parent.mkdir()
    truth.write_text("1\n2\n")
    alone = labels_sha256(truth)
    assert alone == hashlib.sha256(truth.read_bytes()).hexdigest()
    _devkit_meta(truth.parent / "meta.mat", {1: "n01440764", 2: "n01443537"})
    first = labels_sha256(truth)
    _devkit_meta(truth.parent / "meta.mat", {1: "n01443537", 2: "n01440764"})
    assert len({alone, first, labels_sha256(truth)}) == 3
    table = tmp_path / "labels.csv"
    table.write_text("image,label\n1.png,3\n")
    assert labels_sha256(table) == hashlib.sha256(table.read_bytes()).hexdigest()


def test_five_unlabelled_imagenet_images_and_the_devkit_ground_truth_give_accuracies(tmp_path):
    """Five unlabelled ImageNet validation images (a flat folder of ILSVRC2012_val_*.png), the
    devkit's ground truth and meta.mat (IDs in a shuffled class order), and a 1000-class timm
    model whose class names are timm's wnids: each image's label is its ID's wnid's class
    index, and the table gives the clean and certified accuracy of those labels (ground
    truth, not agreement with the classifier)."""
    import random
    import shutil

    from safetensors.torch import save_file
    from timm.data import ImageNetInfo

    import dsmooth
    from classifier_support import timm_net
    from data_support import shared_data

    chosen = sorted(shared_data("imagenet-val-100").glob("ILSVRC2012_val_*.png"))[:5]
    images = tmp_path / "val"
    images.mkdir()
    for path in chosen:
        shutil.copy(path, images / path.name)
    wnids = list(ImageNetInfo().label_names())
    order = list(range(1000))
    random.Random(0).shuffle(order)  # devkit ID i + 1 is the class of wnid wnids[order[i]]
    devkit = tmp_path / "ILSVRC2012_devkit_t12" / "data"
    _devkit_meta(devkit / "meta.mat", {i + 1: wnids[order[i]] for i in range(1000)})
    numbers = [int(path.stem.rsplit("_", 1)[1]) for path in chosen]
    ids = [random.Random(number).randrange(1, 1001) for number in range(1, max(numbers) + 1)]
    truth = devkit / "ILSVRC2012_validation_ground_truth.txt"
    truth.write_text("".join(f"{i}\n" for i in ids))
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in timm_net(1000).state_dict().items()}, weights)
    certificates = dsmooth.certify(
        dataset="folder", data_root=str(images), classifier="timm:test_resnet", classifier_weights=str(weights),
        image_size=64, labels=str(truth), sigma=0.25, n0=4, n=16, batch_size=64, output=str(tmp_path / "run"),
        progress=False, in_process=True)
    assert certificates.sort_values("image_id")["label"].tolist() == [order[ids[n - 1] - 1] for n in numbers]
    assert (certificates["correct"] == ((certificates["predict"] == certificates["label"])
                                        & ~certificates["abstained"])).all()
    table = dsmooth.reduce([tmp_path / "run"]).table
    assert table["clean_accuracy"].iloc[0] == pytest.approx(certificates["correct"].mean())
    assert not table.attrs.get("label_notes")  # ground truth: no "agreement with the classifier" note


def test_fewer_class_folders_than_classes_map_by_name(tmp_path, capsys, factories):
    """Three class folders under a 10-class model: mapped to the model's classes by name
    (case and '_' ignored) and checked before any sample; an unknown folder is one line."""
    from jobs.certify import prepare
    from pipeline.certify.config import CertifyConfig

    root = tmp_path / "tree"
    for folder in ("hen", "Tench", "great_white_shark"):
        png_folder(root / folder, count=1)
    names = tmp_path / "names.txt"
    names.write_text("\n".join(NAMES) + "\n")
    config = CertifyConfig(dataset="folder", data_root=str(root), classifier="module:tiny", class_names=str(names),
                           sigma=0.25, n0=4, n=8, output=str(tmp_path / "out"))
    prepared = prepare(config, tiny_net(), Preprocessing(mean=(0.5,) * 3, std=(0.25,) * 3))
    assert [r.label for r in prepared.selected.records] == [0, 2, 8]  # Tench, great_white_shark, hen (sorted)
    assert prepared.info.num_classes == 10
    png_folder(root / "zebra", count=1)
    code = cli_main(["certify", "--dataset", "folder", "--data-root", str(root), "--classifier",
                     f"{FACTORY_MODULE}:tiny", "--classifier-preprocessing", "none", "--class-names", str(names),
                     "--sigma", "0.25", "--output", str(tmp_path / "out2")])
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 2 and len(lines) == 1 and "class folder 'zebra' is none of the model's" in lines[0], lines


def test_ray_failing_to_start_is_one_line_with_what_to_try(tmp_path):
    """A local Ray that cannot start (here: its temporary folder cannot be made) is one line
    and exit 2, not Ray's traceback (a fresh interpreter: the session's Ray is not touched)."""
    import os
    import subprocess

    argv = [sys.executable, "-m", "jobs.cli", "certify", "--dataset", "cifar10", "--data-root", str(SAMPLE),
            "--classifier", str(MODELS / "classifier.pt"), "--sigma", "0.25", "--ids", "0", "--n0", "4", "--n", "16",
            "--output", str(tmp_path / "out"), "-q"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_TMPDIR": "/proc/no-such-folder"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip() and "warning" not in line.lower()]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert len(lines) == 1 and "cannot start a local Ray" in lines[0] and "try:" in lines[0], lines


def test_three_imagenet_wnid_folders_under_a_1000_class_timm_model(tmp_path):
    """The ImageNet layout with three wnid folders (`val/<wnid>/`) and a 1000-class timm model
    whose class names are timm's wnids: mapped to the model's indices, not refused."""
    from safetensors.torch import save_file
    from timm.data import ImageNetInfo

    from classifier_support import timm_net
    from jobs.certify import prepare
    from pipeline.certify.config import CertifyConfig

    wnids = list(ImageNetInfo().label_names())
    chosen = [wnids[5], wnids[400], wnids[999]]
    for wnid in chosen:
        png_folder(tmp_path / "imagenet" / "val" / wnid, count=1, side=72)
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in timm_net(1000).state_dict().items()}, weights)
    config = CertifyConfig(dataset="imagenet", data_root=str(tmp_path / "imagenet"), classifier="timm:test_resnet",
                           classifier_weights=str(weights), image_size=64, sigma=0.25, n0=4, n=8,
                           output=str(tmp_path / "out"))
    prepared = prepare(config)
    assert [r.label for r in prepared.selected.records] == [5, 400, 999]
    assert prepared.info.num_classes == 1000

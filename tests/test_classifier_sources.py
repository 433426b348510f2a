"""Classifier specs (`pipeline.models.sources`): every form resolves, loads with its own
preprocessing inside f (after the noise and the denoiser), knows its classes, names its
weights in the identity, and the same network in different forms votes the same.

No Ray here (see test_classifier_e2e.py); stand-ins are built at test time, offline."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from api_support import IMAGES as IMAGENET_100  # unlabelled 224 px PNGs every clone can make
from classifier_support import (
    FACTORY_MODULE,
    IMAGENET_MEAN,
    TIMM_INPUT,
    factory_module,
    hf_folder,
    rewrite_json,
    timm_files,
    timm_net,
)
from pipeline.certify.pair import ModelBytes, PairCounter, load_pair
from pipeline.data import open_dataset
from pipeline.data.specs import DataDescription
from pipeline.models import DataMismatchError, build_model
from pipeline.models.preprocess import Preprocess, Preprocessing
from pipeline.models.sources import ClassifierSourceError, ClassifierSpec, MissingExtraError, resolve_classifier
from pipeline.models.sources.bundle import MAGIC, read_bundle
from pipeline.sampling.noise import SampleRequest, chunk_noise

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SIGMA = 0.25


def timm_flags() -> dict:
    """The stand-in's preprocessing as timm itself resolves it, given as flags to the forms
    that carry no config (archives, factories, objects)."""
    from timm.data import resolve_data_config

    config = resolve_data_config({}, model=timm_net(1000))
    return dict(input_size=config["input_size"][-1], mean=config["mean"], std=config["std"],
                interpolation=config["interpolation"])


@pytest.fixture(scope="module")
def timm_1k(tmp_path_factory) -> dict[str, Path]:
    return timm_files(tmp_path_factory.mktemp("timm"), num_classes=1000)


@pytest.fixture(scope="module")
def imagenet():
    return open_dataset("folder", IMAGENET_100, "test")


@pytest.fixture()
def factories(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(factory_module(tmp_path / "factories")))
    yield
    sys.modules.pop(FACTORY_MODULE, None)


def _pair(spec: ClassifierSpec, data: DataDescription):
    return load_pair(ModelBytes.classifier(spec), None, data)


def _pipeline(info) -> dict:
    return json.loads(info.classifier_pipeline)


# ----------------------------------------------------------------------------- forms


def test_forms_of_one_network_vote_the_same(timm_1k, imagenet, factories):
    """timm name + .safetensors / .pth, timm folder, the Python object and a factory (+ weights)
    give identical counts for one seed on ImageNet images; the .pt2 and TorchScript archives
    of the same network, given the same preprocessing by flags, too (measured: the exported
    kernels are the eager ones on CPU; agreement is asserted >= 99% to allow a near-tie)."""
    data = imagenet.describe()
    assert data.num_classes is None and data.image_size == (224, 224)
    net, FLAGS = timm_net(1000), timm_flags()
    assert FLAGS["input_size"] == TIMM_INPUT and FLAGS["mean"] != IMAGENET_MEAN  # not the data's defaults
    forms = {
        "timm:safetensors": ClassifierSpec("timm:test_resnet", str(timm_1k["safetensors"])),
        "timm:pth": ClassifierSpec("timm:test_resnet", str(timm_1k["pth"])),
        "timm folder": ClassifierSpec(str(timm_1k["folder"])),
        "object": ClassifierSpec(net, **FLAGS),
        "factory": ClassifierSpec(f"{FACTORY_MODULE}:timm_net", str(timm_1k["safetensors"]), **FLAGS),
        "pt2": ClassifierSpec(str(timm_1k["pt2"]), **FLAGS),
        "torchscript": ClassifierSpec(str(timm_1k["torchscript"]), **FLAGS),
    }
    images = {i: imagenet.load(i) for i in (0, 3)}
    requests = [SampleRequest(7, i, "estimation", 48, 16) for i in images]
    counts, pipelines = {}, {}
    for name, spec in forms.items():
        source = ModelBytes.classifier(spec)
        _, info = load_pair(source, None, data)
        pipelines[name] = _pipeline(info)
        counter = PairCounter(source, None, info, data, sigma=SIGMA, batch_size=32)
        counts[name], _ = counter.count(requests, {i: (x.permute(1, 2, 0) * 255).round().byte().numpy()
                                                   for i, x in images.items()})
        assert counts[name].sum() == 96 and counts[name].shape == (2, 1000)
    reference = counts["timm:safetensors"]
    for name in ("timm:pth", "timm folder", "object", "factory"):
        assert np.array_equal(counts[name], reference), name
    for name in ("pt2", "torchscript"):
        agreement = np.minimum(counts[name], reference).sum() / reference.sum()
        assert agreement >= 0.99, (name, agreement)
    # An untrained net's votes barely move with the noise, so equal counts alone prove
    # little: the logits of f on noisy images are equal too (bitwise for the eager forms).
    noisy = images[0][None] + SIGMA * torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        logits = {name: _pair(spec, data)[0](noisy) for name, spec in forms.items()}
    assert logits["timm:safetensors"].std(0).mean() > 0
    for name in ("timm:pth", "timm folder", "object", "factory"):
        assert torch.equal(logits[name], logits["timm:safetensors"]), name
    for name in ("pt2", "torchscript"):
        torch.testing.assert_close(logits[name], logits["timm:safetensors"], rtol=1e-4, atol=1e-4)
    # One network, one weights hash, one preprocessing, whatever the form (timm's own config
    # for timm forms, the flags for the others).
    timm_pipeline = pipelines["timm:safetensors"]
    assert timm_pipeline["preprocessing"]["crop"] == TIMM_INPUT
    for name in ("timm folder", "object", "factory"):
        assert pipelines[name]["weights_sha256"] == timm_pipeline["weights_sha256"], name
    for name in forms:
        assert pipelines[name]["preprocessing"] == timm_pipeline["preprocessing"], name


def test_hf_folder_loads_offline_with_its_processor(tmp_path):
    folder = hf_folder(tmp_path / "vit", num_labels=10, image_size=64)
    data = DataDescription("cifar10", 10, (32, 32))
    pair, info = _pair(ClassifierSpec(str(folder)), data)
    assert info.num_classes == 10 and info.classifier.name == "hf:ViTForImageClassification"
    preprocessing = _pipeline(info)["preprocessing"]
    assert preprocessing["resize_exact"] == [64, 64] and preprocessing["mean"] == [0.5, 0.5, 0.5]
    # f = the HF model's logits on its processor's view of the [0, 1] image.
    from transformers import ViTForImageClassification

    model = ViTForImageClassification.from_pretrained(folder, local_files_only=True).eval()
    x = torch.rand(3, 3, 32, 32)
    expected = model(pixel_values=(torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear",
                                                                   antialias=True) - 0.5) / 0.5).logits
    torch.testing.assert_close(pair(x), expected, rtol=1e-4, atol=1e-5)


def test_preprocessing_runs_inside_f_after_noise_and_denoiser(tmp_path):
    """The certificate is in the data set's space: noise is added to the data's [0, 1]
    pixels at their resolution, the denoiser sees those, and only then the classifier's
    resize + mean/std. The counts equal that reference computed by hand (and differ from
    preprocessing the clean image before the noise). A linear classifier on pixels is used:
    its votes follow the noise, so a wrong order shows in the counts."""
    from pipeline.models import ModelMeta, save_checkpoint

    torch.manual_seed(1)
    denoiser = build_model("dncnn", depth=3, n_channels=8).eval()
    save_checkpoint(tmp_path / "d.pt", denoiser, ModelMeta("dncnn", dataset="cifar10", sigma=SIGMA,
                                                          arch_kwargs={"depth": 3, "n_channels": 8}))
    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 48 * 48, 10)).eval()
    data = DataDescription("cifar10", 10, (32, 32))
    spec = ClassifierSpec(linear, input_size=48, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4))
    source, d = ModelBytes.classifier(spec), ModelBytes.read(tmp_path / "d.pt")
    pair, info = load_pair(source, d, data, sigma=SIGMA)
    assert isinstance(pair.classifier[0], Preprocess)
    counter = PairCounter(source, d, info, data, sigma=SIGMA, batch_size=16, optimize=False)
    image = (torch.rand(32, 32, 3) * 255).byte().numpy()
    x = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    request = SampleRequest(3, 5, "estimation", 64, 16)
    counts, _ = counter.count([request], {5: image})
    noise = torch.cat([chunk_noise(chunk, (3, 32, 32), SIGMA) for chunk in request.chunks()])
    with torch.inference_mode():
        expected = np.bincount(pair(x[None] + noise).argmax(1).numpy(), minlength=10)
        preprocess, net = pair.classifier[0], pair.classifier[1]
        before = preprocess(pair.denoiser(x[None]))  # the wrong order: preprocessing, then noise
        wrong_noise = torch.cat([chunk_noise(c, tuple(before.shape[1:]), SIGMA) for c in request.chunks()])
        wrong = np.bincount(net(before + wrong_noise).argmax(1).numpy(), minlength=10)
    assert (expected > 0).sum() >= 3, "votes must follow the noise for this test to mean anything"
    assert np.array_equal(counts[0], expected)
    assert not np.array_equal(expected, wrong)


def test_preprocess_module():
    x = torch.rand(2, 3, 224, 300)
    p = Preprocessing(resize=160, crop=128, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    y = Preprocess(p)(x)
    assert y.shape == (2, 3, 128, 128)
    resized = torch.nn.functional.interpolate(x, size=(160, 214), mode="bilinear", antialias=True)
    torch.testing.assert_close(y, (resized[..., 16:144, 43:171] - 0.5) / 0.25)
    same = Preprocess(Preprocessing(resize=224, crop=224))(x[..., :224])
    assert torch.equal(same, x[..., :224])  # at the model's size: untouched
    assert Preprocessing.from_dict(p.to_dict()) == p


# ----------------------------------------------------------------------------- identity


def test_identity_names_the_weights_and_preprocessing(tmp_path):
    from safetensors.torch import save_file

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(timm_net(10, seed=0).state_dict(), a)
    save_file(timm_net(10, seed=1).state_dict(), b)
    data = DataDescription(None, 10, (32, 32))
    infos = {
        "a": _pair(ClassifierSpec("timm:test_resnet", str(a)), data)[1],
        "b": _pair(ClassifierSpec("timm:test_resnet", str(b)), data)[1],
        "a, other size": _pair(ClassifierSpec("timm:test_resnet", str(a), input_size=96), data)[1],
    }
    from pipeline.certify.plan import certify_identity  # noqa: F401 - the identity carries the pipeline
    pipes = {k: _pipeline(v) for k, v in infos.items()}
    assert pipes["a"]["weights_sha256"] != pipes["b"]["weights_sha256"]
    assert pipes["a"]["preprocessing"] != pipes["a, other size"]["preprocessing"]
    assert len({v.classifier.sha256 for v in infos.values()}) == 3
    assert len({v.classifier_pipeline for v in infos.values()}) == 3
    # The same inputs give the same bundle, byte for byte (a stable identity).
    spec = ClassifierSpec("timm:test_resnet", str(a))
    assert resolve_classifier(spec).data == resolve_classifier(spec).data


def test_identity_in_run_json_keys(tmp_path):
    """certify_identity records the bundled classifier's pipeline, and nothing new for a
    dsmooth checkpoint (runs made before keep their identity)."""
    from pipeline.certify.pair import ModelIdentity, PairInfo
    from pipeline.certify.plan import certify_identity
    from pipeline.certify.plan import CertifyConfig

    split = open_dataset("folder", IMAGENET_100, "test") if IMAGENET_100.is_dir() else pytest.skip("no data")
    config = CertifyConfig(dataset="folder", data_root=str(IMAGENET_100), classifier="x", sigma=0.25, output="o")
    plain = PairInfo(ModelIdentity("resnet50", "ab"), None, 1000)
    pipe = {"kind": "timm", "weights_sha256": "cd", "preprocessing": {"crop": 224}}
    bundled = PairInfo(ModelIdentity("timm:x", "ef"), None, 1000, json.dumps(pipe))
    assert "classifier_pipeline" not in certify_identity(config, split, plain)
    assert certify_identity(config, split, bundled)["classifier_pipeline"] == pipe


def _flip_a_weight_byte(archive: bytes) -> bytes:
    """The archive with one byte of one stored weight changed: still loadable, other content."""
    import io
    import struct
    import zipfile

    with zipfile.ZipFile(io.BytesIO(archive)) as z:
        info = next(i for i in z.infolist() if "/data/weights/weight_" in i.filename)
    start = info.header_offset
    name_len, extra_len = struct.unpack("<HH", archive[start + 26:start + 30])
    at = start + 30 + name_len + extra_len + 3
    return archive[:at] + bytes([archive[at] ^ 1]) + archive[at + 1:]


def test_identity_is_the_archives_content_not_its_name(tmp_path, timm_1k, imagenet):
    """The same .pt2 under another name in another folder is the same run; one byte changed
    is another. (run.json keeps the path, beside the identity, for humans.)"""
    from pipeline.certify.plan import CertifyConfig, certify_identity

    (tmp_path / "elsewhere").mkdir()
    original = timm_1k["pt2"]
    renamed, changed = tmp_path / "elsewhere" / "deployed-v2.pt2", tmp_path / "changed.pt2"
    renamed.write_bytes(original.read_bytes())
    changed.write_bytes(_flip_a_weight_byte(original.read_bytes()))
    flags = timm_flags()

    def identity(path: Path) -> dict:
        config = CertifyConfig(dataset="folder", data_root=str(IMAGENET_100), classifier=str(path), sigma=0.25,
                               output="o")
        return certify_identity(config, imagenet, _pair(ClassifierSpec(str(path), **flags), imagenet.describe())[1])

    assert identity(original) == identity(renamed)
    assert identity(original) != identity(changed)
    assert identity(original)["classifier"] != identity(changed)["classifier"]  # the name is the content's too


# ----------------------------------------------------------------------------- classes


def test_class_count_and_order_are_checked(tmp_path, timm_1k):
    cifar = DataDescription("cifar10", 10, (32, 32), classes=("airplane", "automobile", "bird", "cat", "deer",
                                                              "dog", "frog", "horse", "ship", "truck"))
    # A 1000-class model on 10-class data: refused in one line.
    with pytest.raises(DataMismatchError, match="1000 classes but the data is cifar10"):
        _pair(ClassifierSpec("timm:test_resnet", str(timm_1k["safetensors"])), cifar)
    # Right count, other label order: refused; the data's order: accepted.
    shuffled = list(reversed(cifar.classes))
    wrong = hf_folder(tmp_path / "wrong", labels=shuffled)
    with pytest.raises(DataMismatchError, match="orders its classes differently"):
        _pair(ClassifierSpec(str(wrong)), cifar)
    _pair(ClassifierSpec(str(hf_folder(tmp_path / "right", labels=list(cifar.classes)))), cifar)
    # ImageNet: timm's 1000 classes in the canonical (sorted wnid) order pass on wnid-labelled data.
    from timm.data import ImageNetInfo

    wnids = tuple(ImageNetInfo().label_names())
    assert list(wnids) == sorted(wnids)
    imagenet = DataDescription("imagenet", 1000, (224, 224), classes=wnids)
    _pair(ClassifierSpec("timm:test_resnet", str(timm_1k["safetensors"])), imagenet)
    folder = timm_1k["folder"]
    rewrite_json(folder / "config.json", label_names=list(reversed(wnids)))
    try:
        with pytest.raises(DataMismatchError, match="orders its classes differently"):
            _pair(ClassifierSpec(str(folder)), imagenet)
    finally:
        rewrite_json(folder / "config.json", label_names=None)


# ----------------------------------------------------------------------------- bad input


def test_bad_specs_are_one_line_errors(tmp_path, timm_1k, factories, monkeypatch):
    (tmp_path / "neither").mkdir()
    (tmp_path / "neither" / "config.json").write_text("{}")
    remote = hf_folder(tmp_path / "remote")
    rewrite_json(remote / "config.json", auto_map={"AutoModelForImageClassification": "x.Y"})
    forged = tmp_path / "forged.pt"
    forged.write_bytes(MAGIC + b"PK")
    cases = [
        (ClassifierSpec(str(tmp_path / "missing.pt")), "classifier not found"),
        (ClassifierSpec(str(tmp_path / "neither")), "neither a timm folder"),
        (ClassifierSpec("no_such_module_x:make"), "cannot import no_such_module_x"),
        (ClassifierSpec(f"{FACTORY_MODULE}:not_a_module"), "returned int, not a torch nn.Module"),
        (ClassifierSpec(f"{FACTORY_MODULE}:nothing"), "has no attribute 'nothing'"),
        (ClassifierSpec(str(remote)), "remote code"),
        (ClassifierSpec("timm:test_resnet"), "needs its weights"),
        (ClassifierSpec("timm:no_such_net", str(timm_1k["safetensors"])), "timm has no model"),
        (ClassifierSpec("timm:test_resnet", str(tmp_path / "nope.safetensors")), "classifier weights not found"),
        (ClassifierSpec("resnet50"), "needs its weights"),
        (ClassifierSpec(str(forged)), "not a classifier file"),
        (ClassifierSpec(str(timm_1k["pt2"]), str(timm_1k["safetensors"])), "holds its weights"),
        (ClassifierSpec("timm:test_resnet", str(timm_1k["safetensors"]), mean=(0.5,), std=(0.0,)), "std must be positive"),
    ]
    for spec, message in cases:
        with pytest.raises(ClassifierSourceError) as error:
            resolve_classifier(spec)
        assert message in str(error.value) and "\n" not in str(error.value), (spec, str(error.value))
    # A spec whose library is missing names the extra.
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(MissingExtraError, match=r'pip install -e "\.\[timm\]"'):
        resolve_classifier(ClassifierSpec("timm:test_resnet", str(timm_1k["safetensors"])))
    folder = hf_folder(tmp_path / "hf")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingExtraError, match=r'pip install -e "\.\[hf\]"'):
        resolve_classifier(ClassifierSpec(str(folder)))


def test_weights_are_never_unpickled(tmp_path):
    """A .pth holding a pickled object (code) is refused by the weights_only load."""
    marker = tmp_path / "code-ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    torch.save({"fc.weight": Evil()}, path)
    with pytest.raises(ClassifierSourceError, match="refused to load: it holds the Python object") as refused:
        resolve_classifier(ClassifierSpec("timm:test_resnet", str(path)))
    assert not marker.exists()
    # One line, and never torch's advice to load with weights_only=False (that runs the code).
    assert "\n" not in str(refused.value) and "weights_only" not in str(refused.value)


def test_bundle_holds_what_the_form_needs(timm_1k):
    manifest, files = read_bundle(resolve_classifier(ClassifierSpec(str(timm_1k["folder"]))).data)
    assert manifest["kind"] == "timm" and manifest["num_classes"] == 1000
    assert set(files) == {"weights.safetensors"}


def test_exported_program_gets_its_batchnorm_folded(timm_1k):
    """An archive is kept whole when f∘D is traced, so its BatchNorm is folded at the aten
    level (what keeps a .pt2 as fast as the eager forms); the function does not change."""
    from pipeline.sampling.engine import optimize_for_inference

    pair, _ = _pair(ClassifierSpec(str(timm_1k["pt2"]), **timm_flags()), DataDescription(None, None, (224, 224)))

    def batchnorms(model) -> int:
        return sum(1 for m in model.modules() if isinstance(m, torch.fx.GraphModule)
                   for n in m.graph.nodes if n.target == torch.ops.aten.batch_norm.default)

    assert batchnorms(pair) > 0
    optimized = optimize_for_inference(pair)
    assert batchnorms(optimized) == 0 and batchnorms(pair) > 0  # folded in a copy
    x = torch.rand(2, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(optimized(x), pair(x), rtol=1e-4, atol=1e-4)


KERNELS = ("aten::add", "aten::add_", "aten::batch_norm", "aten::convolution", "aten::relu", "aten::relu_")


def _kernels(model, x) -> dict[str, int]:
    """How many times each kernel of interest runs in one forward (torch.profiler, CPU)."""
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(x)
    return dict(Counter(e.name for e in prof.events() if e.name in KERNELS))


def test_every_form_runs_the_same_kernels_after_optimisation(timm_1k, tmp_path):
    """`optimize_for_inference` is the one place every form is optimised, and gives them the
    same program: BatchNorm folded and residual additions in place (fx records `x += y` as
    an out-of-place add, which an exported program does not: that alone made the .pt2 ~8%
    faster than the same ResNet as an nn.Module). The function does not change."""
    import torchvision

    from pipeline.sampling.engine import optimize_for_inference

    data = DataDescription(None, None, (TIMM_INPUT, TIMM_INPUT))
    forms = {
        "timm spec": ClassifierSpec("timm:test_resnet", str(timm_1k["safetensors"])),
        "timm folder": ClassifierSpec(str(timm_1k["folder"])),
        ".pt2": ClassifierSpec(str(timm_1k["pt2"]), **timm_flags()),
    }
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    torchvision_form = ClassifierSpec("resnet18", str(tmp_path / "r18.pth"))
    x = torch.rand(2, 3, TIMM_INPUT, TIMM_INPUT)
    kernels = {}
    for name, spec in {**forms, "torchvision": torchvision_form}.items():
        pair = load_pair(ModelBytes.classifier(spec), None, data, allow_foreign_classifier=True)[0]
        optimized = optimize_for_inference(pair)
        kernels[name] = _kernels(optimized, x)
        assert "aten::add" not in kernels[name] and "aten::batch_norm" not in kernels[name], (name, kernels[name])
        assert kernels[name].get("aten::add_", 0) > 0, (name, kernels[name])
        with torch.inference_mode():
            torch.testing.assert_close(optimized(x), pair(x), rtol=1e-4, atol=1e-4)
    assert kernels["timm spec"] == kernels["timm folder"] == kernels[".pt2"], kernels


def test_models_command_lists_the_forms(capsys):
    from jobs.cli import main as cli_main
    from pipeline.models.sources import FORMS

    assert cli_main(["models", "--kind", "classifier"]) == 0
    out = capsys.readouterr().out
    for name, usage, _ in FORMS:
        assert f"  {name}" in out and usage in out
    assert "timm:NAME" in out and "trusted files only" in out

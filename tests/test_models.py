"""Tests for pipeline.models: architectures, registry, checkpoints, composition, freezing.

CPU-only and small: no weights are ever downloaded (everything is built with weights=None).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision

from pipeline.models import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    CheckpointError,
    CheckpointMismatchError,
    DenoisedClassifier,
    DnCNN,
    MemNet,
    ModelMeta,
    NormalizeLayer,
    UnknownModelError,
    build_model,
    compose,
    file_sha256,
    freeze,
    list_models,
    load_checkpoint,
    load_classifier,
    model_info,
    register_model,
    save_checkpoint,
)
from pipeline.models.checkpoint import FORMAT


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def convs(m: nn.Module) -> list[nn.Conv2d]:
    return [c for c in m.modules() if isinstance(c, nn.Conv2d)]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ------------------------------------------------------------------ denoisers


def small_build_kwargs(name: str) -> dict:
    """Diffusion denoisers are built from a model's config and its schedule (what a diffusers
    folder or guided-diffusion checkpoint gives); every other denoiser from its name alone."""
    from pipeline.models.diffusion.convert import guided_unet_kwargs
    from pipeline.models.diffusion.schedule import linear_alphas_cumprod

    if name == "guided_unet":
        unet = guided_unet_kwargs({"image_size": 32, "num_channels": 32, "channel_mult": "1,2",
                                   "attention_resolutions": "16", "learn_sigma": True})
    elif name == "diffusers_unet":
        unet = {"sample_size": 32, "block_out_channels": [32, 32], "norm_num_groups": 8, "layers_per_block": 1,
                "down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"]}
    else:
        return {}
    return {"unet": unet, "alphas_cumprod": linear_alphas_cumprod(1000)}


@pytest.mark.parametrize("name", list_models(kind="denoiser"))
def test_every_registered_denoiser_preserves_shape(name: str) -> None:
    d = build_model(name, **small_build_kwargs(name)).eval()
    if hasattr(d, "set_sigma"):  # sigma-independent: given the run's noise level
        d.set_sigma(0.25)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        y = d(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
    assert model_info(name).kind == "denoiser"


@pytest.mark.parametrize("name", ["dncnn_small", "memnet"])
def test_denoisers_accept_any_spatial_size(name: str) -> None:
    kwargs = {"num_memblock": 2, "num_resblock": 2} if name == "memnet" else {}
    d = build_model(name, **kwargs).eval()
    x = torch.rand(1, 3, 17, 23)
    with torch.no_grad():
        assert d(x).shape == x.shape


def test_registered_denoisers_include_reference_set() -> None:
    assert {"dncnn", "dncnn_wide", "memnet", "dncnn_small"} <= set(list_models(kind="denoiser"))
    assert not set(list_models(kind="denoiser")) & set(list_models(kind="classifier"))


@pytest.mark.parametrize(
    "name,depth,width", [("dncnn", 17, 64), ("dncnn_wide", 17, 128), ("dncnn_small", 7, 32)]
)
def test_dncnn_layout_matches_reference(name: str, depth: int, width: int) -> None:
    d = build_model(name)
    assert isinstance(d, DnCNN) and isinstance(d.dncnn, nn.Sequential)
    cs = convs(d)
    assert len(cs) == depth
    assert (cs[0].in_channels, cs[0].out_channels, cs[0].bias is not None) == (3, width, True)
    assert all((c.in_channels, c.out_channels, c.bias) == (width, width, None) for c in cs[1:-1])
    assert (cs[-1].in_channels, cs[-1].out_channels, cs[-1].bias) == (width, 3, None)
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in cs)
    bns = [m for m in d.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == depth - 2
    assert all(b.eps == 1e-4 and b.momentum == 0.95 and b.num_features == width for b in bns)
    # Reference key layout: "dncnn.<i>.weight".
    assert "dncnn.0.weight" in d.state_dict() and "dncnn.0.bias" in d.state_dict()
    assert f"dncnn.{3 * (depth - 2) + 2}.weight" in d.state_dict()


def test_dncnn_is_residual() -> None:
    d = DnCNN(depth=5, n_channels=16).eval()
    x = torch.rand(2, 3, 12, 12)
    with torch.no_grad():
        assert not torch.allclose(d(x), x)  # a random net is not the identity...
        d.dncnn[-1].weight.zero_()
        assert torch.equal(d(x), x)  # ...but with a zero last conv it is exactly x - 0


def test_memnet_structure_and_residual() -> None:
    m = MemNet(in_channels=3, channels=8, num_memblock=3, num_resblock=2).eval()
    assert len(m.dense_memory) == 3
    # Gate i concatenates num_resblock short-term + (i+1) long-term memories.
    for i, block in enumerate(m.dense_memory):
        assert len(block.recursive_unit) == 2
        assert block.gate_unit.conv.in_channels == (2 + i + 1) * 8
        assert block.gate_unit.conv.kernel_size == (1, 1)
    x = torch.rand(2, 3, 10, 10)
    with torch.no_grad():
        assert not torch.allclose(m(x), x)
        m.reconstructor.conv.weight.zero_()
        assert torch.equal(m(x), x)


def test_reference_memnet_depth() -> None:
    m = build_model("memnet")
    assert len(m.dense_memory) == 6 and all(len(b.recursive_unit) == 6 for b in m.dense_memory)
    # 2 (extractor, reconstructor) + 6 blocks x (6 resblocks x 2 convs + gate) = 80 convs.
    assert len(convs(m)) == 80


# ------------------------------------------------------------------ classifiers


def test_cifar_resnet_parameter_counts() -> None:
    r20, r110 = build_model("cifar_resnet20"), build_model("cifar_resnet110")
    assert abs(n_params(r20) - 0.27e6) / 0.27e6 < 0.02
    assert abs(n_params(r110) - 1.7e6) / 1.7e6 < 0.03
    assert r20.net.fc.out_features == 10 and r110.net.fc.out_features == 10
    out = r20.eval()(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 10)


def test_wrn28_10_parameter_count_and_dropout() -> None:
    wrn = build_model("cifar_wrn28_10", drop_rate=0.3)
    assert abs(n_params(wrn) - 36.5e6) / 36.5e6 < 0.01
    assert wrn.net.fc.out_features == 10
    assert all(b.drop_rate == 0.3 for b in wrn.net.block1)


def test_torchvision_resnet18_by_name() -> None:
    m = build_model("resnet18").eval()
    assert isinstance(m.net, torchvision.models.ResNet)
    with torch.no_grad():
        assert m(torch.rand(1, 3, 64, 64)).shape == (1, 1000)
    info = model_info("resnet18")
    assert (info.kind, info.dataset, info.num_classes) == ("classifier", "imagenet", 1000)


def test_any_torchvision_classifier_is_a_fallback() -> None:
    name = "squeezenet1_1"
    assert name in torchvision.models.list_models(module=torchvision.models)
    assert name in list_models(kind="classifier")
    info = model_info(name)
    assert info.source == "torchvision" and info.normalization == {
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
    }
    m = build_model(name, num_classes=7).eval()
    assert torch.allclose(m.normalize.mean.flatten(), torch.tensor(IMAGENET_MEAN))
    with torch.no_grad():
        assert m(torch.rand(1, 3, 64, 64)).shape == (1, 7)


def test_torchvision_download_requests_are_refused() -> None:
    with pytest.raises(ValueError, match="weights"):
        build_model("resnet18", weights="DEFAULT")


def test_normalize_layer_is_applied_inside_classifier() -> None:
    clf = build_model("cifar_resnet20").eval()
    assert isinstance(clf[0], NormalizeLayer) and clf.normalize is clf[0] and clf.net is clf[1]
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        out = clf(x)
        assert torch.allclose(out, clf.net((x - mean) / std), atol=1e-6)
        assert not torch.allclose(out, clf.net(x), atol=1e-3)
    # Buffers: they follow .to() and are saved with the weights.
    sd = clf.state_dict()
    assert torch.allclose(sd["0.mean"].flatten(), mean.flatten())
    assert torch.allclose(sd["0.std"].flatten(), std.flatten())
    assert {n for n, _ in clf.named_buffers()} >= {"0.mean", "0.std"}


def test_normalize_layer_values() -> None:
    layer = NormalizeLayer([0.5, 0.25, 0.0], [0.5, 0.25, 2.0])
    x = torch.ones(1, 3, 2, 2)
    y = layer(x)
    assert torch.allclose(y[0, :, 0, 0], torch.tensor([1.0, 3.0, 0.5]))
    with pytest.raises(ValueError):
        NormalizeLayer([0.5], [0.0])


# ------------------------------------------------------------------ registry


def test_unknown_model_name_error_names_it() -> None:
    with pytest.raises(ValueError) as ei:
        build_model("resnet51")
    assert isinstance(ei.value, UnknownModelError)
    msg = str(ei.value)
    assert "resnet51" in msg and "resnet50" in msg and "dncnn" in msg
    with pytest.raises(UnknownModelError, match="dncnnn"):
        model_info("dncnnn")


def test_model_info_and_listing() -> None:
    info = model_info("cifar_resnet110")
    assert (info.kind, info.dataset, info.num_classes) == ("classifier", "cifar10", 10)
    assert info.normalization == {"mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD)}
    dinfo = model_info("dncnn")
    assert (dinfo.kind, dinfo.normalization, dinfo.num_classes) == ("denoiser", None, None)
    clfs = list_models(kind="classifier")
    assert {"cifar_resnet20", "cifar_resnet110", "cifar_wrn28_10", "resnet50", "vit_b_16"} <= set(clfs)
    assert clfs == sorted(clfs)
    assert "vit_b_16" not in list_models(kind="classifier", include_families=False)


def test_register_model_decorator_and_duplicates() -> None:
    @register_model("_test_tiny_denoiser", kind="denoiser")
    def tiny() -> nn.Module:
        return DnCNN(depth=3, n_channels=4)

    assert "_test_tiny_denoiser" in list_models(kind="denoiser")
    assert isinstance(build_model("_test_tiny_denoiser"), DnCNN)
    with pytest.raises(ValueError, match="already registered"):
        register_model("_test_tiny_denoiser", kind="denoiser")(lambda: nn.Identity())


# ------------------------------------------------------------------ checkpoints


def _trained_like(model: nn.Module) -> nn.Module:
    """Perturb weights and BN running stats so a roundtrip cannot pass by re-initialisation."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
        model.train()
        model(torch.rand(4, 3, 16, 16))
    return model.eval()


def test_checkpoint_roundtrip_denoiser(tmp_path: Path) -> None:
    d = _trained_like(build_model("memnet", channels=8, num_memblock=2, num_resblock=2))
    meta = ModelMeta(
        arch="memnet",
        sigma=0.25,
        objective="mse",
        config={"lr": 1e-3, "epochs": 2, "aug": ["flip"]},
        arch_kwargs={"channels": 8, "num_memblock": 2, "num_resblock": 2},
        extra={"note": "x"},
    )
    path = tmp_path / "sub" / "d.pt"
    digest = save_checkpoint(path, d, meta)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest() == file_sha256(path)
    assert [p.name for p in path.parent.iterdir()] == ["d.pt"]  # no temp files left behind

    raw = torch.load(path, weights_only=True)
    assert raw["format"] == FORMAT == "dsmooth-checkpoint/1"

    loaded, meta2 = load_checkpoint(path, arch="memnet")
    assert not loaded.training
    assert meta2.arch == "memnet" and meta2.kind == "denoiser" and meta2.sigma == 0.25
    assert meta2.config == meta.config and meta2.arch_kwargs == meta.arch_kwargs
    assert meta2.extra == {"note": "x"} and meta2.objective == "mse"
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(d(x), loaded(x))
    for k, v in d.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_checkpoint_roundtrip_classifier_fills_meta(tmp_path: Path) -> None:
    clf = _trained_like(build_model("cifar_resnet20"))
    path = tmp_path / "c.pt"
    save_checkpoint(path, clf, ModelMeta(arch="cifar_resnet20", config={"sigma": 0.5}))
    loaded, meta = load_checkpoint(path)
    assert meta.kind == "classifier" and meta.dataset == "cifar10" and meta.num_classes == 10
    assert meta.normalization == {"mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD)}
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(clf(x), loaded(x))
    # Same bytes in -> same identity; a re-save of identical weights+meta hashes the same.
    p2 = tmp_path / "c2.pt"
    save_checkpoint(p2, loaded, meta)
    assert load_checkpoint(p2)[1] == meta


def test_checkpoint_respects_num_classes(tmp_path: Path) -> None:
    clf = build_model("cifar_resnet20", num_classes=3)
    path = tmp_path / "c3.pt"
    save_checkpoint(path, clf, ModelMeta(arch="cifar_resnet20", num_classes=3))
    loaded, meta = load_checkpoint(path)
    assert meta.num_classes == 3 and loaded.net.fc.out_features == 3


_MARKER: list[str] = []


def _side_effect(path: str) -> str:
    Path(path).write_text("code ran")
    return "pwned"


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (_side_effect, (self.marker,))


def test_checkpoint_loading_is_weights_only(tmp_path: Path) -> None:
    d = build_model("dncnn_small")
    marker = tmp_path / "marker.txt"
    payload = {
        "format": FORMAT,
        "meta": ModelMeta(arch="dncnn_small", kind="denoiser").to_dict(),
        "state_dict": d.state_dict(),
        "evil": _Evil(str(marker)),
    }
    path = tmp_path / "evil.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(path)
    # named, refused as code, and never the advice to load it with weights_only=False
    assert str(path) in str(ei.value) and "run as code" in str(ei.value) and "weights_only" not in str(ei.value)
    with pytest.raises(CheckpointError):
        load_classifier("cifar_resnet20", path)
    assert not marker.exists()  # the pickled callable was never executed


def test_arch_mismatch_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "small.pt"
    save_checkpoint(path, build_model("dncnn_small"), ModelMeta(arch="dncnn_small"))
    with pytest.raises(CheckpointMismatchError) as ei:
        load_checkpoint(path, arch="dncnn")
    msg = str(ei.value)
    assert "'dncnn_small'" in msg and "'dncnn'" in msg and str(path) in msg


def test_state_dict_mismatch_names_keys_and_shapes(tmp_path: Path) -> None:
    # Weights of a 32-channel DnCNN labelled as the 64-channel reference: shapes differ.
    path = tmp_path / "wrong_shape.pt"
    save_checkpoint(path, DnCNN(depth=17, n_channels=32), ModelMeta(arch="dncnn"))
    with pytest.raises(CheckpointMismatchError) as ei:
        load_checkpoint(path)
    msg = str(ei.value)
    assert str(path) in msg and "'dncnn'" in msg
    assert "dncnn.0.weight" in msg and "(32, 3, 3, 3)" in msg and "(64, 3, 3, 3)" in msg
    assert "Traceback" not in msg

    # Fewer layers than the arch: missing keys are listed.
    path2 = tmp_path / "missing.pt"
    save_checkpoint(path2, DnCNN(depth=7, n_channels=64), ModelMeta(arch="dncnn"))
    with pytest.raises(CheckpointMismatchError, match=r"missing keys: .*dncnn\.18\.weight"):
        load_checkpoint(path2)

    # More layers than the arch: unexpected keys are listed.
    path3 = tmp_path / "extra.pt"
    save_checkpoint(path3, DnCNN(depth=9, n_channels=32), ModelMeta(arch="dncnn_small"))
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys: .*dncnn\.18\.weight"):
        load_checkpoint(path3)


def test_raw_torchvision_state_dict_via_load_classifier(tmp_path: Path) -> None:
    net = torchvision.models.resnet18(weights=None, num_classes=1000)
    _trained_like(net)
    path = tmp_path / "resnet18.pth"
    torch.save(net.state_dict(), path)

    clf = load_classifier("resnet18", path)
    assert not clf.training and isinstance(clf.normalize, NormalizeLayer)
    x = torch.rand(2, 3, 64, 64)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(clf(x), net((x - mean) / std), atol=1e-5)

    # A raw state dict is not our format: load_checkpoint says so and points to load_classifier.
    with pytest.raises(CheckpointError, match="load_classifier"):
        load_checkpoint(path)
    # Wrong architecture for those weights: a mismatch, not a torch traceback.
    with pytest.raises(CheckpointMismatchError, match="resnet34"):
        load_classifier("resnet34", path)


def test_load_classifier_adapts_foreign_prefixes_and_our_format(tmp_path: Path) -> None:
    clf = _trained_like(build_model("cifar_resnet20"))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = clf(x)
    # DataParallel-style "module." keys of the bare net.
    p1 = tmp_path / "dp.pth"
    torch.save({f"module.{k}": v for k, v in clf.net.state_dict().items()}, p1)
    # Cohen et al.-style {"state_dict": Sequential(normalize, net)} with "1." keys.
    p2 = tmp_path / "cohen.pth.tar"
    torch.save({"arch": "cifar_resnet20", "state_dict": {f"1.{k}": v for k, v in clf.net.state_dict().items()}}, p2)
    # Our own checkpoint format.
    p3 = tmp_path / "ours.pt"
    save_checkpoint(p3, clf, ModelMeta(arch="cifar_resnet20"))
    for p in (p1, p2, p3):
        with torch.no_grad():
            assert torch.equal(load_classifier("cifar_resnet20", p)(x), expected), p


def test_missing_and_corrupt_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pt"
    for fn in (lambda: load_checkpoint(missing), lambda: file_sha256(missing),
               lambda: load_classifier("resnet18", missing)):
        with pytest.raises(FileNotFoundError, match="nope.pt"):
            fn()

    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(2048))
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(junk)

    good = tmp_path / "good.pt"
    save_checkpoint(good, build_model("dncnn_small"), ModelMeta(arch="dncnn_small"))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pt"):
        load_checkpoint(truncated)

    other = tmp_path / "other.pt"
    torch.save({"format": "dsmooth-checkpoint/99", "meta": {}, "state_dict": {}}, other)
    with pytest.raises(CheckpointError, match="unsupported checkpoint version"):
        load_checkpoint(other)


def test_save_rejects_unknown_arch_and_non_json_meta(tmp_path: Path) -> None:
    with pytest.raises(UnknownModelError, match="not_a_model"):
        save_checkpoint(tmp_path / "a.pt", nn.Linear(2, 2), ModelMeta(arch="not_a_model"))
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(tmp_path / "b.pt", build_model("dncnn_small"),
                        ModelMeta(arch="dncnn_small", config={"obj": object()}))
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------ composition and freezing


def test_denoised_classifier_composes() -> None:
    clf = build_model("cifar_resnet20").eval()
    den = build_model("dncnn_small").eval()
    x = torch.rand(2, 3, 32, 32)
    model = DenoisedClassifier(clf, den)
    assert model.classifier is clf and model.denoiser is den
    with torch.no_grad():
        assert torch.equal(model(x), clf(den(x)))
        assert not torch.allclose(model(x), clf(x))
        alone = compose(clf)
        assert alone.denoiser is None
        assert torch.equal(alone(x), clf(x))
    assert set(model.state_dict()) == {f"denoiser.{k}" for k in den.state_dict()} | {
        f"classifier.{k}" for k in clf.state_dict()
    }


def test_freeze_keeps_classifier_weights_while_denoiser_trains() -> None:
    clf = freeze(build_model("cifar_resnet20"))
    den = build_model("dncnn_small")
    model = compose(clf, den)
    model.train()  # a parent .train() must not unfreeze BatchNorm statistics
    before_clf = {k: v.clone() for k, v in clf.state_dict().items()}
    before_den = {k: v.clone() for k, v in den.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)

    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()

    assert all(p.grad is None for p in clf.parameters())
    assert not clf.training
    for k, v in clf.state_dict().items():
        assert torch.equal(v, before_clf[k]), f"frozen classifier changed: {k}"
    grads = [p.grad for p in den.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert any(not torch.equal(v, before_den[k]) for k, v in den.state_dict().items())


def test_model_modules_import_each_other_without_a_cycle():
    """registry <- classifiers/denoisers <- checkpoint <- fit: one direction only (the registry
    imports no model module; architectures register themselves)."""
    import ast

    folder = Path(__file__).resolve().parents[1] / "pipeline" / "models"
    graph: dict[str, set[str]] = {}
    for path in folder.glob("*.py"):
        if path.name == "__init__.py":
            continue
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level == 1 and module:
                    imported.add(module)
                elif node.level == 1:
                    imported.update(alias.name for alias in node.names)
                elif module.startswith("pipeline.models."):
                    imported.add(module.rsplit(".", 1)[1])
        graph[path.stem] = imported & {p.stem for p in folder.glob("*.py")}
    assert graph["registry"] == set()

    def visit(name: str, trail: tuple[str, ...]) -> None:
        assert name not in trail, f"import cycle: {' -> '.join((*trail, name))}"
        for child in graph.get(name, ()):
            visit(child, (*trail, name))

    for module in graph:
        visit(module, ())

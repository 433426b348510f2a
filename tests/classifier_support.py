"""Tiny stand-ins of the classifier forms dsmooth accepts, built at test time (no network):
a random-init timm model (as weights files and as a timm folder), a tiny Hugging Face ViT
(`save_pretrained`), a torch.export archive and a TorchScript file, and a factory module."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import torch

TIMM_ARCH = "test_resnet"  # timm's own test network: ~0.4M parameters, 160 px
TIMM_INPUT = 160
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FACTORY_MODULE = "dsmooth_test_factories"


def timm_net(num_classes: int = 1000, seed: int = 0) -> torch.nn.Module:
    import timm

    torch.manual_seed(seed)
    net = timm.create_model(TIMM_ARCH, pretrained=False, num_classes=num_classes).eval()
    # BatchNorm statistics of noisy images (a fresh net's are the identity's), so its
    # activations have a realistic scale.
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    net.train()
    with torch.no_grad():
        base = torch.rand(4, 3, 1, 1).expand(4, 3, TIMM_INPUT, TIMM_INPUT).repeat(8, 1, 1, 1)
        net((base + 0.25 * torch.randn_like(base) - 0.45) / 0.225)
    return net.eval()


def timm_files(folder: Path, num_classes: int = 1000) -> dict[str, Path]:
    """timm stand-ins of one network: weights (.safetensors, .pth), a timm folder, a .pt2
    export and a TorchScript file of the same weights."""
    from safetensors.torch import save_file
    from timm.models import save_for_hf

    folder.mkdir(parents=True, exist_ok=True)
    net = timm_net(num_classes)
    files = {"safetensors": folder / "w.safetensors", "pth": folder / "w.pth", "folder": folder / "timm-folder",
             "pt2": folder / "net.pt2", "torchscript": folder / "net.ts"}
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(state, files["safetensors"])
    torch.save(state, files["pth"])
    save_for_hf(net, files["folder"], safe_serialization=True)
    example = torch.rand(2, 3, TIMM_INPUT, TIMM_INPUT)
    batch = torch.export.Dim("batch", min=1, max=65536)
    torch.export.save(torch.export.export(net, (example,), dynamic_shapes=({0: batch},)), files["pt2"])
    torch.jit.save(torch.jit.trace(net, example), files["torchscript"])
    return files


def hf_folder(folder: Path, num_labels: int = 10, image_size: int = 32, labels: list[str] | None = None) -> Path:
    """A tiny ViT image classifier saved with save_pretrained, with its image processor."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    id2label = {i: (labels[i] if labels else f"class{i}") for i in range(num_labels)}
    config = ViTConfig(image_size=image_size, patch_size=16, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=32, num_labels=num_labels, id2label=id2label,
                       label2id={v: k for k, v in id2label.items()})
    ViTForImageClassification(config).eval().save_pretrained(folder)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder


FACTORIES = '''
import torch
import timm

def tiny():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 1000))

def timm_net():
    return timm.create_model("test_resnet", pretrained=False, num_classes=1000)

def not_a_module():
    return 3
'''


def factory_module(folder: Path) -> Path:
    """A module `dsmooth_test_factories` in `folder` (put it on PYTHONPATH for workers)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{FACTORY_MODULE}.py").write_text(textwrap.dedent(FACTORIES))
    return folder


def rewrite_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))

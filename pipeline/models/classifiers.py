"""Base classifiers f, always wrapped with their input normalisation.

Denoised smoothing adds Gaussian noise and denoises in [0,1] pixel space, so the
normalisation must live *inside* the classifier: every factory here returns
NormalizedClassifier(NormalizeLayer, net), i.e. an nn.Sequential whose state-dict keys are
"0.mean", "0.std", "1.<net keys>" (the "1." prefix matches Cohen et al.'s checkpoints).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.data.specs import CIFAR10, IMAGENET

from .registry import Family, register_family, register_model

CIFAR10_MEAN, CIFAR10_STD = CIFAR10.mean, CIFAR10.std
IMAGENET_MEAN, IMAGENET_STD = IMAGENET.mean, IMAGENET.std


class NormalizeLayer(nn.Module):
    """(x - mean) / std per channel. Buffers, so they move with .to() and are checkpointed."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t = torch.as_tensor(list(mean), dtype=torch.float32)
        std_t = torch.as_tensor(list(std), dtype=torch.float32)
        if mean_t.ndim != 1 or mean_t.shape != std_t.shape:
            raise ValueError(f"mean and std must be equal-length 1-D sequences, got {mean!r}, {std!r}")
        if bool((std_t <= 0).any()):
            raise ValueError(f"std must be positive, got {std!r}")
        self.register_buffer("mean", mean_t.view(-1, 1, 1))
        self.register_buffer("std", std_t.view(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class NormalizedClassifier(nn.Sequential):
    """nn.Sequential(normalize, net) taking [0,1] pixels; `.normalize` / `.net` name the parts."""

    def __init__(self, normalize: NormalizeLayer, net: nn.Module) -> None:
        super().__init__(normalize, net)

    @property
    def normalize(self) -> NormalizeLayer:
        return self[0]  # type: ignore[return-value]

    @property
    def net(self) -> nn.Module:
        return self[1]


def with_normalization(
    net: nn.Module, mean: Sequence[float], std: Sequence[float]
) -> NormalizedClassifier:
    """Wrap a bare network so it takes [0,1] pixels."""
    return NormalizedClassifier(NormalizeLayer(mean, std), net)


# ---------------------------------------------------------------- CIFAR ResNet (Cohen et al.)


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Post-activation basic block (He et al. 2016) with a 1x1-conv projection shortcut."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + residual)


class CifarResNet(nn.Module):
    """CIFAR ResNet of depth 6n+2 (16/32/64 channels), key layout of Cohen et al.'s archs."""

    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 56, 110, ...), got {depth}")
        n = (depth - 2) // 6
        self.inplanes = 16
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(16, n)
        self.layer2 = self._make_layer(32, n, stride=2)
        self.layer3 = self._make_layer(64, n, stride=2)
        # Adaptive pool == AvgPool2d(8) at 32x32 but does not break on other sizes.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64 * BasicBlock.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * BasicBlock.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * BasicBlock.expansion),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * BasicBlock.expansion
        layers += [BasicBlock(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ---------------------------------------------------------------- Wide ResNet (Zagoruyko & Komodakis)


class WideBasicBlock(nn.Module):
    """Pre-activation wide block; dropout between the two convs when drop_rate > 0."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        self.conv_shortcut = (
            None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(pre)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        # Projection shortcut uses the pre-activated input, identity uses the raw input.
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(pre)
        return shortcut + out


class WideResNet(nn.Module):
    """WRN-depth-k for 32x32 inputs: depth = 6n+4, widths 16k/32k/64k."""

    def __init__(self, depth: int = 28, widen_factor: int = 10, num_classes: int = 10, drop_rate: float = 0.0):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.block1 = self._group(n, widths[0], widths[1], 1, drop_rate)
        self.block2 = self._group(n, widths[1], widths[2], 2, drop_rate)
        self.block3 = self._group(n, widths[2], widths[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    @staticmethod
    def _group(n: int, in_planes: int, out_planes: int, stride: int, drop_rate: float) -> nn.Sequential:
        return nn.Sequential(
            *[
                WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
                for i in range(n)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn1(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ---------------------------------------------------------------- factories


def _norm(default_mean, default_std, mean, std) -> tuple[Sequence[float], Sequence[float]]:
    return (default_mean if mean is None else mean), (default_std if std is None else std)


@register_model("cifar_resnet20", kind="classifier", dataset="cifar10")
def cifar_resnet20(num_classes: int = 10, mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
    """ResNet-20 for CIFAR (~0.27M params)."""
    return with_normalization(CifarResNet(20, num_classes), *_norm(CIFAR10_MEAN, CIFAR10_STD, mean, std))


@register_model("cifar_resnet110", kind="classifier", dataset="cifar10")
def cifar_resnet110(num_classes: int = 10, mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
    """ResNet-110 for CIFAR (~1.7M params), Cohen et al.'s CIFAR-10 base classifier."""
    return with_normalization(CifarResNet(110, num_classes), *_norm(CIFAR10_MEAN, CIFAR10_STD, mean, std))


@register_model("cifar_wrn28_10", kind="classifier", dataset="cifar10")
def cifar_wrn28_10(
    num_classes: int = 10,
    drop_rate: float = 0.0,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
):
    """WRN-28-10 for CIFAR (~36.5M params)."""
    net = WideResNet(28, 10, num_classes=num_classes, drop_rate=drop_rate)
    return with_normalization(net, *_norm(CIFAR10_MEAN, CIFAR10_STD, mean, std))


@functools.lru_cache(maxsize=1)
def torchvision_classifier_names() -> tuple[str, ...]:
    """Classification architectures shipped by torchvision (not detection/segmentation/video)."""
    import torchvision

    return tuple(sorted(torchvision.models.list_models(module=torchvision.models)))


def build_torchvision_classifier(name: str, num_classes: int = 1000, **kwargs: Any) -> nn.Module:
    """Build a bare torchvision classifier with random weights; refuses any download request."""
    import torchvision

    for forbidden in ("weights", "pretrained"):
        if kwargs.get(forbidden) not in (None, False):
            raise ValueError(
                f"{forbidden}={kwargs[forbidden]!r} would download weights; build with weights=None "
                "and load a local file (pipeline.models.load_classifier)"
            )
        kwargs.pop(forbidden, None)
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)


def torchvision_classifier(
    name: str,
    num_classes: int = 1000,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kwargs: Any,
) -> NormalizedClassifier:
    """Any torchvision classification architecture, random weights, ImageNet normalisation."""
    net = build_torchvision_classifier(name, num_classes=num_classes, **kwargs)
    return with_normalization(net, *_norm(IMAGENET_MEAN, IMAGENET_STD, mean, std))


def _register_torchvision(name: str) -> None:
    @register_model(name, kind="classifier", dataset="imagenet")
    def factory(num_classes: int = 1000, **kwargs: Any) -> NormalizedClassifier:
        return torchvision_classifier(name, num_classes=num_classes, **kwargs)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"torchvision {name} (weights=None) with ImageNet normalisation."


for _name in ("resnet18", "resnet34", "resnet50"):
    _register_torchvision(_name)

# Every other torchvision classifier, by name (weights=None; weights come from local files).
register_family(Family("torchvision", torchvision_classifier_names, torchvision_classifier, "classifier", "imagenet"))

"""Gaussian denoisers D used in denoised smoothing, f(D(x + delta)).

All map [B,3,H,W] images in [0,1] pixel space to the same shape, at any H,W (fully
convolutional, stride 1), and are residual so that an untrained net starts near identity.
Layouts follow the Denoised Smoothing reference (Salman et al. 2020) so its published
state dicts load key-for-key.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn import init

from .registry import register_model


class DnCNN(nn.Module):
    """DnCNN (Zhang et al. 2017): predicts the noise and subtracts it, forward = x - net(x)."""

    def __init__(self, depth: int = 17, n_channels: int = 64, image_channels: int = 3) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError(f"DnCNN depth must be >= 2, got {depth}")
        layers: list[nn.Module] = [
            nn.Conv2d(image_channels, n_channels, kernel_size=3, padding=1, bias=True),
            nn.ReLU(inplace=True),
        ]
        for _ in range(depth - 2):
            layers += [
                nn.Conv2d(n_channels, n_channels, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(n_channels, eps=1e-4, momentum=0.95),
                nn.ReLU(inplace=True),
            ]
        layers.append(nn.Conv2d(n_channels, image_channels, kernel_size=3, padding=1, bias=False))
        self.dncnn = nn.Sequential(*layers)  # name kept: reference checkpoints use "dncnn.*" keys
        self._initialize_weights()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.dncnn(x)

    def _initialize_weights(self) -> None:
        # Orthogonal conv init as in the reference implementation.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                init.orthogonal_(m.weight)
                if m.bias is not None:
                    init.constant_(m.bias, 0)
            elif isinstance(m, nn.BatchNorm2d):
                init.constant_(m.weight, 1)
                init.constant_(m.bias, 0)


class BNReLUConv(nn.Sequential):
    """Pre-activation unit of MemNet: BN -> ReLU -> Conv (no bias)."""

    def __init__(self, in_channels: int, channels: int, k: int = 3, s: int = 1, p: int = 1) -> None:
        super().__init__()
        self.add_module("bn", nn.BatchNorm2d(in_channels))
        self.add_module("relu", nn.ReLU(inplace=True))
        self.add_module("conv", nn.Conv2d(in_channels, channels, k, s, p, bias=False))


class ResidualBlock(nn.Module):
    """x + Conv(ReLU(BN(Conv(ReLU(BN(x)))))): one step of MemNet's recursive unit."""

    def __init__(self, channels: int, k: int = 3, s: int = 1, p: int = 1) -> None:
        super().__init__()
        self.relu_conv1 = BNReLUConv(channels, channels, k, s, p)
        self.relu_conv2 = BNReLUConv(channels, channels, k, s, p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu_conv2(self.relu_conv1(x)) + x


class MemoryBlock(nn.Module):
    """Recursive unit (short-term memory) + 1x1 gate over short- and long-term memories."""

    def __init__(self, channels: int, num_resblock: int, memblock_index: int) -> None:
        super().__init__()
        self.recursive_unit = nn.ModuleList([ResidualBlock(channels) for _ in range(num_resblock)])
        # The gate sees every residual output of this block plus the outputs of all earlier
        # memory blocks and the feature extractor (memblock_index of them).
        self.gate_unit = BNReLUConv((num_resblock + memblock_index) * channels, channels, 1, 1, 0)

    def forward(self, x: torch.Tensor, ys: list[torch.Tensor]) -> torch.Tensor:
        xs = []
        for layer in self.recursive_unit:
            x = layer(x)
            xs.append(x)
        gate_out = self.gate_unit(torch.cat(xs + ys, dim=1))
        ys.append(gate_out)  # long-term memory for later blocks
        return gate_out


class MemNet(nn.Module):
    """MemNet (Tai et al. 2017), layout of the PyTorch port used by Denoised Smoothing."""

    def __init__(
        self, in_channels: int = 3, channels: int = 64, num_memblock: int = 6, num_resblock: int = 6
    ) -> None:
        super().__init__()
        self.feature_extractor = BNReLUConv(in_channels, channels)
        self.reconstructor = BNReLUConv(channels, in_channels)
        self.dense_memory = nn.ModuleList(
            [MemoryBlock(channels, num_resblock, i + 1) for i in range(num_memblock)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.feature_extractor(x)
        ys = [out]
        for memory_block in self.dense_memory:
            out = memory_block(out, ys)
        return self.reconstructor(out) + x


@register_model("dncnn", kind="denoiser")
def dncnn(depth: int = 17, n_channels: int = 64, image_channels: int = 3) -> DnCNN:
    """Reference DnCNN: 17 convs, 64 channels."""
    return DnCNN(depth=depth, n_channels=n_channels, image_channels=image_channels)


@register_model("dncnn_wide", kind="denoiser")
def dncnn_wide(depth: int = 17, n_channels: int = 128, image_channels: int = 3) -> DnCNN:
    """DnCNN-wide from Denoised Smoothing: 17 convs, 128 channels."""
    return DnCNN(depth=depth, n_channels=n_channels, image_channels=image_channels)


@register_model("dncnn_small", kind="denoiser")
def dncnn_small(depth: int = 7, n_channels: int = 32, image_channels: int = 3) -> DnCNN:
    """Small DnCNN (7 convs, 32 channels) so demos and tests train in minutes on a CPU."""
    return DnCNN(depth=depth, n_channels=n_channels, image_channels=image_channels)


@register_model("memnet", kind="denoiser")
def memnet(
    in_channels: int = 3, channels: int = 64, num_memblock: int = 6, num_resblock: int = 6
) -> MemNet:
    """Reference MemNet: 6 memory blocks x 6 residual blocks, 64 channels."""
    return MemNet(in_channels, channels, num_memblock, num_resblock)

"""Training data as uint8 tensors, batch augmentation on the device.

Images stay uint8 [N,3,H,W] in memory (4x smaller than float) and become [0,1] floats a
batch at a time on the training device, where random crops/flips are also done, so a
DataLoader needs no worker processes (Ray Train workers are processes already).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

CIFAR_CROP_PADDING = 4  # Cohen et al. / Salman et al.: RandomCrop(32, padding=4) + flip


def evenly_spaced(dataset: Any, count: int | None) -> Any:
    """`count` images taken every k-th over the split (class-balanced for class-sorted
    listings such as CIFAR-10 folders); None keeps all."""
    if count is None or count >= len(dataset):
        return dataset
    skip = max(1, len(dataset) // count)
    return dataset.subset(skip=skip, max=skip * count)


def load_split(dataset_cfg: dict[str, Any], split: str, count: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(images uint8 [N,3,H,W], labels int64 [N], number of classes) of one split."""
    from pipeline.data import open_dataset

    dataset = open_dataset(
        dataset_cfg["kind"], dataset_cfg["root"], split,
        image_size=dataset_cfg.get("image_size"), cache_dir=dataset_cfg.get("cache_dir"),
    )
    classes = len(dataset.classes or [])
    dataset = evenly_spaced(dataset, count)
    images = torch.from_numpy(np.ascontiguousarray(dataset.as_uint8().transpose(0, 3, 1, 2)))
    labels = torch.from_numpy(dataset.labels())
    return images, labels, classes


def to_float(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 -> float32 in [0,1] on `device` (converted after the copy: 4x less to move)."""
    return batch.to(device, non_blocking=True).float().div_(255)


def augment(x: torch.Tensor, generator: torch.Generator, crop_padding: int = 0) -> torch.Tensor:
    """Random horizontal flip, and a random crop from a zero-padded image when crop_padding > 0.

    Randomness comes from `generator` (CPU), so a resumed epoch augments identically."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip.to(x.device).view(n, 1, 1, 1), x.flip(3), x)
    if crop_padding <= 0:
        return x
    p = crop_padding
    padded = F.pad(x, (p, p, p, p))
    dy = torch.randint(0, 2 * p + 1, (n,), generator=generator).tolist()
    dx = torch.randint(0, 2 * p + 1, (n,), generator=generator).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])

"""PNG grids of clean / noisy / denoised test images (the paper's Figure 5), one row each."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from pipeline.training.evaluation import noisy_batches


@torch.no_grad()
def denoising_grid(
    denoiser: nn.Module,
    images: torch.Tensor,
    sigma: float,
    seed: int,
    count: int,
    device: torch.device,
) -> torch.Tensor:
    """[3*count, 3, H, W] in [0,1]: `count` clean test images spread over the set, their
    noisy versions, then the denoiser's outputs; clamped for display only."""
    picks = torch.linspace(0, len(images) - 1, count).round().long().unique()  # spread over the classes
    labels = torch.zeros(len(picks), dtype=torch.int64)
    clean, noisy, _ = next(noisy_batches(images[picks], labels, sigma, seed, len(picks), device))
    was_training = denoiser.training
    denoiser.eval()
    try:
        denoised = denoiser(noisy)
    finally:
        denoiser.train(was_training)
    return torch.cat([clean, noisy, denoised]).clamp_(0, 1).cpu()


def save_grid(tiles: torch.Tensor, count: int, path: str | Path) -> Path:
    """Write tiles as a PNG with `count` images per row."""
    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(tiles, path, nrow=count, padding=2, pad_value=1.0)
    return path

"""Figures of clean / noisy / denoised test images (the paper's Figure 5), one labelled row each."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from pipeline.figures import image_grid, save_png
from pipeline.training.evaluation import evaluating, noisy_batches


@torch.no_grad()
def denoising_grid(
    denoiser: nn.Module,
    images: torch.Tensor,
    sigma: float,
    seed: int,
    count: int,
    device: torch.device,
    noise: str = "gaussian",
) -> torch.Tensor:
    """[3*count, 3, H, W] in [0,1]: `count` clean test images spread over the set, their
    noisy versions, then the denoiser's outputs; clamped for display only."""
    picks = torch.linspace(0, len(images) - 1, count).round().long().unique()  # spread over the classes
    labels = torch.zeros(len(picks), dtype=torch.int64)
    clean, noisy, _ = next(noisy_batches(images[picks], labels, sigma, seed, len(picks), device, noise))
    with evaluating(denoiser):
        denoised = denoiser(noisy)
    return torch.cat([clean, noisy, denoised]).clamp_(0, 1).cpu()


def grid_title(run: dict[str, Any], dataset: str, epoch: int, epochs: int) -> tuple[str, str]:
    """(headline, detail) of a training run's grid: the run's name, objective and
    architecture, and its sigma, classifiers, data and epoch -- a grid.png found on its own
    says which run and which moment of it it shows."""
    label = str(run.get("surrogate_label") or "-")
    kind, _, names = label.partition(":")
    through = {"wb": f"white-box through {names}", "bb": f"black-box through surrogates {names.replace('+', ' + ')}"}
    noise = run.get("noise", "gaussian")
    sigma = f"σ = {float(run['sigma']):g}" + ("" if noise == "gaussian" else f" ({noise} noise)")
    parts = [sigma, through.get(kind, ""), f"{dataset} test images", f"epoch {epoch}/{epochs}"]
    return f"{run['name']}: {run['objective']} denoiser ({run['arch']})", " · ".join(p for p in parts if p)


def grid_figure(tiles: torch.Tensor, count: int, sigma: float, headline: str, detail: str | None = None) -> Any:
    """The tiles of `denoising_grid` as a figure with rows labelled clean / noisy σ=… /
    denoised, so a reader can tell the denoiser's input from its output."""
    rows = [("clean", tiles[:count]), (f"noisy σ={sigma:g}", tiles[count: 2 * count]), ("denoised", tiles[2 * count:])]
    return image_grid([(label, images.numpy()) for label, images in rows], headline, detail)


def save_grid(
    tiles: torch.Tensor, count: int, path: str | Path, sigma: float, headline: str, detail: str | None = None
) -> Path:
    """Write `grid_figure` as a PNG."""
    return save_png(grid_figure(tiles, count, sigma, headline, detail), path)

"""Certified accuracy against radius, one line per input (the papers' figures).

Uses matplotlib's object API with the Agg canvas, never pyplot: no global backend switch,
no display needed on a cluster head node, and no state leaking into the caller's plots.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.reduce.certificates import Certificates

POINTS = 600


def accuracy_curve(certs: Certificates, radii: np.ndarray) -> np.ndarray:
    """Certified accuracy at each radius (vectorised over the radii)."""
    correct_radii = np.sort(certs["radius"].to_numpy(dtype=np.float64)[certs["correct"].to_numpy(dtype=bool)])
    if len(certs) == 0:
        return np.full(len(radii), np.nan)
    at_least = len(correct_radii) - np.searchsorted(correct_radii, radii, side="left")
    return at_least / len(certs)


def plot_certified_accuracy(
    inputs: Sequence[Certificates],
    path: str | Path,
    envelope: bool = False,
    max_radius: float | None = None,
    title: str | None = None,
) -> Path:
    """Write a PNG with one step curve per input (labelled by name, with sigma), and the
    per-radius best over inputs when `envelope`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    if max_radius is None:
        largest = max((float(c["radius"].max()) for c in inputs if len(c)), default=0.0)
        max_radius = max(largest * 1.05, 0.5)
    grid = np.linspace(0.0, max_radius, POINTS)
    figure = Figure(figsize=(7.5, 4.8), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    curves = []
    for certs in inputs:
        curve = accuracy_curve(certs, grid)
        curves.append(curve)
        label = certs.name if certs.sigma is None else f"{certs.name} (σ={certs.sigma:g})"
        axes.plot(grid, curve, drawstyle="steps-post", linewidth=1.4, label=label)
    if envelope and curves:
        axes.plot(grid, np.nanmax(np.vstack(curves), axis=0), "k--", linewidth=1.8, label="envelope")
    axes.set_xlabel("L2 radius")
    axes.set_ylabel("certified accuracy")
    axes.set_xlim(0.0, max_radius)
    axes.set_ylim(0.0, 1.0)
    axes.grid(True, alpha=0.3)
    if title:
        axes.set_title(title)
    if curves:
        axes.legend(fontsize=7 if len(curves) <= 12 else 5, loc="upper right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path

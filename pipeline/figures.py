"""One look for every figure dsmooth writes: the demo's, training's and `dsmooth reduce --plot`'s.

Sizes, fonts, the two-line title (what the figure shows, then the settings it was made
with) and the labelled image grid live here, so that the figures of the three jobs look
alike and can be read at 100 % zoom. matplotlib's object API with the Agg canvas, never
pyplot: no global backend switch, no display needed on a cluster head node or a Ray worker,
and no state leaking into the caller's own plots. No torch and no Ray here: images come in
as arrays (a CPU tensor converts with numpy).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

DPI = 100
TITLE_SIZE = 13  # points
LABEL_SIZE = 11
SMALL_SIZE = 9
TILE_PX = 128  # a grid draws each image at least this many pixels high (32x32 CIFAR -> 4x)
GRID_MIN_PX = 600  # ... and each row of images at least this wide
GRID_PAD = 2  # image pixels of white between the tiles of a row
LABEL_CHARS = 20  # row labels wrap here
_PT = DPI / 72.0  # pixels per point
_CHAR = 0.6  # a character's width in font sizes (DejaVu Sans, roughly)


def new_figure(width_px: float, height_px: float, layout: str | None = None) -> Any:
    """A matplotlib Figure of that size in pixels on its own Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI, layout=layout)
    FigureCanvasAgg(figure)
    return figure


def title_text(headline: str, detail: str | None, width_px: float) -> str:
    """The figure title: what it shows, then the settings (sigma, n, alpha, images...),
    each wrapped to the figure's width."""
    chars = max(20, int(width_px / (TITLE_SIZE * _CHAR * _PT)))
    lines = [textwrap.fill(headline, chars)]
    if detail:
        lines.append(textwrap.fill(detail, chars))
    return "\n".join(lines)


def set_title(figure: Any, headline: str, detail: str | None = None, y: float | None = None) -> Any:
    """Title the whole figure (suptitle) in the shared style; returns the Text."""
    width_px = figure.get_figwidth() * DPI
    kwargs = {} if y is None else {"y": y, "va": "top"}
    return figure.suptitle(title_text(headline, detail, width_px), fontsize=TITLE_SIZE, **kwargs)


def save_png(figure: Any, path: str | Path) -> Path:
    """Write the figure as PNG (parent folders made)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=DPI)
    return path


def as_images(images: Any) -> np.ndarray:
    """[N, C, H, W] (torch layout, C = 1 or 3) in [0, 1] -> [N, H, W, 3] float, clipped."""
    array = np.asarray(images, dtype=np.float32)
    if array.ndim != 4 or array.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, C, H, W] with C = 1 or 3, got shape {array.shape}")
    array = np.clip(array.transpose(0, 2, 3, 1), 0.0, 1.0)
    return np.repeat(array, 3, axis=3) if array.shape[3] == 1 else array


def _mosaic(images: np.ndarray, columns: int) -> np.ndarray:
    """One row of tiles with GRID_PAD white pixels between them (short rows padded white)."""
    count, height, width, _ = images.shape
    row = np.ones((height, columns * (width + GRID_PAD) - GRID_PAD, 3), dtype=np.float32)
    for i in range(min(count, columns)):
        row[:, i * (width + GRID_PAD): i * (width + GRID_PAD) + width] = images[i]
    return row


def image_grid(rows: Sequence[tuple[str, Any]], headline: str, detail: str | None = None) -> Any:
    """A figure of labelled rows of images: each row's label (wrapped) on its left, one axes
    per row (so `axes.get_ylabel()` is the row's label), the title above.

    `rows` are (label, images [N, C, H, W] in [0, 1]). Images are scaled up by a whole
    factor with nearest-neighbour pixels, so a 32x32 image stays sharp and is at least
    TILE_PX high, and a row at least GRID_MIN_PX wide."""
    if not rows:
        raise ValueError("an image grid needs at least one row")
    arrays = [as_images(images) for _, images in rows]
    if len({a.shape[1:] for a in arrays}) > 1:
        raise ValueError(f"every row's images must have one size, got {sorted({a.shape[1:3] for a in arrays})}")
    columns = max(len(a) for a in arrays)
    height, width = arrays[0].shape[1:3]
    mosaics = [_mosaic(a, columns) for a in arrays]
    scale = max(1, math.ceil(TILE_PX / height), math.ceil(GRID_MIN_PX / mosaics[0].shape[1]))
    labels = [textwrap.fill(label, LABEL_CHARS) for label, _ in rows]
    label_px = max(len(line) for label in labels for line in label.splitlines()) * LABEL_SIZE * _CHAR * _PT + 24
    row_w, row_h, gap, margin = mosaics[0].shape[1] * scale, height * scale, 10, 16
    fig_w = label_px + row_w + 2 * margin
    title_lines = title_text(headline, detail, fig_w).count("\n") + 1
    title_px = title_lines * TITLE_SIZE * _PT * 1.35 + 2 * margin
    fig_h = title_px + len(rows) * row_h + (len(rows) - 1) * gap + margin
    figure = new_figure(fig_w, fig_h)
    for index, (label, mosaic) in enumerate(zip(labels, mosaics)):
        top = title_px + index * (row_h + gap)
        axes = figure.add_axes(
            ((margin + label_px) / fig_w, 1 - (top + row_h) / fig_h, row_w / fig_w, row_h / fig_h)
        )
        axes.imshow(mosaic, interpolation="nearest")
        axes.set_xticks([])
        axes.set_yticks([])
        for spine in axes.spines.values():
            spine.set_visible(False)
        axes.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=LABEL_SIZE, labelpad=10)
    set_title(figure, headline, detail, y=1 - margin / fig_h)
    return figure

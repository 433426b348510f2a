"""Certified accuracy against radius, one line per input (the papers' figures).

The title says what a reader needs to judge the curves -- data set, model(s), sigma, n,
alpha and image count, read off the inputs' metadata -- and a dashed line marks the largest
radius each input's n can certify (`Certificates.max_radius`: sigma * Phi^-1(alpha^(1/n))
for fixed n, the confidence sequence's lower ceiling at n_max for a sequential run), so a
curve falling to 0 there is read as a limit of n, not of the model. The look is `pipeline.figures`', shared
with the demo's and training's image grids.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.figures import LABEL_SIZE, SMALL_SIZE, new_figure, save_png, set_title
from pipeline.reduce.certificates import Certificates, common_norm

POINTS = 600
MAX_INSIDE_LEGEND = 8  # legend entries drawn inside the axes; more go below the plot
MAX_LEGEND = 30  # more entries than this: no legend (unreadable), the title says how many inputs
NEAR = 1.5  # a limit within this factor of the largest radius shown is brought onto the axis
MARKER_GID = "max-radius"  # the gid of every max-radius marker line (tests and callers find them by it)
MARKER_STYLE = {"linestyle": (0, (4, 3)), "linewidth": 1.3}
MAX_MARKER_LABELS = 6  # more distinct limits than this: one legend entry for all markers


def accuracy_curve(certs: Certificates, radii: np.ndarray) -> np.ndarray:
    """Certified accuracy at each radius (vectorised over the radii)."""
    correct_radii = np.sort(certs["radius"].to_numpy(dtype=np.float64)[certs["correct"].to_numpy(dtype=bool)])
    if len(certs) == 0:
        return np.full(len(radii), np.nan)
    at_least = len(correct_radii) - np.searchsorted(correct_radii, radii, side="left")
    return at_least / len(certs)


def _summary(values: Sequence[Any], show: Callable[[Any], str] = str, many: int = 4, noun: str = "values") -> str | None:
    """One value, a short set "{a, b}" (names: "a; b"), a range "a–b" or a count "5 <noun>";
    None when all are unknown; unknown values among known ones show as "?"."""
    known = sorted({v for v in values if v is not None}, key=lambda v: (isinstance(v, str), v))
    if not known:
        return None
    text = list(dict.fromkeys(show(v) for v in known)) + (["?"] if any(v is None for v in values) else [])
    if len(text) == 1:
        return text[0]
    if len(text) <= many:
        return "; ".join(text) if isinstance(known[0], str) else "{" + ", ".join(text) + "}"
    if all(isinstance(v, (int, float)) for v in known):
        return f"{show(known[0])}–{show(known[-1])}" + (" or ?" if "?" in text else "")
    return f"{len(text)} {noun}"


def describe(inputs: Sequence[Certificates]) -> tuple[str, str]:
    """(headline, detail) of a plot of these inputs: data set and model(s); then sigma, n,
    alpha and images per input. Unknown settings are said to be unknown, not left out."""
    dataset = _summary([c.dataset for c in inputs], many=2, noun="data sets") or "data set not recorded"
    model = _summary([c.model for c in inputs], many=3, noun="models") or "model not recorded"
    headline = f"Certified accuracy: {model} on {dataset}"
    sigma = _summary([c.sigma for c in inputs], lambda v: f"{v:g}")
    n = _summary([c.n for c in inputs], lambda v: f"{v:,}")
    alpha = _summary([c.alpha for c in inputs], lambda v: f"{v:g}")
    images = _summary([len(c) for c in inputs], lambda v: f"{v:,}")
    parts = [
        f"σ = {sigma}" if sigma else "σ not recorded",
        f"n = {n}" if n else "n not recorded",
        f"α = {alpha}" if alpha else "α not recorded",
        f"{images} images" + (" each" if len(inputs) > 1 else ""),
    ]
    limit = _summary([c.max_radius for c in inputs], lambda v: f"{v:.3g}")
    if limit:
        parts.append(f"certifiable r ≤ {limit}")
    if len(inputs) + 1 > MAX_LEGEND:
        parts.append(f"{len(inputs)} inputs")
    return headline, " · ".join(parts)


def certified_accuracy_figure(
    inputs: Sequence[Certificates],
    envelope: bool = False,
    max_radius: float | None = None,
    title: str | None = None,
) -> Any:
    """The figure: one step curve per input (labelled by name, with sigma), the per-radius
    best over inputs when `envelope`, a dashed line at each input's largest certifiable
    radius within the axis (gid MARKER_GID; one per distinct radius), grey shade where no
    input can certify, and a title from `describe` (`title` replaces its headline)."""
    limits = [c.max_radius for c in inputs]
    if max_radius is None:
        max_radius = _axis_end(inputs, limits)
    grid = np.linspace(0.0, max_radius, POINTS)
    entries = len(inputs) + int(envelope) + len({round(r, 9) for r in limits if r is not None and r <= max_radius})
    legend = len(inputs) + int(envelope) <= MAX_LEGEND  # else unreadable; the title counts the inputs
    below = legend and entries > MAX_INSIDE_LEGEND
    figure = new_figure(960, 600 + (16 * ((entries + 1) // 2) if below else 0), layout="constrained")
    axes = figure.add_subplot()
    curves, colours = [], input_colours(inputs)
    one_sigma = len({c.sigma for c in inputs}) == 1  # then the title says it, once
    for certs, colour in zip(inputs, colours):
        curve = 100.0 * accuracy_curve(certs, grid)  # % as in the tables
        curves.append(curve)
        name = _shorten(certs.name)
        label = name if certs.sigma is None or one_sigma else f"{name} (σ={certs.sigma:g})"
        axes.plot(grid, curve, drawstyle="steps-post", linewidth=1.6, label=label, color=colour)
    if envelope and curves:
        axes.plot(grid, np.nanmax(np.vstack(curves), axis=0), "k--", linewidth=1.8, label="envelope")
    _mark_limits(axes, inputs, limits, colours, max_radius)
    norm = common_norm(inputs)  # ℓ1 and ℓ2 curves on one axis are refused
    axes.set_xlabel(f"certified {norm} radius", fontsize=LABEL_SIZE)
    axes.set_ylabel("certified accuracy (%)", fontsize=LABEL_SIZE)
    axes.tick_params(labelsize=SMALL_SIZE)
    axes.set_xlim(0.0, max_radius)
    axes.set_ylim(0.0, 100.0)
    axes.grid(True, alpha=0.3)
    headline, detail = describe(inputs)
    set_title(figure, title or headline, detail)
    if below:
        figure.legend(*axes.get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize=7)
    elif curves and legend:
        axes.legend(fontsize=SMALL_SIZE, loc="upper right")
    return figure


def input_colours(inputs: Sequence[Certificates]) -> list[Any]:
    """One colour per input, fixed by the set of inputs, not their order or display names:
    the demo's plot and `dsmooth reduce --plot` of the same runs agree. Runs are keyed by
    their directory (`source`), logs by name; the sorted keys take the colour cycle."""
    import os

    from matplotlib import rcParams

    cycle = rcParams["axes.prop_cycle"].by_key()["color"]
    keys = [os.path.realpath(c.source) if c.source and "://" not in c.source else (c.source or c.name)
            for c in inputs]
    rank = {key: i for i, key in enumerate(sorted(set(keys)))}
    return [cycle[rank[key] % len(cycle)] for key in keys]


def _axis_end(inputs: Sequence[Certificates], limits: list[float | None]) -> float:
    """Past the largest certified radius (at least 0.5), and far enough to show a limit
    that lies near it; limits far beyond the data are only named in the title."""
    largest = max((float(c["radius"].max()) for c in inputs if len(c)), default=0.0)
    end = max(largest, 0.5)
    near = [r for r in limits if r is not None and r <= NEAR * end]
    return max([end, *near]) * 1.08


def _shorten(name: str, width: int = 60) -> str:
    """A legend label that fits: long paths lose their middle."""
    return name if len(name) <= width else name[: width // 3] + "…" + name[-(2 * width // 3 - 1):]


def _mark_limits(axes: Any, inputs: Sequence[Certificates], limits: list[float | None], colours: list[str],
                 max_radius: float) -> None:
    """A dashed vertical line per distinct largest certifiable radius on the axis -- in its
    input's colour when only one of several inputs has it, grey otherwise -- and grey shade
    past the largest of them when every input's limit is known (nothing is certified there)."""
    by_radius: dict[float, list[int]] = {}
    for index, limit in enumerate(limits):
        if limit is not None:
            by_radius.setdefault(round(limit, 9), []).append(index)
    shown = {radius: owners for radius, owners in sorted(by_radius.items()) if radius <= max_radius}
    labelled = len(shown) <= MAX_MARKER_LABELS
    for radius, owners in shown.items():
        colour = colours[owners[0]] if len(owners) == 1 and len(inputs) > 1 else "0.35"
        sigma = _summary([inputs[i].sigma for i in owners], lambda v: f"{v:g}")
        label = f"largest certifiable radius {radius:.3g}" + (f" (σ = {sigma})" if len(by_radius) > 1 else "")
        axes.axvline(radius, color=colour, gid=MARKER_GID, label=label if labelled else None, **MARKER_STYLE)
    if shown and not labelled:
        axes.plot([], [], color="0.35", label="largest certifiable radius of each input", **MARKER_STYLE)
    if by_radius and None not in limits and max(by_radius) < max_radius:
        axes.axvspan(max(by_radius), max_radius, color="0.92", zorder=0, gid=MARKER_GID + "-beyond")


def plot_certified_accuracy(
    inputs: Sequence[Certificates],
    path: str | Path,
    envelope: bool = False,
    max_radius: float | None = None,
    title: str | None = None,
) -> Path:
    """Write `certified_accuracy_figure` as a PNG."""
    return save_png(certified_accuracy_figure(inputs, envelope, max_radius, title), path)

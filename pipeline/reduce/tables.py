"""Certified-accuracy tables: one long frame, rendered as CSV, markdown or LaTeX.

The long frame (one row per input and radius) is what scripts want: the CSV keeps every
requested radius, and says per row the input's n, alpha, its largest certifiable radius
(`max_radius`, empty when unknown) and whether the radius lies above it (`capped`: the 0
there is a limit of n, not of the model). Markdown and LaTeX pivot it into one row per
input for people: the clean accuracy once per row, then plain certified accuracy per
radius in percent; a radius no input can certify is not shown (a note says which and why),
and a cell above its own input's limit reads "—". The envelope row is how Tables 1 and 2 of
Salman et al. are built: per radius the best input, ties to the higher clean accuracy; its
cells keep the papers' "(clean accuracy) certified accuracy", since the winner -- and so
the clean accuracy -- changes from radius to radius.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import pandas as pd

from pipeline.command_settings import DEFAULT_RADII  # noqa: F401 - declared with reduce's settings
from pipeline.reduce.certificates import (
    Certificates,
    average_certified_radius,
    certified_accuracy,
    clean_accuracy,
)
# The first five columns are the original CSV format; the last four were added after them
# so that scripts reading by position keep working.
CSV_COLUMNS = [
    "run", "sigma", "radius", "certified_accuracy", "clean_accuracy", "n", "alpha", "max_radius", "capped",
]
TABLE_COLUMNS = CSV_COLUMNS + ["acr", "images", "input", "winner", "samples_per_image"]
# Added to the CSV (last) only when some input is a sequential run, whose samples vary by image.
SAMPLES_COLUMN = "samples_per_image"
ENVELOPE = "envelope"
FORMATS = ("markdown", "csv", "latex")
CAPPED = "—"  # a cell above its input's largest certifiable radius
CELLS_NOTE = (
    "Cells: certified accuracy (%) at L2 radius r; clean: accuracy of the smoothed classifier (r = 0: "
    "correct, not abstained); ACR: average certified radius."
)
ENVELOPE_NOTE = (
    "envelope: per radius the best input (ties to the higher clean accuracy); its cells read "
    "(clean accuracy of that input) certified accuracy, as in the papers' tables."
)
CAPPED_NOTE = f"{CAPPED}: above that input's largest certifiable radius σ·Φ⁻¹(α^(1/n)) (capped by n)."


def accuracy_table(
    inputs: Sequence[Certificates], radii: Iterable[float] = DEFAULT_RADII, envelope: bool = False
) -> pd.DataFrame:
    """One row per (input, radius): certified and clean accuracy (fractions), the input's
    n, alpha and largest certifiable radius, whether the radius is above it, ACR, image
    count; `input` is the input's position (-1 for the envelope), `winner` the name of the
    input an envelope row comes from."""
    radii = [float(r) for r in radii]
    rows = []
    for position, certs in enumerate(inputs):
        clean, acr, limit = clean_accuracy(certs), average_certified_radius(certs), certs.max_radius
        samples = float(certs["samples"].mean()) if "samples" in certs and len(certs) else math.nan
        for radius, accuracy in certified_accuracy(certs, radii).items():
            rows.append(
                {
                    "run": certs.name, "sigma": _float(certs.sigma), "radius": radius,
                    "certified_accuracy": accuracy, "clean_accuracy": clean,
                    "n": _float(certs.n), "alpha": _float(certs.alpha), "max_radius": _float(limit),
                    "capped": limit is not None and radius > limit,
                    "acr": acr, "images": len(certs), "input": position, "winner": None,
                    SAMPLES_COLUMN: samples,
                }
            )
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    if envelope and len(table):
        table = pd.concat([table, envelope_rows(table, radii)], ignore_index=True)
    return table


def envelope_rows(table: pd.DataFrame, radii: Iterable[float]) -> pd.DataFrame:
    """Per radius, the input with the highest certified accuracy; a tie goes to the higher
    clean accuracy, then to the input given first. Sigma, n, alpha and clean accuracy are
    the winner's; the envelope's largest certifiable radius is the largest of its inputs'
    (unknown if any is), and a radius is capped only when it is capped for every input."""
    rows = []
    inputs = table[table["input"] >= 0]
    limits = inputs.drop_duplicates("input")["max_radius"]
    limit = math.nan if limits.isna().any() else float(limits.max())
    for radius in radii:
        candidates = inputs[inputs["radius"] == radius]
        if candidates.empty:
            continue
        best = max(
            candidates.itertuples(index=False),
            key=lambda row: (row.certified_accuracy, row.clean_accuracy, -row.input),
        )
        rows.append(
            {
                "run": ENVELOPE, "sigma": best.sigma, "radius": radius,
                "certified_accuracy": best.certified_accuracy, "clean_accuracy": best.clean_accuracy,
                "n": best.n, "alpha": best.alpha, "max_radius": limit, "capped": bool(candidates["capped"].all()),
                "acr": math.nan, "images": best.images, "input": -1, "winner": best.run,
                SAMPLES_COLUMN: math.nan,
            }
        )
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def render(table: pd.DataFrame, format: str = "markdown") -> str:
    """The table as text: `csv` (long, columns CSV_COLUMNS, fractions; `capped` True/False,
    n/alpha/max_radius empty when unknown), `markdown` or `latex` (one row per input: sigma,
    n, clean accuracy, certified accuracy per certifiable radius in percent, ACR; notes)."""
    if format == "csv":
        columns = CSV_COLUMNS + ([SAMPLES_COLUMN] if _has_samples(table) else [])
        return table[columns].to_csv(index=False, float_format="%.10g", na_rep="", lineterminator="\n")
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    wide = _wide(table)
    if format == "markdown":
        return _markdown(wide)
    return _latex(wide)


def _has_samples(table: pd.DataFrame) -> bool:
    return SAMPLES_COLUMN in table and bool(table[SAMPLES_COLUMN].notna().any())


def paper_cell(certified: float, clean: float) -> str:
    """The papers' cell: clean accuracy in parentheses, then certified accuracy, in percent."""
    return f"({100 * clean:.1f}) {100 * certified:.1f}"


def percent(value: float) -> str:
    return f"{100 * value:.1f}"


@dataclass
class Wide:
    """The human table: shown radii, one dict per row, whether an n column is worth showing
    (some input's n is known), and the note lines under the table."""

    radii: list[float]
    rows: list[dict]
    with_n: bool
    notes: list[str] = field(default_factory=list)
    with_samples: bool = False


def _wide(table: pd.DataFrame) -> Wide:
    """Pivot the long frame: radius 0 is the clean column; radii capped for every input are
    dropped (with a note), cells capped for their own input read CAPPED."""
    radii = list(dict.fromkeys(table["radius"].tolist()))
    inputs = table[table["input"] >= 0]
    capped_everywhere = {r for r in radii if len(inputs) and inputs.loc[inputs["radius"] == r, "capped"].all()}
    shown = [r for r in radii if r != 0.0 and r not in capped_everywhere]
    rows = []
    for position in dict.fromkeys(table["input"].tolist()):
        group = table[table["input"] == position].set_index("radius")
        first = group.iloc[0]
        envelope = position < 0
        if envelope:
            clean = inputs["clean_accuracy"].max()
            cells = [paper_cell(group.at[r, "certified_accuracy"], group.at[r, "clean_accuracy"])
                     if r in group.index else "" for r in shown]
        else:
            clean = first["clean_accuracy"]
            cells = [("" if r not in group.index else CAPPED if group.at[r, "capped"]
                      else percent(group.at[r, "certified_accuracy"])) for r in shown]
        rows.append(
            {
                "run": first["run"],
                "envelope": envelope,
                "sigma": "" if envelope or pd.isna(first["sigma"]) else f"{first['sigma']:g}",
                "n": "" if envelope or pd.isna(first["n"]) else f"{int(first['n'])}",
                "clean": "" if pd.isna(clean) else percent(clean),
                "cells": cells,
                "acr": "" if pd.isna(first["acr"]) else f"{first['acr']:.3f}",
                "samples": "" if pd.isna(first.get(SAMPLES_COLUMN)) else f"{first[SAMPLES_COLUMN]:,.0f}",
            }
        )
    notes = [CELLS_NOTE]
    if (table["input"] < 0).any():
        notes.append(ENVELOPE_NOTE)
    dropped = [r for r in radii if r in capped_everywhere]
    if dropped:
        limits = inputs.drop_duplicates("input")["max_radius"]
        where = (f"σ·Φ⁻¹(α^(1/n)) = {limits.max():.3g} for every input" if limits.nunique() == 1
                 else f"the inputs' σ·Φ⁻¹(α^(1/n)) are at most {limits.max():.3g}")
        notes.append(
            f"Not shown: r = {', '.join(f'{r:g}' for r in dropped)}, above the largest radius any input can "
            f"certify ({where}): capped by n; raise n to certify larger radii."
        )
    if any(cell == CAPPED for row in rows for cell in row["cells"]):
        notes.append(CAPPED_NOTE)
    with_samples = _has_samples(inputs)
    if with_samples:
        notes.append("samples/image: mean samples a sequential run drew per image before deciding it "
                     "(its n is the cap n_max).")
    return Wide(shown, rows, with_n=bool(inputs["n"].notna().any()), notes=notes, with_samples=with_samples)


def _columns(wide: Wide) -> list[str]:
    return ["input", "sigma"] + (["n"] if wide.with_n else []) + (["samples/image"] if wide.with_samples else []) \
        + ["clean"]


def _row_cells(wide: Wide, row: dict) -> list[str]:
    return ([row["run"], row["sigma"]] + ([row["n"]] if wide.with_n else [])
            + ([row["samples"]] if wide.with_samples else []) + [row["clean"], *row["cells"], row["acr"]])


def _markdown(wide: Wide) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    head = _columns(wide)
    out = [
        line(head + [f"r = {r:g}" for r in wide.radii] + ["ACR"]),
        "|" + "|".join(["---"] + ["---:"] * (len(head) - 1 + len(wide.radii) + 1)) + "|",
    ]
    out += [line(_row_cells(wide, row)) for row in wide.rows]
    out.append("")
    out += wide.notes
    return "\n".join(out) + "\n"


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def _latex(wide: Wide) -> str:
    head = _columns(wide)
    spec = "l" + "r" * (len(head) - 1 + len(wide.radii) + 1)
    names = {"input": "Input", "sigma": "$\\sigma$", "n": "$n$", "samples/image": "samples/image", "clean": "clean"}
    out = [f"% {note}" for note in wide.notes] + [
        f"\\begin{{tabular}}{{{spec}}}",
        "\\hline",
        " & ".join([names[c] for c in head] + [f"$r={r:g}$" for r in wide.radii] + ["ACR"]) + " \\\\",
        "\\hline",
    ]
    for row in wide.rows:
        if row["envelope"]:
            out.append("\\hline")
        cells = [latex_escape(cell) if i == 0 else cell.replace(CAPPED, "---")
                 for i, cell in enumerate(_row_cells(wide, row))]
        out.append(" & ".join(cells) + " \\\\")
    out += ["\\hline", "\\end{tabular}"]
    return "\n".join(out) + "\n"


def _float(value: float | None) -> float:
    return math.nan if value is None else float(value)


def per_image_table(inputs: Sequence[Certificates]) -> pd.DataFrame:
    """Every input's per-image certificates in one frame, with the input's name and sigma."""
    frames = [pd.DataFrame(certs).assign(run=certs.name, sigma=_float(certs.sigma)) for certs in inputs]
    if not frames:
        return pd.DataFrame(columns=["run", "sigma"])
    frame = pd.concat(frames, ignore_index=True)
    return frame[["run", "sigma"] + [c for c in frame.columns if c not in ("run", "sigma")]]

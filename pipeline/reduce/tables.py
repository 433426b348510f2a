"""Certified-accuracy tables: one long frame, rendered as CSV, markdown or LaTeX.

The long frame (one row per input and radius) is what scripts want; markdown and LaTeX pivot
it into the papers' layout, one row per input, each cell "(clean accuracy) certified
accuracy" in percent. The envelope row is how Tables 1 and 2 of Salman et al. are built:
per radius the best input, ties to the higher clean accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import pandas as pd

from pipeline.reduce.certificates import (
    Certificates,
    average_certified_radius,
    certified_accuracy,
    clean_accuracy,
)

DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
CSV_COLUMNS = ["run", "sigma", "radius", "certified_accuracy", "clean_accuracy"]
TABLE_COLUMNS = CSV_COLUMNS + ["acr", "images", "input", "winner"]
ENVELOPE = "envelope"
FORMATS = ("markdown", "csv", "latex")


def accuracy_table(
    inputs: Sequence[Certificates], radii: Iterable[float] = DEFAULT_RADII, envelope: bool = False
) -> pd.DataFrame:
    """One row per (input, radius): certified and clean accuracy (fractions), ACR, image
    count; `input` is the input's position (-1 for the envelope), `winner` the name of the
    input an envelope row comes from."""
    radii = [float(r) for r in radii]
    rows = []
    for position, certs in enumerate(inputs):
        clean, acr = clean_accuracy(certs), average_certified_radius(certs)
        for radius, accuracy in certified_accuracy(certs, radii).items():
            rows.append(
                {
                    "run": certs.name, "sigma": _float(certs.sigma), "radius": radius,
                    "certified_accuracy": accuracy, "clean_accuracy": clean, "acr": acr,
                    "images": len(certs), "input": position, "winner": None,
                }
            )
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    if envelope and len(table):
        table = pd.concat([table, envelope_rows(table, radii)], ignore_index=True)
    return table


def envelope_rows(table: pd.DataFrame, radii: Iterable[float]) -> pd.DataFrame:
    """Per radius, the input with the highest certified accuracy; a tie goes to the higher
    clean accuracy, then to the input given first. Sigma and clean accuracy are the winner's."""
    rows = []
    inputs = table[table["input"] >= 0]
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
                "acr": math.nan, "images": best.images, "input": -1, "winner": best.run,
            }
        )
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def render(table: pd.DataFrame, format: str = "markdown") -> str:
    """The table as text: `csv` (long, columns CSV_COLUMNS, fractions), `markdown` or `latex`
    (one row per input, "(clean) certified" percentages per radius, then ACR)."""
    if format == "csv":
        return table[CSV_COLUMNS].to_csv(index=False, float_format="%.10g", na_rep="", lineterminator="\n")
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    radii, rows = _wide(table)
    if format == "markdown":
        return _markdown(radii, rows)
    return _latex(radii, rows)


def paper_cell(certified: float, clean: float) -> str:
    """The papers' cell: clean accuracy in parentheses, then certified accuracy, in percent."""
    return f"({100 * clean:.1f}) {100 * certified:.1f}"


def _wide(table: pd.DataFrame) -> tuple[list[float], list[dict]]:
    radii = list(dict.fromkeys(table["radius"].tolist()))
    rows = []
    order = list(dict.fromkeys(table["input"].tolist()))
    for position in order:
        group = table[table["input"] == position].set_index("radius")
        first = group.iloc[0]
        rows.append(
            {
                "run": first["run"],
                "envelope": position < 0,
                "sigma": "" if position < 0 or pd.isna(first["sigma"]) else f"{first['sigma']:g}",
                "cells": [
                    paper_cell(group.at[r, "certified_accuracy"], group.at[r, "clean_accuracy"])
                    if r in group.index else ""
                    for r in radii
                ],
                "acr": "" if pd.isna(first["acr"]) else f"{first['acr']:.3f}",
            }
        )
    return radii, rows


def _markdown(radii: list[float], rows: list[dict]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    out = [
        line(["input", "sigma"] + [f"r = {r:g}" for r in radii] + ["ACR"]),
        "|" + "|".join(["---", "---:"] + ["---:"] * len(radii) + ["---:"]) + "|",
    ]
    out += [line([row["run"], row["sigma"], *row["cells"], row["acr"]]) for row in rows]
    out.append("")
    out.append("Cells: (clean accuracy) certified accuracy at L2 radius r, in percent; ACR = average certified radius.")
    return "\n".join(out) + "\n"


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def _latex(radii: list[float], rows: list[dict]) -> str:
    spec = "lr" + "r" * len(radii) + "r"
    out = [
        "% Cells: (clean accuracy) certified accuracy at L2 radius r, in percent; ACR = average certified radius.",
        f"\\begin{{tabular}}{{{spec}}}",
        "\\hline",
        " & ".join(["Input", "$\\sigma$"] + [f"$r={r:g}$" for r in radii] + ["ACR"]) + " \\\\",
        "\\hline",
    ]
    for row in rows:
        if row["envelope"]:
            out.append("\\hline")
        cells = [latex_escape(row["run"]), row["sigma"], *row["cells"], row["acr"]]
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

"""Certified-accuracy tables: one long frame, rendered as CSV, markdown or LaTeX.

The long frame (one row per input and radius) is what scripts want: the CSV keeps every
requested radius, and says per row the input's n, alpha, its largest certifiable radius
(`max_radius`, empty when unknown) and whether the radius lies above it (`capped`: the 0
there is a limit of n, not of the model), and the alpha the run itself recorded
(`run_alpha`; another `alpha` means the certificates were recomputed at --alpha). A
sequential run certified at R measures no clean accuracy (it only tests p_A > Phi(R/sigma)):
its clean_accuracy is empty and its R is among the default radii. Markdown and LaTeX pivot
it into one row per input for people: the clean accuracy once per row, then plain certified accuracy per
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

from pipeline.command_settings import DEFAULT_RADII  # declared with reduce's settings
from pipeline.reduce.certificates import (
    Certificates,
    average_certified_radius,
    certified_accuracy,
    clean_accuracy,
    common_norm,
)

# The first five columns are the original CSV format; the later ones were added after them
# so that scripts reading by position keep working.
CSV_COLUMNS = [
    "run", "sigma", "radius", "certified_accuracy", "clean_accuracy", "n", "alpha", "max_radius", "capped",
    "run_alpha",
]
# at_radius: a sequential run's R (NaN otherwise); at_radius_accuracy: its certified accuracy there.
TABLE_COLUMNS = CSV_COLUMNS + ["acr", "images", "input", "winner", "samples_per_image", "at_radius",
                               "at_radius_accuracy"]
# Added to the CSV (last) only when some input is a sequential run, whose samples vary by image.
SAMPLES_COLUMN = "samples_per_image"
ENVELOPE = "envelope"
FORMATS = ("markdown", "csv", "latex")
CAPPED = "—"  # a cell above its input's largest certifiable radius
CELLS_NOTE = (
    "Cells: certified accuracy (%) at {norm} radius r; clean: accuracy of the smoothed classifier (r = 0: "
    "correct, not abstained); ACR: average certified radius."
)
L1_NOTE = ("ℓ1 radii: uniform / Laplace noise (--noise), σ = E|δ_i| (uniform on [−2σ, 2σ], Laplace of "
           "scale σ); not comparable with ℓ2 radii.")
ENVELOPE_NOTE = (
    "envelope: per radius the best input (ties to the higher clean accuracy); its cells read "
    "(clean accuracy of that input) certified accuracy, as in the papers' tables."
)
BOUNDS = "fixed n: σ·Φ⁻¹(α^(1/n)); sequential: the confidence sequence's ceiling at n_max"
L1_BOUNDS = "fixed n: the noise's radius of α^(1/n); sequential: of the confidence sequence's ceiling at n_max"
CAPPED_NOTE = "{capped}: above that input's largest certifiable radius ({bounds}): capped by n."
AT_RADIUS = "certified at R"  # the first column's header when every input is a sequential run at R
AT_RADIUS_NOTE = (
    "certified at R: a sequential run certified at R measures no clean accuracy (it tests only "
    "p_A > {threshold}); the column holds its certified accuracy at its own R."
)
NO_CLEAN_NOTE = (
    "clean: empty for a sequential run certified at R, which measures no clean accuracy (it tests only "
    "p_A > {threshold}); see its r = R column."
)
# The p_A a radius R needs under each noise (`pipeline.sampling.noise`, `needed_p`), as the notes write it.
THRESHOLDS = {"gaussian": "Φ(R/σ)", "uniform": "½ + R/(4σ)", "laplace": "1 − ½·exp(−R/σ)"}


def threshold_text(noises: Iterable[str]) -> str:
    """The threshold of the table's noises (one, or each named when they differ)."""
    names = sorted(set(noises)) or ["gaussian"]
    if len(names) == 1:
        return THRESHOLDS[names[0]]
    return " / ".join(f"{THRESHOLDS[n]} ({n})" for n in names)
RECOMPUTED_NOTE = (
    "α: an α with (run …) was given by --alpha: the certificates are recomputed at it, not at the α the run "
    "decided with; a sequential run's recomputation only has the chunks the run drew."
)


def default_radii(inputs: Sequence[Certificates]) -> list[float]:
    """DEFAULT_RADII and the R of every sequential run certified at R (its own column)."""
    own = [c.at_radius for c in inputs if c.at_radius is not None]
    return sorted({*DEFAULT_RADII, *own})


def accuracy_table(
    inputs: Sequence[Certificates], radii: Iterable[float] | None = None, envelope: bool = False
) -> pd.DataFrame:
    """One row per (input, radius): certified and clean accuracy (fractions), the input's
    n, alpha (and the run's own) and largest certifiable radius, whether the radius is
    above it, ACR, image count; `input` is the input's position (-1 for the envelope),
    `winner` the name of the input an envelope row comes from. `radii` default to
    `default_radii(inputs)`."""
    norm = common_norm(inputs)  # ℓ1 and ℓ2 inputs in one table are refused
    radii = [float(r) for r in (default_radii(inputs) if radii is None else radii)]
    rows = []
    for position, certs in enumerate(inputs):
        acr, limit = average_certified_radius(certs), certs.max_radius
        at_radius = _float(certs.at_radius)
        # A run at R tested only p_A > Phi(R/sigma): its accuracy at r = 0 is certified-at-R, not clean.
        clean = clean_accuracy(certs) if math.isnan(at_radius) else math.nan
        at_radius_accuracy = (math.nan if math.isnan(at_radius)
                              else float(certified_accuracy(certs, [at_radius]).iloc[0]))
        samples = float(certs["samples"].mean()) if "samples" in certs and len(certs) else math.nan
        run_alpha = certs.alpha if certs.run_alpha is None else certs.run_alpha
        for radius, accuracy in certified_accuracy(certs, radii).items():
            rows.append(
                {
                    "run": certs.name, "sigma": _float(certs.sigma), "radius": radius,
                    "certified_accuracy": accuracy, "clean_accuracy": clean,
                    "n": _float(certs.n), "alpha": _float(certs.alpha), "max_radius": _float(limit),
                    "capped": limit is not None and radius > limit, "run_alpha": _float(run_alpha),
                    "acr": acr, "images": len(certs), "input": position, "winner": None,
                    SAMPLES_COLUMN: samples, "at_radius": at_radius, "at_radius_accuracy": at_radius_accuracy,
                }
            )
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    if envelope and len(table):
        table = pd.concat([table, envelope_rows(table, radii)], ignore_index=True)
    # Unlabelled data scored against the classifier's own clean predictions: the table says so.
    table.attrs["norm"] = norm
    table.attrs["noises"] = sorted({getattr(c, "noise", None) or "gaussian" for c in inputs})
    table.attrs["label_notes"] = [
        f"{certs.name}: no labels in the data; the label of each image is {certs.labels_from}, so "
        "'accuracy' is agreement with it" for certs in inputs if getattr(certs, "labels_from", None)]
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
            key=lambda row: (row.certified_accuracy, _or_lowest(row.clean_accuracy), -row.input),
        )
        rows.append(
            {
                "run": ENVELOPE, "sigma": best.sigma, "radius": radius,
                "certified_accuracy": best.certified_accuracy, "clean_accuracy": best.clean_accuracy,
                "n": best.n, "alpha": best.alpha, "max_radius": limit, "capped": bool(candidates["capped"].all()),
                "run_alpha": best.run_alpha, "acr": math.nan, "images": best.images, "input": -1,
                "winner": best.run, SAMPLES_COLUMN: math.nan, "at_radius": math.nan, "at_radius_accuracy": math.nan,
            }
        )
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def _or_lowest(value: float) -> float:
    """A tie-break key: an unknown (NaN) clean accuracy ranks below every known one."""
    return -math.inf if pd.isna(value) else float(value)


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
    """The papers' cell: clean accuracy in parentheses, then certified accuracy, in percent
    (no parentheses when the winner measured no clean accuracy: a sequential run at R)."""
    if pd.isna(clean):
        return percent(certified)
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
    with_alpha: bool = False  # the inputs' alphas differ, or --alpha overrode a run's own
    clean_header: str = "clean"
    norm: str = "ℓ2"  # of every radius in the table (`common_norm`)

    def radius_header(self, radius: float) -> str:
        """"r = 0.5" for ℓ2 radii (the papers' tables), "ℓ1 r = 0.5" for ℓ1 ones."""
        return f"r = {radius:g}" if self.norm == "ℓ2" else f"{self.norm} r = {radius:g}"


def _wide(table: pd.DataFrame) -> Wide:
    """Pivot the long frame: radius 0 is the clean column; radii capped for every input are
    dropped (with a note), cells capped for their own input read CAPPED."""
    radii = list(dict.fromkeys(table["radius"].tolist()))
    inputs = table[table["input"] >= 0]
    capped_everywhere = {r for r in radii if len(inputs) and inputs.loc[inputs["radius"] == r, "capped"].all()}
    shown = [r for r in radii if r != 0.0 and r not in capped_everywhere]
    firsts = inputs.drop_duplicates("input")
    at_r = firsts["at_radius"].notna() if "at_radius" in firsts else pd.Series(False, index=firsts.index)
    all_at_r = bool(len(firsts)) and bool(at_r.all())  # the first column is then "certified at R"
    run_alpha = firsts["run_alpha"].fillna(firsts["alpha"]) if "run_alpha" in firsts else firsts["alpha"]
    recomputed = bool(((firsts["alpha"] != run_alpha) & run_alpha.notna() & firsts["alpha"].notna()).any())
    with_alpha = recomputed or firsts["alpha"].nunique() > 1
    rows = []
    for position in dict.fromkeys(table["input"].tolist()):
        group = table[table["input"] == position].set_index("radius")
        first = group.iloc[0]
        envelope = position < 0
        if envelope:
            clean = math.nan if all_at_r else inputs["clean_accuracy"].max()
            cells = [paper_cell(group.at[r, "certified_accuracy"], group.at[r, "clean_accuracy"])
                     if r in group.index else "" for r in shown]
        else:
            clean = first["at_radius_accuracy"] if all_at_r else first["clean_accuracy"]
            cells = [("" if r not in group.index else CAPPED if group.at[r, "capped"]
                      else percent(group.at[r, "certified_accuracy"])) for r in shown]
        rows.append(
            {
                "run": first["run"],
                "envelope": envelope,
                "sigma": "" if envelope or pd.isna(first["sigma"]) else f"{first['sigma']:g}",
                "n": "" if envelope or pd.isna(first["n"]) else f"{int(first['n'])}",
                "alpha": "" if envelope else _alpha_cell(first["alpha"], first.get("run_alpha")),
                "clean": "" if pd.isna(clean) else percent(clean),
                "cells": cells,
                "acr": "" if pd.isna(first["acr"]) else f"{first['acr']:.3f}",
                "samples": "" if pd.isna(first.get(SAMPLES_COLUMN)) else f"{first[SAMPLES_COLUMN]:,.0f}",
            }
        )
    norm = table.attrs.get("norm", "ℓ2")
    bounds = BOUNDS if norm == "ℓ2" else L1_BOUNDS
    notes = [CELLS_NOTE.format(norm=norm), *([L1_NOTE] if norm == "ℓ1" else []), *table.attrs.get("label_notes", [])]
    threshold = threshold_text(table.attrs.get("noises", ["gaussian"]))
    if all_at_r:
        notes.append(AT_RADIUS_NOTE.format(threshold=threshold))
    elif at_r.any():
        notes.append(NO_CLEAN_NOTE.format(threshold=threshold))
    if recomputed:
        notes.append(RECOMPUTED_NOTE)
    if (table["input"] < 0).any():
        notes.append(ENVELOPE_NOTE)
    dropped = [r for r in radii if r in capped_everywhere]
    if dropped:
        limits = inputs.drop_duplicates("input")["max_radius"]
        where = (f"{limits.max():.3g} for every input" if limits.nunique() == 1
                 else f"at most {limits.max():.3g} over the inputs")
        notes.append(
            f"Not shown: r = {', '.join(f'{r:g}' for r in dropped)}, above the largest radius any input can "
            f"certify ({where}; {bounds}): capped by n; raise n to certify larger radii."
        )
    if any(cell == CAPPED for row in rows for cell in row["cells"]):
        notes.append(CAPPED_NOTE.format(capped=CAPPED, bounds=bounds))
    with_samples = _has_samples(inputs)
    if with_samples:
        notes.append("samples/image: mean samples a sequential run drew per image before deciding it "
                     "(its n is the cap n_max).")
    return Wide(shown, rows, with_n=bool(inputs["n"].notna().any()), notes=notes, with_samples=with_samples,
                with_alpha=with_alpha, clean_header=AT_RADIUS if all_at_r else "clean", norm=norm)


def _alpha_cell(alpha: float, run_alpha: float | None) -> str:
    """The alpha of a row; "(run …)" after it when --alpha replaced the run's own."""
    if pd.isna(alpha):
        return ""
    if run_alpha is not None and not pd.isna(run_alpha) and run_alpha != alpha:
        return f"{alpha:g} (run {run_alpha:g})"
    return f"{alpha:g}"


def _columns(wide: Wide) -> list[str]:
    return (["input", "sigma"] + (["n"] if wide.with_n else []) + (["α"] if wide.with_alpha else [])
            + (["samples/image"] if wide.with_samples else []) + [wide.clean_header])


def _row_cells(wide: Wide, row: dict) -> list[str]:
    return ([row["run"], row["sigma"]] + ([row["n"]] if wide.with_n else [])
            + ([row["alpha"]] if wide.with_alpha else [])
            + ([row["samples"]] if wide.with_samples else []) + [row["clean"], *row["cells"], row["acr"]])


def _markdown(wide: Wide) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    head = _columns(wide)
    out = [
        line(head + [wide.radius_header(r) for r in wide.radii] + ["ACR"]),
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


def _latex_radius(norm: str, radius: float) -> str:
    return f"$r={radius:g}$" if norm == "ℓ2" else f"$\\ell_1\\ r={radius:g}$"


def _latex(wide: Wide) -> str:
    head = _columns(wide)
    spec = "l" + "r" * (len(head) - 1 + len(wide.radii) + 1)
    names = {"input": "Input", "sigma": "$\\sigma$", "n": "$n$", "α": "$\\alpha$", "samples/image": "samples/image",
             "clean": "clean", AT_RADIUS: "certified at $R$"}
    out = [f"% {note}" for note in wide.notes] + [
        f"\\begin{{tabular}}{{{spec}}}",
        "\\hline",
        " & ".join([names[c] for c in head] + [_latex_radius(wide.norm, r) for r in wide.radii] + ["ACR"]) + " \\\\",
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

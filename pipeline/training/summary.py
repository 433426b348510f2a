"""The end-of-sweep table: one row per run, printed and written as CSV and Markdown."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# (key, header, format) in display order.
COLUMNS: list[tuple[str, str, str]] = [
    ("sigma", "sigma", "{:g}"),
    ("objective", "objective", "{}"),
    ("surrogates", "surrogates", "{}"),
    ("arch", "arch", "{}"),
    ("epochs_done", "epochs", "{}"),
    ("noisy_mse", "noisy MSE", "{:.5f}"),
    ("test_mse", "test MSE", "{:.5f}"),
    ("test_psnr", "PSNR dB", "{:.2f}"),
    ("acc_clean", "clean acc", "{:.1%}"),
    ("acc_noisy_before", "noisy acc before", "{:.1%}"),
    ("acc_noisy_after", "noisy acc after", "{:.1%}"),
    ("wall_s", "wall s", "{:.0f}"),
    ("status", "status", "{}"),
    ("checkpoint", "checkpoint", "{}"),
]


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def table_rows(rows: Sequence[dict[str, Any]]) -> list[list[str]]:
    out = []
    for row in rows:
        row = dict(row)
        row.setdefault("epochs_done", f"{row.get('epoch', 0)}/{row.get('epochs', '?')}")
        out.append([_cell(row.get(key), fmt) for key, _, fmt in COLUMNS])
    return out


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A fixed-width text table (a Markdown table too: cells are separated by '|')."""
    headers = [header for _, header, _ in COLUMNS]
    body = table_rows(rows)
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)]) + "\n"


def write_summary(rows: Sequence[dict[str, Any]], output_dir: str | Path) -> tuple[Path, Path]:
    """summary.csv (raw numbers) and summary.md (the printed table) in output_dir."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    csv_path = output_dir / "summary.csv"
    csv_path.write_text(buffer.getvalue())
    md_path = output_dir / "summary.md"
    md_path.write_text(format_table(rows))
    return csv_path, md_path

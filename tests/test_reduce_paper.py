"""`dsmooth reduce --envelope` on the authors' own logs reproduces the paper's Table 2.

The published table is parsed from the paper's text in ../shared/docs, so nothing here is
typed in by hand: the numbers come from the paper, the logs and our reducer.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import pytest

from jobs.cli import main as dsmooth

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
LOGS = SHARED / "data" / "reference-logs" / "salman2020" / "cifar10"
PAPER = SHARED / "docs" / "denoised-smoothing-paper.txt"
RADII = ["0.25", "0.5", "0.75", "1.0", "1.25", "1.5"]

pytestmark = pytest.mark.skipif(not (LOGS.is_dir() and PAPER.is_file()), reason="../shared data not present")


def published_cifar10_row(row_name: str) -> list[tuple[int, int]]:
    """(clean, certified) percent pairs of one row of the paper's Table 2 (CIFAR-10)."""
    text = PAPER.read_text()
    table = text[text.index("Table 2:") :]
    line = next(line for line in table.splitlines() if line.startswith(row_name))
    return [(int(clean), int(certified)) for clean, certified in re.findall(r"\((\d+)\)\s*(\d+)", line)]


def envelope(inputs: list[Path], capsys) -> list[tuple[float, float]]:
    capsys.readouterr()
    status = dsmooth(["reduce", *map(str, inputs), "--envelope", "--format", "csv", "--radii", *RADII])
    assert status == 0
    rows = [r for r in csv.DictReader(io.StringIO(capsys.readouterr().out)) if r["run"] == "envelope"]
    assert [float(r["radius"]) for r in rows] == [float(r) for r in RADII]
    return [(100 * float(r["clean_accuracy"]), 100 * float(r["certified_accuracy"])) for r in rows]


def assert_matches_paper(ours: list[tuple[float, float]], paper: list[tuple[int, int]]) -> None:
    assert len(ours) == len(paper) == len(RADII)
    for (clean, certified), (paper_clean, paper_certified) in zip(ours, paper):
        assert round(clean) == paper_clean and round(certified) == paper_certified, (ours, paper)


def test_no_denoiser_baseline_row(capsys):
    inputs = [LOGS / "no_denoiser" / "MODEL_resnet110_90epochs" / "noise_0.00" / "test_N10000"]
    assert_matches_paper(envelope(inputs, capsys), published_cifar10_row("NO DENOISER (BASELINE)"))


def test_white_box_row_is_the_stab_envelope(capsys):
    inputs = sorted(
        p for p in (LOGS / "stab_obj").iterdir() if "resnet110_90epochs_dncnn" in p.name or "resnet110_90epochs_memnet" in p.name
    )
    assert len(inputs) >= 3
    assert_matches_paper(envelope(inputs, capsys), published_cifar10_row("OURS (WHITE-BOX)"))

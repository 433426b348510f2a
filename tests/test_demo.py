"""`dsmooth demo` at tiny size: real Ray, the shipped models and sample, the paper's direction."""

from __future__ import annotations

import csv
import json

import pytest

from jobs.cli import main as dsmooth
from jobs.demo import MODELS, SAMPLE, SETTINGS


def test_shipped_models_and_sample_are_small_and_documented():
    images = list(SAMPLE.rglob("*.jpg"))
    assert len(images) == 500 and sum(p.stat().st_size for p in images) < 3 * 2**20
    for name in ["classifier", "surrogate"] + [s.denoiser[:-3] for s in SETTINGS if s.denoiser]:
        model = MODELS / f"{name}.pt"
        assert model.stat().st_size < 5 * 2**20
        assert (MODELS / f"{name}.yaml").is_file()  # the training config beside it
        metrics = json.loads((MODELS / f"{name}.metrics.json").read_text())
        assert metrics  # the figures (clean accuracy, test MSE) beside it


@pytest.fixture(scope="module")
def demo_table(tmp_path_factory):
    import ray

    output = tmp_path_factory.mktemp("demo")
    try:
        status = dsmooth(["demo", "--images", "30", "--n0", "10", "--n", "100", "--output", str(output)])
    finally:
        ray.shutdown()
    assert status == 0
    with open(output / "table.csv") as handle:
        rows = list(csv.DictReader(handle))
    return output, rows


def test_demo_writes_table_plot_and_grid(demo_table):
    output, rows = demo_table
    assert [r["run"] for r in rows[::4]] == [s.label for s in SETTINGS]
    assert [float(r["radius"]) for r in rows[:4]] == [0.0, 0.25, 0.5, 0.75]
    assert len(rows) == 4 * len(SETTINGS)
    for name in ("certified_accuracy.png", "denoising.png"):
        assert (output / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for setting in SETTINGS:
        assert list((output / setting.slug / "votes").glob("part-*.parquet"))


def test_denoisers_beat_the_no_denoiser_baseline(demo_table):
    _, rows = demo_table
    at = {(r["run"], float(r["radius"])): float(r["certified_accuracy"]) for r in rows}
    baseline = SETTINGS[0].label
    for setting in SETTINGS[1:]:
        assert at[(setting.label, 0.25)] > at[(baseline, 0.25)], rows
        assert at[(setting.label, 0.0)] > at[(baseline, 0.0)], rows

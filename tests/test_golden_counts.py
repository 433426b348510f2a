"""Golden vote counts: a fixed-n and a sequential `certify` run on 6 CIFAR-10 test images with
the shipped pair give exactly the per-image counts pinned below (recorded before the drivers
were merged into one `CertifyRun`). Any change to sampling, seeding, scheduling or the
driver that moves a single vote fails here.

Real Ray (one local instance), real Parquet; the counts are read back from the run's votes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cifar_support import extract_two_per_class
from pipeline.certify.plan import CertifyConfig
from pipeline.reduce import load_run
from pipeline.runs.storage import read_votes
from pipeline.stats.smoothing import ABSTAIN

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "pipeline" / "assets" / "models" / "cifar10"
IDS = [0, 6, 11, 14, 16, 18]

# image_id -> {phase: counts}, fixed n0 = 20, n = 100, seed 5
FIXED: dict[int, dict[str, list[int]]] = {
    0: {"estimation": [30, 1, 0, 4, 2, 0, 0, 0, 7, 56], "selection": [3, 0, 1, 0, 0, 0, 0, 0, 3, 13]},
    6: {"estimation": [0, 0, 0, 95, 1, 2, 2, 0, 0, 0], "selection": [0, 0, 0, 18, 1, 0, 1, 0, 0, 0]},
    11: {"estimation": [0, 0, 0, 48, 0, 52, 0, 0, 0, 0], "selection": [0, 0, 0, 8, 0, 12, 0, 0, 0, 0]},
    14: {"estimation": [0, 0, 0, 0, 0, 0, 0, 100, 0, 0], "selection": [0, 0, 0, 0, 0, 0, 0, 20, 0, 0]},
    16: {"estimation": [33, 15, 0, 0, 0, 0, 0, 0, 47, 5], "selection": [8, 2, 0, 0, 0, 0, 0, 0, 10, 0]},
    18: {"estimation": [0, 0, 0, 0, 0, 0, 0, 0, 2, 98], "selection": [0, 0, 0, 0, 0, 0, 0, 0, 0, 20]},
}
# image_id -> (status, estimation samples, estimation votes for the target), R = 0.25, chunks of 32
SEQUENTIAL: dict[int, tuple[int, int, int]] = {
    0: (2, 32, 9), 6: (1, 288, 268), 11: (2, 32, 18), 14: (1, 64, 64), 16: (2, 32, 18), 18: (1, 96, 94),
}
# image_id -> the counts of each chunk the decision rests on (chunks drawn after it may vary)
CHUNKS: dict[int, list[list[int]]] = {
    0: [[9, 0, 0, 0, 2, 0, 0, 0, 2, 19]],
    6: [[0, 0, 0, 30, 1, 1, 0, 0, 0, 0], [0, 0, 0, 31, 0, 0, 1, 0, 0, 0], [0, 0, 0, 30, 0, 1, 1, 0, 0, 0],
        [0, 0, 0, 28, 1, 3, 0, 0, 0, 0], [0, 0, 0, 29, 0, 3, 0, 0, 0, 0], [0, 0, 0, 30, 0, 1, 1, 0, 0, 0],
        [0, 0, 1, 29, 1, 1, 0, 0, 0, 0], [0, 0, 1, 30, 0, 0, 1, 0, 0, 0], [0, 0, 0, 31, 0, 1, 0, 0, 0, 0]],
    11: [[0, 0, 0, 14, 0, 18, 0, 0, 0, 0]],
    14: [[0, 0, 0, 0, 0, 0, 0, 32, 0, 0], [0, 0, 0, 0, 0, 0, 0, 32, 0, 0]],
    16: [[8, 6, 0, 0, 0, 0, 0, 0, 18, 0]],
    18: [[0, 0, 0, 0, 0, 0, 0, 0, 0, 32], [0, 0, 0, 0, 0, 0, 0, 0, 2, 30], [0, 0, 0, 0, 0, 0, 0, 0, 0, 32]],
}


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    return extract_two_per_class(tmp_path_factory.mktemp("cifar"))


@pytest.fixture(params=[pytest.param("ray", marks=pytest.mark.slow), "in-process"])
def where(request):
    """Where the votes are counted: the pool of Ray actors (slow tier) or this process (fast
    tier, `in_process=True`). Both must give exactly the pinned counts."""
    if request.param == "ray":
        request.getfixturevalue("ray_local")
    return request.param


def _settings(cifar_root: Path, output: Path, **overrides) -> dict:
    values = {
        "dataset": "cifar10", "data_root": str(cifar_root), "ids": IDS, "classifier": str(MODELS / "classifier.pt"),
        "denoiser": str(MODELS / "denoiser_mse_s0.25.pt"), "sigma": 0.25, "n0": 20, "n": 100, "seed": 5,
        "batch_size": 50, "chunk_size": 32, "actors": 1, "shard_size": 2, "output": str(output),
    }
    values.update(overrides)
    return values


def _certify(where: str, **values):
    from jobs.certify import certify

    return certify(CertifyConfig(**values), in_process=where == "in-process")


def test_fixed_n_counts_are_pinned(where, cifar_root, tmp_path):
    """Fixed n: the per-image counts of the shipped pair on 6 CIFAR-10 images are exactly the pinned ones,
    counted on Ray and in this process."""
    outcome = _certify(where, **_settings(cifar_root, tmp_path / "fixed"))
    votes = read_votes(tmp_path / "fixed")
    got: dict[int, dict[str, list[int]]] = {}
    for row in votes.itertuples():
        got.setdefault(int(row.image_id), {})[row.phase] = [int(c) for c in row.counts]
    assert got == FIXED
    # The summary counts work as "finished" and certificates as "certified" (issue 21, item 4).
    certificates = load_run(tmp_path / "fixed", 0.001)
    abstained = int((certificates["predict"] == ABSTAIN).sum())
    right = int((certificates["correct"] & ~certificates["abstained"]).sum())  # one meaning of "certified"
    report = outcome.report()
    assert "(6 finished now" in report and "certified now" not in report
    assert (f"outcome: {right} of 6 images certified (the correct class), {abstained} abstained, "
            f"{6 - abstained - right} certified another class") in report
    assert 0 < abstained < 6, "the pinned run should have both kinds"


def test_sequential_counts_are_pinned(where, cifar_root, tmp_path):
    """Sequential: decisions, sample counts and the chunk votes they rest on are exactly the pinned ones,
    counted on Ray and in this process."""
    outcome = _certify(where, **_settings(cifar_root, tmp_path / "seq", n=600, sequential=True, radius=0.25))
    d = outcome.decisions
    got = {image_id: (int(d.status[row]), int(d.estimation_samples[row]), int(d.estimation_votes[row]))
           for row, image_id in enumerate(IDS)}
    votes = read_votes(tmp_path / "seq")
    chunks = {image_id: [[int(c) for c in r.counts] for r in votes[votes["image_id"] == image_id]
                         .sort_values("chunk").itertuples()][: got[image_id][1] // 32] for image_id in IDS}
    assert got == SEQUENTIAL
    certified = int(d.certified.sum())
    assert f"{certified} of 6 images certified at R = 0.25, {6 - certified} not certified" in outcome.report()
    assert chunks == CHUNKS
    assert np.all(d.status != 0)

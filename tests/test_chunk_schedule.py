"""The growing first chunks and the geometric futility rule of sequential model runs: noise
addresses, identity, and resume of runs recorded before them (they keep their identity, noise
and decisions)."""

from __future__ import annotations

import numpy as np

from jobs.certify import _keep_recorded_schedule
from pipeline.certify.plan import CertifyConfig
from pipeline.config import parse_config
from pipeline.runs.identity import sequential_identity
from pipeline.runs.storage import open_run
from pipeline.sampling.noise import growing_schedule
from noise_support import chunk_of
from pipeline.sampling.noise import SampleRequest

BASE = {"dataset": "cifar10", "classifier": "c", "sigma": 0.25, "data_root": "x", "sequential": True,
        "radius": 0.25}


def test_first_chunks_cut_the_phase_without_gap_or_overlap():
    request = SampleRequest(1, 2, "estimation", 1000, 256, first_chunks=(32, 32, 64, 128))
    sizes = [c.size for c in request.chunks()]
    assert sizes == [32, 32, 64, 128, 256, 256, 232] and request.num_samples == 1000
    starts = np.cumsum([0, *sizes[:-1]])
    for index, start in enumerate(starts):  # chunk_of agrees with the cut
        assert chunk_of(request, int(start))[0].index == index and chunk_of(request, int(start))[1] == 0
    short = SampleRequest(1, 2, "estimation", 50, 256, first_chunks=(32, 32, 64, 128))
    assert [c.size for c in short.chunks()] == [32, 18]
    # No first chunks: exactly the fixed cut of every run made before them.
    assert [c.size for c in SampleRequest(1, 2, "estimation", 600, 256).chunks()] == [256, 256, 88]


def test_growing_is_the_default_and_in_the_identity_fixed_is_not(tmp_path):
    config = parse_config(CertifyConfig, {**BASE, "output": str(tmp_path / "new")})
    assert config.first_chunks == list(growing_schedule(256)) == [32, 32, 64, 128]
    assert sequential_identity(config)["sequential"]["first_chunks"] == (32, 32, 64, 128)
    fixed = parse_config(CertifyConfig, {**BASE, "output": "o", "first_chunks": []})
    assert "first_chunks" not in sequential_identity(fixed)["sequential"]
    # chunk_size 32 or less has nothing to grow: the golden sequential run keeps its cut.
    assert parse_config(CertifyConfig, {**BASE, "output": "o", "chunk_size": 32}).first_chunks == []


def test_a_run_recorded_with_fixed_chunks_resumes_with_them(tmp_path):
    old = parse_config(CertifyConfig, {**BASE, "output": str(tmp_path), "first_chunks": [], "futility": "mixture"})
    open_run(str(tmp_path), {"job": "certify", **sequential_identity(old)})  # as recorded before the schedule
    again = parse_config(CertifyConfig, {**BASE, "output": str(tmp_path)})
    assert again.first_chunks == [32, 32, 64, 128] and again.futility == "geometric"
    resumed = _keep_recorded_schedule(again)
    assert resumed.first_chunks == [] and resumed.futility == "mixture"
    assert sequential_identity(resumed) == sequential_identity(old)
    assert again.first_chunks == [32, 32, 64, 128]  # a copy: the caller's config is left as it was
    # ... unless the user asks for first chunks: then the identity differs and the resume is refused.
    told = parse_config(CertifyConfig, {**BASE, "output": str(tmp_path), "first_chunks": [64]})
    assert _keep_recorded_schedule(told).first_chunks == [64]


def test_geometric_futility_is_the_default_and_in_the_identity_mixture_is_not():
    config = parse_config(CertifyConfig, {**BASE, "output": "o"})
    assert config.futility == "geometric"
    assert sequential_identity(config)["sequential"]["futility"] == "geometric"
    mixture = parse_config(CertifyConfig, {**BASE, "output": "o", "futility": "mixture"})
    assert "futility" not in sequential_identity(mixture)["sequential"]


def test_a_run_with_growing_chunks_but_mixture_futility_resumes_with_mixture(tmp_path):
    """Runs made between the two changes (growing chunks recorded, no futility key)."""
    old = parse_config(CertifyConfig, {**BASE, "output": str(tmp_path), "futility": "mixture"})
    open_run(str(tmp_path), {"job": "certify", **sequential_identity(old)})
    resumed = _keep_recorded_schedule(parse_config(CertifyConfig, {**BASE, "output": str(tmp_path)}))
    assert resumed.first_chunks == [32, 32, 64, 128] and resumed.futility == "mixture"
    assert sequential_identity(resumed) == sequential_identity(old)

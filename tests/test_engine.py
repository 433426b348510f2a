"""Noise addressing and the batched vote engine: determinism whatever the batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.engine import SmoothedClassifier, VoteCounter, VoteRequest
from pipeline.noise import Chunk, chunk_noise, chunk_seed, plan_chunks
from pipeline.smoothing import ABSTAIN


def tiny_classifier(num_classes: int = 4) -> nn.Module:
    """Conv features + linear head, scaled so that noise of sigma 0.5 really splits the votes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 8 * 8, num_classes))
    with torch.no_grad():
        model[2].weight.mul_(4.0)
    return model


@pytest.fixture(scope="module")
def images() -> dict[int, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {image_id: torch.rand(3, 8, 8, generator=generator) for image_id in (3, 17, 40, 41, 99)}


def test_chunks_cover_all_samples():
    chunks = plan_chunks(7, "estimation", 1000, 256)
    assert [c.size for c in chunks] == [256, 256, 256, 232]
    assert [c.index for c in chunks] == [0, 1, 2, 3]
    assert plan_chunks(7, "selection", 0, 256) == []
    with pytest.raises(ValueError, match="phase"):
        chunk_seed(0, 1, "warmup", 0)


def test_noise_is_addressed_reproducible_and_gaussian():
    chunk = Chunk(5, "estimation", 2, 4000)
    a = chunk_noise(chunk, (3, 4, 4), 0.5, seed=11)
    b = chunk_noise(chunk, (3, 4, 4), 0.5, seed=11)
    assert torch.equal(a, b)
    assert a.shape == (4000, 3, 4, 4)
    assert abs(a.mean().item()) < 0.01 and a.std().item() == pytest.approx(0.5, rel=0.02)
    # Every coordinate of the address changes the noise (selection vs estimation independent).
    for other in (Chunk(5, "selection", 2, 4000), Chunk(6, "estimation", 2, 4000), Chunk(5, "estimation", 3, 4000)):
        c = chunk_noise(other, (3, 4, 4), 0.5, seed=11)
        assert abs(np.corrcoef(a.flatten().numpy(), c.flatten().numpy())[0, 1]) < 0.01
    assert not torch.equal(a, chunk_noise(chunk, (3, 4, 4), 0.5, seed=12))


def test_counts_do_not_depend_on_batch_size_or_grouping(images):
    model = tiny_classifier()
    requests = [VoteRequest(i, phase, n) for i in images for phase, n in (("selection", 37), ("estimation", 600))]
    reference = VoteCounter(model, 4, 0.5, seed=5, batch_size=1000, chunk_size=64).count(images, requests)
    assert reference.shape == (len(requests), 4)
    assert (reference.sum(axis=1) == [r.num_samples for r in requests]).all()
    assert (reference > 0).sum() >= 2 * len(requests)  # noise really splits votes: not a constant model
    for batch_size in (1, 7, 64, 333):
        counter = VoteCounter(model, 4, 0.5, seed=5, batch_size=batch_size, chunk_size=64)
        np.testing.assert_array_equal(counter.count(images, requests), reference)
    # One image per call (as separate workers would) gives the same counts.
    counter = VoteCounter(model, 4, 0.5, seed=5, batch_size=50, chunk_size=64)
    one_by_one = np.concatenate([counter.count(images, [r]) for r in requests])
    np.testing.assert_array_equal(one_by_one, reference)
    # A different seed gives different noise, hence different counts.
    other = VoteCounter(model, 4, 0.5, seed=6, batch_size=1000, chunk_size=64).count(images, requests)
    assert not np.array_equal(other, reference)


def test_a_batch_mixes_images():
    """Samples of different images share a forward pass (no short batch per image)."""
    seen: list[int] = []

    class Recorder(nn.Module):
        def forward(self, x):
            seen.append(x.shape[0])
            return torch.zeros(x.shape[0], 2)

    images = {i: torch.zeros(3, 2, 2) for i in range(5)}
    VoteCounter(Recorder(), 2, 0.1, batch_size=100).count(images, [VoteRequest(i, "estimation", 30) for i in range(5)])
    assert seen == [100, 50]


def test_smoothed_classifier_certifies_a_confident_model_and_abstains_on_noise():
    class Threshold(nn.Module):
        """Class 1 when the mean pixel is above 0.5: robust for images far from the boundary."""

        def forward(self, x):
            score = x.mean(dim=(1, 2, 3)) - 0.5
            return torch.stack([-score, score], dim=1)

    counter = VoteCounter(Threshold(), 2, 0.25, batch_size=500)
    smoothed = SmoothedClassifier(counter)
    cls, radius = smoothed.certify(0, torch.full((3, 4, 4), 0.9), n0=100, n=2000, alpha=0.001)
    assert cls == 1 and radius > 0.5
    cls, radius = smoothed.certify(1, torch.full((3, 4, 4), 0.5), n0=100, n=2000, alpha=0.001)
    assert (cls, radius) == (ABSTAIN, 0.0)
    assert smoothed.predict(2, torch.full((3, 4, 4), 0.1), n=200, alpha=0.001) == 0
    with pytest.raises(ValueError, match="n0"):
        smoothed.certify(0, torch.zeros(3, 4, 4), n0=200, n=100, alpha=0.001)


def test_engine_rejects_bad_input(images):
    counter = VoteCounter(tiny_classifier(), 4, 0.5)
    with pytest.raises(KeyError, match="1234"):
        counter.count(images, [VoteRequest(1234, "selection", 3)])
    with pytest.raises(ValueError, match="shape"):
        counter.count({1: torch.zeros(3, 8, 8), 2: torch.zeros(3, 4, 4)}, [VoteRequest(1, "selection", 2), VoteRequest(2, "selection", 2)])
    with pytest.raises(ValueError, match="sigma"):
        VoteCounter(tiny_classifier(), 4, 0.0)

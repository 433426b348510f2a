"""Noise addressing and the batched vote engine: determinism whatever the batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.certify.smooth import SmoothedClassifier
from pipeline.sampling.engine import VoteCounter
from pipeline.sampling.noise import Chunk, SampleRequest, chunk_noise, chunk_seed
from pipeline.stats.smoothing import ABSTAIN, certify_matrix

from noise_support import chunk_of, direct_counts


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


def test_requests_cover_all_samples_in_addressed_chunks():
    request = SampleRequest(3, 7, "estimation", 1000, 256)
    chunks = request.chunks()
    assert [c.size for c in chunks] == [256, 256, 256, 232] and request.num_samples == 1000
    assert [c.index for c in chunks] == [0, 1, 2, 3]
    assert all((c.seed, c.image_id, c.phase) == (3, 7, "estimation") for c in chunks)
    # A chunk range of the same plan: the same addresses and sizes (a sequential draw's slices).
    part = SampleRequest(3, 7, "estimation", 1000, 256, first_chunk=2, stop_chunk=4)
    assert part.chunks() == chunks[2:] and part.num_samples == 488
    assert chunk_of(request, 999) == (chunks[3], 231)
    assert SampleRequest(0, 7, "selection", 0, 256).chunks() == []
    for bad in (dict(phase="warmup"), dict(seed=-1), dict(chunk_size=0), dict(first_chunk=5)):
        with pytest.raises(ValueError):
            SampleRequest(**{"seed": 0, "image_id": 1, "phase": "selection", "total": 10, "chunk_size": 4, **bad})
    with pytest.raises(ValueError, match="phase"):
        chunk_seed(0, 1, "warmup", 0)


def test_noise_is_addressed_reproducible_and_gaussian():
    chunk = Chunk(11, 5, "estimation", 2, 4000)
    a = chunk_noise(chunk, (3, 4, 4), 0.5)
    b = chunk_noise(chunk, (3, 4, 4), 0.5)
    assert torch.equal(a, b)
    assert a.shape == (4000, 3, 4, 4)
    assert abs(a.mean().item()) < 0.01 and a.std().item() == pytest.approx(0.5, rel=0.02)
    # Every coordinate of the address changes the noise (selection vs estimation independent).
    for other in (Chunk(11, 5, "selection", 2, 4000), Chunk(11, 6, "estimation", 2, 4000),
                  Chunk(11, 5, "estimation", 3, 4000), Chunk(12, 5, "estimation", 2, 4000)):
        c = chunk_noise(other, (3, 4, 4), 0.5)
        assert abs(np.corrcoef(a.flatten().numpy(), c.flatten().numpy())[0, 1]) < 0.01


def test_counts_are_a_function_of_the_addresses_alone(images):
    model = tiny_classifier()
    requests = [SampleRequest(5, i, phase, n, 64) for i in images for phase, n in (("selection", 37), ("estimation", 600))]
    reference = VoteCounter(model, 4, 0.5, batch_size=1000).count(images, requests)
    assert reference.shape == (len(requests), 4)
    assert (reference.sum(axis=1) == [r.num_samples for r in requests]).all()
    assert (reference > 0).sum() >= 2 * len(requests)  # noise really splits votes: not a constant model
    for batch_size in (1, 7, 64, 333):
        counter = VoteCounter(model, 4, 0.5, batch_size=batch_size)
        np.testing.assert_array_equal(counter.count(images, requests), reference)
    # One image per call (as separate workers would) gives the same counts.
    counter = VoteCounter(model, 4, 0.5, batch_size=50)
    one_by_one = np.concatenate([counter.count(images, [r]) for r in requests])
    np.testing.assert_array_equal(one_by_one, reference)
    # ... and so does noise computed directly from the address, with seed 5.
    for request, row in list(zip(requests, reference))[:4]:
        direct = direct_counts(model, images[request.image_id], 5, request.image_id, request.phase,
                               request.total, 64, 0.5, 4)
        np.testing.assert_array_equal(row, direct)
    # A different seed in the requests gives different noise, hence different counts.
    other = counter.count(images, [SampleRequest(6, r.image_id, r.phase, r.total, 64) for r in requests])
    assert not np.array_equal(other, reference)


def test_a_batch_mixes_images():
    """Samples of different images share a forward pass (no short batch per image)."""
    seen: list[int] = []

    class Recorder(nn.Module):
        def forward(self, x):
            seen.append(x.shape[0])
            return torch.zeros(x.shape[0], 2)

    images = {i: torch.zeros(3, 2, 2) for i in range(5)}
    VoteCounter(Recorder(), 2, 0.1, batch_size=100).count(images, [SampleRequest(0, i, "estimation", 30) for i in range(5)])
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
        counter.count(images, [SampleRequest(0, 1234, "selection", 3)])
    with pytest.raises(ValueError, match="shape"):
        counter.count({1: torch.zeros(3, 8, 8), 2: torch.zeros(3, 4, 4)},
                      [SampleRequest(0, 1, "selection", 2), SampleRequest(0, 2, "selection", 2)])
    with pytest.raises(ValueError, match="sigma"):
        VoteCounter(tiny_classifier(), 4, 0.0)


class Threshold(nn.Module):
    """Class 1 when the mean pixel is above `cut`: the share of class-1 votes under noise is
    set by how far the image is from the cut."""

    def __init__(self, cut: float = 0.5) -> None:
        super().__init__()
        self.cut = cut

    def forward(self, x):
        score = x.mean(dim=(1, 2, 3)) - self.cut
        return torch.stack([-score, score], dim=1)


def test_engine_certificate_uses_the_selection_class_when_the_draws_disagree():
    """With n0 = 1 the selection draw sometimes names class 0 while the estimation draw is
    mostly class 1: CERTIFY must then bound p_A of the *selected* class 0 and abstain (picking
    c_A from the estimation counts would certify class 1 and void the guarantee)."""
    sigma, n0, n = 0.5, 1, 300
    image = torch.full((3, 4, 4), 0.58)  # P[class 1] ~ 0.8 under noise
    counter = VoteCounter(Threshold(), 2, sigma, batch_size=512)
    smoothed = SmoothedClassifier(counter, seed=0, chunk_size=64)
    disagreeing = []
    for image_id in range(60):
        selection, estimation = counter.count(
            {image_id: image},
            [SampleRequest(0, image_id, "selection", n0, 64), SampleRequest(0, image_id, "estimation", n, 64)])
        if selection.argmax() == 0 and estimation.argmax() == 1:
            disagreeing.append(image_id)
            # The estimation draw alone would certify class 1:
            assert certify_matrix(estimation, estimation, sigma, 0.001).prediction[0] == 1
            assert smoothed.certify(image_id, image, n0, n, 0.001) == (ABSTAIN, 0.0)
    assert disagreeing, "no address with disagreeing draws: the test would prove nothing"

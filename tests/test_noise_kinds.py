"""Noise kinds (`pipeline.sampling.noise`): each radius formula against an independent closed form,
a coverage simulation per noise (a point at the certified radius is not over-certified beyond
alpha), the sigma <-> lambda convention, the Gaussian draw pinned, and the one radius function
used by the fixed-n certificate, the sequential threshold and the reach ceilings.

Ray-free and fast (each simulation draws its 20,000 trials in NumPy/torch in about a second).
"""

from __future__ import annotations

import hashlib
from typing import get_args

import numpy as np
import pytest
import torch
from scipy import stats

from pipeline.config import Noise
from pipeline.sampling.noise import KINDS, NAMES, noise_kind
from pipeline.sampling.noise import Chunk, chunk_noise
from pipeline.stats.reach import check_reach, largest_radius
from pipeline.stats.sequential import SequentialTest
from pipeline.stats.smoothing import certified_radii, certify_matrix, lower_confidence_bounds

SIGMA = 0.25


def one_coordinate_cdf(kind: str, t: np.ndarray, sigma: float) -> np.ndarray:
    """P[delta_1 <= t] for one coordinate of the noise, from SciPy's distributions (written
    here from the convention, not from the module): Gaussian N(0, sigma^2); uniform on
    [-2 sigma, 2 sigma]; Laplace of scale sigma."""
    if kind == "gaussian":
        return stats.norm.cdf(t, scale=sigma)
    if kind == "uniform":
        return stats.uniform.cdf(t, loc=-2 * sigma, scale=4 * sigma)
    return stats.laplace.cdf(t, scale=sigma)


def test_the_declared_names_are_the_defined_kinds():
    assert get_args(get_args(Noise)[0]) == NAMES == tuple(KINDS)
    assert [noise_kind(k).norm for k in NAMES] == ["ℓ2", "ℓ1", "ℓ1"]
    assert noise_kind(None).name == "gaussian"  # checkpoints and runs from before noise kinds
    with pytest.raises(ValueError, match="unknown noise"):
        noise_kind("cauchy")


@pytest.mark.parametrize("kind", NAMES)
def test_radius_is_the_distance_to_the_worst_case_boundary(kind):
    """The worst case for the l1 (uniform, Laplace) and l2 (Gaussian) certificates is a half-space
    f(x) = A iff x_1 <= t (Yang et al. 2020; Cohen et al. 2019): at x = 0, p_A = P[delta_1 <= t]
    and the smoothed classifier, symmetric noise, keeps A exactly while x_1 < t, so the exact
    robust radius is t in either norm. Every radius formula must give back t from p_A."""
    lam = noise_kind(kind).scale(SIGMA)
    top = 3 * SIGMA if kind != "uniform" else 0.999 * lam
    t = np.linspace(1e-3, top, 200)
    p = one_coordinate_cdf(kind, t, SIGMA)
    np.testing.assert_allclose(certified_radii(p, SIGMA, kind), t, rtol=1e-9, atol=1e-12)
    assert np.all(certified_radii(np.array([0.1, 0.5]), SIGMA, kind) == 0.0)  # abstain at p_A <= 1/2
    # the inverse (the sequential test's threshold) agrees with the CDF
    np.testing.assert_allclose([noise_kind(kind).needed_p(r, SIGMA) for r in t], p, rtol=1e-12)


def test_the_issue_formulas_hold_in_closed_form():
    """Uniform: 2 lambda (p - 1/2), lambda = 2 sigma. Laplace: the larger of Teng et al.'s
    lambda/2 log(p/(1-p)) and the tight -lambda log(2(1-p)), lambda = sigma."""
    p = np.linspace(0.501, 0.999, 99)
    np.testing.assert_allclose(certified_radii(p, SIGMA, "uniform"), 2 * (2 * SIGMA) * (p - 0.5))
    teng, tight = 0.5 * SIGMA * np.log(p / (1 - p)), -SIGMA * np.log(2 * (1 - p))
    np.testing.assert_allclose(certified_radii(p, SIGMA, "laplace"), np.maximum(teng, tight))
    assert np.all(tight >= teng - 1e-15)  # the tight bound is the one that counts
    np.testing.assert_allclose(certified_radii(p, SIGMA, "gaussian"), SIGMA * stats.norm.ppf(p))


@pytest.mark.parametrize("kind", NAMES)
def test_sigma_is_the_documented_size_of_the_noise(kind):
    """The convention: sigma is the Gaussian's std; for the l1 noises E|delta_i| = sigma (rs4a)."""
    noise = chunk_noise(Chunk(1, 2, "estimation", 0, 40_000), (3,), SIGMA, noise=kind).double()
    size = noise.std() if kind == "gaussian" else noise.abs().mean()
    assert abs(float(size) - SIGMA) < 0.01 * SIGMA
    if kind == "uniform":
        assert float(noise.abs().max()) <= 2 * SIGMA


def test_gaussian_draw_is_unchanged():
    """Pinned bytes of one chunk (recorded before noise kinds existed): golden counts and every
    old run's noise depend on them."""
    noise = chunk_noise(Chunk(5, 3, "estimation", 2, 16), (3, 4, 4), 0.25)
    assert hashlib.sha256(noise.numpy().tobytes()).hexdigest() == (
        "0f0961ea9734a74efb26b75f1a000ea0b2936a37f5d5b717f65f0395eb204e7d")
    assert torch.equal(noise, chunk_noise(Chunk(5, 3, "estimation", 2, 16), (3, 4, 4), 0.25, noise="gaussian"))


@pytest.mark.parametrize("kind", NAMES)
def test_draws_are_pure_functions_of_the_address(kind):
    a = chunk_noise(Chunk(0, 7, "selection", 1, 64), (3, 2, 2), SIGMA, noise=kind)
    assert torch.equal(a, chunk_noise(Chunk(0, 7, "selection", 1, 64), (3, 2, 2), SIGMA, noise=kind))
    assert not torch.equal(a, chunk_noise(Chunk(0, 7, "estimation", 1, 64), (3, 2, 2), SIGMA, noise=kind))


TRIALS, SAMPLES, ALPHA = 20_000, 500, 0.05


def coverage(kind: str, p_true: float, radius_of=None) -> tuple[float, float, float]:
    """(over-certification rate, mean certified radius, exact radius t) of TRIALS CERTIFY runs
    of SAMPLES votes each at x = 0, base classifier A iff x_1 <= t in 2 dimensions (t chosen so
    that p_A = p_true), with the noise drawn by the kind itself (`chunk_noise`)."""
    t = float(stats.norm.ppf(p_true, scale=SIGMA) if kind == "gaussian" else  # the CDF inverted by hand
              (4 * SIGMA * p_true - 2 * SIGMA) if kind == "uniform" else -SIGMA * np.log(2 * (1 - p_true)))
    votes = np.empty(TRIALS, dtype=np.int64)
    for start in range(0, TRIALS, 2_000):
        noise = chunk_noise(Chunk(11, start, "estimation", 0, 2_000 * SAMPLES), (2,), SIGMA, noise=kind)
        votes[start:start + 2_000] = (noise[:, 0].numpy() <= t).reshape(2_000, SAMPLES).sum(axis=1)
    low = lower_confidence_bounds(votes, np.full(TRIALS, SAMPLES), ALPHA)
    radius = (radius_of or (lambda p: certified_radii(p, SIGMA, kind)))(low)
    return float(np.mean(radius > t)), float(radius.mean()), t


@pytest.mark.parametrize("kind", NAMES)
def test_a_point_at_the_radius_is_not_over_certified_beyond_alpha(kind):
    """20,000 simulated CERTIFY runs: a certified radius beyond t (the distance at which the
    smoothed classifier really flips) happens at most alpha of the time (plus 3 standard errors)."""
    rate, mean_radius, t = coverage(kind, 0.99)
    assert rate <= ALPHA + 3 * np.sqrt(ALPHA * (1 - ALPHA) / TRIALS), (kind, rate)
    assert mean_radius > 0.5 * t  # not vacuous: the runs do certify, close to the boundary


def test_the_coverage_simulation_catches_a_wrong_radius():
    """The same simulation with the Gaussian radius under uniform noise over-certifies: the
    check has power against exactly the mistake of using another noise's formula."""
    rate, _, _ = coverage("uniform", 0.99, radius_of=lambda p: certified_radii(p, SIGMA, "gaussian"))
    assert rate > 0.5


@pytest.mark.parametrize("kind", NAMES)
def test_fixed_sequential_and_reach_share_the_radius(kind):
    """The sequential threshold is the inverse of the same radius function, and the ceilings
    (fixed n and sequential) are that function of their bound."""
    radius = 0.2
    test = SequentialTest(sigma=SIGMA, alpha=0.001, n_max=10_000, chunk_size=256, radius=radius, noise=kind)
    assert certified_radii(np.array([test.threshold]), SIGMA, kind)[0] == pytest.approx(radius)
    fixed = largest_radius(SIGMA, 0.001, 1000, noise=kind)
    assert fixed == pytest.approx(float(certified_radii(np.array([0.001 ** (1 / 1000)]), SIGMA, kind)[0]))
    # CERTIFY with all 1000 votes reaches exactly that ceiling
    decision = certify_matrix(np.array([[10, 0]]), np.array([[1000, 0]]), SIGMA, 0.001, noise=kind)
    assert decision.radius[0] == pytest.approx(fixed)
    assert check_reach(fixed * 0.99, SIGMA, 0.001, 1000, noise=kind).within
    assert not check_reach(fixed * 1.01, SIGMA, 0.001, 1000, noise=kind).within


def test_uniform_cannot_certify_beyond_its_half_width():
    assert largest_radius(SIGMA, 0.001, 10**9, noise="uniform") <= 2 * SIGMA
    with pytest.raises(ValueError, match="reach"):
        SequentialTest(sigma=SIGMA, alpha=0.001, n_max=100, chunk_size=10, radius=2 * SIGMA, noise="uniform")


@pytest.mark.parametrize("kind", NAMES)
def test_training_adds_the_same_noise_kind(kind):
    """`add_noise` (training and its evaluation) draws through the same kind as certification."""
    from pipeline.training.objectives import add_noise

    x = torch.zeros(20_000, 3)
    drawn = add_noise(x, SIGMA, torch.Generator().manual_seed(3), kind)
    generator = torch.Generator().manual_seed(3)
    assert torch.equal(drawn, noise_kind(kind).draw(generator, x.shape, SIGMA))
    if kind == "uniform":
        assert float(drawn.abs().max()) <= 2 * SIGMA


@pytest.mark.parametrize("kind", NAMES)
def test_sequential_decisions_use_the_noise_radius(kind):
    """A sequential run at R certifies once its lower confidence sequence passes the noise's q(R),
    and a largest-radius run reports the noise's radius of its bound."""
    from pipeline.stats.confidence_sequences import lower_confidence_sequence
    from pipeline.stats.sequential import ESTIMATION, ChunkVotes, SequentialCertifier, Status

    for radius in (0.1, None):
        test = SequentialTest(sigma=SIGMA, alpha=0.001, n_max=4096, chunk_size=256, radius=radius, noise=kind)
        certifier = SequentialCertifier(test, labels=np.zeros(1, dtype=np.int64))
        for chunk in range(16):
            certifier.decide(ChunkVotes(ESTIMATION, np.array([0]), np.array([chunk]), np.array([256]),
                                        np.array([250])))
            if certifier.decisions().status[0] != Status.UNDECIDED:
                break
        decisions = certifier.decisions()
        assert decisions.status[0] == Status.CERTIFIED
        samples = int(decisions.estimation_samples[0])
        low = float(lower_confidence_sequence(250 * samples // 256, samples, 0.001, test.shape))
        assert decisions.p_lower[0] >= test.threshold
        expected = max(radius or 0.0, float(certified_radii(np.array([low]), SIGMA, kind)[0]))
        assert decisions.radius[0] == pytest.approx(expected)

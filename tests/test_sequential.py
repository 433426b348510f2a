"""Sequential certification: anytime-valid coverage by simulation (optional stopping
included), power, a negative control, exact replay and resume.

Every coverage check simulates 20,000 images per setting through the real state machine
(`SequentialCertifier`, vectorised over the images) and passes when the rate of wrong
certificates is at most alpha + 3 Monte Carlo standard errors. Most checks run at
alpha = 0.05, where 20,000 draws resolve the rate to +-0.0015 (3 % of alpha), so a method
that is off by a fraction of alpha fails; one runs at the production alpha = 0.001.
The negative control shows that the same check rejects the naive procedure (Clopper-Pearson
re-evaluated after every chunk), which is valid at a fixed n but not under stopping.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from scipy import integrate
from scipy.stats import norm

from pipeline.stats.confidence_sequences import (
    DEFAULT_SHAPE,
    failure_thresholds,
    log_evidence_above,
    lower_confidence_sequence,
    success_thresholds,
    upper_confidence_sequence,
)
from pipeline.config import ConfigError, option, parse_config
from pipeline.stats.sequential import (
    ESTIMATION,
    SELECTION,
    ChunkVotes,
    Reason,
    SequentialCertifier,
    SequentialDecisions,
    SequentialTest,
    Status,
    replay,
)
from pipeline.sampling.noise import growing_schedule
from pipeline.settings import ChunkSize, EstimationSamples, SelectionSamples, SequentialSettings, SmoothingSettings
from pipeline.stats.smoothing import ABSTAIN, lower_confidence_bounds

TRIALS = 20_000
SIGMA = 0.25
NEVER = 1e-12  # a futility level that never gives up: the longest chance to go wrong


def log_evidence_below(successes, samples, q, shape=DEFAULT_SHAPE):
    """The mirror image of `log_evidence_above`, the evidence that p < q: what
    `failure_thresholds` must agree with."""
    successes, samples = np.asarray(successes), np.asarray(samples)
    return log_evidence_above(samples - successes, samples, 1.0 - np.asarray(q, dtype=np.float64), shape)


def within_alpha(wrong: int, trials: int, alpha: float) -> bool:
    """The coverage check: wrong-certificate rate <= alpha + 3 Monte Carlo standard errors."""
    return wrong / trials <= alpha + 3.0 * np.sqrt(alpha * (1.0 - alpha) / trials)


def planned_sizes(test: SequentialTest, phase: str, first_chunk: np.ndarray) -> np.ndarray:
    if test.first_chunks:  # the plan's growing first chunks (pipeline.sampling.noise)
        sizes = {int(c): test.chunk_samples(phase, int(c)) for c in np.unique(first_chunk)}
        return np.array([sizes[int(c)] for c in first_chunk], dtype=np.int64)
    return np.minimum(test.chunk_size, test.total(phase) - first_chunk * test.chunk_size)


def run_labelled(test: SequentialTest, p: float, trials: int, seed: int, peek: int = 0) -> SequentialDecisions:
    """`trials` images whose label has probability p, sampled chunk by chunk until decided.

    peek > 0 makes the chunk sizes adversarial: a chunk of a single sample whenever an image is
    within `peek` votes of certifying, so the rule is checked at every sample where it might
    fire; otherwise chunks of `peek` samples (the plan's chunk_size must then be 1)."""
    rng = np.random.default_rng(seed)
    certifier = SequentialCertifier(test, labels=np.zeros(trials, dtype=np.int64))
    if peek:
        need = success_thresholds(np.arange(test.n_max + peek + 1), test.threshold, test.alpha, test.shape)
    while work := certifier.pending():
        (w,) = work
        if peek:
            n, s = certifier.samples[w.image], certifier.successes[w.image]
            size = np.minimum(np.where(s + peek >= need[n + peek], 1, peek), test.n_max - n)
        else:
            size = planned_sizes(test, w.phase, w.first_chunk)
        certifier.decide(ChunkVotes(w.phase, w.image, w.first_chunk, size, rng.binomial(size, p)))
    return certifier.decisions()


def run_deployment(test: SequentialTest, probabilities: list[float], trials: int, seed: int,
                   matrix: bool = False) -> SequentialDecisions:
    """Images whose smoothed votes follow `probabilities`: adaptive selection on per-class
    counts, then the test on fresh samples, given as votes for the selected class only, or
    (matrix=True) as per-class counts from which the certifier takes the selected column."""
    rng = np.random.default_rng(seed)
    probabilities = np.asarray(probabilities)
    certifier = SequentialCertifier(test, num_images=trials)
    while work := certifier.pending():
        for w in work:
            size = planned_sizes(test, w.phase, w.first_chunk)
            if w.phase == SELECTION or matrix:
                counts = rng.multinomial(size, probabilities)
            else:
                counts = rng.binomial(size, probabilities[certifier.target[w.image]])
            certifier.decide(ChunkVotes(w.phase, w.image, w.first_chunk, size, counts))
    return certifier.decisions()


# -- the bound itself: exact values -----------------------------------------------------------


@pytest.mark.parametrize("s,n,q,b", [(0, 1, 0.5, 1.0), (7, 10, 0.6, 2.0), (30, 31, 0.9, 0.5), (12, 40, 0.2, 8.0)])
def test_evidence_is_the_mixture_of_likelihood_ratios(s, n, q, b):
    """Closed form = E_u[(1 + u(1-q)/q)^s (1-u)^(n-s)], u ~ Beta(1, b), by quadrature."""
    integrand = lambda u: (1 + u * (1 - q) / q) ** s * (1 - u) ** (n - s) * b * (1 - u) ** (b - 1)
    expected, _ = integrate.quad(integrand, 0, 1, epsabs=0, epsrel=1e-11, limit=200)
    assert np.exp(log_evidence_above(s, n, q, b)) == pytest.approx(expected, rel=1e-8)
    assert log_evidence_above(0, 0, q, b) == 0.0  # no samples, no evidence
    assert log_evidence_below(s, n, q, b) == pytest.approx(log_evidence_above(n - s, n, 1 - q, b))


def test_evidence_is_monotone_and_the_thresholds_and_bounds_are_the_same_decision():
    alpha, b = 0.01, 2.0
    n = np.array([1, 5, 16, 100, 1000, 77_777])
    for q in (0.5, 0.6915, 0.977):
        need = success_thresholds(n, q, alpha, b)
        for size, k in zip(n, need):
            s = np.unique(np.clip(np.r_[np.arange(0, size + 1, max(1, size // 60)), k - 3 + np.arange(7), size],
                                  0, size))
            evidence = log_evidence_above(s, size, q, b)
            finite = np.isfinite(evidence)  # -inf only where E underflows, far below 1 (s/n < q)
            assert np.all(s[~finite] < q * size) and np.all(np.diff(evidence[finite]) > 0)
            np.testing.assert_array_equal(evidence >= np.log(1 / alpha), s >= k)
            # The lower sequence passes q exactly where the test rejects p <= q.
            low = lower_confidence_sequence(s, size, alpha, b)
            np.testing.assert_array_equal(low[s != k] >= q, (s >= k)[s != k])
            assert np.all(low <= s / size)
            fail = failure_thresholds(size, q, alpha, b)
            np.testing.assert_array_equal(log_evidence_below(s, size, q, b) >= np.log(1 / alpha), s <= fail)
            high = upper_confidence_sequence(s, size, alpha, b)
            assert np.all(high >= s / size)
    grid = np.linspace(0.01, 0.99, 99)
    assert np.all(np.diff(log_evidence_above(30, 40, grid, b)) < 0)  # decreasing in q


def quadrature_threshold(n: int, q: float, alpha: float, b: float) -> int:
    """The fewest successes in n with E_n(q) >= 1/alpha (n + 1 if none), from the mixture's
    definition by quadrature and bisection (E_n grows with s): independent of the closed form,
    the threshold tables and the state machine."""

    def evidence(s: int) -> float:
        integrand = lambda u: (1 + u * (1 - q) / q) ** s * (1 - u) ** (n - s) * b * (1 - u) ** (b - 1)
        return integrate.quad(integrand, 0, 1, epsabs=0, epsrel=1e-10, limit=200)[0]

    low, high = -1, n + 1  # E(low) < 1/alpha (or -1), E(high) >= 1/alpha (or n + 1)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if evidence(mid) >= 1 / alpha else (mid, high)
    return high


@pytest.mark.parametrize("radius,alpha", [(0.25, 0.001), (0.125, 0.05)])
def test_the_certifier_certifies_at_exactly_the_quadrature_threshold_for_small_n(radius, alpha):
    """Every n up to 128 (and the chunk ends 256, 512): an image with k votes for its label in
    n samples, k the threshold computed by quadrature, is certified at once and one with k - 1
    is not -- through the state machine itself, so a rule that certifies one vote early at
    small n only (where few samples decide clear images) fails here, which coverage by
    simulation cannot resolve."""
    test = SequentialTest(sigma=SIGMA, alpha=alpha, n_max=100_000, chunk_size=256, radius=radius,
                          first_chunks=growing_schedule(256), futility="geometric")
    sizes = [*range(1, 129), 256, 512]
    need = np.array([quadrature_threshold(n, test.threshold, alpha, test.shape) for n in sizes])
    assert need[0] == 2 and need[-1] < 512  # n = 1 cannot certify; the table reaches below n
    reachable = need <= np.array(sizes)
    n = np.repeat(np.array(sizes)[reachable], 2)
    votes = np.repeat(need[reachable], 2) - np.tile([1, 0], reachable.sum())  # k - 1, k
    certifier = SequentialCertifier(test, labels=np.zeros(len(n), dtype=np.int64))
    decided = certifier.decide(ChunkVotes(ESTIMATION, np.arange(len(n)), np.zeros(len(n), dtype=np.int64), n, votes))
    np.testing.assert_array_equal(decided.certified, np.tile([False, True], reachable.sum()))


def test_no_evidence_without_a_majority_above_q():
    """For s <= q n every alternative pi > q fits the votes worse than q (s/n is the maximum
    likelihood), so E_n(q) <= 1 exactly: the computed value must not exceed it anywhere, in
    particular where the incomplete beta is tiny."""
    worst = -np.inf
    for b in (0.5, 2.0, 16.0):
        for q in (0.01, 0.5, 0.6915, 0.977, norm.cdf(4), norm.cdf(8)):
            for n in np.unique(np.logspace(0, 6, 25).astype(np.int64)):
                s = np.unique(np.linspace(0, np.floor(q * n), 60).astype(np.int64))
                worst = max(worst, float(np.max(log_evidence_above(s, n, q, b))))
    assert worst <= 0.0


def test_bounds_at_the_edges():
    assert lower_confidence_sequence(0, 50, 0.001)[()] == 0.0
    assert upper_confidence_sequence(50, 50, 0.001)[()] == 1.0
    assert lower_confidence_sequence(0, 0, 0.001)[()] == 0.0 and upper_confidence_sequence(0, 0, 0.001)[()] == 1.0
    # All n votes for the class: the bound rises towards 1 roughly like 1 - log(1/alpha)/n.
    low = lower_confidence_sequence(np.array([100, 1000, 100_000]), np.array([100, 1000, 100_000]), 0.001)
    assert np.all(np.diff(low) > 0) and 0.85 < low[0] < low[-1] < 1 - 1e-5
    with pytest.raises(ValueError):
        log_evidence_above(5, 4, 0.5)
    with pytest.raises(ValueError):
        log_evidence_above(1, 4, 1.0)
    with pytest.raises(ValueError):
        lower_confidence_sequence(1, 4, 0.0)


# -- coverage (G1): wrong certificates <= alpha, whatever the stopping ------------------------


@pytest.mark.parametrize(
    "name,offset,alpha,futility,chunk,n_max",
    [
        ("at the threshold, default futility", 0.0, 0.05, 0.05, 16, 2400),
        ("at the threshold, never giving up", 0.0, 0.05, NEVER, 16, 2400),
        ("just below the threshold", -0.01, 0.05, NEVER, 16, 2400),
        ("far below the threshold", -0.3, 0.05, NEVER, 16, 2400),
        ("at the threshold, production alpha", 0.0, 0.001, NEVER, 64, 8192),
    ],
)
def test_wrong_certificates_at_most_alpha(name, offset, alpha, futility, chunk, n_max):
    """p <= Phi(R/sigma): the label is not certifiable at R; P(CERTIFIED) <= alpha."""
    test = SequentialTest(sigma=SIGMA, alpha=alpha, n_max=n_max, chunk_size=chunk, radius=0.25, futility_alpha=futility)
    decisions = run_labelled(test, test.threshold + offset, TRIALS, seed=zlib.crc32(name.encode()))
    wrong = int(decisions.certified.sum())
    assert within_alpha(wrong, TRIALS, alpha), f"{name}: {wrong} wrong certificates in {TRIALS}"
    if offset == 0.0 and futility == NEVER:
        assert wrong > 0  # the bound is tight enough to be reached at all
    assert np.all(decisions.status != Status.UNDECIDED)


def test_wrong_certificates_at_most_alpha_with_growing_first_chunks():
    """The growing schedule (32, 32, 64, 128, then 256s) looks early and often: at the
    threshold, never giving up, P(CERTIFIED) stays <= alpha -- and is reached at all."""
    test = SequentialTest(sigma=SIGMA, alpha=0.05, n_max=6000, chunk_size=256, radius=0.25, futility_alpha=NEVER,
                          first_chunks=growing_schedule(256))
    assert test.first_chunks == (32, 32, 64, 128)
    decisions = run_labelled(test, test.threshold, TRIALS, seed=21)
    wrong = int(decisions.certified.sum())
    assert within_alpha(wrong, TRIALS, 0.05), f"{wrong} wrong certificates in {TRIALS}"
    assert wrong > 0
    assert np.all(decisions.status != Status.UNDECIDED)


def test_clear_images_stop_near_the_statistical_minimum():
    """All votes for the label at R = sigma = 0.25, alpha = 0.001: 63 samples decide it; the
    growing schedule stops at 64 (fixed chunks of 256 paid 256), and a hopeless image stops
    after its first 32."""
    growing = SequentialTest(sigma=SIGMA, alpha=0.001, n_max=100_000, chunk_size=256, radius=0.25,
                             first_chunks=growing_schedule(256))
    fixed = SequentialTest(sigma=SIGMA, alpha=0.001, n_max=100_000, chunk_size=256, radius=0.25)
    assert run_labelled(growing, 1.0, 10, seed=1).samples.max() == 64
    assert run_labelled(fixed, 1.0, 10, seed=1).samples.max() == 256
    hopeless = run_labelled(growing, 0.1, 200, seed=2)
    assert np.all(hopeless.status == Status.NOT_CERTIFIED) and hopeless.samples.max() <= 64


def test_wrong_certificates_at_most_alpha_when_looking_after_every_sample():
    """The strongest optional stopping: the rule is checked after every single sample (any
    chunking or stopping rule looks at a subset of these times), never giving up, over a long
    horizon. The state machine decides exactly at the first crossing of these thresholds
    (`test_decisions_depend_on_the_running_totals_only`)."""
    alpha, n_max = 0.05, 6000
    q = SequentialTest(sigma=SIGMA, alpha=alpha, n_max=n_max, chunk_size=1, radius=0.25).threshold
    need = success_thresholds(np.arange(1, n_max + 1), q, alpha)
    rng, wrong = np.random.default_rng(12), 0
    for _ in range(TRIALS // 2000):
        votes = np.cumsum(rng.random((2000, n_max), dtype=np.float32) < q, axis=1, dtype=np.int32)
        wrong += int(np.any(votes >= need, axis=1).sum())
    assert within_alpha(wrong, TRIALS, alpha), f"{wrong} wrong certificates in {TRIALS}"
    assert wrong / TRIALS > alpha / 4  # and the bound is not vacuous


def test_wrong_certificates_at_most_alpha_under_adversarial_chunk_sizes():
    """Chunk sizes chosen from the votes so far: one sample at a time whenever an image is
    close to certifying, chunks of 16 otherwise; never giving up."""
    test = SequentialTest(sigma=SIGMA, alpha=0.05, n_max=1500, chunk_size=1, radius=0.125, futility_alpha=NEVER)
    decisions = run_labelled(test, test.threshold, TRIALS, seed=11, peek=16)
    wrong = int(decisions.certified.sum())
    assert within_alpha(wrong, TRIALS, 0.05), f"{wrong} wrong certificates in {TRIALS}"


def naive_wrong_certificates(q: float, alpha: float, chunk: int, n_max: int, trials: int, seed: int) -> int:
    """The invalid method: stop at the first chunk where the fixed-n Clopper-Pearson bound
    (the project's `lower_confidence_bounds`) exceeds q."""
    n = np.arange(chunk, n_max + 1, chunk)
    low, high = np.zeros(len(n), dtype=np.int64), n + 1  # smallest s with bound > q, by bisection
    while np.any(high - low > 1):
        mid = (low + high) // 2
        passes = lower_confidence_bounds(np.minimum(mid, n), n, alpha) > q
        high, low = np.where(passes, mid, high), np.where(passes, low, mid)
    successes = np.cumsum(np.random.default_rng(seed).binomial(chunk, q, size=(trials, len(n))), axis=1)
    return int(np.any(successes >= high, axis=1).sum())


def test_the_coverage_check_rejects_fixed_n_bounds_under_stopping():
    """Negative control: the same setting and check as above, for the naive procedure."""
    test = SequentialTest(sigma=SIGMA, alpha=0.05, n_max=2400, chunk_size=16, radius=0.25, futility_alpha=NEVER)
    wrong = naive_wrong_certificates(test.threshold, 0.05, 16, 2400, TRIALS, seed=5)
    assert not within_alpha(wrong, TRIALS, 0.05)
    assert wrong / TRIALS > 3 * 0.05  # not a borderline failure
    # ... while at a single fixed n the very same bound is valid.
    single = naive_wrong_certificates(test.threshold, 0.05, 2400, 2400, TRIALS, seed=6)
    assert within_alpha(single, TRIALS, 0.05)


# -- power: p above the threshold -------------------------------------------------------------


def test_power_and_sample_cost_above_the_threshold():
    """p_A = 0.95 at R = 0.25 (threshold 0.841), alpha = 0.001: certified essentially always,
    after a few hundred samples instead of a fixed 100,000."""
    test = SequentialTest(sigma=SIGMA, alpha=0.001, n_max=100_000, chunk_size=256, radius=0.25)
    decisions = run_labelled(test, 0.95, TRIALS, seed=3)
    assert decisions.certified.mean() >= 0.999
    assert np.median(decisions.samples) <= 512 and decisions.samples.mean() < 1000
    assert np.all(decisions.radius[decisions.certified] >= 0.25)
    assert np.all(decisions.reason[decisions.certified] == Reason.LOWER_BOUND)


def test_hopeless_images_stop_after_one_chunk():
    test = SequentialTest(sigma=SIGMA, alpha=0.001, n_max=100_000, chunk_size=256, radius=0.25)
    decisions = run_labelled(test, 0.3, 2000, seed=4)
    assert np.all(decisions.status == Status.NOT_CERTIFIED) and np.all(decisions.samples == 256)
    assert np.all(decisions.reason == Reason.UPPER_BOUND)


def test_geometric_futility_gives_up_a_certifiable_image_at_most_futility_alpha():
    """The geometric rule (Clopper-Pearson at pre-set looks, futility_alpha split over them)
    at p = q, the most certifiable p it may give up: P(UPPER_BOUND) <= futility_alpha."""
    test = SequentialTest(sigma=SIGMA, alpha=0.001, n_max=20_000, chunk_size=256, radius=0.25, futility_alpha=0.05,
                          first_chunks=growing_schedule(256), futility="geometric")
    decisions = run_labelled(test, test.threshold, TRIALS, seed=31)
    given_up = int((decisions.reason == Reason.UPPER_BOUND).sum())
    assert within_alpha(given_up, TRIALS, 0.05), f"{given_up} of {TRIALS} given up at p = q"
    assert given_up > 0  # the rule fires at all


def test_geometric_futility_looks_at_preset_chunk_ends_and_stops_sooner():
    """Looks at the first chunk end and each >= 1.5x the last (fixed by the test alone); at
    p = 0.8 < q = Phi(1) = 0.841 it gives up sooner than the mixture sequence after every chunk."""
    common = dict(sigma=SIGMA, alpha=0.001, n_max=100_000, chunk_size=256, radius=0.25,
                  first_chunks=growing_schedule(256))
    geometric = SequentialTest(**common, futility="geometric")
    assert geometric.futility_looks()[:9].tolist() == [32, 64, 128, 256, 512, 768, 1280, 2048, 3072]
    assert np.all(np.isin(geometric.futility_looks(), geometric.chunk_ends(ESTIMATION)))
    faster = run_labelled(geometric, 0.8, 4000, seed=32)
    slower = run_labelled(SequentialTest(**common, futility="mixture"), 0.8, 4000, seed=32)
    assert np.all(faster.status == Status.NOT_CERTIFIED) and np.all(slower.status == Status.NOT_CERTIFIED)
    assert faster.samples.mean() < 0.9 * slower.samples.mean()
    with pytest.raises(ValueError, match="futility"):
        SequentialTest(**common, futility="sometimes")


def test_curtailment_and_the_cap():
    """n_max = 100, alpha = 0.001, R = 0.125, one sample per chunk: an image is given up at
    the first failure that makes the threshold at n = 100 unreachable, not one earlier (with
    one failure fewer, all-positive remaining votes still certify it by n = 100)."""
    test = SequentialTest(sigma=SIGMA, alpha=0.001, n_max=100, chunk_size=1, radius=0.125, futility_alpha=NEVER)
    allowed = 100 - int(success_thresholds(100, test.threshold, 0.001, test.shape))
    assert 0 < allowed < 50
    certifier = SequentialCertifier(test, labels=np.zeros(2, dtype=np.int64))
    one = np.ones(2, dtype=np.int64)
    for k in range(allowed):  # both images: `allowed` failures in a row, still alive
        certifier.decide(ChunkVotes(ESTIMATION, np.arange(2), np.full(2, k), one, np.zeros(2, dtype=np.int64)))
    assert np.all(certifier.decisions().status == Status.UNDECIDED)
    # Image 0: one more failure ends it; image 1: all successes from here certify it.
    certifier.decide(ChunkVotes(ESTIMATION, np.arange(2), np.full(2, allowed), one, np.array([0, 1])))
    decisions = certifier.decisions()
    assert decisions.status[0] == Status.NOT_CERTIFIED and decisions.reason[0] == Reason.CANNOT_REACH
    for k in range(allowed + 1, 100):
        certifier.decide(ChunkVotes(ESTIMATION, np.array([1]), np.array([k]), np.array([1]), np.array([1])))
    decisions = certifier.decisions()
    assert decisions.status[1] == Status.CERTIFIED  # at n <= 100 (n - k(n) never decreases)
    # At n = n_max "not certified" and "cannot reach" coincide; N_MAX is for a plan whose
    # chunks run out first (here chunks of 5 samples where 10 were planned, 4 votes each).
    short = SequentialCertifier(test.__class__(**{**test.__dict__, "chunk_size": 10}), labels=np.zeros(1, np.int64))
    for k in range(10):
        short.decide(ChunkVotes(ESTIMATION, np.array([0]), np.array([k]), np.array([5]), np.array([4])))
    decisions = short.decisions()
    assert decisions.status[0] == Status.NOT_CERTIFIED and decisions.reason[0] == Reason.N_MAX
    assert decisions.estimation_samples[0] == 50 and not short.pending()


# -- deployment (G2) and largest radius (G3) --------------------------------------------------


@pytest.mark.parametrize(
    "name,radius,probabilities,matrix",
    [
        ("top class at the threshold", 0.125, [0.6915, 0.2085, 0.1], False),
        ("two classes tied below 1/2, per-class counts", 0.0, [0.45, 0.45, 0.1], True),
    ],
)
def test_deployment_total_error_at_most_alpha(name, radius, probabilities, matrix):
    """No class is certifiable at R: any certificate is wrong; over selection and test <= alpha."""
    test = SequentialTest(sigma=SIGMA, alpha=0.05, n_max=1600, chunk_size=16, radius=radius,
                          futility_alpha=NEVER, selection_alpha=0.05, selection_max=256)
    assert probabilities[0] <= test.threshold + 1e-4
    decisions = run_deployment(test, probabilities, TRIALS, seed=7, matrix=matrix)
    wrong = int(decisions.certified.sum())
    assert within_alpha(wrong, TRIALS, 0.05), f"{name}: {wrong} wrong certificates"
    assert np.all(decisions.status != Status.UNDECIDED)


def test_deployment_certifies_a_clear_top_class():
    test = SequentialTest(sigma=SIGMA, alpha=0.001, n_max=10_000, chunk_size=64, radius=0.25, selection_max=640)
    decisions = run_deployment(test, [0.05, 0.93, 0.02], 2000, seed=8)
    assert decisions.certified.mean() > 0.99 and np.all(decisions.target[decisions.certified] == 1)
    assert np.median(decisions.samples) <= 256 + 64
    assert np.all(decisions.as_decisions().prediction[decisions.certified] == 1)
    assert np.all(decisions.as_decisions().prediction[~decisions.certified] == ABSTAIN)


@pytest.mark.parametrize("p", [0.9, 0.999])
def test_largest_radius_too_large_at_most_alpha(p):
    """Largest-radius mode: P(reported radius > sigma * Phi^-1(p)) <= alpha."""
    test = SequentialTest(sigma=SIGMA, alpha=0.05, n_max=8192, chunk_size=64, radius=None, tolerance=0.005)
    decisions = run_labelled(test, p, TRIALS, seed=int(p * 1000))
    true_radius = SIGMA * norm.ppf(p)
    wrong = int((decisions.radius > true_radius).sum())
    assert within_alpha(wrong, TRIALS, 0.05), f"{wrong} radii above {true_radius:.3f}"
    assert np.median(decisions.radius) > 0.7 * true_radius  # and they are not trivially small


def test_largest_radius_stops_when_the_radius_stalls():
    test = SequentialTest(sigma=SIGMA, alpha=0.001, n_max=100_000, chunk_size=256, radius=None, tolerance=0.02)
    decisions = run_labelled(test, 0.9, 500, seed=9)  # radius -> 0.25 * Phi^-1(0.9) = 0.320
    assert np.all(decisions.reason == Reason.CONVERGED) and np.all(decisions.certified)
    assert np.median(decisions.samples) < 100_000 / 4
    assert 0.25 < np.median(decisions.radius) < SIGMA * norm.ppf(0.9)
    hopeless = run_labelled(test, 0.3, 100, seed=10)
    assert np.all(hopeless.status == Status.NOT_CERTIFIED) and np.all(hopeless.samples == 256)


# -- determinism: grouping, replay, resume ----------------------------------------------------


def chunk_stream(images: int, chunks: int, size: int, p: np.ndarray, seed: int) -> np.ndarray:
    """Fixed per-(image, chunk) votes: the analogue of noise addressed by (image, chunk)."""
    return np.random.default_rng(seed).binomial(size, p[:, None], size=(images, chunks))


def drive(test: SequentialTest, stream: np.ndarray, rng: np.random.Generator, labels: np.ndarray,
          stop_after: int | None = None, certifier: SequentialCertifier | None = None,
          store: list[ChunkVotes] | None = None) -> SequentialCertifier:
    """Serve the certifier's requests from `stream`, in randomly sized and shuffled batches."""
    certifier = certifier or SequentialCertifier(test, labels=labels)
    rounds = 0
    while (work := certifier.pending(growth=float(rng.choice([0.0, 0.5, 2.0])))) and rounds != stop_after:
        (w,) = work
        image = np.repeat(w.image, w.num_chunks)
        chunk = np.concatenate([np.arange(f, f + k) for f, k in zip(w.first_chunk, w.num_chunks)])
        order = np.argsort(chunk, kind="stable")  # each image's chunks in order across the parts
        for part in np.array_split(order, int(rng.integers(1, 4))):
            part = rng.permutation(part)  # rows within a call in any order
            votes = ChunkVotes(ESTIMATION, image[part], chunk[part], np.full(len(part), test.chunk_size),
                               stream[image[part], chunk[part]])
            certifier.decide(votes)
            if store is not None:
                store.append(votes)
        rounds += 1
    return certifier


def assert_same(a: SequentialDecisions, b: SequentialDecisions, unused: bool = True) -> None:
    for field in SequentialDecisions.__dataclass_fields__:
        if field == "unused_samples" and not unused:
            continue
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)


@pytest.mark.parametrize("radius,futility", [(0.25, "mixture"), (0.25, "geometric"), (None, "mixture")])
def test_decisions_do_not_depend_on_batching_and_replay_exactly(radius, futility):
    images, chunks, size = 300, 64, 32
    test = SequentialTest(sigma=SIGMA, alpha=0.01, n_max=chunks * size, chunk_size=size, radius=radius, tolerance=0.01,
                          futility=futility)
    p = np.random.default_rng(0).uniform(0.3, 1.0, images)
    stream = chunk_stream(images, chunks, size, p, seed=1)
    labels = np.zeros(images, dtype=np.int64)
    one_at_a_time = SequentialCertifier(test, labels=labels)
    while work := one_at_a_time.pending():
        (w,) = work
        one_at_a_time.decide(ChunkVotes(ESTIMATION, w.image, w.first_chunk, np.full(len(w.image), size),
                                        stream[w.image, w.first_chunk]))
    reference = one_at_a_time.decisions()
    assert np.all(reference.unused_samples == 0)
    assert 0 < reference.certified.sum() < images  # both outcomes occur
    stored: list[ChunkVotes] = []
    batched = drive(test, stream, np.random.default_rng(2), labels, store=stored).decisions()
    assert_same(reference, batched, unused=False)
    assert batched.unused_samples.sum() > 0  # growth > 0 drew chunks after some decisions
    # Offline: replaying the stored rows, shuffled and with a repeated part, gives it all back.
    shuffled = stored[::-1] + stored[:3]
    assert_same(replay(test, shuffled, labels=labels).decisions(), batched)


def test_resume_from_stored_chunks_reaches_the_same_decisions():
    images, chunks, size = 200, 64, 32
    test = SequentialTest(sigma=SIGMA, alpha=0.01, n_max=chunks * size, chunk_size=size, radius=0.25)
    p = np.random.default_rng(3).uniform(0.7, 1.0, images)
    stream = chunk_stream(images, chunks, size, p, seed=4)
    labels = np.zeros(images, dtype=np.int64)
    uninterrupted = drive(test, stream, np.random.default_rng(5), labels).decisions()
    stored: list[ChunkVotes] = []
    drive(test, stream, np.random.default_rng(6), labels, stop_after=4, store=stored)  # "killed"
    # Lose one image's second chunk (a part file never written): it is drawn again.
    lost = stored[0].image[0]
    kept = [ChunkVotes(v.phase, v.image[keep], v.chunk[keep], v.samples[keep], v.counts[keep])
            for v in stored for keep in [~((v.image == lost) & (v.chunk == 1))]]
    resumed = replay(test, kept, labels=labels)
    if resumed.decisions().status[lost] == Status.UNDECIDED:
        (w,) = resumed.pending()
        assert w.first_chunk[list(w.image).index(lost)] == 1
    final = drive(test, stream, np.random.default_rng(7), labels, certifier=resumed).decisions()
    assert_same(uninterrupted, final, unused=False)


def test_deployment_replay_with_class_count_matrices():
    test = SequentialTest(sigma=SIGMA, alpha=0.01, n_max=1024, chunk_size=32, radius=0.125,
                          selection_alpha=0.01, selection_max=128)
    probabilities = np.array([[0.8, 0.15, 0.05], [0.4, 0.35, 0.25], [0.1, 0.88, 0.02], [0.5, 0.49, 0.01]])
    images = np.tile(np.arange(4), 50)
    rng = np.random.default_rng(12)
    streams = {phase: np.stack([rng.multinomial(32, probabilities[i], size=32) for i in images])
               for phase in (SELECTION, ESTIMATION)}
    online, stored = SequentialCertifier(test, num_images=len(images)), []
    while work := online.pending(growth=1.0):
        for w in work:
            image = np.repeat(w.image, w.num_chunks)
            chunk = np.concatenate([np.arange(f, f + k) for f, k in zip(w.first_chunk, w.num_chunks)])
            votes = ChunkVotes(w.phase, image, chunk, np.full(len(image), 32), streams[w.phase][image, chunk])
            online.decide(votes)
            stored.append(votes)
    decisions = online.decisions()
    assert set(decisions.target[decisions.certified]) <= {0, 1}
    assert decisions.certified[images == 2].all() and not decisions.certified[images == 1].any()
    assert_same(replay(test, stored, num_images=len(images)).decisions(), decisions)


def test_decisions_depend_on_the_running_totals_only():
    """Chunk-size independence: the rule sees (votes, samples) after each chunk. Splitting a
    stream into smaller chunks only adds looks, so with futility off every image certified with
    chunks of 8 is certified with chunks of 1, no later; and the coarse run's decision equals
    the fine run's rule read at the coarse boundaries."""
    rng = np.random.default_rng(13)
    images, n_max = 400, 512
    samples = rng.random((images, n_max)) < rng.uniform(0.75, 0.95, images)[:, None]
    runs = {}
    for size in (1, 8):
        test = SequentialTest(sigma=SIGMA, alpha=0.01, n_max=n_max, chunk_size=size, radius=0.25, futility_alpha=NEVER)
        votes = samples.reshape(images, n_max // size, size).sum(axis=2)
        certifier = SequentialCertifier(test, labels=np.zeros(images, dtype=np.int64))
        for k in range(n_max // size):
            certifier.decide(ChunkVotes(ESTIMATION, np.arange(images), np.full(images, k), np.full(images, size),
                                        votes[:, k]))
        runs[size] = certifier.decisions()
        cumulative = np.cumsum(votes, axis=1)
        need = success_thresholds(np.arange(1, n_max // size + 1) * size, test.threshold, 0.01, test.shape)
        crossed = cumulative >= need
        first = np.where(crossed.any(axis=1), crossed.argmax(axis=1), -1)
        np.testing.assert_array_equal(runs[size].certified, first >= 0)
        np.testing.assert_array_equal(runs[size].estimation_samples[first >= 0], (first[first >= 0] + 1) * size)
    fine, coarse = runs[1], runs[8]
    assert np.all(fine.certified[coarse.certified])
    assert np.all(fine.estimation_samples[coarse.certified] <= coarse.estimation_samples[coarse.certified])


def test_replay_at_another_alpha_stays_valid_on_the_stored_samples():
    """`dsmooth reduce --alpha`: the run stopped by its own rule (alpha = 0.05); replaying its
    stored chunks at alpha = 0.02 certifies wrongly at most 2 % of the time, and images whose
    stored samples end before a decision count as not certified (ABSTAIN)."""
    test = SequentialTest(sigma=SIGMA, alpha=0.05, n_max=640, chunk_size=32, radius=0.25, futility_alpha=NEVER)
    rng = np.random.default_rng(14)
    certifier, stored = SequentialCertifier(test, labels=np.zeros(TRIALS, dtype=np.int64)), []
    while work := certifier.pending():
        (w,) = work
        size = planned_sizes(test, w.phase, w.first_chunk)
        stored.append(ChunkVotes(w.phase, w.image, w.first_chunk, size, rng.binomial(size, test.threshold)))
        certifier.decide(stored[-1])
    stricter = SequentialTest(**{**test.__dict__, "alpha": 0.02})
    decisions = replay(stricter, stored, labels=np.zeros(TRIALS, dtype=np.int64)).decisions()
    assert within_alpha(int(decisions.certified.sum()), TRIALS, 0.02)
    left = decisions.status == Status.UNDECIDED
    assert left.any() and np.all(decisions.as_decisions().prediction[left] == ABSTAIN)


def test_decide_refuses_gaps_and_repeats_without_changing_state():
    test = SequentialTest(sigma=SIGMA, alpha=0.01, n_max=1024, chunk_size=16, radius=0.25, futility_alpha=NEVER)
    certifier = SequentialCertifier(test, labels=np.array([0, 0, -1]))
    assert certifier.decisions().reason[2] == Reason.NO_CLASS  # no label: never sampled
    assert [list(w.image) for w in certifier.pending()] == [[0, 1]]
    certifier.decide(ChunkVotes(ESTIMATION, np.array([0]), np.array([0]), np.array([16]), np.array([14])))
    before = certifier.decisions()
    assert before.status[0] == Status.UNDECIDED
    for chunk in ([0], [2]):
        with pytest.raises(ValueError, match="in sequence"):
            certifier.decide(ChunkVotes(ESTIMATION, np.array([1, 0]), np.array([0, *chunk]), np.array([16, 16]),
                                        np.array([16, 16])))
    assert_same(before, certifier.decisions())
    with pytest.raises(ValueError, match="planned"):
        certifier.decide(ChunkVotes(ESTIMATION, np.array([0]), np.array([1]), np.array([1010]), np.array([1])))
    with pytest.raises(ValueError):
        ChunkVotes(ESTIMATION, np.array([0]), np.array([0]), np.array([4]), np.array([5]))  # votes > samples
    with pytest.raises(ValueError):
        ChunkVotes(SELECTION, np.array([0]), np.array([0]), np.array([4]), np.array([3]))  # selection needs classes
    with pytest.raises(ValueError, match="twice"):
        votes = ChunkVotes(ESTIMATION, np.array([0, 0]), np.array([0, 0]), np.array([16, 16]), np.array([3, 4]))
        replay(test, [votes], labels=np.array([0, 0, -1]))
    with pytest.raises(ValueError):
        SequentialTest(sigma=SIGMA, alpha=0.0, n_max=10, chunk_size=1, radius=0.1)
    with pytest.raises(ValueError):
        SequentialTest(sigma=SIGMA, alpha=0.01, n_max=10, chunk_size=1, radius=3.0)  # Phi(12) == 1.0


# -- settings ---------------------------------------------------------------------------------


class _Job(SmoothingSettings, SequentialSettings):
    n0: SelectionSamples = option(20)
    n: EstimationSamples = option(100)
    chunk_size: ChunkSize = option(16)


def test_settings_declare_the_sequential_rule_once():
    settings = parse_config(_Job, {"sigma": 0.25, "sequential": True, "radius": 0.125, "n_max": 240})
    test = SequentialTest.from_settings(settings)
    assert (test.n_max, test.chunk_size, test.selection_max, test.alpha) == (240, 16, 20, 0.001)
    assert test.threshold == pytest.approx(norm.cdf(0.5))
    assert SequentialTest.from_settings(parse_config(_Job, {"sigma": 0.5})).n_max == 100  # default: n
    with pytest.raises(ConfigError, match="radius"):
        parse_config(_Job, {"sigma": 0.25, "radius": 2.5})
    with pytest.raises(ConfigError, match="did you mean 'futility_alpha'"):
        parse_config(_Job, {"sigma": 0.25, "futility_alpa": 0.1})
    for name in ("sequential", "radius", "n_max", "tolerance", "futility_alpha", "selection_alpha", "certify_class"):
        assert _Job.model_fields[name].description


def test_sequential_progress_and_start_line_speak_plainly():
    """Issue 22 item 7: the start line describes the rule, not the dataclass repr, and a
    sequential run's progress shows decided counts and elapsed time, never a false ETA."""
    from pipeline.progress import Progress

    text = SequentialTest(sigma=0.25, alpha=0.001, n_max=100_000, chunk_size=1000, radius=0.5).describe()
    assert "SequentialTest(" not in text and "R = 0.5" in text and "100,000 samples" in text
    assert "largest radius" in SequentialTest(sigma=0.25, alpha=0.001, n_max=1000, chunk_size=100).describe()
    for eta in (True, False):
        progress = Progress("certify", total=10, unit="images decided", eta=eta, bar=False)
        progress.set(9, 5000)
        assert ("ETA" in progress.line()) is eta and "9/10 images decided" in progress.line()

"""Certification maths: exact values, coverage by simulation, radius and abstain rules."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import beta, binomtest, norm
from statsmodels.stats.proportion import proportion_confint

from pipeline.stats.smoothing import (
    ABSTAIN,
    certified_radius,
    certify_counts,
    lower_confidence_bound,
    lower_confidence_bounds,
    max_certifiable_radius,
    predict_counts,
)


def test_lower_bound_matches_clopper_pearson_on_random_inputs():
    rng = np.random.default_rng(0)
    for _ in range(500):
        n = int(rng.integers(1, 200_000))
        n_a = int(rng.integers(0, n + 1))
        alpha = float(10 ** rng.uniform(-4, -0.5))
        got = lower_confidence_bound(n_a, n, alpha)
        # Independent formula: the one-sided Clopper-Pearson bound is a Beta quantile.
        exact = 0.0 if n_a == 0 else beta.ppf(alpha, n_a, n - n_a + 1)
        assert got == pytest.approx(exact, rel=1e-9, abs=1e-12)
        assert got == pytest.approx(proportion_confint(n_a, n, alpha=2 * alpha, method="beta")[0], abs=1e-12)


def test_vectorised_bounds_equal_scalar_ones():
    rng = np.random.default_rng(1)
    n = rng.integers(1, 10_000, size=300)
    n_a = (rng.random(300) * (n + 1)).astype(int).clip(0, n)
    got = lower_confidence_bounds(n_a, n, 0.001)
    expected = [lower_confidence_bound(int(a), int(b), 0.001) for a, b in zip(n_a, n)]
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("p,n", [(0.55, 100), (0.7, 1000), (0.9, 100), (0.99, 10_000), (0.3, 50)])
def test_lower_bound_coverage_by_simulation(p, n):
    """Over many draws the bound exceeds the true p in at most ~alpha of them."""
    alpha, trials = 0.05, 20_000
    n_a = np.random.default_rng(2).binomial(n, p, size=trials)
    exceed = np.mean(lower_confidence_bounds(n_a, np.full(trials, n), alpha) > p)
    slack = 3 * np.sqrt(alpha * (1 - alpha) / trials)
    assert exceed <= alpha + slack
    # ... and it is a bound at level alpha, not a much looser one (alpha/2 would be ~0.025).
    if p in (0.7, 0.99):
        assert exceed > 0.3 * alpha


def test_certify_claims_too_large_a_radius_at_most_alpha_of_the_time():
    """Cohen et al.'s guarantee, simulated: P[certified radius > true radius] <= alpha."""
    alpha, sigma, trials, n0, n = 0.05, 0.5, 4000, 50, 500
    probabilities = np.array([0.72, 0.2, 0.08])
    true_radius = sigma * norm.ppf(probabilities[0])
    rng = np.random.default_rng(3)
    selections = rng.multinomial(n0, probabilities, size=trials)
    estimations = rng.multinomial(n, probabilities, size=trials)
    wrong = 0
    for selection, estimation in zip(selections, estimations):
        cls, radius = certify_counts(selection, estimation, sigma, alpha)
        wrong += cls != ABSTAIN and (cls != 0 or radius > true_radius)
    assert wrong / trials <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / trials)
    assert wrong > 0  # the radius is tight enough to sometimes touch the truth


def test_predict_returns_a_wrong_class_at_most_alpha_of_the_time():
    alpha, trials, n = 0.05, 4000, 400
    probabilities = np.array([0.41, 0.40, 0.19])  # class 0 is g(x), barely
    rng = np.random.default_rng(4)
    wrong = sum(predict_counts(c, alpha) not in (0, ABSTAIN) for c in rng.multinomial(n, probabilities, trials))
    assert wrong / trials <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / trials)


def test_radius_formula():
    assert certified_radius(norm.cdf(2.0), 0.25) == pytest.approx(0.5)
    assert certified_radius(0.5, 1.0) == 0.0
    assert certified_radius(0.3, 1.0) == 0.0
    with pytest.raises(ValueError, match="sigma"):
        certified_radius(0.9, 0.0)


def test_max_certifiable_radius_is_what_unanimous_votes_certify():
    """sigma * Phi^-1(alpha^(1/n)), from scipy's beta quantile: the radius CERTIFY gives when
    all n estimation votes go to c_A, and no count of n samples does better."""
    rng = np.random.default_rng(3)
    for _ in range(40):
        n, alpha, sigma = int(rng.integers(10, 200_000)), float(10 ** rng.uniform(-5, -1)), float(rng.uniform(0.1, 1))
        expected = sigma * norm.ppf(beta.ppf(alpha, n, 1))  # the one-sided Clopper-Pearson bound at n_a = n
        assert max_certifiable_radius(n, alpha, sigma) == pytest.approx(expected, rel=1e-9)
        assert certify_counts([0, 5], [0, n], sigma, alpha)[1] == pytest.approx(expected, rel=1e-9)
        assert certify_counts([0, 5], [1, n - 1], sigma, alpha)[1] < expected
    # Vectorised: n, alpha and sigma broadcast against each other.
    n = np.array([100, 400, 10_000])
    np.testing.assert_allclose(max_certifiable_radius(n, 0.001, 0.25), 0.25 * norm.ppf(beta.ppf(0.001, n, 1)))
    sigmas = np.array([[0.12], [0.5]])
    assert max_certifiable_radius(n, 0.001, sigmas).shape == (2, 3)
    # Too few samples to certify anything: alpha^(1/n) <= 1/2 for n <= log(alpha)/log(1/2).
    assert max_certifiable_radius(9, 0.001, 1.0) == 0.0 and max_certifiable_radius(10, 0.001, 1.0) > 0
    for bad in ((0, 0.001, 0.25), (10.5, 0.001, 0.25), (100, 1.5, 0.25), (100, 0.001, 0.0)):
        with pytest.raises(ValueError):
            max_certifiable_radius(*bad)


def test_certify_values_and_abstain_rules():
    sigma, alpha = 0.5, 0.001
    cls, radius = certify_counts([1, 99, 0], [10, 990, 0], sigma, alpha)
    p_a = beta.ppf(alpha, 990, 11)
    assert cls == 1 and radius == pytest.approx(sigma * norm.ppf(p_a))
    # Selection picks the class; estimation votes for another class do not help it.
    assert certify_counts([99, 1, 0], [10, 990, 0], sigma, alpha) == (ABSTAIN, 0.0)
    # Majority but a lower bound not above 1/2: abstain.
    assert certify_counts([0, 100], [45, 55], sigma, alpha) == (ABSTAIN, 0.0)
    # Failed samples (n > sum of counts) count against the top class.
    assert certify_counts([0, 20], [0, 60], sigma, 0.05)[0] == 1
    assert certify_counts([0, 20], [0, 60], sigma, 0.05, n=120) == (ABSTAIN, 0.0)
    with pytest.raises(ValueError, match="sigma"):
        certify_counts([1], [1], 0.0, alpha)
    with pytest.raises(ValueError, match="no votes"):
        certify_counts([0, 0], [5, 5], sigma, alpha)


def test_string_labels_give_the_same_certificate_as_indices():
    labels = ["cat", "dog", "car"]
    selection, estimation = [3, 90, 7], [40, 900, 60]
    by_label = certify_counts(dict(zip(labels, selection)), dict(zip(labels, estimation)), 0.25, 0.001)
    by_index = certify_counts(np.array(selection), np.array(estimation), 0.25, 0.001)
    assert by_label == ("dog", by_index[1])
    # A class absent from the estimation mapping has zero votes there.
    assert certify_counts({"cat": 5}, {"dog": 100}, 0.25, 0.001) == (ABSTAIN, 0.0)
    assert predict_counts({"cat": 5, "dog": 95}, 0.001) == "dog"


def test_predict_binomial_test_and_ties():
    alpha = 0.001
    assert predict_counts(np.array([0, 80, 20]), alpha) == 1
    assert binomtest(55, 100, 0.5).pvalue > alpha
    assert predict_counts(np.array([55, 45, 0]), alpha) == ABSTAIN
    assert predict_counts(np.array([50, 50]), 0.5) == ABSTAIN
    assert predict_counts(np.array([0, 0, 0]), alpha) == ABSTAIN
    assert predict_counts(np.array([30]), alpha) == 0  # a single class beats "no second class"
    # Equal counts break towards the lower index, like np.argmax, for arrays and mappings alike.
    assert predict_counts(np.array([0, 40, 40, 0]), 0.9) == ABSTAIN


@pytest.mark.parametrize(
    "call",
    [
        lambda: lower_confidence_bound(5, 0, 0.1),
        lambda: lower_confidence_bound(11, 10, 0.1),
        lambda: lower_confidence_bound(-1, 10, 0.1),
        lambda: lower_confidence_bound(5, 10, 0.0),
        lambda: lower_confidence_bound(5, 10, 1.5),
        lambda: certify_counts([1, 2], [1, 2], 0.5, 0.01, n=2),
        lambda: predict_counts(np.array([1.5, 2.0]), 0.01),
        lambda: predict_counts(np.array([-1, 2]), 0.01),
    ],
)
def test_bad_inputs_raise(call):
    with pytest.raises(ValueError):
        call()

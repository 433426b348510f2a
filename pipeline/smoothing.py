"""Randomized-smoothing decisions on vote counts (Cohen, Rosenfeld & Kolter, 2019).

Everything here works on *counts*, never on models: the sampling engine (local, Ray actors
or a commercial API) produces counts, and these functions turn them into certificates.
Keeping the statistics apart from the sampling is what lets `dsmooth reduce` recompute
every certificate offline at another alpha without a single new query.

Counts are either integer arrays indexed by class, or mappings from a label (an API's
label string, or a class index) to a count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Hashable, Union

import numpy as np
from scipy.stats import binomtest, norm
from statsmodels.stats.proportion import proportion_confint

ABSTAIN = -1

Counts = Union[Sequence[int], np.ndarray, Mapping[Hashable, int]]


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")


def lower_confidence_bound(n_a: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on p from n_a successes in n.

    A two-sided interval at level 2*alpha has exactly the one-sided lower bound we want;
    that is how the reference implementation calls statsmodels.
    """
    _check_alpha(alpha)
    if n <= 0:
        raise ValueError(f"n must be positive, got {n!r}")
    if not 0 <= n_a <= n:
        raise ValueError(f"n_a must lie in [0, n={n}], got {n_a!r}")
    return float(proportion_confint(n_a, n, alpha=2 * alpha, method="beta")[0])


def lower_confidence_bounds(n_a: np.ndarray, n: np.ndarray, alpha: float) -> np.ndarray:
    """Vectorised `lower_confidence_bound` for whole result tables (the reducer)."""
    _check_alpha(alpha)
    n_a = np.asarray(n_a, dtype=np.int64)
    n = np.asarray(n, dtype=np.int64)
    if np.any(n <= 0) or np.any(n_a < 0) or np.any(n_a > n):
        raise ValueError("every n must be positive and every n_a must lie in [0, n]")
    low, _ = proportion_confint(n_a, n, alpha=2 * alpha, method="beta")
    return np.nan_to_num(np.asarray(low, dtype=np.float64), nan=0.0)


def certified_radius(p_a_lower: float, sigma: float) -> float:
    """L2 radius sigma * Phi^-1(p_A) of Cohen et al.'s Theorem 1 (0 when p_A <= 1/2)."""
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma!r}")
    if p_a_lower <= 0.5:
        return 0.0
    return float(sigma * norm.ppf(p_a_lower))


def ranked(counts: Counts) -> list[tuple[Hashable, int]]:
    """(class, count) pairs, most votes first; ties go to the lower index / smaller label.

    The tie rule matches `np.argmax` on arrays and is independent of a mapping's
    iteration order, so a Parquet round trip cannot change a prediction.
    """
    if isinstance(counts, Mapping):
        items = [(label, int(c)) for label, c in counts.items()]
        if any(c < 0 for _, c in items):
            raise ValueError("counts must be non-negative")
        return sorted(items, key=lambda item: (-item[1], str(item[0])))
    array = np.asarray(counts)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"counts must be a 1-D integer array or a mapping, got {array.dtype} {array.shape}")
    if np.any(array < 0):
        raise ValueError("counts must be non-negative")
    order = np.argsort(-array, kind="stable")
    return [(int(i), int(array[i])) for i in order]


def top_class(counts: Counts) -> Hashable:
    """The class with the most votes (the CERTIFY selection step's guess c_A)."""
    ranking = ranked(counts)
    if not ranking or ranking[0][1] == 0:
        raise ValueError("selection counts hold no votes")
    return ranking[0][0]


def count_of(counts: Counts, cls: Hashable) -> int:
    """Votes for `cls`; a class that never came up has 0 votes."""
    if isinstance(counts, Mapping):
        return int(counts.get(cls, 0))
    array = np.asarray(counts)
    return int(array[cls]) if 0 <= int(cls) < array.shape[0] else 0


def total(counts: Counts) -> int:
    if isinstance(counts, Mapping):
        return int(sum(counts.values()))
    return int(np.asarray(counts).sum())


def certify_counts(
    counts_selection: Counts,
    counts_estimation: Counts,
    sigma: float,
    alpha: float,
    n: int | None = None,
) -> tuple[Hashable, float]:
    """CERTIFY: guess c_A from the selection counts, bound p_A on the fresh estimation counts.

    `n` is the number of estimation samples drawn; it defaults to the counts' total, and
    must be given when some samples produced no vote (a failed API query), so that those
    count against c_A instead of silently shrinking the sample.
    Returns (c_A, radius), or (ABSTAIN, 0.0) when p_A's lower bound is not above 1/2.
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma!r}")
    c_a = top_class(counts_selection)
    n_total = total(counts_estimation) if n is None else int(n)
    if n is not None and total(counts_estimation) > n_total:
        raise ValueError(f"estimation counts total {total(counts_estimation)} > n={n_total}")
    p_a = lower_confidence_bound(count_of(counts_estimation, c_a), n_total, alpha)
    if p_a <= 0.5:
        return ABSTAIN, 0.0
    return c_a, certified_radius(p_a, sigma)


def predict_counts(counts: Counts, alpha: float) -> Hashable:
    """PREDICT: the top class if a two-sided binomial test of the top two counts rejects
    "they are equally likely" at level alpha; else ABSTAIN."""
    _check_alpha(alpha)
    ranking = ranked(counts)
    if not ranking:
        return ABSTAIN
    top, n_a = ranking[0]
    n_b = ranking[1][1] if len(ranking) > 1 else 0
    if n_a + n_b == 0:
        return ABSTAIN
    if binomtest(n_a, n_a + n_b, p=0.5).pvalue > alpha:
        return ABSTAIN
    return top

"""Randomized-smoothing decisions on vote counts (Cohen, Rosenfeld & Kolter, 2019).

Everything here works on *counts*, never on models: a sampler (the local engine, Ray actors
or a commercial API) produces counts, and these functions turn them into certificates.
Keeping the statistics apart from the sampling is what lets `dsmooth reduce` recompute every
certificate offline at another alpha without a single new query.

There is one implementation: `certify_matrix` and `predict_matrix` decide a whole table of
images at once (a row per image, a column per class). The engine, the reducer (model and API
votes alike) and the scalar functions `certify_counts` / `predict_counts` all go through
them. Labels that are not column indices (an API's label strings) are mapped to columns by
`dense_counts`, whose column order is also the tie rule: equal counts go to the lower column,
i.e. the lower class index or the smaller label.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np
from scipy.stats import binom
from statsmodels.stats.proportion import proportion_confint

from pipeline.config import Alpha, Sigma, check_value
from pipeline.sampling.noise import DEFAULT_NOISE, noise_kind

ABSTAIN = -1

Counts = Union[Sequence[int], np.ndarray, Mapping[Hashable, int]]


def _check_alpha(alpha: float) -> float:
    return float(check_value(Alpha, alpha, "alpha"))


def _check_sigma(sigma: float) -> float:
    return float(check_value(Sigma, sigma, "sigma"))


# -- the bound and the test --------------------------------------------------------------------


def lower_confidence_bounds(n_a: np.ndarray, n: np.ndarray, alpha: float) -> np.ndarray:
    """One-sided (1 - alpha) Clopper-Pearson lower bounds on p from n_a successes in n, per row.

    A two-sided interval at level 2*alpha has exactly the one-sided lower bound we want; that
    is how the reference implementation calls statsmodels. n = 0 (no evidence) gives 0.
    """
    _check_alpha(alpha)
    n_a = np.asarray(n_a, dtype=np.int64)
    n = np.asarray(n, dtype=np.int64)
    if np.any(n < 0) or np.any(n_a < 0) or np.any(n_a > n):
        raise ValueError("every n must be >= 0 and every n_a must lie in [0, n]")
    low = np.zeros(np.broadcast(n_a, n).shape, dtype=np.float64)
    informative = np.broadcast_to(n > 0, low.shape)
    if informative.any():
        n_a_b, n_b = np.broadcast_to(n_a, low.shape), np.broadcast_to(n, low.shape)
        bound, _ = proportion_confint(n_a_b[informative], n_b[informative], alpha=2 * alpha, method="beta")
        low[informative] = np.nan_to_num(np.asarray(bound, dtype=np.float64), nan=0.0)
    return low


def lower_confidence_bound(n_a: int, n: int, alpha: float) -> float:
    """`lower_confidence_bounds` for one count (n must be positive)."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n!r}")
    if not 0 <= n_a <= n:
        raise ValueError(f"n_a must lie in [0, n={n}], got {n_a!r}")
    return float(lower_confidence_bounds(np.array([n_a]), np.array([n]), alpha)[0])


def binomial_pvalues(n_a: np.ndarray, n_b: np.ndarray) -> np.ndarray:
    """Two-sided exact binomial test of n_a successes in n_a + n_b at p = 1/2, per row.

    At p = 1/2 the distribution is symmetric, so scipy's binomtest p-value is
    min(1, 2 * P[X <= min(n_a, n_b)]), and 1 when the two counts are equal."""
    n_a = np.asarray(n_a, dtype=np.int64)
    n_b = np.asarray(n_b, dtype=np.int64)
    low = np.minimum(n_a, n_b)
    p = np.minimum(1.0, 2.0 * binom.cdf(low, n_a + n_b, 0.5))
    return np.where(n_a == n_b, 1.0, p)


def certified_radius(p_a_lower: float, sigma: float, noise: str = DEFAULT_NOISE) -> float:
    """The radius a lower bound p_A certifies under `noise` (0 when p_A <= 1/2): Gaussian, the
    L2 radius sigma * Phi^-1(p_A) of Cohen et al.'s Theorem 1; see `pipeline.sampling.noise`."""
    return float(certified_radii(np.array([p_a_lower]), _check_sigma(sigma), noise)[0])


def certified_radii(p_a_lower: np.ndarray, sigma: float | np.ndarray, noise: str | None = DEFAULT_NOISE
                    ) -> np.ndarray:
    """Vectorised `certified_radius` (sigma a scalar or one per row): the noise kind's one
    radius function."""
    return noise_kind(noise).radius(p_a_lower, sigma)


def max_certifiable_radius(
    n: int | np.ndarray, alpha: float | np.ndarray, sigma: float | np.ndarray, noise: str | None = DEFAULT_NOISE
) -> float | np.ndarray:
    """The largest radius CERTIFY can return with `n` estimation samples at `alpha`.

    Even when all n votes go to c_A, the one-sided Clopper-Pearson bound is only
    alpha^(1/n), so no image can be certified beyond radius(alpha^(1/n)) (0 when
    that bound is not above 1/2: n too small to certify anything). A table column or a plot
    region above it is empty because of n, not because of the model -- which is why tables
    drop such columns and plots mark this radius. Vectorised (arguments broadcast); a float
    when every argument is a scalar.
    """
    n_array, alphas, sigmas = np.broadcast_arrays(np.asarray(n), np.asarray(alpha, dtype=np.float64),
                                                  np.asarray(sigma, dtype=np.float64))
    if not (np.issubdtype(n_array.dtype, np.integer) or np.all(np.mod(n_array, 1) == 0)) or np.any(n_array <= 0):
        raise ValueError(f"n must be a positive whole number of samples, got {n!r}")
    for value in np.unique(alphas):
        _check_alpha(float(value))
    best_bound = np.exp(np.log(alphas) / n_array.astype(np.float64))  # alpha^(1/n): all n votes for c_A
    radius = certified_radii(best_bound, sigmas, noise)
    return float(radius) if radius.ndim == 0 else radius


# -- the decisions, a row per image ------------------------------------------------------------


@dataclass(frozen=True)
class Decisions:
    """Per row: the class column decided (ABSTAIN = -1), its certified radius (0 for PREDICT
    and abstentions) and p_A's lower bound (NaN for PREDICT)."""

    prediction: np.ndarray
    radius: np.ndarray
    p_a_lower: np.ndarray

    @property
    def abstained(self) -> np.ndarray:
        return self.prediction == ABSTAIN


def _matrix(counts: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(counts)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or not (np.issubdtype(array.dtype, np.integer) or array.size == 0):
        raise ValueError(f"{name} must be an integer matrix [images, classes], got {array.dtype} {array.shape}")
    if np.any(array < 0):
        raise ValueError(f"{name} must be non-negative")
    return array.astype(np.int64, copy=False)


def _same_width(*matrices: np.ndarray) -> list[np.ndarray]:
    width = max(max(m.shape[1] for m in matrices), 1)
    return [np.pad(m, ((0, 0), (0, width - m.shape[1]))) for m in matrices]


def certify_matrix(
    selection: np.ndarray,
    estimation: np.ndarray,
    sigma: float | np.ndarray,
    alpha: float,
    n: np.ndarray | None = None,
    noise: str | None = DEFAULT_NOISE,
) -> Decisions:
    """CERTIFY for every row: c_A from the *selection* counts, p_A bounded on the fresh
    *estimation* counts, the noise's radius of p_A (Gaussian: sigma * Phi^-1(p_A)) when
    p_A > 1/2, else abstain.

    `n` (per row) is the number of estimation samples drawn; it defaults to the row sums and
    must be given when some samples gave no vote (a failed API query), so that those count
    against c_A instead of silently shrinking the sample. A row with no selection vote
    abstains (there is no c_A to name).
    """
    _check_alpha(alpha)
    selection, estimation = _same_width(_matrix(selection, "selection counts"), _matrix(estimation, "estimation counts"))
    if selection.shape[0] != estimation.shape[0]:
        raise ValueError(f"{selection.shape[0]} selection rows but {estimation.shape[0]} estimation rows")
    rows = np.arange(selection.shape[0])
    drawn = estimation.sum(axis=1) if n is None else np.broadcast_to(np.asarray(n, dtype=np.int64), rows.shape)
    if np.any(estimation.sum(axis=1) > drawn):
        raise ValueError("estimation counts exceed the number of samples n drawn")
    c_a = selection.argmax(axis=1)  # ties -> lowest column
    has_votes = selection.sum(axis=1) > 0
    p_a = lower_confidence_bounds(estimation[rows, c_a], drawn, alpha)
    p_a = np.where(has_votes, p_a, 0.0)
    certified = p_a > 0.5
    radius = certified_radii(np.where(certified, p_a, 0.0), sigma, noise)
    return Decisions(np.where(certified, c_a, ABSTAIN).astype(np.int64), radius, p_a)


def predict_matrix(counts: np.ndarray, alpha: float) -> Decisions:
    """PREDICT for every row: the top column if a two-sided binomial test of the top two counts
    rejects "they are equally likely" at level alpha; else abstain."""
    _check_alpha(alpha)
    (counts,) = _same_width(_matrix(counts, "counts"))
    rows = np.arange(counts.shape[0])
    top = counts.argmax(axis=1)
    first = counts[rows, top]
    rest = counts.copy()
    rest[rows, top] = -1
    second = rest.max(axis=1).clip(min=0) if counts.shape[1] > 1 else np.zeros_like(first)
    decided = (first + second > 0) & (binomial_pvalues(first, second) <= alpha)
    prediction = np.where(decided, top, ABSTAIN).astype(np.int64)
    return Decisions(prediction, np.zeros(len(rows)), np.full(len(rows), np.nan))


# -- labels that are not column indices --------------------------------------------------------


def _label_key(label: Hashable) -> tuple:
    """Column order of labels, which is also the tie rule: numbers by value, then strings."""
    if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
        return (0, int(label), "")
    return (1, 0, str(label))


def dense_counts(rows: Sequence[Mapping[Hashable, int]], labels: Sequence[Hashable] | None = None,
                 ) -> tuple[np.ndarray, list[Hashable]]:
    """(count matrix, column labels) for mappings label -> count, one row per mapping; the
    columns are `labels` or every label seen, in `_label_key` order."""
    if labels is None:
        labels = sorted({label for row in rows for label in row}, key=_label_key)
    column = {label: i for i, label in enumerate(labels)}
    matrix = np.zeros((len(rows), len(labels)), dtype=np.int64)
    for i, row in enumerate(rows):
        for label, count in row.items():
            if label in column:
                matrix[i, column[label]] = int(count)
    return matrix, list(labels)


def _as_row(counts: Counts, labels: list[Hashable] | None = None) -> tuple[np.ndarray, list[Hashable] | None]:
    if isinstance(counts, Mapping):
        if any(int(c) < 0 for c in counts.values()):
            raise ValueError("counts must be non-negative")
        matrix, labels = dense_counts([counts], labels)
        return matrix, labels
    array = np.asarray(counts)
    if array.ndim != 1 or not (np.issubdtype(array.dtype, np.integer) or array.size == 0):
        raise ValueError(f"counts must be a 1-D integer array or a mapping, got {array.dtype} {array.shape}")
    return _matrix(array, "counts"), None


def ranked(counts: Counts) -> list[tuple[Hashable, int]]:
    """(class, count) pairs, most votes first, ties in column order (see `dense_counts`)."""
    row, labels = _as_row(counts)
    order = np.argsort(-row[0], kind="stable")
    return [((labels[i] if labels is not None else int(i)), int(row[0, i])) for i in order]


def top_class(counts: Counts) -> Hashable:
    """The class with the most votes (the CERTIFY selection step's guess c_A)."""
    ranking = ranked(counts)
    if not ranking or ranking[0][1] == 0:
        raise ValueError("selection counts hold no votes")
    return ranking[0][0]


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
    noise: str = DEFAULT_NOISE,
) -> tuple[Hashable, float]:
    """CERTIFY for one image (a thin wrapper of `certify_matrix`): (c_A, radius), or
    (ABSTAIN, 0.0) when p_A's lower bound is not above 1/2.

    `n` is the number of estimation samples drawn (default: the counts' total); give it when
    some samples produced no vote. Raises ValueError when the selection holds no vote.
    """
    _check_sigma(sigma)
    top_class(counts_selection)  # raises on an empty selection, as a single call should
    labels = None
    if isinstance(counts_selection, Mapping) or isinstance(counts_estimation, Mapping):
        as_map = [c if isinstance(c, Mapping) else dict(enumerate(np.asarray(c).tolist()))
                  for c in (counts_selection, counts_estimation)]
        (selection, estimation), labels = _pair_rows(as_map)
    else:
        selection, _ = _as_row(counts_selection)
        estimation, _ = _as_row(counts_estimation)
    drawn = total(counts_estimation) if n is None else int(n)
    if n is not None and total(counts_estimation) > drawn:
        raise ValueError(f"estimation counts total {total(counts_estimation)} > n={drawn}")
    decision = certify_matrix(selection, estimation, sigma, alpha, n=np.array([drawn]), noise=noise)
    column = int(decision.prediction[0])
    if column == ABSTAIN:
        return ABSTAIN, 0.0
    return (labels[column] if labels is not None else column), float(decision.radius[0])


def _pair_rows(rows: list[Mapping[Hashable, int]]) -> tuple[tuple[np.ndarray, np.ndarray], list[Hashable]]:
    for row in rows:
        if any(int(c) < 0 for c in row.values()):
            raise ValueError("counts must be non-negative")
    matrix, labels = dense_counts(rows)
    return (matrix[:1], matrix[1:]), labels


def predict_counts(counts: Counts, alpha: float) -> Hashable:
    """PREDICT for one image (a thin wrapper of `predict_matrix`): the top class if a
    two-sided binomial test of the top two counts rejects equality at alpha, else ABSTAIN."""
    row, labels = _as_row(counts)
    column = int(predict_matrix(row, alpha).prediction[0])
    if column == ABSTAIN:
        return ABSTAIN
    return labels[column] if labels is not None else column

"""Certificates recomputed from a run's Parquet vote rows at any alpha.

The rules are `pipeline.smoothing`'s (certify_counts, predict_counts), applied to whole
columns at once: a scalar call per image costs ~0.5 ms in statsmodels/scipy, which would
make 10,000 images take seconds per alpha; here the bound and the binomial test run on
arrays and only API rows (a dict of label strings per image) loop in Python.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import binom, norm

from pipeline.reduce.certificates import Certificates, ReduceWarning, UnusableInput, make_certificates
from pipeline.smoothing import ABSTAIN, _check_alpha, lower_confidence_bounds, ranked
from pipeline.storage import RUN_FILE, read_votes

ABSTAIN_LABEL = str(ABSTAIN)  # how label-string (API) rows spell an abstention, as the API logs do


def load_run(run_dir: str | Path, alpha: float, name: str | None = None) -> Certificates:
    """A run directory's certificates at `alpha`; sigma from run.json identity["sigma"]."""
    run_dir = Path(run_dir)
    try:
        record = json.loads((run_dir / RUN_FILE).read_text())
        identity = record.get("identity") or {}
    except (OSError, ValueError, AttributeError) as error:
        raise UnusableInput(f"{run_dir}: unreadable {RUN_FILE} ({error})") from None
    try:
        votes = read_votes(run_dir)
    except Exception as error:  # a damaged part file must not stop the whole reduction
        raise UnusableInput(f"{run_dir}: unreadable votes ({type(error).__name__}: {error})") from None
    if votes.empty:
        raise UnusableInput(f"{run_dir}: run has no votes yet")
    sigma = identity.get("sigma")
    label = name if name is not None else str(run_dir)
    return certificates_from_votes(votes, alpha, sigma=sigma, name=label, source=str(run_dir))


def certificates_from_votes(
    votes: pd.DataFrame, alpha: float, sigma: float | None = None, name: str = "", source: str = ""
) -> Certificates:
    """Certify (selection + estimation rows) and predict (prediction rows) every image.

    `sigma` is the run's; a row's own sigma column wins where set. Images lacking one of
    their CERTIFY rows are skipped with one ReduceWarning giving the count."""
    _check_alpha(alpha)
    where = name or source or "votes"
    votes = votes.drop_duplicates(["image_id", "phase"], keep="first")  # as storage.read_votes
    parts = []
    certify = _certify(votes, alpha, sigma, where)
    if certify is not None:
        parts.append(certify)
    predict = _predict(votes, alpha)
    if predict is not None:
        if certify is not None:  # a CERTIFY result is the stronger statement about an image
            predict = predict[~predict["image_id"].isin(certify["image_id"])]
        parts.append(predict)
    if not parts:
        raise UnusableInput(f"{where}: no complete images in the votes")
    frame = pd.concat(parts, ignore_index=True).sort_values("image_id", kind="stable")
    run_sigma = sigma if sigma is not None else _single_sigma(votes)
    return make_certificates(frame, name=name, sigma=run_sigma, source=source, alpha=alpha)


def _single_sigma(votes: pd.DataFrame) -> float | None:
    values = votes["sigma"].dropna().unique()
    return float(values[0]) if len(values) == 1 else None


def _is_labelled(classes: pd.Series) -> np.ndarray:
    return np.array([value is not None and not (np.isscalar(value) and pd.isna(value)) for value in classes])


def _dense(counts: pd.Series, width: int | None = None) -> np.ndarray:
    """Stack per-row count lists into a matrix, zero-padded to the widest row."""
    rows = [np.asarray(c, dtype=np.int64) for c in counts]
    width = max([len(r) for r in rows] + [width or 0, 1])
    matrix = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        matrix[i, : len(row)] = row
    return matrix


def _mapping(classes: Any, counts: Any) -> dict[str, int]:
    if classes is None or (np.isscalar(classes) and pd.isna(classes)):
        return {str(i): int(c) for i, c in enumerate(counts)}
    return {str(label): int(c) for label, c in zip(classes, counts)}


def _certify(votes: pd.DataFrame, alpha: float, sigma: float | None, where: str) -> pd.DataFrame | None:
    selection = votes[votes["phase"] == "selection"].set_index("image_id")
    estimation = votes[votes["phase"] == "estimation"].set_index("image_id")
    if selection.empty and estimation.empty:
        return None
    for missing, phase, why in (
        (selection.index.difference(estimation.index), "estimation", "in flight when the job stopped"),
        (estimation.index.difference(selection.index), "selection", "damaged run"),
    ):
        if len(missing):
            warnings.warn(
                f"{where}: {len(missing)} image(s) have no {phase} row ({why}); skipped", ReduceWarning, stacklevel=3
            )
    ids = selection.index.intersection(estimation.index).sort_values()
    if len(ids) == 0:
        return None
    selection, estimation = selection.loc[ids], estimation.loc[ids]

    row_sigma = estimation["sigma"].astype(np.float64).to_numpy()
    if sigma is not None:
        row_sigma = np.where(np.isnan(row_sigma), float(sigma), row_sigma)
    if np.any(np.isnan(row_sigma)) or np.any(row_sigma <= 0):
        raise UnusableInput(f"{where}: sigma unknown or not positive (neither run.json nor the votes give it)")

    labelled = _is_labelled(selection["classes"]) | _is_labelled(estimation["classes"])
    n_images = len(ids)
    n_a = np.zeros(n_images, dtype=np.int64)
    totals = np.zeros(n_images, dtype=np.int64)
    has_votes = np.zeros(n_images, dtype=bool)
    guess = np.empty(n_images, dtype=object)

    dense = np.flatnonzero(~labelled)
    if len(dense):
        chosen = _dense(selection["counts"].iloc[dense])
        counted = _dense(estimation["counts"].iloc[dense], width=chosen.shape[1])
        if counted.shape[1] > chosen.shape[1]:
            chosen = np.pad(chosen, ((0, 0), (0, counted.shape[1] - chosen.shape[1])))
        top = chosen.argmax(axis=1)  # ties -> lowest index, as smoothing.top_class
        has_votes[dense] = chosen.sum(axis=1) > 0
        n_a[dense] = counted[np.arange(len(dense)), top]
        totals[dense] = counted.sum(axis=1)
        guess[dense] = top.tolist()
    for i in np.flatnonzero(labelled):
        chosen = _mapping(selection["classes"].iloc[i], selection["counts"].iloc[i])
        counted = _mapping(estimation["classes"].iloc[i], estimation["counts"].iloc[i])
        ranking = ranked(chosen)
        has_votes[i] = bool(ranking) and ranking[0][1] > 0
        guess[i] = ranking[0][0] if has_votes[i] else ABSTAIN_LABEL
        n_a[i] = counted.get(guess[i], 0) if has_votes[i] else 0
        totals[i] = sum(counted.values())

    n_column = estimation["n"].astype("Float64").to_numpy(dtype=np.float64, na_value=np.nan)
    n = np.where(np.isnan(n_column), totals, n_column).astype(np.int64)
    valid = (n > 0) & (totals <= n)
    if not valid.all():
        warnings.warn(
            f"{where}: {int((~valid).sum())} image(s) have estimation counts above n or n = 0; skipped",
            ReduceWarning,
            stacklevel=3,
        )
    p_a = np.zeros(n_images, dtype=np.float64)
    if valid.any():
        p_a[valid] = lower_confidence_bounds(n_a[valid], n[valid], alpha)
    p_a[~has_votes] = 0.0  # nothing to select: certify_counts cannot name c_A, so abstain
    certified = has_votes & (p_a > 0.5)
    with np.errstate(divide="ignore", invalid="ignore"):
        radius = np.where(certified, row_sigma * norm.ppf(np.where(certified, p_a, 0.75)), 0.0)

    predict = np.empty(n_images, dtype=object)
    for i in range(n_images):
        if certified[i]:
            predict[i] = guess[i]
        else:
            predict[i] = ABSTAIN_LABEL if labelled[i] else ABSTAIN
    label, correct = _labels_and_correct(estimation, labelled, predict, certified)
    frame = pd.DataFrame(
        {
            "image_id": ids.to_numpy(),
            "label": label,
            "predict": predict,
            "p_a_lower": p_a,
            "radius": radius,
            "correct": correct,
            "abstained": ~certified,
            "time_s": _elapsed(selection) + _elapsed(estimation),
        }
    )
    return frame[valid]


def _elapsed(rows: pd.DataFrame) -> np.ndarray:
    return rows["elapsed_s"].astype("Float64").to_numpy(dtype=np.float64, na_value=np.nan)


def _labels_and_correct(
    rows: pd.DataFrame, labelled: np.ndarray, predict: np.ndarray, decided: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Label strings are compared with label_name (APIs), class indices with label."""
    label = np.empty(len(rows), dtype=object)
    correct = np.zeros(len(rows), dtype=bool)
    names = rows["label_name"].to_numpy(dtype=object)
    indices = rows["label"].astype("Int64").to_numpy(dtype=object, na_value=None)
    for i in range(len(rows)):
        if labelled[i]:
            label[i] = None if names[i] is None or pd.isna(names[i]) else str(names[i])
            correct[i] = bool(decided[i]) and label[i] is not None and predict[i] == label[i]
        else:
            label[i] = indices[i]
            correct[i] = bool(decided[i]) and indices[i] is not None and int(predict[i]) == int(indices[i])
    return label, correct


def _predict(votes: pd.DataFrame, alpha: float) -> pd.DataFrame | None:
    """PREDICT on "prediction" rows: top class unless a two-sided binomial test of the top
    two counts at p = 1/2 fails to reject at alpha (radius 0)."""
    rows = votes[votes["phase"] == "prediction"].sort_values("image_id", kind="stable")
    if rows.empty:
        return None
    labelled = _is_labelled(rows["classes"])
    count = len(rows)
    first = np.zeros(count, dtype=np.int64)
    second = np.zeros(count, dtype=np.int64)
    top = np.empty(count, dtype=object)
    dense = np.flatnonzero(~labelled)
    if len(dense):
        matrix = _dense(rows["counts"].iloc[dense])
        best = matrix.argmax(axis=1)
        ordered = np.sort(matrix, axis=1)
        first[dense] = ordered[:, -1]
        second[dense] = ordered[:, -2] if matrix.shape[1] > 1 else 0
        top[dense] = best.tolist()
    for i in np.flatnonzero(labelled):
        ranking = ranked(_mapping(rows["classes"].iloc[i], rows["counts"].iloc[i]))
        top[i] = ranking[0][0] if ranking else ABSTAIN_LABEL
        first[i] = ranking[0][1] if ranking else 0
        second[i] = ranking[1][1] if len(ranking) > 1 else 0
    decided = (first + second > 0) & (binomial_pvalue(first, second) <= alpha)
    predict = np.empty(count, dtype=object)
    for i in range(count):
        predict[i] = top[i] if decided[i] else (ABSTAIN_LABEL if labelled[i] else ABSTAIN)
    label, correct = _labels_and_correct(rows, labelled, predict, decided)
    return pd.DataFrame(
        {
            "image_id": rows["image_id"].to_numpy(),
            "label": label,
            "predict": predict,
            "p_a_lower": np.nan,
            "radius": 0.0,
            "correct": correct,
            "abstained": ~decided,
            "time_s": _elapsed(rows),
        }
    )


def binomial_pvalue(n_a: np.ndarray, n_b: np.ndarray) -> np.ndarray:
    """Two-sided exact binomial test of n_a successes in n_a + n_b at p = 1/2, vectorised.

    At p = 1/2 the distribution is symmetric, so scipy's binomtest p-value is
    min(1, 2 * P[X <= min(n_a, n_b)]), and 1 when the two counts are equal."""
    n_a = np.asarray(n_a, dtype=np.int64)
    n_b = np.asarray(n_b, dtype=np.int64)
    low = np.minimum(n_a, n_b)
    p = np.minimum(1.0, 2.0 * binom.cdf(low, n_a + n_b, 0.5))
    return np.where(n_a == n_b, 1.0, p)

"""Certificates recomputed from a run's Parquet vote rows at any alpha.

The decisions are `pipeline.stats.smoothing.certify_matrix` / `predict_matrix`, the one
implementation of CERTIFY and PREDICT, applied to every image of a run at once. Rows of
class-index counts (models) become count matrices directly; rows of label strings (APIs)
are mapped onto columns by `smoothing.dense_counts`, whose column order is the tie rule.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.reduce.certificates import Certificates, ReduceWarning, UnusableInput, make_certificates
from pipeline.stats.smoothing import ABSTAIN, _check_alpha, certify_matrix, dense_counts, predict_matrix
from pipeline.runs.fs import Location
from pipeline.runs.identity import recorded_alpha
from pipeline.runs.storage import RUN_FILE, VOTE_KEY, CorruptPartError, read_intact_votes, read_run_record

ABSTAIN_LABEL = str(ABSTAIN)  # how label-string (API) rows spell an abstention, as the API logs do


def load_run(run_dir: str | Path | Location, alpha: float | None = None, name: str | None = None) -> Certificates:
    """A run directory's certificates (local or object storage) at `alpha`, by default the
    run's own (`recorded_alpha`: exactly what a sequential run decided); sigma, n, data set
    and model from the run.json identity (see `describe_identity`)."""
    run_dir = Location.of(run_dir)
    try:
        record = read_run_record(run_dir)
        identity = record.get("identity") or {}
    except (OSError, ValueError, AttributeError) as error:
        raise UnusableInput(f"{run_dir}: unreadable {RUN_FILE} ({error})") from None
    try:
        votes, damaged = read_intact_votes(run_dir)
    except CorruptPartError as error:  # a damaged part whose images are unknown: nothing is sure
        raise UnusableInput(str(error)) from None
    except Exception as error:  # a damaged part file must not stop the whole reduction
        raise UnusableInput(f"{run_dir}: unreadable votes ({type(error).__name__}: {error})") from None
    for part in damaged:  # the rest of the run is reported; resume keeps refusing until it is deleted
        warnings.warn(f"{run_dir}: {len(part.images)} image(s) left out, {part.message}", ReduceWarning, stacklevel=2)
    if votes.empty:
        raise UnusableInput(f"{run_dir}: " + ("no intact votes (damaged parts above)" if damaged else "run has no votes yet"))
    label = name if name is not None else str(run_dir)
    if identity.get("openai_model") and str(identity["openai_model"]) not in label:
        label += f" [{describe_identity(identity)['model']}]"  # tables name a chat model's runs: model, prompt
    own = recorded_alpha(record)
    alpha = own if alpha is None else alpha
    if identity.get("sequential"):
        certs = sequential_certificates(votes, identity, alpha, name=label, source=str(run_dir))
        certs.labels_from = (record.get("extra") or {}).get("labels_from")
        return certs
    certs = certificates_from_votes(
        votes, alpha, sigma=identity.get("sigma"), name=label, source=str(run_dir), **describe_identity(identity)
    )
    certs.run_alpha = own
    certs.labels_from = (record.get("extra") or {}).get("labels_from")
    return certs


def describe_identity(identity: dict[str, Any]) -> dict[str, Any]:
    """What a table or plot says about a run, from its run.json identity
    (`pipeline.runs.identity`): the CERTIFY estimation count `n` (None for a PREDICT run,
    which certifies no radius), the `dataset` ("cifar10/test (cifar10-sample)": the split
    and the data's base name) and the `model` ("denoiser → classifier", or "→ aws API")."""
    n = identity.get("n") if identity.get("mode", "certify") == "certify" else None
    dataset = identity.get("dataset")
    data = identity.get("data")
    if dataset and data and data != str(dataset).split("/")[0]:
        dataset = f"{dataset} ({data})"
    target = identity.get("classifier") or (f"{identity['provider']} API" if identity.get("provider") else None)
    if identity.get("openai_model"):  # a chat model: which model, and which prompt (by its digest)
        target = f"{identity['openai_model']} (chat API, prompt {identity.get('prompt_sha256')})"
    denoiser = identity.get("denoiser")
    model = f"{denoiser} → {target}" if denoiser and target else target
    return {"n": None if n is None else int(n), "dataset": dataset, "model": model,
            "noise": identity.get("noise", "gaussian")}


def certificates_from_votes(
    votes: pd.DataFrame,
    alpha: float,
    sigma: float | None = None,
    name: str = "",
    source: str = "",
    n: int | None = None,
    dataset: str | None = None,
    model: str | None = None,
    noise: str | None = None,
) -> Certificates:
    """Certify (selection + estimation rows) and predict (prediction rows) every image.

    `sigma` is the run's; a row's own sigma column wins where set. Images lacking one of
    their CERTIFY rows are skipped with one ReduceWarning giving the count. `dataset` and
    `model` only label the result; `n`, the run's estimation count, bounds its radii
    (`Certificates.max_radius`), so the rows' own n wins, and it is dropped when the rows
    disagree or when some images were only PREDICT'ed (no radius at all)."""
    _check_alpha(alpha)
    where = name or source or "votes"
    votes = votes.drop_duplicates([c for c in VOTE_KEY if c in votes], keep="first")  # as storage.read_votes
    parts = []
    certify = _certify(votes, alpha, sigma, where, noise)
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
    n = None if predict is not None and len(predict) else _estimation_n(votes, n)
    return make_certificates(
        frame, name=name, sigma=run_sigma, source=source, alpha=alpha, n=n, dataset=dataset, model=model,
        noise=noise,
    )


def _estimation_n(votes: pd.DataFrame, run_n: int | None) -> int | None:
    """The one n every estimation row drew (`run_n` when the rows do not say); None when
    the rows disagree, since then no single n bounds the radii."""
    drawn = votes.loc[votes["phase"] == "estimation", "n"].astype("Float64").dropna().unique()
    if len(drawn) > 1:
        return None
    return int(drawn[0]) if len(drawn) else run_n


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


def _count_matrices(
    rows: list[pd.DataFrame], labelled: np.ndarray
) -> tuple[list[np.ndarray], np.ndarray]:
    """Count matrices of the same images in each frame of `rows` (aligned), and each column's
    class: class indices for model rows, label strings for API rows (`labelled`)."""
    width = 1
    matrices = [np.zeros((len(labelled), 0), dtype=np.int64) for _ in rows]
    dense = np.flatnonzero(~labelled)
    if len(dense):
        parts = [_dense(frame["counts"].iloc[dense]) for frame in rows]
        width = max(part.shape[1] for part in parts)
        for i, part in enumerate(parts):
            matrices[i] = np.zeros((len(labelled), width), dtype=np.int64)
            matrices[i][dense, : part.shape[1]] = part
    columns = np.arange(width, dtype=object)
    api = np.flatnonzero(labelled)
    if len(api):
        maps = [[_mapping(frame["classes"].iloc[i], frame["counts"].iloc[i]) for i in api] for frame in rows]
        _, labels = dense_counts([m for frame_maps in maps for m in frame_maps])
        offset = max(width, 1)
        for i, frame_maps in enumerate(maps):
            part, _ = dense_counts(frame_maps, labels)
            grown = np.zeros((len(labelled), offset + len(labels)), dtype=np.int64)
            grown[:, : matrices[i].shape[1]] = matrices[i]
            grown[api, offset:] = part
            matrices[i] = grown
        columns = np.concatenate([np.arange(offset, dtype=object), np.array(labels, dtype=object)])
    return matrices, columns


def _decided_classes(prediction: np.ndarray, columns: np.ndarray, labelled: np.ndarray) -> np.ndarray:
    """Column indices -> classes; abstentions as ABSTAIN (models) or "-1" (API labels)."""
    out = np.empty(len(prediction), dtype=object)
    for i, column in enumerate(prediction):
        if column == ABSTAIN:
            out[i] = ABSTAIN_LABEL if labelled[i] else ABSTAIN
        else:
            out[i] = columns[column] if labelled[i] else int(columns[column])
    return out


def _certify(votes: pd.DataFrame, alpha: float, sigma: float | None, where: str,
             noise: str | None = None) -> pd.DataFrame | None:
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
    (chosen, counted), columns = _count_matrices([selection, estimation], labelled)
    totals = counted.sum(axis=1)
    n_column = estimation["n"].astype("Float64").to_numpy(dtype=np.float64, na_value=np.nan)
    n = np.where(np.isnan(n_column), totals, n_column).astype(np.int64)
    valid = (n > 0) & (totals <= n)
    if not valid.all():
        warnings.warn(
            f"{where}: {int((~valid).sum())} image(s) have estimation counts above n or n = 0; skipped",
            ReduceWarning,
            stacklevel=3,
        )
    decisions = certify_matrix(chosen[valid], counted[valid], row_sigma[valid], alpha, n=n[valid], noise=noise)
    selection, estimation, labelled = selection[valid], estimation[valid], labelled[valid]
    predict = _decided_classes(decisions.prediction, columns, labelled)
    certified = ~decisions.abstained
    label, correct = _labels_and_correct(estimation, labelled, predict, certified)
    return pd.DataFrame(
        {
            "image_id": ids.to_numpy()[valid],
            "label": label,
            "predict": predict,
            "p_a_lower": decisions.p_a_lower,
            "radius": decisions.radius,
            "correct": correct,
            "abstained": ~certified,
            "time_s": _elapsed(selection) + _elapsed(estimation),
        }
    )


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
    """PREDICT on "prediction" rows (radius 0)."""
    rows = votes[votes["phase"] == "prediction"].sort_values("image_id", kind="stable")
    if rows.empty:
        return None
    labelled = _is_labelled(rows["classes"])
    (counts,), columns = _count_matrices([rows], labelled)
    decisions = predict_matrix(counts, alpha)
    predict = _decided_classes(decisions.prediction, columns, labelled)
    decided = ~decisions.abstained
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


def sequential_certificates(votes: pd.DataFrame, identity: dict[str, Any], alpha: float | None = None,
                            name: str = "", source: str = "") -> Certificates:
    """A sequential run's certificates: every decision recomputed by `replay` of the stored
    chunk votes (`pipeline.stats.sequential`), one row per image that has votes, with the samples
    its decision used (column `samples`).

    At the run's alpha (the default) this is exactly what the run decided, from the chunks up
    to each decision (the ones drawn after it are ignored). At another alpha the replay is
    still valid (Ville's inequality holds up to the run's stopping) but only has the chunks
    the run drew: an image it leaves undecided is not certified. Images still undecided at
    the run's own alpha were in flight when the job stopped: they are the borderline ones, so
    they stay in the table, counted as not certified, with a ReduceWarning saying so (a rerun
    of the job resumes them)."""
    import dataclasses

    from pipeline.stats.sequential import SequentialTest, replay
    from pipeline.certify.schedule import chunk_votes_from_rows, is_label_row

    where = name or source or "votes"
    fields = {f.name for f in dataclasses.fields(SequentialTest)}
    settings = identity["sequential"]
    run_test = SequentialTest(**{k: v for k, v in settings.items() if k in fields})
    alpha = run_test.alpha if alpha is None else _check_alpha(alpha)
    chunked = votes[votes["chunk"].notna()].sort_values("image_id", kind="stable")
    if chunked.empty:
        raise UnusableInput(f"{where}: no chunk votes in this sequential run yet")
    first = chunked.drop_duplicates("image_id")
    ids = first["image_id"].astype(np.int64).to_numpy()
    rows_of = {int(i): row for row, i in enumerate(ids)}
    api = bool(any(is_label_row(c) for c in first["classes"]))
    if api:  # the clean answer is the label, tested as column 0 (pipeline.apis.run.state)
        names = first["label_name"].to_numpy(dtype=object)
        labels = np.array([0 if name is not None and not pd.isna(name) else -1 for name in names], dtype=np.int64)
    else:
        labels = first["label"].astype("Int64").fillna(-1).astype(np.int64).to_numpy()
    stored = chunk_votes_from_rows(chunked, rows_of)
    labelled = settings.get("certify_class", "label") == "label"

    def decide(test: SequentialTest) -> Any:
        certifier = replay(test, stored, labels=labels if labelled else None, num_images=len(ids))
        return certifier.decisions()

    at_run = decide(run_test)
    decisions = at_run if alpha == run_test.alpha else decide(dataclasses.replace(run_test, alpha=alpha))
    complete = ~at_run.needs_samples
    if not complete.all():
        warnings.warn(f"{where}: {int((~complete).sum())} image(s) undecided (in flight when the job stopped); "
                      "counted as not certified (a rerun resumes them)", ReduceWarning, stacklevel=2)
    result = decisions.as_decisions()
    certified = decisions.certified & complete  # an undecided image is not certified (at another alpha too)
    correct = certified & (decisions.target == labels) & (labels >= 0)
    label_out: np.ndarray = labels
    predict: np.ndarray = result.prediction
    if api:  # as fixed-n API rows: label strings, abstentions as ABSTAIN_LABEL
        label_out = np.array([None if pd.isna(n) else str(n) for n in names], dtype=object)
        predict = np.where(certified, label_out, ABSTAIN_LABEL).astype(object)
    elapsed = chunked.groupby("image_id")["elapsed_s"].sum().reindex(ids).to_numpy(dtype=np.float64)
    predict = np.where(complete, predict, ABSTAIN_LABEL if api else ABSTAIN)
    if api:
        predict = predict.astype(object)
    frame = pd.DataFrame({
        "image_id": ids, "label": label_out, "predict": predict,
        "p_a_lower": np.where(complete, result.p_a_lower, np.nan),
        "radius": np.where(complete, result.radius, 0.0), "correct": correct, "abstained": ~certified, "time_s": elapsed,
        "samples": decisions.samples,
    })
    meaning = describe_identity(identity)
    return make_certificates(frame, name=name, sigma=run_test.sigma, source=source, alpha=alpha, n=run_test.n_max,
                             dataset=meaning["dataset"], model=meaning["model"], sequence_shape=run_test.shape,
                             at_radius=run_test.radius, run_alpha=run_test.alpha, noise=run_test.noise)

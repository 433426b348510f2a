"""Per-image certificates as one table per input, and the statistics read off them.

A `Certificates` frame holds one row per image -- image_id, label, predict, p_a_lower,
radius, correct, abstained, time_s -- whatever produced it: Parquet votes recomputed at the
reduce-time alpha, or a reference implementation's log. Keeping both in one shape is what
lets old published results sit beside new runs in one table.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from pipeline.stats.reach import largest_radius

COLUMNS = ["image_id", "label", "predict", "p_a_lower", "radius", "correct", "abstained", "time_s"]
# Kept when an input has them: `samples`, the samples per image a sequential run's decision used.
OPTIONAL_COLUMNS = ["samples"]


class ReduceWarning(UserWarning):
    """Something in the inputs was skipped; the reduction goes on without it."""


class UnusableInput(ValueError):
    """An input (empty, truncated or malformed log; run without votes) that must be skipped."""


class Certificates(pd.DataFrame):
    """One row per image, plus what a reader of its table or plot needs to know about it.

    Metadata: the input's `name`, `sigma`, `source` path, the `alpha` the certificates were
    computed at, the number `n` of CERTIFY estimation samples per image, the `dataset` and
    the `model` (classifier, with its denoiser or API). Each is None when unknown -- a log
    records none of them, so they come from its path when that follows a documented layout.
    n and alpha decide the largest certifiable radius (`max_radius`), so they are only set
    together, and only for CERTIFY results (PREDICT certifies no radius).

    A sequential run also has `sequence_shape`, the prior shape of the confidence sequence
    its decisions used (None for fixed n: Clopper-Pearson), and `at_radius`, the R it
    certified at (None in largest-radius mode). `run_alpha` is the alpha the run itself
    recorded (None when unknown, as for a log): when it differs from `alpha` the
    certificates were recomputed at another alpha than the run decided with."""

    _metadata = ["name", "sigma", "source", "alpha", "n", "dataset", "model", "sequence_shape", "at_radius",
                 "run_alpha", "labels_from", "noise"]
    name: str = ""
    sigma: float | None = None
    source: str = ""
    alpha: float | None = None
    n: int | None = None
    dataset: str | None = None
    model: str | None = None
    sequence_shape: float | None = None
    at_radius: float | None = None
    run_alpha: float | None = None
    labels_from: str | None = None  # set when the labels are not the data's (unlabelled data)
    noise: str = "gaussian"  # the smoothing noise (pipeline.sampling.noise): its norm is the radii's

    @property
    def norm(self) -> str:
        """The norm the radii are measured in: ℓ2 (Gaussian) or ℓ1 (uniform, Laplace)."""
        from pipeline.sampling.noise import noise_kind

        return noise_kind(self.noise).norm

    @property
    def _constructor(self):  # keep the subclass (and its metadata) through pandas operations
        return Certificates

    @property
    def max_radius(self) -> float | None:
        """No image of this input can be certified beyond it (`pipeline.stats.reach`):
        sigma * Phi^-1(alpha^(1/n)) for fixed n, the confidence sequence's own ceiling at
        n_max for a sequential run (None when sigma, n or alpha is unknown)."""
        if self.sigma is None or self.n is None or self.alpha is None:
            return None
        sequential = self.sequence_shape is not None
        return largest_radius(self.sigma, self.alpha, self.n, sequential=sequential,
                              **({"shape": self.sequence_shape} if sequential else {}), noise=self.noise)

    @property
    def recomputed(self) -> bool:
        """Certified at another alpha than the run recorded (`dsmooth reduce --alpha`)."""
        return self.run_alpha is not None and self.alpha is not None and self.alpha != self.run_alpha


def common_norm(inputs: Sequence[Certificates]) -> str:
    """The one norm of the inputs' radii (ℓ2 when there are none). ℓ1 and ℓ2 radii on one axis
    or in one table column would read as comparable numbers, which they are not: refused."""
    norms = {getattr(c, "norm", "ℓ2") for c in inputs} or {"ℓ2"}
    if len(norms) > 1:
        by_norm = {norm: [c.name for c in inputs if c.norm == norm] for norm in sorted(norms)}
        listing = "; ".join(f"{norm}: {', '.join(names[:3])}{' …' if len(names) > 3 else ''}"
                            for norm, names in by_norm.items())
        raise ValueError(f"ℓ1 and ℓ2 certificates cannot share one table or figure (their radii measure "
                            f"different things): reduce them separately ({listing})")
    return norms.pop()


def make_certificates(
    frame: pd.DataFrame,
    name: str = "",
    sigma: float | None = None,
    source: str = "",
    alpha: float | None = None,
    n: int | None = None,
    dataset: str | None = None,
    model: str | None = None,
    sequence_shape: float | None = None,
    at_radius: float | None = None,
    run_alpha: float | None = None,
    noise: str | None = None,
) -> Certificates:
    """Normalise column order and types (correct/abstained as bool) and attach metadata."""
    frame = frame.copy()
    for column in COLUMNS:
        if column not in frame:
            frame[column] = np.nan
    for column in ("label", "predict"):  # class indices as int64 when no label is a string or missing
        if frame[column].dtype == object:
            frame[column] = frame[column].infer_objects()
    frame["correct"] = frame["correct"].astype(bool)
    frame["abstained"] = frame["abstained"].astype(bool)
    frame["radius"] = frame["radius"].astype(np.float64)
    certs = Certificates(frame[COLUMNS + [c for c in OPTIONAL_COLUMNS if c in frame]].reset_index(drop=True))
    certs.name = name
    certs.sigma = None if sigma is None or pd.isna(sigma) else float(sigma)
    certs.source = source
    certs.alpha = None if alpha is None else float(alpha)
    certs.n = None if n is None else int(n)
    certs.dataset = dataset
    certs.model = model
    certs.sequence_shape = None if sequence_shape is None else float(sequence_shape)
    certs.at_radius = None if at_radius is None else float(at_radius)
    certs.run_alpha = None if run_alpha is None else float(run_alpha)
    certs.noise = noise or "gaussian"
    return certs


def certified_accuracy(certs: pd.DataFrame, radii: Iterable[float]) -> pd.Series:
    """Fraction of all images that are classified correctly with radius >= r, for each r.

    Abstentions and wrong predictions count against the classifier (denominator = every
    image), as in Cohen et al.'s and Salman et al.'s tables."""
    radii = [float(r) for r in radii]
    correct = certs["correct"].to_numpy(dtype=bool)
    radius = certs["radius"].to_numpy(dtype=np.float64)
    if len(certs) == 0:
        return pd.Series(np.nan, index=pd.Index(radii, name="radius"), name="certified_accuracy")
    values = [float(np.mean(correct & (radius >= r))) for r in radii]
    return pd.Series(values, index=pd.Index(radii, name="radius"), name="certified_accuracy")


def clean_accuracy(certs: pd.DataFrame) -> float:
    """Certified accuracy at radius 0: images predicted correctly (not abstained)."""
    return float(certified_accuracy(certs, [0.0]).iloc[0])


def average_certified_radius(certs: pd.DataFrame) -> float:
    """ACR (Zhai et al., 2020): mean over all images of the radius, 0 when wrong or abstained."""
    if len(certs) == 0:
        return float("nan")
    correct = certs["correct"].to_numpy(dtype=bool)
    return float(np.mean(np.where(correct, certs["radius"].to_numpy(dtype=np.float64), 0.0)))

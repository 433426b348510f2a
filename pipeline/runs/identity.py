"""A run's identity: every setting that changes what its votes mean, one rule for all jobs.

`certify` and `certify-api` both store this in run.json and refuse to resume a directory made
with other settings. Speed settings (batch size, actors, rates), budgets and the image
selection are *not* part of it: votes are kept per image id, so a rerun may use other
hardware, spend more, or certify more images of the same data set.

A data set is named the same way wherever the job runs: its layout and split, the image size,
the base name of its root and a fingerprint of the split's listing -- never the full path,
because `ray job submit --working-dir` unpacks to a new folder every time and a user may
resume from another working directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what the identity is computed from; the run's record sits below the settings
    from pipeline.data.core import ImageDataset
    from pipeline.settings import DataSelection, SmoothingSettings


def listing_fingerprint(dataset: ImageDataset) -> str:
    """SHA-256 of the split's image names, in id order: the same files in the same order
    wherever the data set is unpacked, another data set otherwise."""
    digest = hashlib.sha256()
    for record in dataset.records:
        digest.update(f"{record.image_id}\t{record.name}\n".encode())
    return digest.hexdigest()


def data_identity(selection: DataSelection, split: ImageDataset) -> dict[str, Any]:
    """How a run names its data set (`split` is the whole split, before skip/max/ids)."""
    return {
        "dataset": split.name,
        "data": Path(selection.data_root).expanduser().resolve().name,
        "image_size": selection.image_size,
        "listing_sha256": listing_fingerprint(split),
    }


def run_identity(job: str, settings: SmoothingSettings, selection: DataSelection, split: ImageDataset,
                 **meaning: Any) -> dict[str, Any]:
    """The identity of a `job` run: its data set, its smoothing (sigma, n0, n, seed, chunk
    size) and the job's own `meaning` (models and their hashes, provider, encoding...)."""
    phases = dict(settings.phases())
    return {
        "job": job,
        "mode": getattr(settings, "mode", "certify"),
        **data_identity(selection, split),
        "sigma": settings.sigma,
        "n0": phases.get("selection"),
        "n": phases.get("estimation", phases.get("prediction")),
        "seed": settings.seed,
        "chunk_size": settings.chunk_size,  # type: ignore[attr-defined]
        **sequential_identity(settings),
        # Only when not Gaussian, so that runs recorded before noise kinds existed keep their identity.
        **({"noise": settings.noise} if getattr(settings, "noise", "gaussian") != "gaussian" else {}),
        **({"allow_foreign_denoiser": True} if getattr(settings, "allow_foreign_denoiser", False) else {}),
        **meaning,
    }


def sequential_identity(settings: SmoothingSettings) -> dict[str, Any]:
    """{"sequential": the test's every field, alpha included, and the class rule} for a
    sequential run: they decide which samples are drawn. {} for a fixed-n run, whose votes
    do not depend on alpha -- so the identities of runs made before sequential existed (and
    their resumption) do not change."""
    if not getattr(settings, "sequential", False):
        return {}
    from pipeline.stats.sequential import SequentialTest

    test = SequentialTest.from_settings(settings)
    fields = dataclasses.asdict(test)
    if not fields["first_chunks"]:
        del fields["first_chunks"]  # fixed chunks: the identity of runs made before the schedule existed
    if fields["futility"] == "mixture":
        del fields["futility"]  # the identity of runs made before the geometric futility rule existed
    if fields["noise"] == "gaussian":
        del fields["noise"]  # the identity of runs made before noise kinds existed
    return {"sequential": {**fields, "certify_class": settings.certify_class}}  # type: ignore[attr-defined]


def precision_identity(precision: str) -> dict[str, Any]:
    """{"precision": ...} when not fp32: votes are those of the model as computed, and runs
    recorded before --precision existed (fp32) keep their identity."""
    return {"precision": precision} if precision != "fp32" else {}


# The alpha of a run whose run.json records none (runs older than the record of it).
DEFAULT_ALPHA = 0.001


def recorded_alpha(record: dict[str, Any]) -> float:
    """The alpha a run was made with: a sequential run's (it decided when sampling stopped,
    so it is in the identity), else the one its job recorded beside the identity (`extra`),
    else DEFAULT_ALPHA. `dsmooth reduce` certifies at it unless told otherwise."""
    sequential = (record.get("identity") or {}).get("sequential") or {}
    alpha = sequential.get("alpha", (record.get("extra") or {}).get("alpha"))
    return DEFAULT_ALPHA if alpha is None else float(alpha)


def max_radius(record: dict[str, Any]) -> float | None:
    """The largest radius a run can certify at its recorded alpha (`pipeline.stats.reach`):
    a sequential run's confidence-sequence ceiling at n_max, a fixed-n CERTIFY run's
    Clopper-Pearson one; None for PREDICT (no radius) or when sigma or n is not recorded."""
    from pipeline.stats.confidence_sequences import DEFAULT_SHAPE
    from pipeline.stats.reach import largest_radius

    identity = record.get("identity") or {}
    sequential = identity.get("sequential")
    if sequential:
        return largest_radius(sequential["sigma"], sequential["alpha"], sequential["n_max"], sequential=True,
                              shape=sequential.get("shape", DEFAULT_SHAPE), noise=identity.get("noise"))
    if identity.get("mode", "certify") != "certify" or not identity.get("sigma") or not identity.get("n"):
        return None
    return largest_radius(identity["sigma"], recorded_alpha(record), identity["n"], noise=identity.get("noise"))

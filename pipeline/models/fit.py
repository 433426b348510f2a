"""Models know their data: a checkpoint is checked against the data it is asked to certify.

A classifier trained on ImageNet runs on CIFAR-10 images without an error (its layers adapt
to any size) and returns class indices that mean nothing there; every certificate would be
silently wrong. So before any work starts the checkpoint's recorded data set, number of
classes and input size are compared with the data's, and a contradiction is refused with a
message naming both. A checkpoint that records no data set (a foreign file) is refused too,
unless the user says so explicitly (`allow_foreign`); what can still be checked then (the
number of outputs, the image size) still is.
"""

from __future__ import annotations

from pipeline.data.specs import DataDescription, dataset_spec
from pipeline.errors import setting

from .checkpoint import CheckpointMismatchError, ModelMeta


class DataMismatchError(CheckpointMismatchError):
    """The model was made for other data than the data being certified."""


def check_denoiser_sigma(meta: ModelMeta, sigma: float, source: str, noise: str = "gaussian",
                         allow_foreign: bool = False) -> None:
    """Denoisers are trained per noise (Salman et al. train one per sigma; Gaussian noise is not
    uniform noise): for another noise or sigma the certificates stay valid but are needlessly
    weak, and for an API every one of those queries is paid, so a mismatch is refused.

    The noise kind: a checkpoint that records none was trained before noise kinds existed, on
    Gaussian noise (diffusion models too); `allow_foreign` accepts another noise on purpose (the
    "trained on Gaussian, tested on uniform" experiment). The sigma: a sigma-independent
    denoiser (one step of a diffusion model) is told the run's sigma instead."""
    trained = meta.noise or "gaussian"
    if trained != noise and not allow_foreign:
        raise DataMismatchError(
            f"{source}: denoiser {meta.arch} was trained for {trained} noise but the run uses "
            f"{setting('noise', noise)} (pass {setting('allow_foreign_denoiser', True)} to test it there anyway)"
        )
    if meta.sigma_independent:
        return
    if meta.sigma is not None and abs(float(meta.sigma) - float(sigma)) > 1e-9:
        raise DataMismatchError(
            f"{source}: denoiser {meta.arch} was trained for sigma={meta.sigma} but the run uses "
            f"sigma={sigma} (denoisers are sigma-specific)"
        )


def _trained_for(meta: ModelMeta, outputs: int | None) -> str:
    spec = dataset_spec(meta.dataset)
    classes = meta.num_classes or outputs or (spec.num_classes if spec else None)
    size = meta.input_size or (spec.input_size if spec else None)
    details = [f"{classes} classes"] if classes else []
    if size:
        details.append(f"{size}x{size} images")
    name = meta.dataset or "an unrecorded data set"
    return f"{name} ({', '.join(details)})" if details else name


def check_fits_data(
    meta: ModelMeta | None,
    data: DataDescription,
    source: str,
    *,
    allow_foreign: bool = False,
    outputs: int | None = None,
) -> None:
    """Raise DataMismatchError when the model `meta` describes cannot be right for `data`.

    `meta` is None for a file without dsmooth metadata (a raw state dict); `outputs` is the
    number of outputs the loaded classifier actually has.
    """
    kind = meta.kind if meta is not None else "classifier"
    if kind == "denoiser":
        if meta is not None and meta.dataset and data.name and meta.dataset != data.name:
            raise DataMismatchError(
                f"{source}: denoiser {meta.arch} was trained on {meta.dataset} but the data is {data}"
            )
        return
    arch = meta.arch if meta is not None else "classifier"
    if meta is None or not meta.dataset:
        if not allow_foreign:
            raise DataMismatchError(
                f"{source}: the checkpoint does not record which data set {arch} was trained on; to certify "
                f"it on {data} anyway, allow foreign classifiers ({setting('allow_foreign_classifier', True)})"
            )
    elif data.name and meta.dataset != data.name:
        raise DataMismatchError(
            f"{source}: classifier {arch} was trained on {_trained_for(meta, outputs)} "
            f"but the data is {data}"
        )
    spec = dataset_spec(meta.dataset) if meta is not None else None
    classes = (meta.num_classes if meta is not None else None) or outputs or (spec.num_classes if spec else None)
    if outputs is not None and classes is not None and outputs != classes:
        raise DataMismatchError(f"{source}: classifier {arch} has {outputs} outputs but records {classes} classes")
    if data.num_classes is not None and classes is not None and classes != data.num_classes:
        raise DataMismatchError(
            f"{source}: classifier {arch} has {classes} outputs (classes) but the data is {data}"
        )
    size = (meta.input_size if meta is not None else None) or (spec.input_size if spec else None)
    if size is not None and tuple(data.image_size) != (size, size):
        what = _trained_for(meta, outputs) if meta is not None else f"{size}x{size} images"
        raise DataMismatchError(
            f"{source}: classifier {arch} was trained on {what} but the data is {data}"
        )


def check_classes_fit(
    source: str,
    name: str,
    outputs: int,
    data: DataDescription,
    *,
    num_classes: int | None = None,
    labels: list[str] | None = None,
    data_classes: list[str] | None = None,
) -> None:
    """A model that brings its own config (timm, Hugging Face) knows its classes: their count
    (`num_classes`, HF's id2label, timm's num_classes) must be its number of outputs and the
    data's, and where the model's label names and the data's class names are the same
    vocabulary (e.g. ImageNet wnids) they must be in the same order. Unlabelled data
    (num_classes None) is not refused: its labels come from the classifier itself."""
    if num_classes is not None and outputs != num_classes:
        raise DataMismatchError(f"{source}: classifier {name} has {outputs} outputs but its config says {num_classes} classes")
    if data.num_classes is not None and outputs != data.num_classes:
        raise DataMismatchError(f"{source}: classifier {name} has {outputs} classes but the data is {data}")
    if labels and data_classes and len(labels) == len(data_classes) and set(labels) == set(data_classes):
        moved = [i for i, (a, b) in enumerate(zip(labels, data_classes)) if a != b]
        if moved:
            i = moved[0]
            raise DataMismatchError(
                f"{source}: classifier {name} orders its classes differently from the data ({len(moved)} differ; "
                f"class {i} is {labels[i]!r} for the model, {data_classes[i]!r} for the data)")

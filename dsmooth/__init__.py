"""dsmooth's Python API: certified robustness by (denoised) randomized smoothing.

A thin front over the library and the jobs, so that a notebook and the `dsmooth` command
line run the very same code -- the same model checks, the same settings validation, the
same CERTIFY / PREDICT (`pipeline.stats.smoothing`) and the same reducer:

    import dsmooth

    model = dsmooth.load_model("classifier.pt", "denoiser.pt", dataset="cifar10", sigma=0.25)
    smoothed = dsmooth.Smooth(model, num_classes=10, sigma=0.25, seed=0)
    prediction, radius = smoothed.certify(x, n0=100, n=10_000, alpha=0.001)

    certificates = dsmooth.certify(dataset="cifar10", data_root="data/", classifier="classifier.pt",
                                   denoiser="denoiser.pt", sigma=0.25, n=10_000, output="runs/x")
    reduced = dsmooth.reduce(["runs/x"], alpha=0.01)   # .certificates, .table

`dsmooth.certify` runs the `dsmooth certify` job on Ray (a local Ray is started for the call
unless one is running or `address` is given); everything else runs in this process.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.certify.smooth import Smooth
from pipeline.errors import python_wording
from pipeline.stats.smoothing import ABSTAIN, certify_counts, lower_confidence_bound, predict_counts

__all__ = [
    "ABSTAIN",
    "Reduced",
    "Smooth",
    "__version__",
    "certify",
    "certify_counts",
    "load_model",
    "lower_confidence_bound",
    "predict_counts",
    "reduce",
    "save_archive",
]


def _version() -> str:
    from jobs.cli import version

    return version()


__version__ = _version()


@python_wording()  # its refusals name keyword arguments (classifier_mean=), not flags
def load_model(
    classifier: Any,
    denoiser: str | Path | None = None,
    *,
    dataset: str,
    sigma: float | None = None,
    image_size: int | None = None,
    classifier_arch: str | None = None,
    allow_foreign_classifier: bool = False,
    classifier_weights: str | Path | None = None,
    classifier_input_size: int | None = None,
    classifier_resize: int | None = None,
    classifier_mean: Sequence[float] | None = None,
    classifier_std: Sequence[float] | None = None,
    classifier_interpolation: str | None = None,
    classifier_preprocessing: Any = "auto",
    noise: str = "gaussian",
    allow_foreign_denoiser: bool = False,
    data_root: str | Path | None = None,
) -> Any:
    """f∘D (eval mode, CPU) as an `nn.Module` taking images in [0, 1], checked the way
    `dsmooth certify` checks it: each file's kind, that the classifier was trained on
    `dataset` ("cifar10", "imagenet") and that the denoiser was trained for `noise` (gaussian,
    uniform, laplace; another one only with `allow_foreign_denoiser`) at `sigma` (a
    diffusion denoiser, a diffusers folder included, is set to it). Paths may be s3:// or
    gs:// URIs. `classifier` is any classifier spec (see `dsmooth models`: a checkpoint,
    timm:NAME, a timm or Hugging Face folder, a .pt2 / TorchScript archive,
    package.module:callable) or an nn.Module; its preprocessing runs inside the returned
    module, after the denoiser: the model's own (timm's pretrained_cfg, a Hugging Face processor,
    an archive's, a factory's, a module's `pretrained_cfg`), the `classifier_*` values on top;
    `classifier_preprocessing` is "none" for a network that normalises inside, or an object that
    says it (a `Preprocessing`, torchvision weights or their transforms, a Hugging Face image
    processor); a classifier whose preprocessing nothing gives is refused.
    `dataset` is any layout `certify` takes (cifar10, imagenet, folder); with `data_root` the
    model is checked against that data (its classes, its image size) as `certify` checks it.
    Raises CheckpointError / CheckpointMismatchError / DataMismatchError (ClassifierSourceError
    for an unusable spec)."""
    from pipeline.config import Sigma, check_value
    from pipeline.data import dataset_spec
    from pipeline.data.specs import DataDescription
    from pipeline.certify.pair import ModelBytes, load_pair
    from pipeline.settings import KINDS

    if dataset not in KINDS:
        raise ValueError(f"dataset must be one of {', '.join(KINDS)} (as for certify), got {dataset!r}")
    if data_root is not None:
        from pipeline.data.sources import open_dataset
        from pipeline.runs.fs import Location

        data = open_dataset(dataset, Location.of(str(data_root)).local_copy(), "test", image_size=image_size).describe()
    elif dataset == "folder":
        data = DataDescription(None, None, (image_size or 224, image_size or 224))
    else:
        data = dataset_spec(dataset).describe(image_size)
    if denoiser is not None and sigma is None:
        raise ValueError("sigma is required with a denoiser: the denoiser is checked against it (or set to it)")
    if sigma is not None:
        sigma = float(check_value(Sigma, sigma, "sigma"))
    from pipeline.models.sources import ClassifierSpec

    classifier_spec = ClassifierSpec(
        classifier, None if classifier_weights is None else str(classifier_weights), classifier_arch,
        classifier_input_size, classifier_resize, classifier_mean, classifier_std, classifier_interpolation,
        classifier_preprocessing)
    pair, _ = load_pair(
        ModelBytes.classifier(classifier_spec),
        ModelBytes.read_denoiser(denoiser) if denoiser is not None else None,
        data,
        classifier_arch,
        allow_foreign_classifier,
        sigma=sigma,
        noise=noise,
        allow_foreign_denoiser=allow_foreign_denoiser,
    )
    return pair


def save_archive(module: Any, path: str | Path, preprocessing: Any, example: Any, kind: str = "export") -> Path:
    """Write `module` as a torch.export (.pt2, `kind="export"`) or TorchScript archive that
    carries its preprocessing (a `Preprocessing`, its dict, timm's pretrained_cfg, torchvision
    weights, a Hugging Face image processor): `--classifier FILE` then needs no flags.
    `example`: an input batch at the network's input size."""
    from pipeline.models.sources import save_archive as save

    return save(module, path, preprocessing, example, kind)


@python_wording()  # its refusals name keyword arguments (classifier_mean=), not flags
def certify(config: str | Path | Mapping[str, Any] | None = None, *, address: str | None = None,
            progress: bool = True, in_process: bool = False, **settings: Any) -> Any:
    """Run `dsmooth certify` and return the per-image certificates of the images it selected
    (a `pipeline.reduce.Certificates` DataFrame: image_id, label, predict, p_a_lower, radius,
    correct, abstained, time_s; with .sigma, .n, .alpha, .dataset, .model).

    `settings` are the job's settings by field name -- the command-line flags with '_' for
    '-' (`data_root`, `n0`, `batch_size` for --batch, ...), listed below -- validated by the
    same fields: a bad value raises ConfigError naming it. `config` is a YAML file (or a
    mapping) the keywords override, as flags override --config. The run directory `output`
    resumes like the command's: images already there are not sampled again.
    `progress` shows the command's progress bar (on stderr; a widget in a notebook);
    `progress=False` shows nothing. `in_process=True` counts the votes in this process on its
    CPU, without Ray: the same votes as a pool of actors, for small runs and debugging.
    """
    from torch import nn

    from jobs.certify import certify as run_job
    from pipeline.certify.plan import CertifyConfig
    from pipeline.config import load_config
    from pipeline.progress import shown

    module = settings.get("classifier")
    if isinstance(module, nn.Module):  # an object: resolved (and shipped) as a bundle, named by its class
        settings = {**settings, "classifier": f"module:{type(module).__module__}.{type(module).__qualname__}"}
    else:
        module = None
    preprocessing = settings.get("classifier_preprocessing")
    if preprocessing is not None and not isinstance(preprocessing, str):  # an object saying it (see load_model)
        settings = {k: v for k, v in settings.items() if k != "classifier_preprocessing"}
    else:
        preprocessing = None
    with shown(progress):
        outcome = run_job(load_config(CertifyConfig, config, settings), address=address, classifier=module,
                          classifier_preprocessing=preprocessing, in_process=in_process)
    return outcome.certificates()


def _settings_help() -> str:
    """certify()'s settings, from the fields that declare them (never a second list)."""
    from pipeline.certify.plan import CertifyConfig

    lines = []
    for name, field in CertifyConfig.model_fields.items():
        default = "required" if field.is_required() else f"default {field.default!r}"
        lines.append(f"    {name} ({default}): {field.description or ''}")
    return "\n\nSettings:\n" + "\n".join(lines)


certify.__doc__ = (certify.__doc__ or "") + _settings_help()


@dataclass(frozen=True)
class Reduced:
    """What `reduce` returns: `inputs` (one `Certificates` per run or log), `certificates`
    (all of them in one frame, with columns run and sigma) and `table` (certified and clean
    accuracy per input and radius, as `dsmooth reduce --format csv` writes it)."""

    inputs: list[Any]
    certificates: Any
    table: Any


def reduce(
    paths: str | Path | Sequence[str | Path],
    alpha: float | None = None,
    *,
    radii: Sequence[float] | None = None,
    names: Sequence[str] | None = None,
    envelope: bool = False,
) -> Reduced:
    """`dsmooth reduce` as DataFrames: certificates recomputed from runs' votes at `alpha`
    (default: each run's own, as it decided; no new samples), reference logs read as they
    are. Unusable inputs are skipped with a ReduceWarning; ValueError when none is usable."""
    from jobs.reduce import load
    from pipeline.config import Alpha, check_value
    from pipeline.reduce import accuracy_table, per_image_table

    alpha = None if alpha is None else float(check_value(Alpha, alpha, "alpha"))
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    inputs = load(paths, alpha, names=None if names is None else list(names))
    table = accuracy_table(inputs, radii, envelope=envelope)
    return Reduced(inputs, per_image_table(inputs), table)

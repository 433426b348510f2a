"""One classifier spec for every place a classifier is named.

`--classifier` (and `dsmooth.certify(classifier=...)`, `dsmooth.load_model`) accepts:

  * a dsmooth checkpoint, or a raw state dict with --classifier-arch NAME (as before), or a
    registry/torchvision name with --classifier-weights FILE;
  * `timm:NAME` with --classifier-weights FILE, or a local timm folder (config.json with
    its `architecture`, plus weights);
  * a local Hugging Face image-classification folder (config.json, weights,
    preprocessor_config.json): offline, never remote code;
  * a `torch.export` archive (.pt2) or a TorchScript file (code by nature: trusted files only);
    its preprocessing from the archive's extra file (`save_archive` writes it), else flags;
  * `package.module:callable` returning an nn.Module or (module, preprocessing) (optionally
    --classifier-weights);
  * from Python, an nn.Module object.

The first kind stays the checkpoint's own bytes (so runs made before keep their identity);
every other kind is resolved on the driver into a *bundle* (`bundle.py`): the files the
form needs, its preprocessing (the model's own config, then the flags; refused when neither
says it, unless --classifier-preprocessing none) and the SHA-256 of its weights. `load_bundle` rebuilds it anywhere as Preprocess -> network, a module taking
the data set's [0, 1] pixels.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from pipeline.errors import setting
from ..preprocess import Preprocess, Preprocessing
from ..registry import is_known_model
from . import archive_form, factory_form, hf_form, timm_form
from .bundle import is_bundle, make_bundle, read_bundle
from .carried import PREPROCESSING_CHOICES, flags_hint, preprocessing_of, save_archive
from .common import ClassifierSourceError, MissingExtraError, Resolved

BUNDLE_FORMAT = "dsmooth-classifier-bundle/1"
FORMS = (
    ("checkpoint", "PATH", "a dsmooth checkpoint (or a raw state dict with --classifier-arch NAME)"),
    ("torchvision", "NAME --classifier-weights FILE", "a registry/torchvision architecture with local weights"),
    ("timm", "timm:NAME --classifier-weights FILE", "a timm model (.safetensors/.pth/.bin) [extra: timm]"),
    ("timm folder", "DIR", "config.json with 'architecture' + model.safetensors [extra: timm]"),
    ("hugging face", "DIR", "transformers image classifier folder, offline, no remote code [extra: hf]"),
    ("torch.export", "FILE.pt2", "a torch.export archive (runs the file's code: trusted files only); "
     "preprocessing from dsmooth.save_archive's extra file, else the flags"),
    ("torchscript", "FILE", "a TorchScript file (runs the file's code: trusted files only); as .pt2"),
    ("factory", "package.module:callable", "returns an nn.Module or (module, preprocessing); importable on the "
     "workers"),
    ("object", "(Python)", "an nn.Module passed to dsmooth.certify / load_model (its pretrained_cfg, or "
     "classifier_preprocessing=)"),
)

__all__ = [
    "BUNDLE_FORMAT",
    "FORMS",
    "ClassifierSourceError",
    "ClassifierSpec",
    "LoadedClassifier",
    "MissingExtraError",
    "PREPROCESSING_CHOICES",
    "preprocessing_of",
    "save_archive",
    "is_bundle",
    "load_bundle",
    "resolve_classifier",
]


@dataclass(frozen=True)
class ClassifierSpec:
    """What the user named: the classifier and the flags that complete it."""

    classifier: Any  # str | Path | nn.Module
    weights: str | None = None
    arch: str | None = None  # legacy: architecture of a raw state dict
    input_size: int | None = None
    resize: int | None = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    interpolation: str | None = None
    # "auto" (the form's own, else refused), "none" (the network normalises inside) or, from
    # Python, anything `carried.preprocessing_of` reads (a Preprocessing, torchvision weights...)
    preprocessing: Any = "auto"

    @classmethod
    def of(cls, settings: Any) -> ClassifierSpec:
        """From a job's settings (the fields named classifier, classifier_weights, ...)."""
        get = lambda name: getattr(settings, name, None)  # noqa: E731
        return cls(get("classifier"), get("classifier_weights"), get("classifier_arch"),
                   get("classifier_input_size"), get("classifier_resize"), get("classifier_mean"),
                   get("classifier_std"), get("classifier_interpolation"),
                   get("classifier_preprocessing") or "auto")

    @property
    def has_preprocessing_flags(self) -> bool:
        return (any(v is not None for v in (self.input_size, self.resize, self.mean, self.std, self.interpolation))
                or not _is_auto(self.preprocessing))


def _is_auto(preprocessing: Any) -> bool:
    return isinstance(preprocessing, str) and preprocessing == "auto"


@dataclass(frozen=True)
class Source:
    """A resolved spec: `data` are a checkpoint's own bytes (with `arch` for a raw state
    dict) or a bundle's."""

    source: str
    data: bytes
    arch: str | None = None


def _legacy(spec: ClassifierSpec, path: str, arch: str | None, data: bytes | None = None) -> Source:
    if spec.has_preprocessing_flags:
        names = ("input_size", "resize", "mean", "std", "preprocessing")
        raise ClassifierSourceError(
            f"{path}: a dsmooth checkpoint or torchvision classifier carries its own normalisation; "
            f"{'/'.join(setting(f'classifier_{name}') for name in names)} apply to timm, Hugging Face, archives "
            "and factories")
    if data is None:
        from pipeline.runs.fs import Location

        location = Location.of(path)
        if not location.is_file():
            raise ClassifierSourceError(f"classifier file not found: {location}")
        data = location.read_bytes()
    if is_bundle(data):
        raise ClassifierSourceError(f"{path}: not a classifier file (dsmooth makes bundles in memory only)")
    return Source(path, data, arch)


def _folder(folder: Path, spec: ClassifierSpec) -> Resolved:
    config_path = folder / "config.json"
    config: Any = None
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except (ValueError, UnicodeDecodeError) as error:
            raise ClassifierSourceError(f"{config_path}: not valid JSON ({error})") from None
    if isinstance(config, dict) and "architecture" in config:
        return timm_form.resolve_folder(folder, config, spec.weights)
    if isinstance(config, dict) and ("model_type" in config or "architectures" in config):
        if spec.weights is not None:
            raise ClassifierSourceError(f"{folder}: a Hugging Face folder holds its weights; drop {setting('classifier_weights')}")
        return hf_form.resolve_folder(folder, config)
    raise ClassifierSourceError(
        f"{folder}: neither a timm folder (config.json with 'architecture') nor a Hugging Face folder "
        "(config.json with 'model_type')")


def _resolve_new(spec: ClassifierSpec) -> Resolved | Source:
    classifier = spec.classifier
    if isinstance(classifier, nn.Module):
        return factory_form.resolve_object(classifier)
    text = str(classifier)
    if text.startswith("timm:"):
        return timm_form.resolve_name(text[len("timm:"):], spec.weights)
    if "://" in text:
        return _legacy(spec, text, spec.arch)
    path = Path(text).expanduser()
    if path.is_dir():
        return _folder(path, spec)
    if path.is_file():
        data = path.read_bytes()
        kind = archive_form.archive_kind(path, data)
        if kind is not None:
            if spec.weights is not None:
                raise ClassifierSourceError(f"{text}: a {kind} archive holds its weights; drop {setting('classifier_weights')}")
            return archive_form.resolve(path, data, kind)
        if spec.weights is not None:
            raise ClassifierSourceError(f"{text}: {setting('classifier_weights')} goes with timm:NAME, a registry name or a factory")
        return _legacy(spec, text, spec.arch, data)
    if is_known_model(text) and spec.weights is not None:
        if spec.arch is not None and spec.arch != text:
            raise ClassifierSourceError(f"{setting('classifier', text)} and {setting('classifier_arch', spec.arch)} disagree")
        return _legacy(spec, str(spec.weights), text)
    if factory_form.is_factory(text):
        return factory_form.resolve_factory(text, spec.weights)
    if is_known_model(text):
        raise ClassifierSourceError(f"{text} needs its weights: {setting('classifier_weights', 'FILE')} (nothing is downloaded)")
    raise ClassifierSourceError(
        f"classifier not found: {text} (a file, a timm or Hugging Face folder, timm:NAME, a registry name "
        f"with {setting('classifier_weights')}, or package.module:callable)")


def resolve_classifier(spec: ClassifierSpec) -> Source:
    """The classifier's bytes as the driver ships them to actors (see the module doc).
    ClassifierSourceError (a CheckpointError) in one line for anything unusable."""
    resolved = _resolve_new(spec)
    if isinstance(resolved, Source):
        return resolved
    preprocessing = _preprocessing(resolved, spec)
    source = spec.classifier if isinstance(spec.classifier, (str, Path)) else resolved.name
    manifest = {
        "format": BUNDLE_FORMAT,
        "kind": resolved.kind,
        "name": resolved.name,
        "weights_sha256": resolved.weights_sha256,
        "preprocessing": preprocessing.to_dict(),
        "num_classes": resolved.num_classes,
        "labels": resolved.labels,
        "extra": resolved.extra,
    }
    return Source(str(source), make_bundle(manifest, resolved.files))


def _preprocessing(resolved: Resolved, spec: ClassifierSpec) -> Preprocessing:
    """The form's preprocessing (or the caller's object, or none), the flags on top; refused in
    one line when nothing says how the network expects its input (`carried.py`)."""
    chosen, known = resolved.preprocessing, resolved.known
    if isinstance(spec.preprocessing, str) and spec.preprocessing == "none":
        if spec.mean is not None or spec.std is not None:
            raise ClassifierSourceError(f"{setting('classifier_preprocessing', 'none')} and "
                                        f"{setting('classifier_mean')}/{setting('classifier_std')} "
                                        "contradict each other: give one or the other")
        chosen, known = Preprocessing(), True
    elif not _is_auto(spec.preprocessing):
        chosen, known = preprocessing_of(spec.preprocessing), True
    try:
        chosen = chosen.override(input_size=spec.input_size, resize=spec.resize, mean=spec.mean, std=spec.std,
                                 interpolation=spec.interpolation)
    except ValueError as error:
        raise ClassifierSourceError(str(error)) from None
    if not known and chosen.mean is None:
        raise ClassifierSourceError(f"{resolved.name}: its preprocessing is unknown (the {FORM_NAMES[resolved.kind]} "
                                    f"carries no mean/std); {flags_hint()}")
    return chosen


FORM_NAMES = {"export": "torch.export archive", "torchscript": "TorchScript file", "factory": "factory's module",
              "module": "module", "hf": "Hugging Face folder (no preprocessor_config.json)", "timm": "timm model"}


@dataclass
class LoadedClassifier:
    """A bundle rebuilt: `module` takes the data set's [0, 1] pixels (preprocessing inside)."""

    module: nn.Module
    name: str
    num_classes: int | None
    labels: list[str] | None
    pipeline: dict[str, Any]  # kind, name, weights_sha256, preprocessing: for run.json and the identity


_LOADERS = {
    "timm": timm_form.load,
    "hf": hf_form.load,
    "export": archive_form.load,
    "torchscript": archive_form.load,
    "factory": factory_form.load,
    "module": factory_form.load,
}


def load_bundle(data: bytes, source: str) -> LoadedClassifier:
    """Preprocess -> network (eval, CPU) from a bundle's bytes."""
    manifest, files = read_bundle(data)
    if manifest.get("format") != BUNDLE_FORMAT or manifest.get("kind") not in _LOADERS:
        raise ClassifierSourceError(f"{source}: unknown classifier bundle {manifest.get('format')!r}")
    net = _LOADERS[manifest["kind"]](manifest, files, source)
    preprocessing = Preprocessing.from_dict(manifest["preprocessing"])
    module = nn.Sequential(Preprocess(preprocessing), net).eval()
    pipeline = {k: manifest[k] for k in ("kind", "name", "weights_sha256", "preprocessing")}
    return LoadedClassifier(module, manifest["name"], manifest.get("num_classes"), manifest.get("labels"), pipeline)


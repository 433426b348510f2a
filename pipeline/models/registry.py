"""Name -> model factory registry (timm-style).

Checkpoints store only an architecture *name* plus constructor kwargs, never pickled
classes, so every model we can load must be buildable from a name.  Any torchvision
classification model is reachable by name too (weights=None; weights come from local
files only), so "certify any pretrained classifier" needs no per-model code.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch.nn as nn

Kind = Literal["denoiser", "classifier"]

CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2023, 0.1994, 0.2010)  # Cohen et al.'s values
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

DATASET_NORMALIZATION: dict[str, dict[str, list[float]]] = {
    "cifar10": {"mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD)},
    "imagenet": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
}
DATASET_NUM_CLASSES: dict[str, int] = {"cifar10": 10, "imagenet": 1000}


class UnknownModelError(ValueError):
    """Raised for a model name that is neither registered nor a torchvision classifier."""


@dataclass(frozen=True)
class ModelInfo:
    """What a caller needs to know about a name before building it."""

    name: str
    kind: Kind
    dataset: str | None
    normalization: dict[str, list[float]] | None  # {"mean": [...], "std": [...]}; None for denoisers
    num_classes: int | None
    source: str  # "registry" or "torchvision"


@dataclass(frozen=True)
class _Entry:
    name: str
    factory: Callable[..., nn.Module]
    kind: Kind
    dataset: str | None
    num_classes: int | None


_REGISTRY: dict[str, _Entry] = {}


def register_model(
    name: str,
    kind: Kind = "classifier",
    dataset: str | None = None,
    num_classes: int | None = None,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a factory under `name`; duplicates are errors (silent shadowing
    would make a checkpoint's arch name mean two different networks)."""
    if kind not in ("denoiser", "classifier"):
        raise ValueError(f"kind must be 'denoiser' or 'classifier', got {kind!r}")

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY and _REGISTRY[name].factory is not fn:
            raise ValueError(f"model name {name!r} is already registered")
        n_cls = num_classes
        if n_cls is None and kind == "classifier" and dataset is not None:
            n_cls = DATASET_NUM_CLASSES.get(dataset)
        _REGISTRY[name] = _Entry(name, fn, kind, dataset, n_cls)
        return fn

    return deco


def _ensure_registered() -> None:
    """Import the modules whose decorators fill the registry (lazy: avoids import cycles)."""
    from . import classifiers, denoisers  # noqa: F401


@functools.lru_cache(maxsize=1)
def torchvision_classifier_names() -> tuple[str, ...]:
    """Classification architectures shipped by torchvision (not detection/segmentation/video)."""
    import torchvision

    return tuple(sorted(torchvision.models.list_models(module=torchvision.models)))


def build_torchvision_classifier(name: str, num_classes: int = 1000, **kwargs: Any) -> nn.Module:
    """Build a bare torchvision classifier with random weights; refuses any download request."""
    import torchvision

    for forbidden in ("weights", "pretrained"):
        if kwargs.get(forbidden) not in (None, False):
            raise ValueError(
                f"{forbidden}={kwargs[forbidden]!r} would download weights; build with weights=None "
                "and load a local file (pipeline.models.load_classifier)"
            )
        kwargs.pop(forbidden, None)
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)


def _unknown(name: str) -> UnknownModelError:
    registered = sorted(_REGISTRY)
    candidates = sorted(set(registered) | set(torchvision_classifier_names()))
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return UnknownModelError(
        f"unknown model {name!r}.{hint} Registered: {', '.join(registered)}; "
        "any torchvision classification model name (e.g. resnet50, vit_b_16) also works."
    )


def _info_from_entry(e: _Entry) -> ModelInfo:
    norm = None
    if e.kind == "classifier" and e.dataset in DATASET_NORMALIZATION:
        norm = {k: list(v) for k, v in DATASET_NORMALIZATION[e.dataset].items()}
    return ModelInfo(e.name, e.kind, e.dataset, norm, e.num_classes, "registry")


def model_info(name: str) -> ModelInfo:
    """Kind, dataset, default normalisation and class count of a model name."""
    _ensure_registered()
    if name in _REGISTRY:
        return _info_from_entry(_REGISTRY[name])
    if name in torchvision_classifier_names():
        norm = {k: list(v) for k, v in DATASET_NORMALIZATION["imagenet"].items()}
        return ModelInfo(name, "classifier", "imagenet", norm, 1000, "torchvision")
    raise _unknown(name)


def is_known_model(name: str) -> bool:
    """True when `name` builds (registered or torchvision classifier)."""
    _ensure_registered()
    return name in _REGISTRY or name in torchvision_classifier_names()


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a model by name; classifiers come wrapped with their input normalisation, so
    every model takes [0,1] pixels."""
    _ensure_registered()
    if name in _REGISTRY:
        return _REGISTRY[name].factory(**kwargs)
    if name in torchvision_classifier_names():
        from .classifiers import torchvision_classifier

        return torchvision_classifier(name, **kwargs)
    raise _unknown(name)


def list_models(kind: Kind | None = None, include_torchvision: bool = True) -> list[str]:
    """Buildable names (registered first-class ones plus torchvision classifiers), sorted."""
    _ensure_registered()
    if kind not in (None, "denoiser", "classifier"):
        raise ValueError(f"kind must be None, 'denoiser' or 'classifier', got {kind!r}")
    names = {n for n, e in _REGISTRY.items() if kind is None or e.kind == kind}
    if include_torchvision and kind in (None, "classifier"):
        names.update(torchvision_classifier_names())
    return sorted(names)

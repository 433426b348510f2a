"""Name -> model factory registry (timm-style).

Checkpoints store only an architecture *name* plus constructor kwargs, never pickled
classes, so every model we can load must be buildable from a name. The registry imports no
model module: `classifiers.py` and `denoisers.py` register their factories (and the
classifiers module a *family* that builds any torchvision classifier by name) when
`pipeline.models` is imported, so the dependency runs one way only.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch.nn as nn

from pipeline.data.specs import dataset_spec

Kind = Literal["denoiser", "classifier"]


class UnknownModelError(ValueError):
    """Raised for a model name that no registered factory or family builds."""


@dataclass(frozen=True)
class ModelInfo:
    """What a caller needs to know about a name before building it."""

    name: str
    kind: Kind
    dataset: str | None
    normalization: dict[str, list[float]] | None  # {"mean": [...], "std": [...]}; None for denoisers
    num_classes: int | None
    source: str  # "registry" or the family's name (e.g. "torchvision")


@dataclass(frozen=True)
class _Entry:
    name: str
    factory: Callable[..., nn.Module]
    kind: Kind
    dataset: str | None
    num_classes: int | None


@dataclass(frozen=True)
class Family:
    """Many architectures behind one factory (e.g. every torchvision classifier)."""

    source: str
    names: Callable[[], Sequence[str]]
    build: Callable[..., nn.Module]  # build(name, **kwargs)
    kind: Kind
    dataset: str | None


_REGISTRY: dict[str, _Entry] = {}
_FAMILIES: list[Family] = []


def _info(name: str, kind: Kind, dataset: str | None, num_classes: int | None, source: str) -> ModelInfo:
    spec = dataset_spec(dataset)
    normalization = spec.normalization if kind == "classifier" and spec is not None else None
    if num_classes is None and kind == "classifier" and spec is not None:
        num_classes = spec.num_classes
    return ModelInfo(name, kind, dataset, normalization, num_classes, source)


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
        _REGISTRY[name] = _Entry(name, fn, kind, dataset, num_classes)
        return fn

    return deco


def register_family(family: Family) -> None:
    """Make every name of `family` buildable (registered names take precedence)."""
    if all(f.source != family.source for f in _FAMILIES):
        _FAMILIES.append(family)


def _family_of(name: str) -> Family | None:
    return next((f for f in _FAMILIES if name in f.names()), None)


def _unknown(name: str) -> UnknownModelError:
    registered = sorted(_REGISTRY)
    candidates = sorted(set(registered).union(*(f.names() for f in _FAMILIES)))
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    families = "".join(f"; any {f.source} {f.kind} name also works" for f in _FAMILIES)
    return UnknownModelError(f"unknown model {name!r}.{hint} Registered: {', '.join(registered)}{families}.")


def model_info(name: str) -> ModelInfo:
    """Kind, dataset, default normalisation and class count of a model name."""
    if name in _REGISTRY:
        e = _REGISTRY[name]
        return _info(e.name, e.kind, e.dataset, e.num_classes, "registry")
    family = _family_of(name)
    if family is not None:
        return _info(name, family.kind, family.dataset, None, family.source)
    raise _unknown(name)


def is_known_model(name: str) -> bool:
    """True when `name` builds (registered, or a name of a registered family)."""
    return name in _REGISTRY or _family_of(name) is not None


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a model by name; classifiers come wrapped with their input normalisation, so
    every model takes [0,1] pixels."""
    if name in _REGISTRY:
        return _REGISTRY[name].factory(**kwargs)
    family = _family_of(name)
    if family is not None:
        return family.build(name, **kwargs)
    raise _unknown(name)


def list_models(kind: Kind | None = None, include_families: bool = True) -> list[str]:
    """Buildable names (registered ones plus, optionally, every family's), sorted."""
    if kind not in (None, "denoiser", "classifier"):
        raise ValueError(f"kind must be None, 'denoiser' or 'classifier', got {kind!r}")
    names = {n for n, e in _REGISTRY.items() if kind is None or e.kind == kind}
    if include_families:
        for family in _FAMILIES:
            if kind is None or family.kind == kind:
                names.update(family.names())
    return sorted(names)

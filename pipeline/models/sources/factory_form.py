"""Code the user already has: `package.module:callable` returning an nn.Module, or
(module, preprocessing) (imported
on the workers too, e.g. from `ray job submit --working-dir`), or an nn.Module object
passed to the Python API. The driver's weights travel in the bundle as safetensors, so
every actor holds exactly the network the driver checked (a factory with random
initialisation included)."""

from __future__ import annotations

import importlib
import pickle
import re
from typing import Any

from torch import nn

from ..preprocess import Preprocessing
from .carried import module_preprocessing, split_factory_result
from .common import ClassifierSourceError, Resolved, load_weights, read_file, read_state_dict, sha256, state_bytes

FACTORY = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")
STATE = "state.safetensors"


def is_factory(spec: str) -> bool:
    return bool(FACTORY.match(spec))


def call_factory(spec: str) -> nn.Module:
    return call_factory_with_preprocessing(spec)[0]


def call_factory_with_preprocessing(spec: str) -> tuple[nn.Module, Preprocessing | None]:
    """The factory's module and the preprocessing it returned beside it (None if it gave none)."""
    module_name, _, attribute = spec.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001 - a failing import is the user's, in one line
        raise ClassifierSourceError(f"{spec}: cannot import {module_name} ({type(error).__name__}: {error})") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ClassifierSourceError(f"{spec}: {module_name} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ClassifierSourceError(f"{spec}: {attribute} is not callable")
    try:
        model = target()
    except Exception as error:  # noqa: BLE001
        raise ClassifierSourceError(f"{spec}: calling {attribute}() failed ({type(error).__name__}: {error})") from None
    model, preprocessing = split_factory_result(model, spec)
    if not isinstance(model, nn.Module):
        raise ClassifierSourceError(f"{spec}: {attribute}() returned {type(model).__name__}, not a torch nn.Module")
    return model, preprocessing


def resolve_factory(spec: str, weights: str | None) -> Resolved:
    model, preprocessing = call_factory_with_preprocessing(spec)
    preprocessing = preprocessing or module_preprocessing(model)
    weights_sha = None
    if weights is not None:
        data = read_file(weights, "classifier weights")
        load_weights(model, read_state_dict(str(weights), data, str(weights)), str(weights), spec)
        weights_sha = sha256(data)
    state = state_bytes(model)
    return Resolved("factory", f"factory:{spec}", {STATE: state}, weights_sha or sha256(state),
                    preprocessing or Preprocessing(), extra={"factory": spec}, known=preprocessing is not None)


def resolve_object(model: nn.Module) -> Resolved:
    """An in-memory module, pickled by value where its class lives in __main__ (cloudpickle)."""
    try:
        import cloudpickle as pickler  # ships with Ray: classes of a notebook travel by value
    except ImportError:  # pragma: no cover
        pickler = pickle  # type: ignore[assignment]
    state = state_bytes(model)
    name = f"module:{type(model).__module__}.{type(model).__qualname__}"
    preprocessing = module_preprocessing(model)
    return Resolved("module", name, {"module.pkl": pickler.dumps(model.cpu()), STATE: state}, sha256(state),
                    preprocessing or Preprocessing(), known=preprocessing is not None)


def load(manifest: dict, files: dict[str, bytes], source: str) -> nn.Module:
    if manifest["kind"] == "module":
        # Only ever made in memory from the caller's own object (see bundle.py).
        model = pickle.loads(files["module.pkl"])  # noqa: S301
    else:
        model = call_factory(manifest["extra"]["factory"])
    load_weights(model, read_state_dict(STATE, files[STATE], source), source, manifest["name"])
    return model

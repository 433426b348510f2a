"""Checkpoint format: weights + JSON-able metadata, loadable with weights_only=True.

A checkpoint never pickles classes: it names its architecture (a registry name plus
constructor kwargs) and stores a plain state dict, so loading cannot run foreign code and
the file hash (file_sha256) is a stable model identity for results downstream.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from pipeline.runs.fs import atomic_open
from pipeline.data.specs import dataset_spec

from .classifiers import NormalizeLayer
from .registry import build_model, is_known_model, model_info

FORMAT = "dsmooth-checkpoint/1"
_FORMAT_PREFIX = "dsmooth-checkpoint/"
_MAX_LISTED = 5

PathLike = str | os.PathLike


class CheckpointError(RuntimeError):
    """A file that is not a loadable dsmooth checkpoint (corrupt, unsafe, wrong format)."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's weights or architecture do not match what the caller asked for."""


@dataclass
class ModelMeta:
    """Everything needed to rebuild a model and to know what it was trained for."""

    arch: str  # registry name, e.g. "dncnn", "cifar_resnet110", "resnet50"
    kind: str | None = None  # "denoiser" | "classifier"; filled from the registry on save
    dataset: str | None = None  # the data set it was trained on ("cifar10", "imagenet", ...)
    num_classes: int | None = None
    input_size: int | None = None  # side of the (square) images a classifier was trained on
    normalization: dict[str, list[float]] | None = None  # {"mean": [...], "std": [...]}
    sigma: float | None = None  # noise level a denoiser/classifier was trained for
    noise: str | None = None  # smoothing noise it was trained for (pipeline.sampling.noise); None = gaussian
    sigma_independent: bool = False  # a denoiser that serves every sigma (diffusion): given the run's at load
    objective: str | None = None  # e.g. "mse", "stab", "clf"
    config: dict[str, Any] = field(default_factory=dict)  # training config (JSON-able)
    arch_kwargs: dict[str, Any] = field(default_factory=dict)  # build_model(arch, **arch_kwargs)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only (tuples become lists), so torch.load(weights_only=True) accepts it."""
        try:
            return json.loads(json.dumps(asdict(self), allow_nan=True))
        except (TypeError, ValueError) as e:
            raise TypeError(f"ModelMeta must be JSON-serialisable (plain dicts/lists/numbers/str): {e}") from e

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelMeta:
        """Inverse of to_dict; unknown keys (from newer writers) are kept in `extra`."""
        names = {f.name for f in fields(cls)}
        known = {k: v for k, v in d.items() if k in names}
        unknown = {k: v for k, v in d.items() if k not in names}
        if "arch" not in known:
            raise ValueError("checkpoint metadata has no 'arch'")
        meta = cls(**known)
        if unknown:
            meta.extra = {**meta.extra, **unknown}
        return meta


def file_sha256(path: PathLike) -> str:
    """Hex SHA-256 of a file's bytes: the model identity recorded with every result."""
    h = hashlib.sha256()
    with open(_existing(path), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _existing(path: PathLike) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {p}")
    return p


def _unwrap(model: nn.Module) -> nn.Module:
    """Strip DataParallel/DDP and torch.compile wrappers so keys match a freshly built model."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _find_normalization(model: nn.Module) -> dict[str, list[float]] | None:
    for m in model.modules():
        if isinstance(m, NormalizeLayer):
            # float32 buffers -> shortest decimals that round-trip (0.201, not 0.20100000500679016).
            return {k: [float(f"{v:.7g}") for v in getattr(m, k).flatten().tolist()] for k in ("mean", "std")}
    return None


def _complete_meta(model: nn.Module, meta: ModelMeta) -> ModelMeta:
    """Fill kind/dataset/num_classes/normalisation the caller left out, from registry + model."""
    info = model_info(meta.arch)
    kind = meta.kind or info.kind
    if kind != info.kind:
        raise ValueError(f"meta.kind={meta.kind!r} but {meta.arch!r} is a {info.kind}")
    normalization = meta.normalization
    if normalization is None and kind == "classifier":
        normalization = _find_normalization(model) or info.normalization
    num_classes = meta.num_classes
    if num_classes is None and kind == "classifier":
        num_classes = meta.arch_kwargs.get("num_classes", info.num_classes)
    dataset = meta.dataset if meta.dataset is not None else info.dataset
    input_size = meta.input_size
    spec = dataset_spec(dataset)
    if input_size is None and kind == "classifier" and spec is not None:
        input_size = spec.input_size
    return ModelMeta(
        **{
            **asdict(meta),
            "kind": kind,
            "dataset": dataset,
            "num_classes": num_classes,
            "input_size": input_size,
            "normalization": normalization,
        }
    )


def save_checkpoint(path: PathLike, model: nn.Module, meta: ModelMeta) -> str:
    """Atomically write {"format", "meta", "state_dict"}; returns the file's sha256.

    Atomic (temp file in the same directory + os.replace) so a crash or a concurrent
    reader never sees a half-written checkpoint.
    """
    if not is_known_model(meta.arch):
        model_info(meta.arch)  # raises UnknownModelError naming close matches
    meta = _complete_meta(model, meta)
    state = {k: v.detach().cpu().clone() for k, v in _unwrap(model).state_dict().items()}
    with atomic_open(path, "wb") as handle:
        torch.save(_payload(meta, state), handle)
    return file_sha256(path)


def _payload(meta: ModelMeta, state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    return {"format": FORMAT, "meta": meta.to_dict(), "state_dict": dict(state)}


def checkpoint_bytes(meta: ModelMeta, state: Mapping[str, torch.Tensor]) -> bytes:
    """A checkpoint's bytes built in memory from complete metadata and a state dict.

    For models converted from other formats on the fly: the same inputs give the same bytes
    (torch's zip writer stores no time stamps or paths), so the SHA-256 identity of a run is
    stable across conversions, machines and working directories.
    """
    if not is_known_model(meta.arch):
        model_info(meta.arch)
    buffer = io.BytesIO()
    torch.save(_payload(meta, {k: v.detach().cpu().contiguous() for k, v in state.items()}), buffer)
    return buffer.getvalue()


def refused_pickle(error: BaseException) -> str:
    """One line for a pickle that `weights_only=True` refused: what it holds (the global torch
    names) and what to do. torch's own text advises `weights_only=False`, i.e. running the
    file's code: never repeated here."""
    import re

    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    what = f"the Python object {found.group(1)}" if found else "objects other than tensors and plain containers"
    return (f"refused to load: it holds {what}, which loading would run as code; dsmooth only reads weights "
            "(re-save the file as a plain state dict, or as .safetensors)")


def _safe_load(path: Path, map_location: Any) -> Any:
    """torch.load with weights_only=True, turning pickle/zip failures into CheckpointError."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if not zipfile.is_zipfile(path):  # torch.save writes zip archives; anything else is junk
            raise CheckpointError(f"{path}: not a PyTorch checkpoint (unreadable or corrupt file)") from e
        raise CheckpointError(f"{path}: {refused_pickle(e)}") from e
    except FileNotFoundError:
        raise
    except Exception as e:  # junk bytes surface as anything from KeyError to IndexError
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (corrupt or truncated?): {e}") from e


def _fmt_keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def _check_fits(model: nn.Module, state: Mapping[str, Any], path: Path, arch: str) -> None:
    """Compare keys and shapes up front so the error names the offenders, not a torch traceback."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and isinstance(state[k], torch.Tensor) and tuple(state[k].shape) != tuple(v.shape)
    ]
    not_tensors = [k for k in expected if k in state and not isinstance(state[k], torch.Tensor)]
    if not (missing or unexpected or shapes or not_tensors):
        return
    parts = []
    if missing:
        parts.append(f"missing keys: {_fmt_keys(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_fmt_keys(unexpected)}")
    if shapes:
        parts.append(f"shape mismatches: {'; '.join(shapes[:_MAX_LISTED])}")
    if not_tensors:
        parts.append(f"non-tensor values: {_fmt_keys(not_tensors)}")
    raise CheckpointMismatchError(f"{path}: weights do not fit architecture {arch!r}: " + " | ".join(parts))


def _to_device(model: nn.Module, map_location: Any) -> nn.Module:
    if isinstance(map_location, (str, torch.device)):
        model = model.to(map_location)
    return model


def _build(arch: str, kwargs: Mapping[str, Any], path: Path) -> nn.Module:
    try:
        return build_model(arch, **kwargs)
    except TypeError as e:
        raise CheckpointMismatchError(f"{path}: cannot build {arch!r} with {dict(kwargs)!r}: {e}") from e


def read_checkpoint(path: PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load and validate the raw payload (format, meta, state_dict) without building a model."""
    p = _existing(path)
    obj = _safe_load(p, map_location)
    if not isinstance(obj, dict) or "format" not in obj:
        raise CheckpointError(
            f"{p}: not a dsmooth checkpoint (no 'format' key); for a raw torchvision/state-dict "
            "file use load_classifier(name, path)"
        )
    fmt = obj["format"]
    if fmt != FORMAT:
        what = "unsupported checkpoint version" if str(fmt).startswith(_FORMAT_PREFIX) else "unknown format"
        raise CheckpointError(f"{p}: {what} {fmt!r} (this code reads {FORMAT!r})")
    if not isinstance(obj.get("meta"), dict) or not isinstance(obj.get("state_dict"), dict):
        raise CheckpointError(f"{p}: malformed checkpoint: 'meta' and 'state_dict' must be dicts")
    return obj


def load_checkpoint(
    path: PathLike, arch: str | None = None, map_location: Any = "cpu"
) -> tuple[nn.Module, ModelMeta]:
    """Rebuild the model named in the checkpoint and load its weights (eval mode).

    `arch`, when given, is what the caller expects; a different stored arch is an error
    rather than a silently different network.
    """
    obj = read_checkpoint(path, map_location)
    p = Path(path)
    try:
        meta = ModelMeta.from_dict(obj["meta"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{p}: malformed checkpoint metadata: {e}") from e
    if arch is not None and arch != meta.arch:
        raise CheckpointMismatchError(f"{p}: checkpoint holds architecture {meta.arch!r}, expected {arch!r}")
    if not is_known_model(meta.arch):
        raise CheckpointMismatchError(f"{p}: architecture {meta.arch!r} is not a known model")
    kwargs = dict(meta.arch_kwargs)
    if meta.kind == "classifier" and meta.num_classes is not None:
        kwargs.setdefault("num_classes", meta.num_classes)
    model = _build(meta.arch, kwargs, p)
    _check_fits(model, obj["state_dict"], p, meta.arch)
    model.load_state_dict(obj["state_dict"], strict=True)
    return _to_device(model, map_location).eval(), meta


def _strip_prefix(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def _adapt_raw_state_dict(state: Mapping[str, Any], net: nn.Module) -> dict[str, Any]:
    """Map common foreign layouts onto a bare net's keys: DataParallel's "module.",
    torch.compile's "_orig_mod.", and Cohen et al.'s Sequential(normalize, net) "1." prefix."""
    state = dict(state)
    net_keys = set(net.state_dict())
    for _ in range(3):
        if set(state) <= net_keys:
            break
        for prefix in ("module.", "_orig_mod."):
            state = _strip_prefix(state, prefix)
        if not set(state) <= net_keys and any(k.startswith("1.") for k in state):
            # Drop the normalisation entries of a wrapped classifier, keep the net's.
            state = {k[2:]: v for k, v in state.items() if k.startswith("1.")}
    return state


def load_classifier(
    name: str, weights_path: PathLike, num_classes: int | None = None, map_location: Any = "cpu"
) -> nn.Module:
    """Classifier `name` with local weights, wrapped with its normalisation (eval mode).

    Accepts our checkpoint format or a raw state dict of the bare network (e.g. a
    torchvision .pth, or {"state_dict": ...} as written by Cohen et al.'s training code).
    """
    p = _existing(weights_path)
    info = model_info(name)
    if info.kind != "classifier":
        raise ValueError(f"{name!r} is a {info.kind}, not a classifier")
    obj = _safe_load(p, map_location)
    if isinstance(obj, dict) and "format" in obj:
        model, _ = load_checkpoint(p, arch=name, map_location=map_location)
        return model
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise CheckpointError(f"{p}: expected a state dict (mapping of parameter names to tensors)")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    model = _build(name, kwargs, p)
    net = getattr(model, "net", model)
    state = _adapt_raw_state_dict(obj, net)
    _check_fits(net, state, p, name)
    net.load_state_dict(state, strict=True)
    return _to_device(model, map_location).eval()

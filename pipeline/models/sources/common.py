"""What every classifier form shares: its errors, the optional libraries (extras), safe
weight loading (safetensors or `weights_only`, never unpickled code) and the result type."""

from __future__ import annotations

import hashlib
import importlib
import io
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import CheckpointError, CheckpointMismatchError, _adapt_raw_state_dict, _check_fits, refused_pickle
from ..preprocess import Preprocessing



class ClassifierSourceError(CheckpointError):
    """A classifier spec that cannot be resolved or loaded (one line, exit 2)."""


class MissingExtraError(ClassifierSourceError):
    """A spec whose library is not installed: names the extra to install."""


def require(module: str, extra: str, what: str) -> Any:
    """Import an optional library, or say which extra brings it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(
            f"{what} needs the '{module}' package: pip install -e \".[{extra}]\" (or pip install {module})"
        ) from None


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_file(path: str | Path, what: str) -> bytes:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ClassifierSourceError(f"{what} not found: {path}")
    return p.read_bytes()


def read_state_dict(name: str, data: bytes, source: str) -> dict[str, torch.Tensor]:
    """A state dict from weight bytes: safetensors, or torch.load(weights_only=True) for
    .pth/.pt/.bin ({"state_dict": ...} / {"model": ...} wrappers are unwrapped)."""
    try:
        if name.endswith(".safetensors"):
            from safetensors.torch import load as load_safetensors

            return dict(load_safetensors(data))
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # code in a pickle: refused, in one line
        raise ClassifierSourceError(f"{source}: {refused_pickle(error)}") from None
    except Exception as error:  # noqa: BLE001 - any failure: not loadable weights
        raise ClassifierSourceError(f"{source}: cannot read weights ({type(error).__name__}: "
                                    f"{str(error).splitlines()[0] if str(error) else ''})") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        raise ClassifierSourceError(f"{source}: expected a state dict (parameter names to tensors)")
    return dict(obj)


def load_weights(net: nn.Module, state: Mapping[str, Any], source: str, arch: str) -> None:
    """Strict load after mapping common prefixes, with the offending keys named."""
    state = _adapt_raw_state_dict(state, net)
    try:
        _check_fits(net, state, Path(source), arch)
    except CheckpointMismatchError as error:
        raise ClassifierSourceError(str(error)) from None
    net.load_state_dict(state, strict=True)


def state_bytes(net: nn.Module) -> bytes:
    """A module's state as safetensors bytes: deterministic, so its hash names the weights."""
    from safetensors.torch import save as save_safetensors

    state = {k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()}
    return save_safetensors(state)


@dataclass
class Resolved:
    """A form's answer on the driver: what goes in the bundle."""

    kind: str
    name: str  # what results call the classifier, e.g. "timm:resnet50"
    files: dict[str, bytes]
    weights_sha256: str
    preprocessing: Preprocessing
    num_classes: int | None = None
    labels: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # form-specific manifest entries
    known: bool = True  # the form carried its preprocessing (else flags must give it: `carried.py`)


class Logits(nn.Module):
    """A model whose output is an object with `.logits` (Hugging Face) as a logits module."""

    fx_leaf = True  # transformers models are not fx-traceable by torch.fx's plain tracer

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=x)
        return out.logits if hasattr(out, "logits") else out[0]


class Archive(nn.Module):
    """A loaded export/TorchScript program, kept as one call (fx cannot retrace it)."""

    fx_leaf = True

    def __init__(self, program: nn.Module) -> None:
        super().__init__()
        self.program = program

    def train(self, mode: bool = True) -> Archive:
        """An archive is an inference program: an exported one refuses train()/eval(), and
        neither mode changes what either computes, so the flag stays here."""
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)

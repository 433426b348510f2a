"""The preprocessing a classifier carries, in whatever form it comes: a certificate of a
network that never saw its normalisation is a certificate of another classifier, so a
form's preprocessing is read wherever the form holds it, and where none is held and no
flag gives it, the run is refused before any sample (`require_known`).

Read from: timm's `pretrained_cfg` (and a module's `pretrained_cfg` / `default_cfg`
attribute), a Hugging Face image processor (object or `preprocessor_config.json`),
torchvision weights (`ResNet50_Weights.DEFAULT` or its `.transforms()`), a factory that
returns `(module, preprocessing)`, and the extra file `PREPROCESSING_FILE` of a `.pt2` /
TorchScript archive (`save_archive` writes it).
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.errors import setting

from ..preprocess import INTERPOLATIONS, Preprocessing, hf_preprocessing
from .common import ClassifierSourceError

# The archive's extra file holding Preprocessing.to_dict() as JSON.
PREPROCESSING_FILE = "dsmooth_preprocessing.json"
# What --classifier-preprocessing takes: auto = the form's own (else refused), none = the
# network normalises inside (no resize, no mean/std unless flags give them).
PREPROCESSING_CHOICES = ("auto", "none")


def flags_hint() -> str:
    """What to give when a form carries no preprocessing (worded for the front end: flags or keywords)."""
    return (f"give {setting('classifier_mean', 'M M M')} and {setting('classifier_std', 'S S S')} (and "
            f"{setting('classifier_input_size', 'PX')}), or {setting('classifier_preprocessing', 'none')} if the "
            "network normalises its input itself")


def _timm_like(cfg: Mapping[str, Any]) -> Preprocessing:
    """timm's pretrained_cfg / data config: input_size (C, H, W), mean, std, interpolation.
    As for timm models (`preprocess.timm_preprocessing`): the data set's loader has cropped
    already, so the input size is both the resize and the crop."""
    size = cfg.get("input_size")
    side = int(size[-1]) if size else None
    interpolation = str(cfg.get("interpolation") or "bilinear")
    mean, std = cfg.get("mean"), cfg.get("std")
    return Preprocessing(resize=side, crop=side,
                         mean=None if mean is None else tuple(float(v) for v in mean),
                         std=None if std is None else tuple(float(v) for v in std),
                         interpolation=interpolation if interpolation in INTERPOLATIONS else "bilinear")


def _torchvision_preset(preset: Any) -> Preprocessing:
    """torchvision's ImageClassification preset (what `Weights.transforms()` returns): its crop
    size is the network's input (resize = crop, as for timm: the data's loader has cropped)."""
    crop = preset.crop_size[0] if isinstance(preset.crop_size, (list, tuple)) else preset.crop_size
    mode = getattr(preset.interpolation, "value", preset.interpolation)
    return Preprocessing(resize=int(crop), crop=int(crop), mean=tuple(float(v) for v in preset.mean),
                         std=tuple(float(v) for v in preset.std),
                         interpolation=str(mode) if str(mode) in INTERPOLATIONS else "bilinear")


def preprocessing_of(value: Any) -> Preprocessing:
    """A Preprocessing from any object that describes one (see the module doc): a
    Preprocessing, its dict, a timm or Hugging Face config mapping, a Hugging Face image
    processor, torchvision weights or their transforms. ClassifierSourceError otherwise."""
    if isinstance(value, Preprocessing):
        return value
    if isinstance(value, str) and value == "none":
        return Preprocessing()
    if callable(getattr(value, "transforms", None)) and hasattr(value, "meta"):  # torchvision WeightsEnum
        value = value.transforms()
    if all(hasattr(value, a) for a in ("crop_size", "resize_size", "mean", "std")):
        return _torchvision_preset(value)
    if hasattr(value, "image_mean") and callable(getattr(value, "to_dict", None)):  # HF image processor
        value = value.to_dict()
    try:
        if isinstance(value, Mapping):
            if "image_mean" in value or "do_normalize" in value or "shortest_edge" in str(value.get("size")):
                return hf_preprocessing(value)
            if "input_size" in value:
                return _timm_like(value)
            if set(value) <= set(Preprocessing().to_dict()):
                return Preprocessing.from_dict(value)
    except (ValueError, TypeError, KeyError) as error:
        raise ClassifierSourceError(f"unusable classifier preprocessing: {error}") from None
    raise ClassifierSourceError(
        f"cannot read a preprocessing from {type(value).__name__}: give a dsmooth Preprocessing, its dict, "
        "timm's pretrained_cfg, a Hugging Face image processor or torchvision weights")


def module_preprocessing(module: Any) -> Preprocessing | None:
    """A module's own `pretrained_cfg` / `default_cfg` (timm models have one), if it names a mean."""
    for attribute in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(module, attribute, None)
        if isinstance(cfg, Mapping) and cfg.get("mean") is not None and cfg.get("std") is not None:
            return _timm_like(cfg)
    return None


def archive_preprocessing(data: bytes, kind: str) -> Preprocessing | None:
    """The preprocessing an archive's extra file holds, or None."""
    import torch

    extra = {PREPROCESSING_FILE: ""}
    try:
        if kind == "export":
            torch.export.load(io.BytesIO(data), extra_files=extra)
        else:
            torch.jit.load(io.BytesIO(data), map_location="cpu", _extra_files=extra)
    except Exception:  # noqa: BLE001 - a broken archive is refused by its loader, in one line
        return None
    text = extra.get(PREPROCESSING_FILE) or ""
    if isinstance(text, bytes):
        text = text.decode()
    if not text:
        return None
    try:
        return Preprocessing.from_dict(json.loads(text))
    except (ValueError, TypeError) as error:
        raise ClassifierSourceError(f"the archive's {PREPROCESSING_FILE} is unusable: {error}") from None


def save_archive(module: Any, path: str | Path, preprocessing: Any, example: Any, kind: str = "export") -> Path:
    """Write `module` as a torch.export (.pt2) or TorchScript archive that carries its
    preprocessing (`preprocessing_of(preprocessing)`), so dsmooth reads it back without flags.
    `example`: one input batch [B, C, H, W] at the network's input size (batch dimension dynamic)."""
    import torch

    text = json.dumps(preprocessing_of(preprocessing).to_dict())
    if kind not in ("export", "torchscript"):
        raise ValueError(f"kind must be export or torchscript, got {kind!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "export":
        batch = torch.export.Dim("batch", min=1, max=65536)
        program = torch.export.export(module.eval(), (example,), dynamic_shapes=({0: batch},))
        torch.export.save(program, path, extra_files={PREPROCESSING_FILE: text})
    elif kind == "torchscript":
        torch.jit.save(torch.jit.trace(module.eval(), example), str(path), _extra_files={PREPROCESSING_FILE: text})
    return path


def split_factory_result(result: Any, spec: str) -> tuple[Any, Preprocessing | None]:
    """A factory's answer: a module, or (module, preprocessing)."""
    if isinstance(result, tuple):
        if len(result) != 2:
            raise ClassifierSourceError(f"{spec}: return a module or (module, preprocessing), got {len(result)} values")
        return result[0], preprocessing_of(result[1])
    return result, None

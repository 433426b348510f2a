"""timm classifiers: `timm:NAME` + a weights file, or a local timm folder (config.json with
its `architecture`, plus model.safetensors / pytorch_model.bin), as `timm.models.save_for_hf`
writes it. Preprocessing comes from timm's pretrained config; nothing is downloaded
(pretrained=False, then the local weights)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from pipeline.errors import setting
from ..preprocess import timm_preprocessing
from .common import ClassifierSourceError, Resolved, load_weights, read_file, read_state_dict, require, sha256

FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def _timm() -> Any:
    return require("timm", "timm", "a timm classifier")


def _labels(num_classes: int, names: list[str] | None) -> list[str] | None:
    """The model's class names: its own, else timm's ImageNet-1k order (wnids) for 1000."""
    if names:
        return [str(n) for n in names]
    if num_classes == 1000:
        try:
            from timm.data import ImageNetInfo

            return list(ImageNetInfo().label_names())
        except Exception:  # noqa: BLE001 - older timm: no label info, nothing to check
            return None
    return None


def _classes_of(state: dict, cfg: dict) -> int | None:
    head = cfg.get("classifier")
    heads = [head] if isinstance(head, str) else list(head or [])
    for name in heads:
        weight = state.get(f"{name}.weight")
        if weight is not None and weight.ndim >= 1:
            return int(weight.shape[0])
    return None


def build(architecture: str, num_classes: int, cfg: dict | None = None, model_args: dict | None = None) -> nn.Module:
    timm = _timm()
    if not timm.is_model(architecture):
        raise ClassifierSourceError(f"timm has no model {architecture!r} (see timm.list_models())")
    kwargs = dict(model_args or {})
    kwargs["num_classes"] = num_classes
    if cfg:
        kwargs["pretrained_cfg_overlay"] = {k: v for k, v in cfg.items() if k not in ("url", "hf_hub_id", "file")}
    return timm.create_model(architecture, pretrained=False, **kwargs)


def resolve_name(name: str, weights: str | None) -> Resolved:
    """`timm:NAME` with --classifier-weights FILE."""
    timm = _timm()
    if not name:
        raise ClassifierSourceError("timm: give a model name, e.g. timm:resnet50")
    if not timm.is_model(name):
        raise ClassifierSourceError(f"timm has no model {name!r} (see timm.list_models())")
    if weights is None:
        raise ClassifierSourceError(f"timm:{name} needs its weights: {setting('classifier_weights', 'FILE')} "
                                    "(.safetensors, .pth, .bin)")
    data = read_file(weights, "classifier weights")
    file = "weights" + _suffix(weights)
    state = read_state_dict(file, data, weights)
    default_cfg = dict(timm.models.get_pretrained_cfg(name).to_dict()) if timm.models.get_pretrained_cfg(name) else {}
    num_classes = _classes_of(state, default_cfg) or int(default_cfg.get("num_classes", 1000))
    return _finish(f"timm:{name}", name, num_classes, None, {}, file, data, str(weights), None)


def resolve_folder(folder: Path, config: dict, weights: str | None) -> Resolved:
    """A local timm folder: config.json names the architecture, num_classes, pretrained_cfg."""
    _timm()
    architecture = str(config["architecture"])
    if weights is None:
        found = [folder / n for n in FOLDER_WEIGHTS if (folder / n).is_file()]
        if not found:
            raise ClassifierSourceError(f"{folder}: timm folder without weights ({' or '.join(FOLDER_WEIGHTS)})")
        weights = str(found[0])
    data = read_file(weights, "classifier weights")
    file = "weights" + _suffix(weights)
    cfg = dict(config.get("pretrained_cfg") or {})
    num_classes = int(config.get("num_classes") or cfg.get("num_classes") or 1000)
    model_args = {k: v for k, v in (config.get("model_args") or {}).items() if k != "num_classes"}
    return _finish(f"timm:{architecture}", architecture, num_classes, cfg, model_args, file, data, str(weights),
                   config.get("label_names"))


def _suffix(path: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in (".safetensors", ".pth", ".pt", ".bin"):
        raise ClassifierSourceError(f"{path}: weights must be .safetensors, .pth, .pt or .bin")
    return suffix


def _finish(name: str, architecture: str, num_classes: int, cfg: dict | None, model_args: dict, file: str,
            data: bytes, source: str, label_names: list[str] | None) -> Resolved:
    from timm.data import resolve_data_config

    model = build(architecture, num_classes, cfg, model_args)
    load_weights(model, read_state_dict(file, data, source), source, name)  # refuse misfits on the driver
    preprocessing = timm_preprocessing(resolve_data_config({}, model=model))
    extra = {"architecture": architecture, "pretrained_cfg": cfg, "model_args": model_args, "weights_file": file}
    return Resolved("timm", name, {file: data}, sha256(data), preprocessing, num_classes,
                    _labels(num_classes, label_names), json.loads(json.dumps(extra, default=list)))


def load(manifest: dict, files: dict[str, bytes], source: str) -> nn.Module:
    extra = manifest["extra"]
    model = build(extra["architecture"], int(manifest["num_classes"]), extra.get("pretrained_cfg"),
                  extra.get("model_args"))
    file = extra["weights_file"]
    load_weights(model, read_state_dict(file, files[file], source), source, manifest["name"])
    return model

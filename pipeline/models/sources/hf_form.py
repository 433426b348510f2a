"""Hugging Face `transformers` image classifiers from a local folder (config.json, weights,
preprocessor_config.json), loaded offline (local_files_only) and never with remote code:
a config that asks for its own code (auto_map) is refused."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from torch import nn

from ..preprocess import Preprocessing, hf_preprocessing
from .common import ClassifierSourceError, Logits, Resolved, require, sha256

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json")
_REMOTE_KEYS = ("auto_map",)


def _transformers():
    return require("transformers", "hf", "a Hugging Face classifier")


def resolve_folder(folder: Path, config: dict, trust_remote_code: bool = False) -> Resolved:
    if trust_remote_code or any(key in config for key in _REMOTE_KEYS):
        raise ClassifierSourceError(
            f"{folder}: this model asks to run its own code (remote code); dsmooth never loads remote code")
    _transformers()
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    weight_files = [n for n in names if n.endswith(_WEIGHT_SUFFIXES) and n != "preprocessor_config.json"]
    if not any(n.endswith((".safetensors", ".bin")) for n in weight_files):
        raise ClassifierSourceError(f"{folder}: Hugging Face folder without weights (model.safetensors or pytorch_model.bin)")
    files = {n: (folder / n).read_bytes() for n in ["config.json", *weight_files]}
    preprocessor = folder / "preprocessor_config.json"
    if preprocessor.is_file():
        try:
            preprocessing = hf_preprocessing(json.loads(preprocessor.read_text()))
        except (ValueError, TypeError, KeyError) as error:
            raise ClassifierSourceError(f"{preprocessor}: {error}") from None
        files["preprocessor_config.json"] = preprocessor.read_bytes()
    else:
        preprocessing = None
    id2label = config.get("id2label") or {}
    num_classes = len(id2label) or int(config.get("num_labels", 0)) or None
    labels = [str(id2label.get(str(i), id2label.get(i, i))) for i in range(len(id2label))] if id2label else None
    digest = sha256(b"".join(sha256(files[n]).encode() for n in sorted(files) if n.endswith((".safetensors", ".bin"))))
    architecture = (config.get("architectures") or [config.get("model_type", "model")])[0]
    resolved = Resolved("hf", f"hf:{architecture}", files, digest, preprocessing or Preprocessing(), num_classes,
                        labels, {"model_type": config.get("model_type")}, known=preprocessing is not None)
    load({"name": resolved.name}, files, str(folder))  # refuse what transformers cannot build, on the driver
    return resolved


def load(manifest: dict, files: dict[str, bytes], source: str) -> nn.Module:
    transformers = _transformers()
    transformers.utils.logging.disable_progress_bar()  # logs, not progress bars, on workers
    with tempfile.TemporaryDirectory(prefix="dsmooth-hf-") as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        try:
            model = transformers.AutoModelForImageClassification.from_pretrained(
                tmp, local_files_only=True, trust_remote_code=False)
        except Exception as error:  # noqa: BLE001 - any failure: not a loadable HF classifier
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ClassifierSourceError(f"{source}: not a loadable Hugging Face image classifier: {first}") from None
    return Logits(model.eval())

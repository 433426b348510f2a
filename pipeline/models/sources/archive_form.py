"""Deployment archives: a `torch.export` program (.pt2) or a TorchScript file. They carry
their own code (that is their point: no model code on the workers), so loading one runs
code from the file -- give only archives you trust (said in --help and the README).
Preprocessing comes from the archive's extra file (`carried.save_archive` writes it), else
from the flags (--classifier-input-size/-mean/-std/-resize)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import torch
from torch import nn

from ..preprocess import Preprocessing
from .carried import archive_preprocessing
from .common import Archive, ClassifierSourceError, Resolved, sha256


def archive_kind(path: Path, data: bytes) -> str | None:
    """"export", "torchscript" or None (not an archive: e.g. a dsmooth checkpoint)."""
    if path.suffix.lower() == ".pt2":
        return "export"
    if not zipfile.is_zipfile(io.BytesIO(data)):
        return None
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = archive.namelist()
    if any(n.endswith("/archive_format") or "/models/" in n and n.endswith(".json") for n in names):
        return "export"
    if any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names):
        return "torchscript"
    return None


def resolve(path: Path, data: bytes, kind: str) -> Resolved:
    """The archive's bundle. Its name is its content's (kind + the start of its SHA-256), never
    its file name: the same archive renamed or moved is the same classifier, so a run resumes
    (run.json still records the path, beside the identity, for humans)."""
    file = "model.pt2" if kind == "export" else "model.torchscript.pt"
    digest = sha256(data)
    load({"kind": kind, "extra": {"file": file}}, {file: data}, str(path))  # refuse a broken archive now
    carried = archive_preprocessing(data, kind)
    resolved = Resolved(kind, f"{kind}:{digest[:12]}", {file: data}, digest, carried or Preprocessing(),
                        extra={"file": file}, known=carried is not None)
    return resolved


def load(manifest: dict, files: dict[str, bytes], source: str) -> nn.Module:
    data = files[manifest["extra"]["file"]]
    try:
        if manifest["kind"] == "export":
            return Archive(torch.export.load(io.BytesIO(data)).module())
        return Archive(torch.jit.load(io.BytesIO(data), map_location="cpu").eval())
    except Exception as error:  # noqa: BLE001 - any failure: not a loadable archive
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ClassifierSourceError(f"{source}: not a loadable {manifest['kind']} archive: {first}") from None

"""A resolved classifier as one blob of bytes: a manifest plus the files its form needs.

The driver resolves a classifier spec (a timm name, a Hugging Face folder, an archive, a
factory...) into a bundle once; actors receive the bundle's bytes through the blob store,
so they need no shared file system, and the bundle's SHA-256 names the whole pipeline
(weights, config, preprocessing). The zip is written deterministically (sorted names,
fixed timestamps), so the same inputs always give the same bytes.

Bundles are made in memory by `resolve_classifier` only: a user's file that starts with
the bundle's magic is refused there, because a bundle of an in-memory module holds a
pickled object.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Mapping
from typing import Any

MAGIC = b"dsmooth-classifier-bundle/1\n"
_DATE = (1980, 1, 1, 0, 0, 0)


def is_bundle(data: bytes) -> bool:
    return data[: len(MAGIC)] == MAGIC


def make_bundle(manifest: Mapping[str, Any], files: Mapping[str, bytes]) -> bytes:
    """MAGIC + a stored zip of manifest.json and `files`, byte-for-byte reproducible."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        entries = {"manifest.json": json.dumps(dict(manifest), sort_keys=True).encode(), **files}
        for name in sorted(entries):
            info = zipfile.ZipInfo(name, date_time=_DATE)
            info.external_attr = 0o644 << 16
            archive.writestr(info, entries[name])
    return MAGIC + buffer.getvalue()


def read_bundle(data: bytes) -> tuple[dict[str, Any], dict[str, bytes]]:
    """(manifest, files) of a bundle made by `make_bundle`."""
    if not is_bundle(data):
        raise ValueError("not a dsmooth classifier bundle")
    with zipfile.ZipFile(io.BytesIO(data[len(MAGIC):])) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    manifest = json.loads(files.pop("manifest.json"))
    return manifest, files

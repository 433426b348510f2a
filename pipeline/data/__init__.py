"""Image data sets for certification and training: CIFAR-10, ImageNet and plain folders.

Every data set is an :class:`ImageDataset` of ``(image_id, image, label)`` items, where
``image_id`` is the image's position in the full split's deterministic listing. Ids survive
``subset``/``by_ids``, so a certification log row can always be traced back to its image and
results of runs that covered different slices can be merged.

Modules:
    core     records, errors, decoding, transforms, ``ImageDataset``, batching helpers
    archive  cache directory and atomic ``.tar.gz`` extraction
    sources  ``open_dataset`` and the CIFAR-10 / ImageNet / folder layouts
    specs    what a known data set is: classes, input size, normalisation
    kinds    the layouts (cifar10, imagenet, folder), light: the settings declare with them
"""

from __future__ import annotations

import importlib
from typing import Any

# Where each public name lives: loaded on first use, so that the light modules (`kinds`,
# `specs`) are importable by the settings without torch or PIL.
_HOME = {
    "cache_root": "archive", "extract_archive": "archive",
    "CIFAR10_CLASSES": "core", "IMAGE_EXTENSIONS": "core", "DatasetError": "core", "ImageDataset": "core",
    "ImageRecord": "core", "UnknownImageIdError": "core", "collate_items": "core", "decode_image": "core",
    "stack_batch": "core",
    "KINDS": "kinds", "DatasetKind": "kinds", "open_dataset": "sources",
    "CIFAR10": "specs", "IMAGENET": "specs", "DataDescription": "specs", "DatasetSpec": "specs",
    "dataset_spec": "specs",
}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'pipeline.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"pipeline.data.{_HOME[name]}"), name)


__all__ = [
    "CIFAR10",
    "CIFAR10_CLASSES",
    "DataDescription",
    "DatasetKind",
    "DatasetSpec",
    "IMAGENET",
    "KINDS",
    "dataset_spec",
    "IMAGE_EXTENSIONS",
    "DatasetError",
    "ImageDataset",
    "ImageRecord",
    "UnknownImageIdError",
    "cache_root",
    "collate_items",
    "decode_image",
    "extract_archive",
    "open_dataset",
    "stack_batch",
]

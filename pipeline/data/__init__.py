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
"""

from pipeline.data.archive import cache_root, extract_archive
from pipeline.data.core import (
    CIFAR10_CLASSES,
    IMAGE_EXTENSIONS,
    DatasetError,
    ImageDataset,
    ImageRecord,
    UnknownImageIdError,
    collate_items,
    decode_image,
    stack_batch,
)
from pipeline.data.sources import KINDS, DatasetKind, open_dataset
from pipeline.data.specs import CIFAR10, IMAGENET, DataDescription, DatasetSpec, dataset_spec

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

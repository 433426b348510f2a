"""The data-set layouts dsmooth reads, declared once and light (no torch, no PIL): the settings
take them for --help and validation, `pipeline.data.sources` opens them."""

from __future__ import annotations

from typing import Literal, get_args

DatasetKind = Literal["cifar10", "imagenet", "folder"]
KINDS: tuple[str, ...] = get_args(DatasetKind)

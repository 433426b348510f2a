"""The small CIFAR-10 test set the job tests share: 20 test images (2 per class), extracted
from ../shared/data/cifar10-jpeg.tar.gz in the class-folder layout."""

from __future__ import annotations

import re
import tarfile
from pathlib import Path

import pytest

CIFAR_ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"
_TWO_PER_CLASS = re.compile(r"test/[a-z]+/000[01]\.jpg")


def extract_two_per_class(root: Path) -> Path:
    """Images 0000 and 0001 of each class's test folder under `root` (skips without the data)."""
    if not CIFAR_ARCHIVE.is_file():
        pytest.skip(f"{CIFAR_ARCHIVE} not found")
    with tarfile.open(CIFAR_ARCHIVE) as archive:
        archive.extractall(root, members=[m for m in archive if _TWO_PER_CLASS.fullmatch(m.name)], filter="data")
    return root

"""The small CIFAR-10 test sets the job tests share, in the class-folder layout.

`two_per_class` comes from the shipped sample (`pipeline/assets/cifar10-sample`), so it exists
on every clone; `extract_two_per_class` takes images 0000 and 0001 of each class from the full
archive in `../shared/data` for the few tests pinned to those exact images (golden votes)."""

from __future__ import annotations

import re
import shutil
import tarfile
from pathlib import Path

from data_support import shared_data

SAMPLE = Path(__file__).resolve().parents[1] / "pipeline" / "assets" / "cifar10-sample"
_TWO_PER_CLASS = re.compile(r"test/[a-z]+/000[01]\.jpg")


def two_per_class(root: Path) -> Path:
    """Images 0000 and 0020 of each class of the shipped sample under `root` (20 images)."""
    for source in sorted(SAMPLE.glob("test/*/00[02]0.jpg")):
        target = root / "test" / source.parent.name / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return root


def extract_two_per_class(root: Path) -> Path:
    """Images 0000 and 0001 of each class's test folder of the full archive under `root`
    (skips with a reason where `../shared/data` is absent)."""
    archive_path = shared_data("cifar10-jpeg.tar.gz")
    with tarfile.open(archive_path) as archive:
        archive.extractall(root, members=[m for m in archive if _TWO_PER_CLASS.fullmatch(m.name)], filter="data")
    return root

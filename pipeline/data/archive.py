"""Cache directory, atomic archive extraction and the decoded-array cache.

A ``.tar.gz`` data set is extracted once into ``<cache>/datasets/<stem>-<key>``, where the
key hashes the archive's path, size and mtime: a replaced archive gets a fresh directory
instead of silently reusing stale files. Extraction goes to a temporary sibling that is
renamed into place only when complete, so a crash or Ctrl-C never leaves a half-extracted
directory that a later run would trust, and concurrent workers racing to extract the same
archive all end up using one complete copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

from pipeline.data.core import DatasetError

ARCHIVE_SUFFIXES: tuple[str, ...] = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar")
_STALE_PARTIAL_S = 6 * 3600  # a partial extraction this old belongs to a dead process
_ARRAY_CACHE_DIR = ".dsmooth-cache"


def cache_root() -> Path:
    """``$DSMOOTH_CACHE`` if set, else ``~/.cache/dsmooth`` (data sets go under ``datasets/``)."""
    env = os.environ.get("DSMOOTH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dsmooth"


def is_archive(path: Path) -> bool:
    """Whether ``path`` names a tar archive this module can extract."""
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def archive_stem(path: Path) -> str:
    """File name without its archive suffix: ``cifar10-jpeg.tar.gz`` -> ``cifar10-jpeg``."""
    name = path.name
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def extraction_dir(archive: Path, cache_dir: str | Path | None = None) -> Path:
    """Where ``archive`` is (or would be) extracted; the name changes with path/size/mtime."""
    archive = Path(archive).resolve()
    try:
        st = archive.stat()
    except OSError as exc:
        raise DatasetError(f"cannot read archive {archive}: {exc}") from exc
    key = hashlib.sha1(f"{archive}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    base = Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / "datasets"
    return base / f"{archive_stem(archive)}-{key}"


def _safe_members(tar: tarfile.TarFile, archive: Path) -> list[tarfile.TarInfo]:
    """Fallback member check for Pythons without extraction filters: no escaping paths."""
    members = []
    for member in tar.getmembers():
        parts = Path(member.name).parts
        if member.name.startswith(("/", "\\")) or ".." in parts:
            raise DatasetError(f"archive {archive} has an unsafe member path {member.name!r}")
        if member.isfile() or member.isdir():
            members.append(member)
    return members


def _remove_stale_partials(final: Path) -> None:
    """Delete leftovers of long-dead interrupted extractions of the same archive."""
    now = time.time()
    for partial in final.parent.glob(f".{final.name}.partial-*"):
        try:
            if now - partial.stat().st_mtime > _STALE_PARTIAL_S:
                shutil.rmtree(partial, ignore_errors=True)
        except OSError:
            pass


def extract_archive(archive: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Extract ``archive`` once (atomically) and return the extracted directory."""
    archive = Path(archive)
    final = extraction_dir(archive, cache_dir)
    if final.is_dir():
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetError(f"cannot create cache folder {final.parent}: {exc}") from exc
    _remove_stale_partials(final)
    partial = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        partial.chmod(0o755)  # mkdtemp's 0700 would hide the data from other local users
        with tarfile.open(archive) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(partial, filter="data")
            else:  # pragma: no cover - Pythons before the 2023 tarfile security backports
                tar.extractall(partial, members=_safe_members(tar, archive))
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise DatasetError(f"cannot extract archive {archive}: {exc}") from exc
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    try:
        os.rename(partial, final)
    except OSError:
        # Another process finished first: use its copy, drop ours.
        shutil.rmtree(partial, ignore_errors=True)
        if not final.is_dir():
            raise
    return final


# ---------------------------------------------------------------------------------------
# Decoded-array cache: the second open of an extracted CIFAR-10 skips JPEG decoding
# ---------------------------------------------------------------------------------------


def _cache_paths(root: Path, split: str) -> tuple[Path, Path]:
    folder = root / _ARRAY_CACHE_DIR
    return folder / f"{split}-uint8.npy", folder / f"{split}-index.json"


def read_array_cache(
    root: Path, split: str
) -> tuple[np.ndarray, list[str], list[int], dict[int, str]] | None:
    """``(images, names, labels, {id: error} of undecodable files)`` cached for ``split``
    under ``root``, or None if absent/bad."""
    images_path, index_path = _cache_paths(root, split)
    if not index_path.is_file() or not images_path.is_file():
        return None
    try:
        index = json.loads(index_path.read_text())
        images = np.load(images_path, allow_pickle=False)
        names, labels = list(index["names"]), [int(x) for x in index["labels"]]
        # Caches written before unreadable files were recorded only exist when all decoded.
        unreadable = {int(k): str(v) for k, v in index.get("unreadable", {}).items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # unreadable cache: decode again and overwrite it
    if images.dtype != np.uint8 or images.ndim != 4 or not len(images) == len(names) == len(labels):
        return None
    return images, names, labels, unreadable


def write_array_cache(
    root: Path, split: str, images: np.ndarray, names: list[str], labels: list[int],
    unreadable: dict[int, str] | None = None,
) -> None:
    """Store a decoded split; best effort (a read-only cache only costs speed)."""
    images_path, index_path = _cache_paths(root, split)
    try:
        images_path.parent.mkdir(exist_ok=True)
        # Write to temporaries and rename: readers never see a half-written file, and the
        # index (written last) is the commit marker.
        tmp_images = images_path.with_name(f".{images_path.name}.{os.getpid()}.tmp")
        with open(tmp_images, "wb") as fh:
            np.save(fh, images, allow_pickle=False)
        os.replace(tmp_images, images_path)
        tmp_index = index_path.with_name(f".{index_path.name}.{os.getpid()}.tmp")
        tmp_index.write_text(json.dumps({"names": names, "labels": labels,
                                         "unreadable": {str(k): v for k, v in (unreadable or {}).items()}}))
        os.replace(tmp_index, index_path)
    except OSError:
        pass

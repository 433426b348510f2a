"""``open_dataset``: CIFAR-10 (pickled batches, class folders, archives), ImageNet, folders.

Listings are sorted deterministically (class, then path parts) so that an image id means the
same image on every machine of a cluster and in every later run.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline.data.archive import extract_archive, is_archive, read_array_cache, write_array_cache
from pipeline.data.core import (
    IMAGE_EXTENSIONS,
    ArraySource,
    DatasetError,
    FileSource,
    ImageDataset,
    ImageRecord,
    ResizeCenterCrop,
    decode_image,
    parallel_map,
)
from pipeline.data.specs import CIFAR10, CIFAR10_CLASSES, IMAGENET
from pipeline.data.kinds import KINDS  # light: the settings take them too

CIFAR10_SPLITS: dict[str, tuple[str, ...]] = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}
CIFAR10_SIZE = CIFAR10.input_size
# Cohen et al.'s ImageNet test transform: Resize(256) + CenterCrop(224), i.e. crop/0.875.
IMAGENET_CROP = IMAGENET.input_size
IMAGENET_CROP_FRACTION = 0.875


def open_dataset(
    kind: str,
    root: str | Path,
    split: str = "test",
    *,
    image_size: int | None = None,
    labels: bool = True,
    cache_dir: str | Path | None = None,
) -> ImageDataset:
    """Open a split of a data set; see the module docs of :mod:`pipeline.data`.

    ``kind``: ``"cifar10"`` (pickled ``cifar-10-batches-py``, ``<split>/<class>/`` image
    folders, or a ``.tar.gz`` of either, auto-detected), ``"imagenet"``
    (``<split>/<wnid>/*.JPEG``; split ``"test"`` means ``val``) or ``"folder"`` (any folder
    of images; ``split`` is ignored). ``image_size``: output side length (ImageNet: crop size,
    resized first to ``image_size / 0.875``; others: resize shorter side + center crop).
    ``labels=False`` reports every label as -1. ``cache_dir`` overrides where archives are
    extracted (default ``$DSMOOTH_CACHE/datasets`` or ``~/.cache/dsmooth/datasets``).
    """
    kind_key = str(kind).lower()
    if kind_key not in KINDS:
        raise DatasetError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer))
        or image_size < 1
    ):
        raise DatasetError(f"image_size must be None or an integer >= 1, got {image_size!r}")
    root = Path(root).expanduser()
    if not root.exists():
        raise DatasetError(f"dataset root {root} does not exist")
    if kind_key == "cifar10":
        return _open_cifar10(root, split, image_size, labels, cache_dir)
    if kind_key == "imagenet":
        return _open_imagenet(root, split, image_size, labels)
    return _open_folder(root, image_size, labels)


# ---------------------------------------------------------------------------------------
# Listing helpers
# ---------------------------------------------------------------------------------------


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _walk_images(folder: Path) -> Iterator[Path]:
    """Image files under ``folder``, recursively, skipping hidden files and folders."""
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for filename in filenames:
            if not filename.startswith(".") and _is_image(filename):
                yield Path(dirpath) / filename


def _sorted_images(folder: Path) -> list[Path]:
    """Sorted by path components, so ``a/x`` < ``a-b/x`` as with sorted class folders."""
    return sorted(_walk_images(folder), key=lambda p: p.relative_to(folder).parts)


def _class_folders(split_dir: Path, what: str) -> list[tuple[str, list[Path]]]:
    """``[(class name, sorted images)]`` for the class sub-folders of ``split_dir``."""
    if not split_dir.is_dir():
        raise DatasetError(f"{what} split folder {split_dir} does not exist")
    try:
        with os.scandir(split_dir) as it:
            entries = [e for e in it if not e.name.startswith(".")]
        loose = sorted(e.name for e in entries if e.is_file() and _is_image(e.name))
        classes = sorted(e.name for e in entries if e.is_dir())
    except OSError as exc:
        raise DatasetError(f"cannot list {what} split folder {split_dir}: {exc}") from exc
    if loose:
        raise DatasetError(
            f"{split_dir} holds images directly (e.g. {loose[0]}); {what} expects one "
            "sub-folder per class (use kind='folder' for unlabelled images)"
        )
    groups = [(name, _sorted_images(split_dir / name)) for name in classes]
    if not any(paths for _, paths in groups):
        raise DatasetError(
            f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {what} split folder {split_dir}"
        )
    return groups


# ---------------------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------------------


def _find_cifar_layout(root: Path, depth: int = 0) -> tuple[str, Path] | None:
    """``("pickle" | "folders", directory)`` for a CIFAR-10 root, or None if unrecognised."""
    if (root / "test_batch").is_file() or (root / "data_batch_1").is_file():
        return "pickle", root
    if (root / "cifar-10-batches-py").is_dir():
        return _find_cifar_layout(root / "cifar-10-batches-py", depth + 1)
    if (root / "train").is_dir() or (root / "test").is_dir():
        return "folders", root
    if depth == 0:  # archives often wrap everything in one top-level folder
        try:
            with os.scandir(root) as it:
                subdirs = [e.path for e in it if e.is_dir() and not e.name.startswith(".")]
        except OSError as exc:
            raise DatasetError(f"cannot list dataset root {root}: {exc}") from exc
        if len(subdirs) == 1:
            return _find_cifar_layout(Path(subdirs[0]), depth + 1)
    return None


def _open_cifar10(
    root: Path, split: str, image_size: int | None, labels: bool,
    cache_dir: str | Path | None,
) -> ImageDataset:
    if split not in CIFAR10_SPLITS:
        raise DatasetError(f"split for cifar10 must be 'train' or 'test', got {split!r}")
    extracted = False
    origin = root
    if root.is_file():
        if not is_archive(root):
            raise DatasetError(
                f"{root} is a file but not a .tar.gz/.tgz/.tar archive of CIFAR-10"
            )
        root = extract_archive(root, cache_dir)
        extracted = True
    layout = _find_cifar_layout(root)
    if layout is None:
        raise DatasetError(
            f"{origin} is not a CIFAR-10 data set: expected a cifar-10-batches-py folder "
            "(data_batch_1..5, test_batch), a folder with train/<class>/ and test/<class>/ "
            "image folders, or a .tar.gz archive of either"
        )
    kind, layout_root = layout
    unreadable: dict[int, str] = {}
    if kind == "pickle":
        images, names, label_list = _read_cifar_pickles(layout_root, split)
    else:
        # Only archives extracted into our own cache get the .npy cache: a user's folder may
        # change under us, and we should not write into it.
        images, names, label_list, unreadable = _read_cifar_folders(layout_root, split, cache=extracted)
    transform = (None if image_size is None or image_size == CIFAR10_SIZE
                 else ResizeCenterCrop(image_size, image_size))
    records = [ImageRecord(i, name, label if labels else -1)
               for i, (name, label) in enumerate(zip(names, label_list))]
    return ImageDataset(records, name=f"cifar10/{split}",
                        classes=list(CIFAR10_CLASSES) if labels else None,
                        source=ArraySource(images, transform, unreadable), spec=CIFAR10)


class _BatchUnpickler(pickle.Unpickler):
    """Only what a CIFAR batch (dict of numpy arrays/lists) needs: loading a pickle
    otherwise runs arbitrary code, and data sets often come from untrusted mirrors."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, list[int]]:
    """Decode one pickled batch into ``([N, 32, 32, 3] uint8, labels)``."""
    if not path.is_file():
        raise DatasetError(f"CIFAR-10 batch file {path} is missing")
    try:
        with open(path, "rb") as fh:
            batch = _BatchUnpickler(fh, encoding="bytes").load()
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise DatasetError(f"cannot read CIFAR-10 batch file {path}: {exc}") from exc
    if not isinstance(batch, dict):
        raise DatasetError(f"CIFAR-10 batch file {path} does not hold a dict")

    def field(key: str) -> object:
        for k in (key.encode(), key):
            if k in batch:
                return batch[k]
        raise DatasetError(f"CIFAR-10 batch file {path} has no {key!r} field")

    data = np.asarray(field("data"))
    raw_labels = field("labels")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * CIFAR10_SIZE ** 2:
        raise DatasetError(
            f"CIFAR-10 batch file {path}: field 'data' must be uint8 [N, 3072], "
            f"got {data.dtype} {list(data.shape)}"
        )
    try:
        label_list = [int(x) for x in raw_labels]  # type: ignore[union-attr]
    except (TypeError, ValueError) as exc:
        raise DatasetError(
            f"CIFAR-10 batch file {path}: field 'labels' is not a list of ints"
        ) from exc
    if len(label_list) != len(data):
        raise DatasetError(
            f"CIFAR-10 batch file {path}: {len(label_list)} labels for {len(data)} images"
        )
    bad = [x for x in label_list if not 0 <= x < len(CIFAR10_CLASSES)]
    if bad:
        raise DatasetError(f"CIFAR-10 batch file {path}: field 'labels' has value {bad[0]}")
    # Rows are the R, G and B planes one after another (channels-first).
    images = data.reshape(-1, 3, CIFAR10_SIZE, CIFAR10_SIZE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), label_list


def _read_cifar_pickles(root: Path, split: str) -> tuple[np.ndarray, list[str], list[int]]:
    arrays, names, label_list = [], [], []
    for batch_name in CIFAR10_SPLITS[split]:
        images, batch_labels = _read_cifar_batch(root / batch_name)
        arrays.append(images)
        names.extend(f"{batch_name}:{i}" for i in range(len(images)))
        label_list.extend(batch_labels)
    images = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
    if len(images) == 0:
        raise DatasetError(f"CIFAR-10 batch files for split {split!r} in {root} hold no images")
    return images, names, label_list


def _decode_cifar_file(path: Path) -> np.ndarray:
    image = decode_image(path)
    if image.size != (CIFAR10_SIZE, CIFAR10_SIZE):
        raise DatasetError(
            f"CIFAR-10 image {path} is {image.size[0]}x{image.size[1]}, expected 32x32"
        )
    return np.asarray(image)


def _decode_or_error(path: Path) -> np.ndarray | str:
    try:
        return _decode_cifar_file(path)
    except DatasetError as error:
        return str(error)


def _read_cifar_folders(
    root: Path, split: str, *, cache: bool
) -> tuple[np.ndarray, list[str], list[int], dict[int, str]]:
    """Decode ``root/<split>/<class>/*`` once into memory (JPEG decoding per epoch is slow).

    A file that cannot be decoded gets a black placeholder row and its error in the returned
    ``{image id: error}``: the job then fails on it or skips it (``on_bad_image``) as with the
    lazily read layouts, instead of the whole data set failing to open.
    """
    split_dir = root / split
    groups = _class_folders(split_dir, "CIFAR-10")
    paths: list[Path] = []
    label_list: list[int] = []
    for class_name, class_paths in groups:
        if class_name not in CIFAR10_CLASSES:
            raise DatasetError(
                f"{split_dir / class_name} is not a CIFAR-10 class folder; "
                f"expected names from {', '.join(CIFAR10_CLASSES)}"
            )
        paths.extend(class_paths)
        label_list.extend([CIFAR10_CLASSES.index(class_name)] * len(class_paths))
    # Class folders come sorted by name, and CIFAR-10's names sort in label order.
    names = [p.relative_to(root).as_posix() for p in paths]
    if cache:
        cached = read_array_cache(root, split)
        if cached is not None and cached[1] == names and cached[2] == label_list:
            return cached
    decoded = parallel_map(_decode_or_error, paths)
    unreadable = {i: d for i, d in enumerate(decoded) if isinstance(d, str)}
    placeholder = np.zeros((CIFAR10_SIZE, CIFAR10_SIZE, 3), dtype=np.uint8)
    images = np.stack([placeholder if isinstance(d, str) else d for d in decoded])
    if cache:
        write_array_cache(root, split, images, names, label_list, unreadable)
    return images, names, label_list, unreadable


# ---------------------------------------------------------------------------------------
# ImageNet and plain folders (lazy)
# ---------------------------------------------------------------------------------------


def _open_imagenet(root: Path, split: str, image_size: int | None, labels: bool) -> ImageDataset:
    if not root.is_dir():
        raise DatasetError(f"ImageNet root {root} must be a folder with train/ and val/")
    folder = split
    if split == "test" and not (root / "test").is_dir():
        folder = "val"  # certification uses the validation set as its test set
    split_dir = root / folder
    groups = _class_folders(split_dir, "ImageNet")
    classes = [name for name, _ in groups]
    paths, records = [], []
    for label, (_, class_paths) in enumerate(groups):
        for path in class_paths:
            records.append(ImageRecord(len(paths), path.relative_to(root).as_posix(),
                                       label if labels else -1))
            paths.append(path)
    crop = image_size or IMAGENET_CROP
    transform = ResizeCenterCrop(int(round(crop / IMAGENET_CROP_FRACTION)), crop)
    return ImageDataset(records, name=f"imagenet/{folder}", classes=classes if labels else None,
                        source=FileSource(paths, transform), spec=IMAGENET)


def _open_folder(root: Path, image_size: int | None, labels: bool) -> ImageDataset:
    if not root.is_dir():
        raise DatasetError(f"folder data set root {root} is not a folder")
    paths = _sorted_images(root)
    if not paths:
        raise DatasetError(
            f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in folder {root}"
        )
    parts = [p.relative_to(root).parts for p in paths]
    # Class sub-folders only when every image sits in one; loose images mean "unlabelled".
    classes = sorted({q[0] for q in parts}) if labels and all(len(q) > 1 for q in parts) else None
    index = {name: i for i, name in enumerate(classes or [])}
    records = [ImageRecord(i, "/".join(q), index[q[0]] if classes else -1)
               for i, q in enumerate(parts)]
    transform = ResizeCenterCrop(image_size, image_size) if image_size else None
    return ImageDataset(records, name=f"folder/{root.name}", classes=classes,
                        source=FileSource(paths, transform))

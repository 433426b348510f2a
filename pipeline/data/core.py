"""Records, decoding, transforms and the :class:`ImageDataset` shared by every layout.

Images are handled as uint8 ``[H, W, 3]`` RGB arrays until the last moment, because that is
how CIFAR-10 is held in memory (a float copy of the 50k training images would be 4x larger)
and how training loops want them for fast GPU-side augmentation. ``__getitem__``/``load``
convert to float32 ``[3, H, W]`` in ``[0, 1]`` exactly like torchvision's ``ToTensor``, so
classifiers trained with torchvision's pipelines see the same numbers.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pipeline.data.specs import CIFAR10_CLASSES, DataDescription, DatasetSpec
from pipeline.sampling.noise import to_tensor  # the pixel space the noise is added in

__all__ = ["CIFAR10_CLASSES"]  # re-exported: the data set's facts live in pipeline.data.specs


# Lower-case suffixes recognised as images when listing folders (".JPEG" matches too).
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})

_T = TypeVar("_T")
_R = TypeVar("_R")


class DatasetError(ValueError):
    """Bad data-set input; the message names the offending file, folder or field."""


class UnknownImageIdError(DatasetError, KeyError):
    """An image id that the data set does not hold (a KeyError, so ``except KeyError`` works)."""

    # KeyError quotes its message; keep the plain, readable one of ValueError.
    __str__ = BaseException.__str__


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """One image of a split.

    ``image_id`` is the position in the full split's deterministic listing, so it stays the
    same whatever subset a run certifies; ``name`` says where the pixels came from.
    """

    image_id: int
    name: str
    label: int  # -1 when unknown


# ---------------------------------------------------------------------------------------
# Decoding and transforms
# ---------------------------------------------------------------------------------------


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; classifiers expect three channels."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        # 16-bit grayscale PNGs: Pillow's own conversion would clip at 255 (all white).
        values = np.asarray(image, dtype=np.float64)
        scale = 257.0 if values.max(initial=0) > 255 else 1.0
        gray = np.clip(np.rint(values / scale), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        # Going through RGBA avoids Pillow's palette-transparency warning; alpha is dropped
        # as in torchvision's default loader (``convert("RGB")``).
        image = image.convert("RGBA")
    return image.convert("RGB")


def decode_image(path: str | Path) -> Image.Image:
    """Decode an image file fully into RGB, raising :class:`DatasetError` naming the file.

    Decoding is forced here (``load``) so that truncated files fail now with a clear
    message instead of deep inside a batch with a bare Pillow error.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            return _to_rgb(image)
    except FileNotFoundError as exc:
        raise DatasetError(f"image file {path} does not exist") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
            Image.DecompressionBombError) as exc:
        raise DatasetError(f"cannot decode image file {path}: {exc}") from exc


@dataclass(frozen=True)
class ResizeCenterCrop:
    """Resize the shorter side to ``resize``, then center-crop ``crop`` x ``crop``.

    Reproduces torchvision's ``Resize(resize)`` + ``CenterCrop(crop)`` on PIL images
    (bilinear, same rounding) without importing torchvision, so that ImageNet numbers match
    Cohen et al.'s reference pipeline bit for bit.
    """

    resize: int
    crop: int

    def __post_init__(self) -> None:
        if self.resize < 1 or self.crop < 1 or self.crop > self.resize:
            raise DatasetError(
                f"image_size: need 1 <= crop <= resize, got crop={self.crop}, resize={self.resize}"
            )

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        short, long = (width, height) if width <= height else (height, width)
        if short != self.resize:
            new_short, new_long = self.resize, int(self.resize * long / short)
            size = (new_short, new_long) if width <= height else (new_long, new_short)
            image = image.resize(size, Image.BILINEAR)
        width, height = image.size
        top = int(round((height - self.crop) / 2.0))
        left = int(round((width - self.crop) / 2.0))
        return image.crop((left, top, left + self.crop, top + self.crop))


def parallel_map(fn: Callable[[_T], _R], items: Sequence[_T]) -> list[_R]:
    """Map ``fn`` over ``items`` with threads; Pillow releases the GIL while decoding."""
    workers = min(8, os.cpu_count() or 1)
    if len(items) < 64 or workers == 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, items, chunksize=256))


# ---------------------------------------------------------------------------------------
# Pixel sources: where the dataset's images live, indexed by image_id
# ---------------------------------------------------------------------------------------


class _Source(Protocol):
    def image(self, image_id: int) -> np.ndarray: ...

    def images(self, image_ids: Sequence[int]) -> list[np.ndarray] | np.ndarray: ...


class ArraySource:
    """Eagerly decoded images ``[N, H, W, 3]`` uint8, row = image_id (CIFAR-10).

    ``unreadable`` maps the ids of files that could not be decoded to their error: their
    rows are placeholders, and reading one raises that error, exactly as a lazy
    :class:`FileSource` would when the file is read -- so one bad file in an eagerly decoded
    layout fails (or is skipped by) only the work that touches it, not the whole data set.
    """

    def __init__(self, array: np.ndarray, transform: ResizeCenterCrop | None = None,
                 unreadable: dict[int, str] | None = None) -> None:
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
            raise DatasetError(
                f"images: expected a uint8 array [N, H, W, 3], got {array.dtype} {array.shape}"
            )
        self.array = array
        self.transform = transform
        self.unreadable: dict[int, str] = dict(unreadable or {})

    def _check_readable(self, image_ids: Iterable[int]) -> None:
        if self.unreadable:
            bad = next((int(i) for i in image_ids if int(i) in self.unreadable), None)
            if bad is not None:
                raise DatasetError(self.unreadable[bad])

    def image(self, image_id: int) -> np.ndarray:
        self._check_readable((image_id,))
        row = self.array[image_id]
        if self.transform is None:
            return row
        return np.asarray(self.transform(Image.fromarray(row)))

    def images(self, image_ids: Sequence[int]) -> np.ndarray:
        ids = np.asarray(image_ids, dtype=np.int64)
        self._check_readable(ids.tolist())
        if self.transform is None:
            n = len(self.array)
            if len(ids) == n and (n == 0 or (ids[0] == 0 and np.all(np.diff(ids) == 1))):
                return self.array  # the whole split in order: no 150 MB copy
            return self.array[ids]
        return np.stack([self.image(int(i)) for i in ids]) if len(ids) else self._empty()

    def _empty(self) -> np.ndarray:
        size = self.transform.crop if self.transform else self.array.shape[1]
        return np.zeros((0, size, size, 3), dtype=np.uint8)


class FileSource:
    """Lazily decoded image files, index = image_id (ImageNet, folders)."""

    def __init__(self, paths: Sequence[Path], transform: ResizeCenterCrop | None = None) -> None:
        self.paths = list(paths)
        self.transform = transform

    def image(self, image_id: int) -> np.ndarray:
        image = decode_image(self.paths[image_id])
        if self.transform is not None:
            image = self.transform(image)
        return np.asarray(image)

    def images(self, image_ids: Sequence[int]) -> list[np.ndarray]:
        return parallel_map(self.image, list(image_ids))


# ---------------------------------------------------------------------------------------
# The data set
# ---------------------------------------------------------------------------------------


class ImageDataset(torch.utils.data.Dataset):
    """A split (or a slice of one) yielding ``(image_id, image [3,H,W] float32, label)``.

    Slices share the parent's pixel source, so ``subset``/``by_ids`` are cheap and never
    re-decode CIFAR-10.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        *,
        name: str,
        classes: Sequence[str] | None,
        source: _Source,
        spec: DatasetSpec | None = None,
    ) -> None:
        self.records: list[ImageRecord] = list(records)
        self.classes: list[str] | None = list(classes) if classes is not None else None
        self.name = name
        self.spec = spec  # the known data set these images belong to (None: any folder)
        self._source = source

    @classmethod
    def from_array(
        cls,
        images: np.ndarray,
        labels: Sequence[int] | np.ndarray | None = None,
        *,
        name: str = "array",
        classes: Sequence[str] | None = None,
    ) -> ImageDataset:
        """Wrap in-memory uint8 ``[N, H, W, 3]`` images (ids 0..N-1), e.g. for tests/benchmarks."""
        images = np.asarray(images)
        source = ArraySource(images)
        n = len(images)
        label_list = [-1] * n if labels is None else [int(x) for x in labels]
        if len(label_list) != n:
            raise DatasetError(f"labels: {len(label_list)} labels for {n} images")
        records = [ImageRecord(i, f"{name}:{i}", label_list[i]) for i in range(n)]
        return cls(records, name=name, classes=classes, source=source)

    # -- torch Dataset protocol ----------------------------------------------------------

    def __len__(self) -> int:
        return len(self.records)

    def _record(self, i: int) -> ImageRecord:
        n = len(self.records)
        if not -n <= i < n:
            # IndexError (not DatasetError): the sequence protocol and DataLoader rely on it.
            raise IndexError(f"position {i} out of range for {self.name} with {n} images")
        return self.records[i]

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, int]:
        record = self._record(i)
        return record.image_id, to_tensor(self._source.image(record.image_id)), record.label

    def load(self, i: int) -> torch.Tensor:
        """The image at position ``i`` as float32 ``[3, H, W]`` in [0, 1]."""
        return to_tensor(self._source.image(self._record(i).image_id))

    def __repr__(self) -> str:
        return f"ImageDataset({self.name!r}, {len(self)} images)"

    # -- slicing -------------------------------------------------------------------------

    def _derive(self, records: list[ImageRecord]) -> ImageDataset:
        return ImageDataset(records, name=self.name, classes=self.classes, source=self._source, spec=self.spec)

    def describe(self) -> DataDescription:
        """What a classifier must fit to certify these images (the first readable image gives
        the size: an unreadable one is the job's to fail on or skip, with its own message)."""
        if not self.records:
            raise DatasetError(f"{self.name} is empty")
        first_error: DatasetError | None = None
        for record in self.records:
            try:
                height, width = self._source.image(record.image_id).shape[:2]
                break
            except DatasetError as error:
                first_error = first_error or error
        else:
            assert first_error is not None
            raise first_error
        num_classes = len(self.classes) if self.classes is not None else None
        if num_classes is None and self.spec is not None:
            num_classes = self.spec.num_classes
        classes = tuple(self.classes) if self.classes is not None else None
        return DataDescription(self.spec.name if self.spec else None, num_classes, (int(height), int(width)), classes)

    def subset(self, skip: int = 1, max: int | None = None) -> ImageDataset:  # noqa: A002
        """Keep positions ``i`` with ``i % skip == 0`` and ``i < max``, as certify.py does.

        ``max`` bounds the position, not the count: Cohen et al.'s ``--skip 20 --max -1``
        style runs and their logs' ``idx`` column depend on exactly this rule.
        """
        if isinstance(skip, bool) or not isinstance(skip, (int, np.integer)) or skip < 1:
            raise DatasetError(f"skip must be an integer >= 1, got {skip!r}")
        if max is not None and (
            isinstance(max, bool) or not isinstance(max, (int, np.integer)) or max < 0
        ):
            raise DatasetError(f"max must be None or an integer >= 0, got {max!r}")
        stop = len(self.records) if max is None else min(int(max), len(self.records))
        return self._derive(self.records[0:stop:int(skip)])

    def by_ids(self, ids: Iterable[int]) -> ImageDataset:
        """Keep the images with these ids, in the order given (e.g. to resume a run)."""
        positions = {r.image_id: p for p, r in enumerate(self.records)}
        wanted = [int(i) for i in ids]
        unknown = [i for i in wanted if i not in positions]
        if unknown:
            raise UnknownImageIdError(
                f"image ids not in {self.name} ({len(self)} images): {unknown[:10]}"
                + (" ..." if len(unknown) > 10 else "")
            )
        if len(set(wanted)) != len(wanted):
            # A repeated image would be counted twice in certified accuracy.
            dups = sorted(i for i, count in Counter(wanted).items() if count > 1)
            raise DatasetError(f"ids: duplicate image ids {dups[:10]}")
        return self._derive([self.records[positions[i]] for i in wanted])

    # -- bulk access for training --------------------------------------------------------

    def image_ids(self) -> np.ndarray:
        """int64 ``[N]`` ids in dataset order."""
        return np.fromiter((r.image_id for r in self.records), dtype=np.int64, count=len(self))

    def labels(self) -> np.ndarray:
        """int64 ``[N]`` labels in dataset order (-1 where unknown)."""
        return np.fromiter((r.label for r in self.records), dtype=np.int64, count=len(self))

    def as_uint8(self) -> np.ndarray:
        """All images as uint8 ``[N, H, W, 3]``; lazy data sets decode everything now.

        For a whole in-memory split this is the data set's own array (no copy): treat it as
        read-only.
        """
        images = self._source.images(self.image_ids().tolist())
        if isinstance(images, np.ndarray):
            return images
        if not images:
            raise DatasetError(f"{self.name} is empty: nothing to stack")
        first = images[0].shape
        for record, image in zip(self.records, images):
            if image.shape != first:
                raise DatasetError(
                    f"{record.name} is {image.shape[1]}x{image.shape[0]} but "
                    f"{self.records[0].name} is {first[1]}x{first[0]}: "
                    "open the data set with image_size=... to batch images of different sizes"
                )
        return np.stack(images)


# ---------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------


def stack_batch(
    dataset: ImageDataset, positions: Sequence[int] | Iterable[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids int64 [B], images float32 [B,3,H,W], labels int64 [B])`` for these positions.

    Array-backed data sets (CIFAR-10) gather with one numpy fancy-index instead of B
    per-image conversions, which matters when certifying thousands of small images.
    """
    records = [dataset._record(int(p)) for p in positions]
    ids = torch.tensor([r.image_id for r in records], dtype=torch.int64)
    labels = torch.tensor([r.label for r in records], dtype=torch.int64)
    sub = dataset._derive(records)
    if not records:
        source = dataset._source
        if isinstance(source, ArraySource):
            return ids, to_tensor(source.images([])), labels
        return ids, torch.zeros((0, 3, 0, 0)), labels
    return ids, to_tensor(sub.as_uint8()), labels


def collate_items(
    items: Sequence[tuple[int, torch.Tensor, int]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DataLoader ``collate_fn``: stack ``(id, image, label)`` items with a clear size error."""
    if not items:
        return (torch.zeros(0, dtype=torch.int64), torch.zeros((0, 3, 0, 0)),
                torch.zeros(0, dtype=torch.int64))
    shape = items[0][1].shape
    for image_id, image, _ in items:
        if image.shape != shape:
            raise DatasetError(
                f"image {image_id} has shape {tuple(image.shape)} but image {items[0][0]} has "
                f"{tuple(shape)}: open the data set with image_size=... to batch them"
            )
    ids = torch.tensor([int(i) for i, _, _ in items], dtype=torch.int64)
    labels = torch.tensor([int(y) for _, _, y in items], dtype=torch.int64)
    return ids, torch.stack([x for _, x, _ in items]), labels

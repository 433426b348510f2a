"""What a known data set is: its classes, the input size its classifiers take, and the
normalisation they were trained with.

These facts describe the *data*; models refer to them (a classifier's default normalisation,
its number of classes) and checkpoints record which data set they were trained on, so a
model can be checked against the data it is asked to certify before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


@dataclass(frozen=True)
class DatasetSpec:
    """A known data set: `input_size` is the side of the images its classifiers take."""

    name: str
    num_classes: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    classes: tuple[str, ...] | None = None

    @property
    def normalization(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}

    def describe(self, side: int | None = None) -> DataDescription:
        """What a model must fit to take this data set's images (`side` px square, default
        the classifiers' input size) -- for checks made without the images at hand."""
        side = side or self.input_size
        return DataDescription(self.name, self.num_classes, (side, side))


CIFAR10 = DatasetSpec(
    "cifar10", 10, 32,
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2023, 0.1994, 0.2010),  # Cohen et al.'s values
    classes=CIFAR10_CLASSES,
)
IMAGENET = DatasetSpec(
    "imagenet", 1000, 224,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
)

SPECS: dict[str, DatasetSpec] = {spec.name: spec for spec in (CIFAR10, IMAGENET)}


def dataset_spec(name: str | None) -> DatasetSpec | None:
    """The spec of a known data set name ("cifar10", "imagenet"), else None."""
    return SPECS.get(str(name).split("/")[0]) if name else None


@dataclass(frozen=True)
class DataDescription:
    """What a model must fit: the data set's name (None for an arbitrary folder), its number
    of classes (None when unlabelled) and the size of its images."""

    name: str | None
    num_classes: int | None
    image_size: tuple[int, int]
    classes: tuple[str, ...] | None = None  # class names in label order, when the data has them

    def __str__(self) -> str:
        parts = [self.name or "a folder data set"]
        details = []
        if self.num_classes is not None:
            details.append(f"{self.num_classes} classes")
        details.append(f"{self.image_size[1]}x{self.image_size[0]} images")
        return f"{parts[0]} ({', '.join(details)})"

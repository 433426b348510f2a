"""Labels that do not come from a full class-folder tree: a labels file, and class folders
that name some of a model's classes.

`--labels FILE` gives each image its label: a CSV `image,label` (the image's path in the
listing, its file name or its stem; the label a class index or a class name), ImageNet's
validation ground truth as `val.txt` lines (`ILSVRC2012_val_00000001.JPEG 65`, class
indices in sorted-wnid order), Kaggle's `LOC_val_solution.csv` (`ImageId,PredictionString`,
the first wnid) or the devkit's `ILSVRC2012_validation_ground_truth.txt` (line i: the
ILSVRC2012_ID of `ILSVRC2012_val_0000000i`; IDs count in the devkit's own class order, not
the sorted-wnid order of torchvision and timm, so they are mapped to wnids by the devkit's
`data/meta.mat`, beside the file or in `../data/`). Class names come from the model (Hugging
Face `id2label`, timm's ImageNet wnids) or `--class-names FILE` (one per line, in class-index
order).

A class-folder tree with fewer folders than the model has classes (three ImageNet wnid
folders under a 1000-class model) maps each folder name to the model's class of that name
(a wnid, or a name such as `tench`; case, `_` and `-` ignored, any of a comma-separated
list of synonyms); a folder name that is none of them is a one-line error.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from pipeline.data.core import DatasetError, ImageDataset, ImageRecord
from pipeline.errors import setting

log = logging.getLogger("dsmooth")
_HEADERS = {"image", "imageid", "image_id", "file", "filename", "name", "path"}


def _key(name: str) -> str:
    return " ".join(name.strip().lower().replace("_", " ").replace("-", " ").split())


def name_index(class_names: Sequence[str]) -> dict[str, int]:
    """Normalised class name (and each comma-separated synonym) -> class index."""
    index: dict[str, int] = {}
    for i, name in enumerate(class_names):
        for word in [name, *str(name).split(",")]:
            index.setdefault(_key(str(word)), i)
    return index


def read_class_names(path: str | Path) -> list[str]:
    """One class name per line, in class-index order (blank lines ignored)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DatasetError(f"class names file {path} does not exist")
    names = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    if not names:
        raise DatasetError(f"class names file {path} names no class")
    return names


def read_labels_file(path: str | Path) -> dict[str, str]:
    """image key -> label text, from any format in the module doc."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DatasetError(f"labels file {path} does not exist")
    text = file.read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise DatasetError(f"labels file {path} is empty")
    rows: list[list[str]]
    if _is_devkit(lines):
        return _devkit_labels(file, [int(line) for line in lines])
    if "," in lines[0]:
        rows = [row for row in csv.reader(io.StringIO(text)) if row]
        header = [c.strip().lower() for c in rows[0]]
        kaggle = header[:2] == ["imageid", "predictionstring"]
        if header and header[0] in _HEADERS:
            rows = rows[1:]
        if kaggle:  # LOC_val_solution.csv: the first token of the prediction string is the wnid
            rows = [[row[0], row[1].split()[0]] for row in rows if len(row) > 1 and row[1].split()]
    else:
        rows = [line.split() for line in lines]
    labels: dict[str, str] = {}
    for number, row in enumerate(rows, 1):
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise DatasetError(f"labels file {path}: row {number} is not 'image,label': {row}")
        labels[row[0].strip()] = row[1].strip()
    return labels


def _is_devkit(lines: Sequence[str]) -> bool:
    """The devkit's ground truth holds one ILSVRC2012_ID per line and nothing else."""
    return all(line.strip().isdigit() for line in lines)


def _meta_places(file: Path) -> list[Path]:
    """Where a devkit ground-truth file's meta.mat is looked for: beside it, then ../data/."""
    return [file.parent / "meta.mat", file.parent.parent / "data" / "meta.mat"]


def _devkit_meta(file: Path) -> Path | None:
    """The meta.mat of a devkit ground-truth file (the first of `_meta_places` that exists)."""
    return next((place for place in _meta_places(file) if place.is_file()), None)


def _devkit_labels(file: Path, ids: list[int]) -> dict[str, str]:
    """The devkit's ground truth: the i-th ID is image ILSVRC2012_val_<i, 8 digits>'s, mapped
    to its wnid by the devkit's meta.mat (refused without one: the IDs are no class indices)."""
    meta = _devkit_meta(file)
    if meta is None:
        places = _meta_places(file)
        raise DatasetError(f"labels file {file} holds ImageNet devkit ILSVRC2012_IDs (the devkit's own class "
                           f"order, not class indices): its data/meta.mat maps them to wnids, but there is none at "
                           f"{places[0]} or {places[1]}")
    wnids = devkit_wnids(meta)
    labels: dict[str, str] = {}
    for number, ilsvrc_id in enumerate(ids, 1):
        if ilsvrc_id not in wnids:
            raise DatasetError(f"labels file {file}: line {number}: ILSVRC2012_ID {ilsvrc_id} is not in {meta}")
        labels[f"ILSVRC2012_val_{number:08d}"] = wnids[ilsvrc_id]
    return labels


def devkit_wnids(meta: Path) -> dict[int, str]:
    """ILSVRC2012_ID -> wnid, from the devkit's meta.mat (its `synsets` struct)."""
    import numpy as np
    from scipy.io import loadmat

    try:
        synsets = np.atleast_1d(loadmat(str(meta), squeeze_me=True)["synsets"])
        return {int(entry["ILSVRC2012_ID"]): str(entry["WNID"]) for entry in synsets}
    except (OSError, ValueError, KeyError, IndexError, TypeError) as error:
        raise DatasetError(f"{meta}: not the ImageNet devkit's meta.mat (a 'synsets' struct with ILSVRC2012_ID and "
                           f"WNID): {type(error).__name__}: {str(error)[:200]}") from None


def _lookup(labels: dict[str, str], record_name: str) -> str | None:
    pure = PurePosixPath(record_name)
    for key in (record_name, pure.name, pure.stem):
        if key in labels:
            return labels[key]
    return None


def _label_of(text: str, class_names: Sequence[str] | None, index: dict[str, int], where: str) -> int:
    if text.lstrip("-").isdigit():
        label = int(text)
        if label < 0 or (class_names is not None and label >= len(class_names)):
            bound = f"0..{len(class_names) - 1}" if class_names is not None else ">= 0"
            raise DatasetError(f"{where}: label {label} is not a class index ({bound})")
        return label
    if class_names is None:
        raise DatasetError(f"{where}: label {text!r} is a class name but the model names no classes; "
                           f"give {setting('class_names', 'FILE')} (one name per line, in class-index order)")
    if _key(text) not in index:
        raise DatasetError(f"{where}: label {text!r} is none of the model's {len(class_names)} class names "
                           f"(e.g. {', '.join(map(repr, class_names[:3]))})")
    return index[_key(text)]


def apply_labels_file(dataset: ImageDataset, path: str | Path, class_names: Sequence[str] | None) -> ImageDataset:
    """`dataset` with each image's label from the file; an image the file does not name is
    a one-line error (a certificate needs its label)."""
    labels = read_labels_file(path)
    index = name_index(class_names or [])
    records, missing = [], []
    for record in dataset.records:
        text = _lookup(labels, record.name)
        if text is None:
            missing.append(record.name)
            continue
        records.append(ImageRecord(record.image_id, record.name,
                                   _label_of(text, class_names, index, f"labels file {path}, {record.name}")))
    if missing:
        raise DatasetError(f"labels file {path} has no label for {len(missing)} of the {len(dataset)} selected "
                           f"images (e.g. {missing[0]}); rows are 'image,label' by path, file name or stem")
    # Ground truth (unlike labels from the classifier's clean predictions): run.json keeps the
    # file's path with the settings and its SHA-256 in the identity.
    return ImageDataset(records, name=dataset.name, classes=list(class_names) if class_names else None,
                        source=dataset._source, spec=dataset.spec)


def map_class_folders(dataset: ImageDataset, class_names: Sequence[str]) -> ImageDataset:
    """Class folders that name some of the model's classes: each folder's images get the
    model's index of that class; the log says how; an unknown folder name is one line."""
    folders = dataset.classes or []
    index = name_index(class_names)
    mapped: dict[int, int] = {}
    for label, folder in enumerate(folders):
        if _key(folder) not in index:
            raise DatasetError(f"class folder {folder!r} is none of the model's {len(class_names)} class names "
                               f"(e.g. {', '.join(map(repr, list(class_names)[:3]))}): name folders by the "
                               f"model's classes (wnid or name), or give {setting('labels', 'FILE')}")
        mapped[label] = index[_key(folder)]
    log.info("%d class folders mapped to the model's %d classes by name: %s", len(folders), len(class_names),
             ", ".join(f"{folders[k]} -> {v}" for k, v in list(mapped.items())[:5]) + (" ..." if len(mapped) > 5 else ""))
    records = [ImageRecord(r.image_id, r.name, mapped[r.label] if r.label >= 0 else -1) for r in dataset.records]
    return ImageDataset(records, name=dataset.name, classes=list(class_names), source=dataset._source,
                        spec=dataset.spec)


def own_labels(dataset: ImageDataset, class_names: Sequence[str] | None, labels_file: str | None) -> ImageDataset:
    """The selected images labelled as the user said: from `labels_file`, or class folders
    mapped by name when there are fewer than the model's classes; else `dataset` as it is."""
    if labels_file is not None:
        return apply_labels_file(dataset, labels_file, class_names)
    # A known data set's folders are its own classes (CIFAR-10's ten under a 1000-class model is
    # a mismatch, said by the class check); ImageNet wnid folders and plain folders map by name.
    own_vocabulary = dataset.spec is None or dataset.spec.num_classes == len(class_names or [])
    if class_names and dataset.classes and len(dataset.classes) < len(class_names) and own_vocabulary:
        return map_class_folders(dataset, class_names)
    return dataset


def labels_sha256(path: str | Path) -> str:
    """What a labels file's labels depend on, for the run identity: its bytes, and for the
    devkit's ground truth its meta.mat's too (another meta.mat maps the same IDs elsewhere)."""
    file = Path(path).expanduser()
    data = file.read_bytes()
    digest = hashlib.sha256(data)
    lines = [line for line in data.decode(errors="replace").splitlines() if line.strip()]
    meta = _devkit_meta(file) if lines and _is_devkit(lines) else None
    if meta is not None:
        digest.update(meta.read_bytes())
    return digest.hexdigest()

"""Labels for unlabelled images: the classifier's prediction on the clean image.

A folder of images without classes (the paper's 100 ImageNet validation images) has no
ground truth, and scoring predictions against "no label" would report a false accuracy of
0. Denoised Smoothing's convention for vision APIs is to take the prediction on the clean
image as the label; certified accuracy then reads "certified consistent with the clean
prediction", which run.json and the tables say.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from pipeline.data.core import DatasetError, ImageDataset, ImageRecord

LABELS_FROM_CLASSIFIER = "the classifier's prediction on the clean image (unlabelled data)"
BATCH = 16

log = logging.getLogger(__name__)


def is_unlabelled(dataset: ImageDataset) -> bool:
    return dataset.classes is None and all(r.label < 0 for r in dataset.records)


def label_by_classifier(dataset: ImageDataset, classifier: nn.Module, num_classes: int) -> ImageDataset:
    """`dataset` itself when it has labels, else a copy whose labels are `classifier`'s
    argmax on each clean image (no noise, no denoiser) and whose `labels_from` says so."""
    if not is_unlabelled(dataset):
        return dataset
    records = list(dataset.records)
    labels: list[int] = []
    classifier = classifier.eval()
    with torch.inference_mode():
        for start in range(0, len(records), BATCH):
            images = [_readable(dataset, i) for i in range(start, min(start + BATCH, len(records)))]
            readable = [x for x in images if x is not None]
            if readable and len({tuple(x.shape) for x in readable}) == 1:
                predicted = iter(classifier(torch.stack(readable)).argmax(dim=1).tolist())
            else:  # images of several sizes: one at a time
                predicted = iter([int(classifier(x[None]).argmax(dim=1)) for x in readable])
            labels += [-1 if x is None else next(predicted) for x in images]
    log.info("%s has no labels: each image's label is %s", dataset.name, LABELS_FROM_CLASSIFIER)
    relabelled = ImageDataset([ImageRecord(r.image_id, r.name, int(y)) for r, y in zip(records, labels)],
                              name=dataset.name, classes=None, source=dataset._source, spec=dataset.spec)
    relabelled.labels_from = LABELS_FROM_CLASSIFIER  # type: ignore[attr-defined]
    return relabelled


def _readable(dataset: ImageDataset, index: int) -> torch.Tensor | None:
    """The clean image, or None when it cannot be read: the run's own bad-image handling
    (`on_bad_image`) then fails or skips it when it reads it, as for labelled data."""
    try:
        return dataset.load(index)
    except DatasetError:
        return None

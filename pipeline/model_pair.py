"""Loading a denoiser-classifier pair f∘D and counting its votes on a batch of images.

The pair is checked where it is first loaded (the job's driver) so that a wrong file fails
before any actor starts; actors then receive the checkpoint *bytes* (no shared file system
needed on a cluster), check them against the same SHA-256 and load them the same way.
`PairCounter` is what an actor holds: the pair wrapped in the batched `VoteCounter`.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.certify_plan import ModelIdentity, VoteItem
from pipeline.data.core import to_tensor
from pipeline.engine import VoteCounter, VoteRequest
from pipeline.inference import optimize_for_inference
from pipeline.models import (
    CheckpointError,
    CheckpointMismatchError,
    DenoisedClassifier,
    ModelMeta,
    compose,
    load_checkpoint,
    load_classifier,
)


@dataclass(frozen=True)
class ModelBytes:
    """A checkpoint's content, as shipped to actors, with where it came from."""

    source: str  # the path given by the user (for messages only)
    data: bytes

    @classmethod
    def read(cls, path: str | Path) -> ModelBytes:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        return cls(str(path), path.read_bytes())

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@dataclass(frozen=True)
class PairInfo:
    """Identity and shape of a loaded pair: what every vote row records."""

    classifier: ModelIdentity
    denoiser: ModelIdentity | None
    num_classes: int
    denoiser_sigma: float | None  # noise level the denoiser was trained for, if recorded


@contextmanager
def _named(temporary: Path, source: str) -> Iterator[None]:
    """Errors name the user's file, not the temporary copy the loader read."""
    try:
        yield
    except CheckpointError as error:
        raise type(error)(str(error).replace(str(temporary), source)) from None


def _load_classifier(path: Path, source: str, arch: str | None) -> tuple[nn.Module, str]:
    """(classifier, registry name) from a dsmooth checkpoint or, with `arch`, a raw state dict."""
    try:
        model, meta = load_checkpoint(path, arch=arch)
    except CheckpointMismatchError:
        raise
    except CheckpointError as error:
        if arch is None:
            raise CheckpointError(
                f"{source}: not a dsmooth checkpoint; to load a raw state dict name its "
                f"architecture with classifier_arch (--classifier-arch). ({error})"
            ) from None
        return load_classifier(arch, path), arch
    if meta.kind != "classifier":
        raise CheckpointMismatchError(f"{source}: holds a {meta.kind} ({meta.arch}), not a classifier")
    return model, meta.arch


def _load_denoiser(path: Path, source: str) -> tuple[nn.Module, ModelMeta]:
    model, meta = load_checkpoint(path)
    if meta.kind != "denoiser":
        raise CheckpointMismatchError(f"{source}: holds a {meta.kind} ({meta.arch}), not a denoiser")
    return model, meta


def _probe_num_classes(model: nn.Module, image_shape: Sequence[int], names: str) -> int:
    """Run one blank image through f∘D: proves the pair accepts the data set's images."""
    try:
        with torch.inference_mode():
            logits = model(torch.zeros((1, *image_shape)))
    except Exception as error:  # noqa: BLE001 - any failure here means "does not fit"
        raise CheckpointMismatchError(
            f"{names} cannot process {'x'.join(map(str, image_shape))} images: {error}"
        ) from None
    if logits.dim() != 2 or logits.shape[0] != 1:
        raise CheckpointMismatchError(f"{names} returns shape {tuple(logits.shape)}, not [batch, classes]")
    return int(logits.shape[1])


def load_pair(
    classifier: ModelBytes,
    denoiser: ModelBytes | None,
    image_shape: Sequence[int],
    classifier_arch: str | None = None,
) -> tuple[DenoisedClassifier, PairInfo]:
    """f∘D (eval, CPU) and its identity; CheckpointError / CheckpointMismatchError name the file."""
    with tempfile.TemporaryDirectory(prefix="dsmooth-ckpt-") as folder:
        # The checkpoint loaders read files; bytes make actors independent of shared storage.
        classifier_path = Path(folder) / "classifier.pt"
        classifier_path.write_bytes(classifier.data)
        with _named(classifier_path, classifier.source):
            f, f_name = _load_classifier(classifier_path, classifier.source, classifier_arch)
        d, d_meta = None, None
        if denoiser is not None:
            denoiser_path = Path(folder) / "denoiser.pt"
            denoiser_path.write_bytes(denoiser.data)
            with _named(denoiser_path, denoiser.source):
                d, d_meta = _load_denoiser(denoiser_path, denoiser.source)
    pair = compose(f, d).eval()
    names = f_name if d_meta is None else f"{f_name} with denoiser {d_meta.arch}"
    num_classes = _probe_num_classes(pair, image_shape, names)
    info = PairInfo(
        classifier=ModelIdentity(f_name, classifier.sha256),
        denoiser=ModelIdentity(d_meta.arch, denoiser.sha256) if d_meta and denoiser else None,
        num_classes=num_classes,
        denoiser_sigma=d_meta.sigma if d_meta else None,
    )
    return pair, info


def check_labels_fit(info: PairInfo, num_labels: int | None, source: str) -> None:
    """A classifier with fewer outputs than the data set has classes cannot be right."""
    if num_labels is not None and info.num_classes < num_labels:
        raise CheckpointMismatchError(
            f"{source}: classifier {info.classifier.name} has {info.num_classes} outputs but the "
            f"data set has {num_labels} classes"
        )


class PairCounter:
    """A loaded f∘D inside the batched engine; turns vote items + uint8 images into counts."""

    def __init__(
        self,
        classifier: ModelBytes,
        denoiser: ModelBytes | None,
        expected: PairInfo,
        image_shape: Sequence[int],
        *,
        sigma: float,
        classifier_arch: str | None = None,
        batch_size: int = 400,
        chunk_size: int = 256,
        device: str | torch.device = "cpu",
        amp: bool = True,
        optimize: bool = True,
    ) -> None:
        pair, info = load_pair(classifier, denoiser, image_shape, classifier_arch)
        if info != expected:
            # Another file than the driver checked (e.g. bytes corrupted in transit).
            raise CheckpointMismatchError(f"models loaded here ({info}) differ from the job's ({expected})")
        self.info = info
        self.device = torch.device(device)
        model = optimize_for_inference(pair, self.device) if optimize else pair.to(self.device).eval()
        self.counter = VoteCounter(
            model,
            info.num_classes,
            sigma,
            batch_size=batch_size,
            chunk_size=chunk_size,
            device=self.device,
            amp=amp,
        )

    def count(self, items: Sequence[VoteItem], images: Mapping[int, np.ndarray]) -> tuple[np.ndarray, float]:
        """(counts int64 [len(items), classes], seconds); images are uint8 [H, W, 3] by id.

        Items sharing a seed and an image size are counted in one engine call, so samples of
        different images fill the same forward batches.
        """
        started = time.perf_counter()
        tensors = {image_id: to_tensor(np.asarray(image)) for image_id, image in images.items()}
        missing = sorted({item.image_id for item in items} - set(tensors))
        if missing:
            raise KeyError(f"no image given for ids {missing[:5]}")
        counts = np.zeros((len(items), self.info.num_classes), dtype=np.int64)
        groups = {(item.seed, tuple(tensors[item.image_id].shape)) for item in items}
        for seed, shape in sorted(groups):
            rows = [
                i for i, item in enumerate(items)
                if item.seed == seed and tuple(tensors[item.image_id].shape) == shape
            ]
            self.counter.seed = seed
            requests = [VoteRequest(items[i].image_id, items[i].phase, items[i].num_samples) for i in rows]
            counts[rows] = self.counter.count(tensors, requests)
        return counts, time.perf_counter() - started

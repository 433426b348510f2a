"""Loading a denoiser-classifier pair f∘D and counting its votes on a batch of images.

The pair is checked where it is first loaded (the job's driver), against the data it will
certify (`pipeline.models.fit`), so that a wrong file fails before any actor starts; actors then receive the checkpoint *bytes* (no shared file system
needed on a cluster), check them against the same SHA-256 and load them the same way.
`PairCounter` is what an actor holds: the pair wrapped in the batched `VoteCounter`.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.runs.fs import Location
from pipeline.data.specs import DataDescription
from pipeline.errors import setting
from pipeline.sampling.engine import VoteCounter
from pipeline.sampling.engine import optimize_for_inference
from pipeline.models import (
    CheckpointError,
    CheckpointMismatchError,
    DenoisedClassifier,
    ModelMeta,
    check_denoiser_sigma,
    check_fits_data,
    compose,
    load_checkpoint,
    load_classifier,
)
from pipeline.models.fit import check_classes_fit
from pipeline.models.sources import ClassifierSpec, LoadedClassifier, is_bundle, load_bundle, resolve_classifier


@dataclass(frozen=True)
class ModelBytes:
    """A checkpoint's content, as shipped to actors, with where it came from."""

    source: str  # the path given by the user (for messages only)
    data: bytes
    arch: str | None = None  # architecture of a raw state dict, when the spec named it

    @classmethod
    def classifier(cls, spec: ClassifierSpec) -> ModelBytes:
        """A classifier spec resolved (`pipeline.models.sources`): a checkpoint's own bytes,
        or a bundle of a timm / Hugging Face / archive / factory / in-memory classifier."""
        resolved = resolve_classifier(spec)
        return cls(resolved.source, resolved.data, resolved.arch)

    @classmethod
    def read(cls, where: str | Path | Location) -> ModelBytes:
        """A checkpoint from a local path or an object-storage URI."""
        location = Location.of(where)
        if not location.is_file():
            raise FileNotFoundError(f"checkpoint file not found: {location}")
        return cls(str(where), location.read_bytes())

    @classmethod
    def read_denoiser(cls, where: str | Path | Location) -> ModelBytes:
        """A denoiser's checkpoint bytes; a local diffusers folder or improved/guided-diffusion
        file is converted to a dsmooth checkpoint here, deterministically, so actors, identity
        and weights_only loading are those of any other denoiser. On object storage only
        dsmooth checkpoints are read (convert once with `dsmooth convert-diffusion`)."""
        from pipeline.models.diffusion.convert import read_diffusion_source

        location = Location.of(where)
        if not location.is_local:
            return cls.read(where)
        converted = read_diffusion_source(location.local_path)
        return cls.read(where) if converted is None else cls(str(where), converted)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@dataclass(frozen=True)
class ModelIdentity:
    """A model as results record it: registry name + SHA-256 of the checkpoint file."""

    name: str
    sha256: str


@dataclass(frozen=True)
class PairInfo:
    """Identity and shape of a loaded pair: what every vote row records."""

    classifier: ModelIdentity
    denoiser: ModelIdentity | None
    num_classes: int
    # JSON of a bundled classifier's pipeline (kind, name, weights_sha256, preprocessing);
    # None for a dsmooth checkpoint / raw state dict, whose file hash says it all.
    classifier_pipeline: str | None = None


@contextmanager
def _named(temporary: Path, source: str) -> Iterator[None]:
    """Errors name the user's file, not the temporary copy the loader read."""
    try:
        yield
    except CheckpointError as error:
        raise type(error)(str(error).replace(str(temporary), source)) from None


def _load_classifier(path: Path, source: str, arch: str | None) -> tuple[nn.Module, str, ModelMeta | None]:
    """(classifier, registry name, metadata) from a dsmooth checkpoint or, with `arch`, a raw
    state dict (which has no metadata: a foreign checkpoint)."""
    try:
        model, meta = load_checkpoint(path, arch=arch)
    except CheckpointMismatchError:
        raise
    except CheckpointError as error:
        if arch is None:
            raise CheckpointError(
                f"{source}: not a dsmooth checkpoint; to load a raw state dict name its "
                f"architecture with {setting('classifier_arch', 'NAME')}. ({error})"
            ) from None
        return load_classifier(arch, path), arch, None
    if meta.kind != "classifier":
        raise CheckpointMismatchError(f"{source}: holds a {meta.kind} ({meta.arch}), not a classifier")
    return model, meta.arch, meta


def load_denoiser(path: Path, source: str, data: DataDescription, sigma: float | None = None,
                  noise: str = "gaussian", allow_foreign: bool = False) -> tuple[nn.Module, ModelMeta]:
    """A denoiser checkpoint checked for its kind, its data set and its noise (kind and level,
    `check_denoiser_sigma`); a sigma-independent one (diffusion) is given the run's sigma instead."""
    model, meta = load_checkpoint(path)
    if meta.kind != "denoiser":
        raise CheckpointMismatchError(f"{source}: holds a {meta.kind} ({meta.arch}), not a denoiser")
    check_fits_data(meta, data, source)
    if sigma is not None:
        check_denoiser_sigma(meta, sigma, source, noise, allow_foreign)
    if meta.sigma_independent:
        if sigma is None:
            raise CheckpointMismatchError(f"{source}: denoiser {meta.arch} serves any sigma and needs the run's")
        try:
            model.set_sigma(sigma)
        except ValueError as error:
            raise CheckpointMismatchError(f"{source}: {error}") from None
    return model, meta


@contextmanager
def _as_file(checkpoint: ModelBytes, name: str) -> Iterator[Path]:
    """The bytes as a temporary file for the checkpoint loaders, which read files (bytes make
    actors independent of shared storage); their errors name the user's path, not this file."""
    with tempfile.TemporaryDirectory(prefix="dsmooth-ckpt-") as folder:
        path = Path(folder) / name
        path.write_bytes(checkpoint.data)
        with _named(path, checkpoint.source):
            yield path


def load_denoiser_bytes(denoiser: ModelBytes, data: DataDescription, sigma: float | None = None,
                        noise: str = "gaussian", allow_foreign: bool = False) -> tuple[nn.Module, ModelMeta]:
    """`load_denoiser` on shipped bytes (errors name the user's path, not a temporary file)."""
    with _as_file(denoiser, "denoiser.pt") as path:
        return load_denoiser(path, denoiser.source, data, sigma, noise, allow_foreign)


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


def load_from_bytes(checkpoint: ModelBytes) -> tuple[nn.Module, ModelMeta]:
    """A dsmooth checkpoint's model and metadata from its bytes (actors get bytes, not files)."""
    with _as_file(checkpoint, "model.pt") as path:
        return load_checkpoint(path)


def load_classifier_source(classifier: ModelBytes, arch: str | None = None,
                           ) -> tuple[nn.Module, str, ModelMeta | None, LoadedClassifier | None]:
    """(f taking [0, 1] pixels, its name, its checkpoint metadata or None, the bundle or None)
    from a resolved classifier spec: what certify's actors and `train`'s frozen classifiers load."""
    if is_bundle(classifier.data):
        bundled = load_bundle(classifier.data, classifier.source)
        return bundled.module, bundled.name, None, bundled
    with _as_file(classifier, "classifier.pt") as path:
        f, f_name, f_meta = _load_classifier(path, classifier.source, classifier.arch or arch)
    return f, f_name, f_meta, None


def load_pair(
    classifier: ModelBytes,
    denoiser: ModelBytes | None,
    data: DataDescription,
    classifier_arch: str | None = None,
    allow_foreign_classifier: bool = False,
    sigma: float | None = None,
    noise: str = "gaussian",
    allow_foreign_denoiser: bool = False,
) -> tuple[DenoisedClassifier, PairInfo]:
    """f∘D (eval, CPU) and its identity, checked against the data it will certify.

    CheckpointError / CheckpointMismatchError (DataMismatchError for models made for other
    data) name the user's file.
    """
    f, f_name, f_meta, bundled = load_classifier_source(classifier, classifier_arch)
    d, d_meta = (load_denoiser_bytes(denoiser, data, sigma, noise, allow_foreign_denoiser)
                 if denoiser is not None else (None, None))
    pair = compose(f, d).eval()
    names = f_name if d_meta is None else f"{f_name} with denoiser {d_meta.arch}"
    image_shape = (3, *data.image_size)
    num_classes = _probe_num_classes(pair, image_shape, names)
    if bundled is not None:
        check_classes_fit(classifier.source, f_name, num_classes, data, num_classes=bundled.num_classes,
                          labels=bundled.labels, data_classes=list(data.classes) if data.classes else None)
    else:
        check_fits_data(f_meta, data, classifier.source, allow_foreign=allow_foreign_classifier, outputs=num_classes)
    info = PairInfo(
        classifier=ModelIdentity(f_name, classifier.sha256),
        denoiser=ModelIdentity(d_meta.arch, denoiser.sha256) if d_meta and denoiser else None,
        num_classes=num_classes,
        classifier_pipeline=json.dumps(bundled.pipeline, sort_keys=True) if bundled is not None else None,
    )
    return pair, info


@dataclass(frozen=True)
class PairSettings:
    """What a model actor needs besides the checkpoints to build its `PairCounter` (typed, so
    a setting the actor does not know is an error where it is made, not in a worker)."""

    sigma: float
    classifier_arch: str | None = None
    allow_foreign_classifier: bool = False
    batch_size: int = 400
    optimize: bool = True
    precision: str = "fp32"
    sound: bool = False
    noise: str = "gaussian"
    allow_foreign_denoiser: bool = False

    def counter(self, classifier: ModelBytes, denoiser: ModelBytes | None, expected: PairInfo,
                data: DataDescription, device: str) -> PairCounter:
        return PairCounter(classifier, denoiser, expected, data, sigma=self.sigma, classifier_arch=self.classifier_arch,
                           allow_foreign_classifier=self.allow_foreign_classifier, batch_size=self.batch_size,
                           device=device, optimize=self.optimize,
                           precision=self.precision, sound=self.sound, noise=self.noise,
                           allow_foreign_denoiser=self.allow_foreign_denoiser)


class PairCounter:
    """A loaded f∘D inside the batched engine; turns sample requests + uint8 images into counts."""

    def __init__(
        self,
        classifier: ModelBytes,
        denoiser: ModelBytes | None,
        expected: PairInfo,
        data: DataDescription,
        *,
        sigma: float,
        classifier_arch: str | None = None,
        allow_foreign_classifier: bool = False,
        batch_size: int = 400,
        device: str | torch.device = "cpu",
        optimize: bool = True,
        precision: str = "fp32",
        sound: bool = False,
        noise: str = "gaussian",
        allow_foreign_denoiser: bool = False,
    ) -> None:
        pair, info = load_pair(classifier, denoiser, data, classifier_arch, allow_foreign_classifier, sigma,
                               noise, allow_foreign_denoiser)
        if info != expected:
            # Another file than the driver checked (e.g. bytes corrupted in transit).
            raise CheckpointMismatchError(f"models loaded here ({info}) differ from the job's ({expected})")
        self.info = info
        self.device = torch.device(device)
        model = optimize_for_inference(pair, self.device) if optimize else pair.to(self.device).eval()
        self.counter = VoteCounter(
            model, info.num_classes, sigma, batch_size=batch_size, device=self.device,
            precision=precision, sound=sound, noise=noise,
        )
        # (counts [len(requests), classes], seconds) of uint8 images by id: the engine's own,
        # so the per-image loop runs in the engine alone.
        self.count = self.counter.count_images

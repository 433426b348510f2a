"""Models for denoised smoothing: denoisers D, classifiers f (normalisation inside), their
composition f∘D, a name registry, and a safe (weights_only) checkpoint format."""

from . import classifiers, denoisers, diffusion  # noqa: F401  (their factories register themselves)

from .checkpoint import (
    FORMAT as CHECKPOINT_FORMAT,
    CheckpointError,
    CheckpointMismatchError,
    ModelMeta,
    checkpoint_bytes,
    file_sha256,
    load_checkpoint,
    load_classifier,
    read_checkpoint,
    save_checkpoint,
)
from .fit import DataMismatchError, check_denoiser_sigma, check_fits_data
from .classifiers import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    CifarResNet,
    NormalizedClassifier,
    NormalizeLayer,
    WideResNet,
)
from .compose import DenoisedClassifier, compose, freeze, is_frozen
from .denoisers import DnCNN, MemNet
from .registry import (
    ModelInfo,
    UnknownModelError,
    build_model,
    list_models,
    model_info,
    register_model,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CheckpointError",
    "CheckpointMismatchError",
    "DataMismatchError",
    "CifarResNet",
    "DenoisedClassifier",
    "DnCNN",
    "MemNet",
    "ModelInfo",
    "ModelMeta",
    "NormalizeLayer",
    "NormalizedClassifier",
    "UnknownModelError",
    "WideResNet",
    "build_model",
    "checkpoint_bytes",
    "check_denoiser_sigma",
    "check_fits_data",
    "compose",
    "file_sha256",
    "freeze",
    "is_frozen",
    "list_models",
    "load_checkpoint",
    "load_classifier",
    "model_info",
    "read_checkpoint",
    "register_model",
    "save_checkpoint",
]

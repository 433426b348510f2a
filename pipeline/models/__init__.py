"""Models for denoised smoothing: denoisers D, classifiers f (normalisation inside), their
composition f∘D, a name registry, and a safe (weights_only) checkpoint format."""

from .checkpoint import (
    FORMAT as CHECKPOINT_FORMAT,
    CheckpointError,
    CheckpointMismatchError,
    ModelMeta,
    file_sha256,
    load_checkpoint,
    load_classifier,
    read_checkpoint,
    save_checkpoint,
)
from .classifiers import CifarResNet, NormalizedClassifier, NormalizeLayer, WideResNet
from .compose import DenoisedClassifier, compose, freeze, is_frozen
from .denoisers import DnCNN, MemNet
from .registry import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
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

"""The emulator's answers: a label list with scores for an RGB image.

`ColourClassifier` (the default) needs no weights and is deterministic: it describes an
image by the mean colour of its upper and lower halves and names the nearest of a few
scene prototypes ("Sky", "Snow", "Foliage"...). Means over tens of thousands of pixels
barely move under Gaussian noise, except through clipping to [0, 1], which brightens dark
images and darkens bright ones as sigma grows -- so smoothing gives certificates that are
neither all-abstain nor all-certified, and a good denoiser (which removes the noise before
clipping) measurably helps, as with the real APIs.

`CheckpointClassifier` answers with any dsmooth classifier checkpoint instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np


class Classifier(Protocol):
    def labels(self, rgb: np.ndarray) -> list[tuple[str, float]]:
        """(name, score in [0, 1]) pairs, best first, for a uint8 [H, W, 3] image."""
        ...


# name -> (upper-half mean RGB, lower-half mean RGB), in [0, 1].
PROTOTYPES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "Sky": ((0.55, 0.70, 0.90), (0.45, 0.45, 0.40)),
    "Water": ((0.40, 0.52, 0.62), (0.20, 0.35, 0.48)),
    "Foliage": ((0.30, 0.40, 0.20), (0.25, 0.33, 0.15)),
    "Grass": ((0.50, 0.52, 0.45), (0.30, 0.42, 0.18)),
    "Night": ((0.07, 0.07, 0.09), (0.07, 0.07, 0.08)),
    "Shadow": ((0.22, 0.20, 0.18), (0.22, 0.20, 0.18)),
    "Snow": ((0.88, 0.90, 0.92), (0.85, 0.87, 0.90)),
    "Sand": ((0.78, 0.68, 0.50), (0.72, 0.62, 0.45)),
    "Wood": ((0.45, 0.32, 0.20), (0.40, 0.28, 0.17)),
    "Stone": ((0.50, 0.50, 0.48), (0.45, 0.45, 0.43)),
    "Fire": ((0.75, 0.30, 0.12), (0.60, 0.20, 0.10)),
    "Flower": ((0.80, 0.50, 0.60), (0.55, 0.40, 0.35)),
    "Animal": ((0.55, 0.47, 0.38), (0.45, 0.38, 0.30)),
    "Indoors": ((0.68, 0.62, 0.55), (0.50, 0.42, 0.35)),
}


class ColourClassifier:
    """Nearest colour prototype; scores are a softmax over negative squared distances."""

    def __init__(self, temperature: float = 0.01, top_k: int = 10) -> None:
        self.names = list(PROTOTYPES)
        self.prototypes = np.array([np.concatenate(p) for p in PROTOTYPES.values()], dtype=np.float64)
        self.temperature = temperature
        self.top_k = top_k

    def features(self, rgb: np.ndarray) -> np.ndarray:
        if rgb.ndim == 2:  # a grayscale PNG decoded as L
            rgb = np.repeat(rgb[..., None], 3, axis=2)
        image = np.asarray(rgb[..., :3], dtype=np.float64) / 255.0
        half = max(1, image.shape[0] // 2)
        upper, lower = image[:half], image[half:] if image.shape[0] > 1 else image
        return np.concatenate([upper.mean(axis=(0, 1)), lower.mean(axis=(0, 1))])

    def labels(self, rgb: np.ndarray) -> list[tuple[str, float]]:
        distances = ((self.prototypes - self.features(rgb)) ** 2).sum(axis=1)
        logits = -distances / self.temperature
        scores = np.exp(logits - logits.max())
        scores /= scores.sum()
        order = np.argsort(-scores, kind="stable")[: self.top_k]
        return [(self.names[i], round(float(scores[i]), 6)) for i in order]


class CheckpointClassifier:
    """A dsmooth classifier checkpoint (e.g. an ImageNet ResNet) answering like an API."""

    def __init__(self, path: str | Path, top_k: int = 10, image_size: int | None = None) -> None:
        import torch

        from pipeline.models import load_checkpoint

        self._torch = torch
        self.model, meta = load_checkpoint(path)
        if meta.kind != "classifier":
            raise ValueError(f"{path} holds a {meta.kind}, not a classifier")
        self.model.eval()
        self.names = _class_names(meta)
        self.top_k = top_k
        self.image_size = image_size or (32 if meta.dataset == "cifar10" else None)
        self._lock = __import__("threading").Lock()

    def labels(self, rgb: np.ndarray) -> list[tuple[str, float]]:
        torch = self._torch
        if rgb.ndim == 2:
            rgb = np.repeat(rgb[..., None], 3, axis=2)
        x = torch.from_numpy(np.array(rgb[..., :3], dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div(255).unsqueeze(0)
        if self.image_size is not None and x.shape[-1] != self.image_size:
            x = torch.nn.functional.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                                                antialias=True, align_corners=False)
        with self._lock, torch.inference_mode():
            probabilities = self.model(x).softmax(dim=1)[0]
        scores, indices = probabilities.topk(min(self.top_k, probabilities.numel()))
        return [(self._name(int(i)), round(float(s), 6)) for s, i in zip(scores, indices)]

    def _name(self, index: int) -> str:
        return self.names[index] if index < len(self.names) else f"class {index}"


def _class_names(meta: object) -> list[str]:
    extra = getattr(meta, "extra", {}) or {}
    if isinstance(extra.get("classes"), list):
        return [str(c) for c in extra["classes"]]
    dataset = getattr(meta, "dataset", None)
    if dataset == "cifar10":
        from pipeline.data import CIFAR10_CLASSES

        return list(CIFAR10_CLASSES)
    if dataset == "imagenet":
        try:  # category names ship inside torchvision (no download)
            from torchvision.models import ResNet50_Weights

            return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
        except Exception:  # noqa: BLE001 - names are cosmetic
            pass
    return []

"""End-of-epoch evaluation on noisy test images, with noise fixed across epochs.

Every epoch sees the *same* noise draws (seeded, generated on the CPU), so a change in
test MSE or accuracy between epochs is the model's, not the noise's.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

from pipeline.training.objectives import add_noise
from pipeline.training.data import to_float

EVAL_SEED_OFFSET = 1_000_003  # keeps evaluation noise apart from training noise of the same seed


def psnr(mse: float, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of a mean squared error on [0, data_range] images."""
    if mse <= 0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


@contextmanager
def evaluating(module: nn.Module | None) -> Iterator[None]:
    """`module` in eval mode for the block, then back in the mode it came in (None: nothing)."""
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    try:
        yield
    finally:
        if module is not None:
            module.train(was_training)


def noisy_batches(
    images: torch.Tensor, labels: torch.Tensor, sigma: float, seed: int, batch_size: int, device: torch.device,
    noise: str = "gaussian",
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(clean, clean + delta, labels) batches on `device`, delta of kind `noise` at sigma
    (Gaussian: sigma*N(0,I)); the noise depends only on seed."""
    generator = torch.Generator().manual_seed(seed + EVAL_SEED_OFFSET)
    for start in range(0, len(images), batch_size):
        clean = to_float(images[start:start + batch_size], torch.device("cpu"))
        noisy = add_noise(clean, sigma, generator, noise)
        yield clean.to(device), noisy.to(device), labels[start:start + batch_size].to(device)


@dataclass(frozen=True)
class NoisyTestSet:
    """The test images under fixed noise that every evaluation of a run reads: the same draws
    each epoch (`noisy_batches`)."""

    images: torch.Tensor
    labels: torch.Tensor
    sigma: float
    seed: int
    batch_size: int
    device: torch.device
    noise: str = "gaussian"

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return noisy_batches(self.images, self.labels, self.sigma, self.seed, self.batch_size, self.device,
                             self.noise)


@torch.no_grad()
def evaluate_denoiser(denoiser: nn.Module | None, classifier: nn.Module | None,
                      test: NoisyTestSet) -> dict[str, float]:
    """MSE/PSNR of D(x+delta) against x, and accuracy of f(D(x+delta)) (denoiser None: the
    noisy input itself, i.e. the no-denoiser baseline). MSE is on the unclipped output,
    the signal the classifier sees."""
    squared, pixels, correct, clean_correct, total = 0.0, 0, 0, 0, 0
    with evaluating(denoiser):
        for clean, noisy, y in test.batches():
            out = denoiser(noisy) if denoiser is not None else noisy
            squared += float(((out - clean) ** 2).sum())
            pixels += out.numel()
            total += len(y)
            if classifier is not None:
                correct += int((classifier(out).argmax(1) == y).sum())
                clean_correct += int((classifier(clean).argmax(1) == y).sum())
    mse = squared / max(pixels, 1)
    nan = float("nan")
    return {
        "mse": mse,
        "psnr": psnr(mse),
        "acc": correct / total if classifier is not None and total else nan,
        "acc_clean": clean_correct / total if classifier is not None and total else nan,
    }


@torch.no_grad()
def evaluate_classifier(classifier: nn.Module, test: NoisyTestSet) -> dict[str, float]:
    """Clean accuracy, accuracy on x + sigma*N(0,I), and the clean test loss."""
    clean_correct, noisy_correct, loss, total = 0, 0, 0.0, 0
    with evaluating(classifier):
        for clean, noisy, y in test.batches():
            logits = classifier(clean)
            loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            clean_correct += int((logits.argmax(1) == y).sum())
            noisy_correct += int((classifier(noisy).argmax(1) == y).sum())
            total += len(y)
    total = max(total, 1)
    return {"acc_clean": clean_correct / total, "acc_noisy": noisy_correct / total, "test_loss": loss / total}


def state_digest(module: nn.Module) -> str:
    """SHA-256 of every parameter *and buffer* (BatchNorm running stats included): proof
    that a frozen classifier left training exactly as it came in."""
    h = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()

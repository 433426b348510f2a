"""Training objectives of Denoised Smoothing (Salman et al., 2020) and Cohen et al. (2019).

Denoisers D are trained on x + delta, delta ~ N(0, sigma^2 I), in [0,1] pixel space:

* ``mse``      ||D(x+delta) - x||^2 (mean over pixels): a plain Gaussian denoiser.
* ``stab``     CE(f(D(x+delta)), argmax f(x)): D must keep the *classifier's own* decision,
               so no labels are needed (the point of the paper: f can be an API).
* ``stab_mse`` the ``stab`` loss, but D starts from an ``mse`` denoiser (fine-tuning).
* ``clf``      CE(f(D(x+delta)), y): needs true labels.

White-box training passes the one classifier to defend; black-box training passes 1..N
surrogates and the loss is their *mean*, so no single surrogate dominates. Classifiers are
frozen by the caller; gradients flow through them into D only.

Classifiers (Cohen et al.'s baseline and the system's own surrogates) train with
``xent``: CE(f(x + delta), y), with sigma = 0 meaning standard training.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.training.config import (  # noqa: F401 - the names are declared with the settings (light)
    CLASSIFIER_OBJECTIVES,
    DENOISER_OBJECTIVES,
    NEEDS_CLASSIFIER,
    NEEDS_MSE_INIT,
    OBJECTIVES,
)


def add_noise(x: torch.Tensor, sigma: float, generator: torch.Generator | None = None,
              noise: str = "gaussian") -> torch.Tensor:
    """x + delta in pixel space, *not* clipped: smoothing certifies exactly this. delta is of
    kind `noise` at level sigma (`pipeline.sampling.noise`; Gaussian: sigma * N(0, I))."""
    if sigma == 0:
        return x
    from pipeline.sampling.noise import noise_kind

    return x + noise_kind(noise).draw(generator, x.shape, sigma, x.device, x.dtype)


def mse_loss(denoised: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all pixels (the paper's nn.MSELoss(reduction='mean'))."""
    return F.mse_loss(denoised, clean)


def _check_classifiers(classifiers: Sequence[nn.Module]) -> None:
    if not classifiers:
        raise ValueError("this objective needs at least one classifier (white-box) or surrogate (black-box)")


def stab_loss(denoised: torch.Tensor, clean: torch.Tensor, classifiers: Sequence[nn.Module]) -> torch.Tensor:
    """Mean over classifiers f of CE(f(denoised), argmax f(clean)).

    The target is each classifier's *own* hard prediction on the clean image, computed
    without gradient: D learns to preserve f's decision, whatever f's accuracy.
    """
    _check_classifiers(classifiers)
    losses = []
    for f in classifiers:
        with torch.no_grad():
            target = f(clean).argmax(dim=1)
        losses.append(F.cross_entropy(f(denoised), target))
    return torch.stack(losses).mean()


def clf_loss(denoised: torch.Tensor, labels: torch.Tensor, classifiers: Sequence[nn.Module]) -> torch.Tensor:
    """Mean over classifiers f of CE(f(denoised), true labels)."""
    _check_classifiers(classifiers)
    return torch.stack([F.cross_entropy(f(denoised), labels) for f in classifiers]).mean()


def denoiser_loss(
    objective: str,
    denoiser: nn.Module,
    clean: torch.Tensor,
    noisy: torch.Tensor,
    labels: torch.Tensor | None = None,
    classifiers: Sequence[nn.Module] = (),
) -> torch.Tensor:
    """The loss of `objective` for one batch; `noisy` is clean + delta (see add_noise)."""
    if objective not in DENOISER_OBJECTIVES:
        raise ValueError(f"unknown denoiser objective {objective!r}; expected one of {list(DENOISER_OBJECTIVES)}")
    denoised = denoiser(noisy)
    if objective == "mse":
        return mse_loss(denoised, clean)
    if objective in ("stab", "stab_mse"):
        return stab_loss(denoised, clean, classifiers)
    if labels is None:
        raise ValueError("objective 'clf' needs the true labels")
    return clf_loss(denoised, labels, classifiers)


def classifier_loss(classifier: nn.Module, noisy: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cohen et al.'s training loss: CE(f(x + delta), y) (delta = 0 for standard training)."""
    return F.cross_entropy(classifier(noisy), labels)

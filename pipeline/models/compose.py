"""f∘D as one module, and freezing of classifiers whose weights must never change.

Certification samples the *composition* f(D(x + delta)); packaging it as a single
nn.Module lets the smoothing code treat "classifier alone" and "denoised classifier"
identically.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn


class DenoisedClassifier(nn.Module):
    """forward(x) = classifier(denoiser(x)); denoiser None means the classifier alone."""

    def __init__(self, classifier: nn.Module, denoiser: nn.Module | None = None) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.denoiser is not None:
            x = self.denoiser(x)
        return self.classifier(x)


def compose(classifier: nn.Module, denoiser: nn.Module | None = None) -> DenoisedClassifier:
    """Shorthand for DenoisedClassifier(classifier, denoiser)."""
    return DenoisedClassifier(classifier, denoiser)


def _stay_in_eval(module: nn.Module, args: Any) -> None:
    # Module-level (not a lambda) so frozen modules stay picklable.
    if module.training:
        module.eval()


def freeze(module: nn.Module) -> nn.Module:
    """Make `module` immutable under training: no parameter gradients, and eval mode that
    survives a parent's .train() (a forward pre-hook re-applies it), so BatchNorm running
    stats never update either. Gradients still flow *through* it to upstream inputs."""
    module.requires_grad_(False)
    module.eval()
    if not getattr(module, "_dsmooth_frozen", False):
        module.register_forward_pre_hook(_stay_in_eval)
        module._dsmooth_frozen = True  # type: ignore[assignment]
    return module


def is_frozen(module: nn.Module) -> bool:
    """True if freeze() was applied and no parameter has been re-enabled for training."""
    return bool(getattr(module, "_dsmooth_frozen", False)) and not any(
        p.requires_grad for p in module.parameters()
    )

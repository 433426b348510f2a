"""Noise schedules and the σ → timestep maths of diffusion denoised smoothing.

Carlini et al. (2023) observe that x + δ with δ ~ N(0, σ²I) *is* a diffusion sample once
rescaled: the data live in [-1, 1] (so the noise doubles to 2σ), and the forward process
x_t = √ᾱ_t x₀ + √(1-ᾱ_t) ε has noise-to-signal ratio √(1-ᾱ_t)/√ᾱ_t. Equating it with 2σ
gives ᾱ_t* = 1/(1 + (2σ)²) and x_t* = √ᾱ_t* · (2(x + δ) - 1); one ε prediction then gives
x̂₀ in closed form. Kept free of torch.nn and diffusers so the maths is testable alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def target_alpha_bar(sigma: float) -> float:
    """ᾱ whose noise-to-signal ratio equals 2σ (σ in [0, 1] pixel units, data in [-1, 1])."""
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    return 1.0 / (1.0 + (2.0 * sigma) ** 2)


def timestep_for_sigma(alphas_cumprod: Sequence[float], sigma: float) -> int:
    """t*: the first timestep whose noise reaches 2σ, i.e. the smallest t with ᾱ_t ≤ 1/(1+4σ²).

    This is the reference implementation's rule (it walks t up until √(1-ᾱ)/√ᾱ ≥ 2σ); on a
    fine schedule ᾱ_t* is within one step of the closed form. ᾱ must decrease with t.
    """
    bars = np.asarray(alphas_cumprod, dtype=np.float64)
    target = target_alpha_bar(sigma)
    reached = np.flatnonzero(bars <= target)
    if reached.size == 0:
        raise ValueError(
            f"sigma={sigma} needs alpha_bar <= {target:.4g} but this schedule's last timestep has "
            f"alpha_bar = {bars[-1]:.4g} (too much noise for the model)"
        )
    return int(reached[0])


def linear_alphas_cumprod(steps: int) -> list[float]:
    """ᾱ of the DDPM linear β schedule (Ho et al.), scaled to `steps` as guided-diffusion does."""
    scale = 1000.0 / steps
    betas = np.linspace(scale * 1e-4, scale * 0.02, steps, dtype=np.float64)
    return np.cumprod(1.0 - betas).tolist()


def cosine_alphas_cumprod(steps: int, max_beta: float = 0.999) -> list[float]:
    """ᾱ of the cosine schedule (Nichol & Dhariwal 2021), β clipped at `max_beta` as they do."""
    def bar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = np.array([min(1 - bar((i + 1) / steps) / bar(i / steps), max_beta) for i in range(steps)])
    return np.cumprod(1.0 - betas).tolist()


def named_alphas_cumprod(name: str, steps: int) -> list[float]:
    """ᾱ of a guided/improved-diffusion `noise_schedule` flag ("linear" or "cosine")."""
    if name == "linear":
        return linear_alphas_cumprod(steps)
    if name == "cosine":
        return cosine_alphas_cumprod(steps)
    raise ValueError(f"unknown noise_schedule {name!r} (linear or cosine)")


def reverse_timesteps(t_start: int, steps: int) -> list[int]:
    """Descending timesteps from t* to 0 for a `steps`-step deterministic (DDIM, η = 0)
    reverse pass; one step is the paper's one-shot denoising."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    points = np.round(np.linspace(t_start, 0, steps)).astype(int) if steps > 1 else np.array([t_start])
    return sorted({int(t) for t in points}, reverse=True)

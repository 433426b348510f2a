"""One (or a few) reverse steps of a pretrained diffusion model as a Gaussian denoiser.

Diffusion denoised smoothing (Carlini et al., ICLR 2023): the noisy input x + δ, rescaled to
the model's [-1, 1] data range and by √ᾱ_t*, is exactly a diffusion sample at the timestep t*
whose noise level matches 2σ (`schedule.py`), so one ε prediction gives x̂₀. The module is
an ordinary [0,1] -> [0,1] denoiser, so every sampler, the certify actors and the API worker
use it unchanged; unlike a trained denoiser one model serves every σ, which the run sets
with `set_sigma` when the pair is built.

The multi-step variant walks from t* to 0 deterministically (DDIM, η = 0); the paper's
variant samples fresh noise at each step, which would make the vote counts depend on more
than the addressed smoothing noise, so dsmooth does not offer it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..registry import register_model
from .guided_unet import GuidedUNet
from .schedule import reverse_timesteps, timestep_for_sigma

PREDICTIONS = ("epsilon", "v_prediction", "sample")


class DiffusionDenoiser(nn.Module):
    """D(x) = x̂₀ of `model` at the timestep matching the run's σ, mapped back to [0, 1].

    `model(x_t, t)` returns the network output (a tensor, or an object with `.sample` as
    diffusers' UNets do); with `learned_sigma` its first half of channels is ε. The model's
    parameters live under `model.` so a checkpoint is the original state dict, prefixed.
    """

    fx_leaf = True  # inference.fold_batchnorm traces around it (diffusers' UNet is not traceable)

    def __init__(
        self,
        model: nn.Module,
        alphas_cumprod: Sequence[float],
        *,
        prediction_type: str = "epsilon",
        learned_sigma: bool = False,
        timestep_scale: float = 1.0,
        steps: int = 1,
        clip: bool = True,
    ) -> None:
        super().__init__()
        if prediction_type not in PREDICTIONS:
            raise ValueError(f"prediction_type must be one of {PREDICTIONS}, got {prediction_type!r}")
        bars = [float(a) for a in alphas_cumprod]
        if not bars or any(b <= 0 or b >= 1 for b in bars) or any(b2 > b1 for b1, b2 in zip(bars, bars[1:])):
            raise ValueError("alphas_cumprod must decrease within (0, 1)")
        reverse_timesteps(0, steps)  # validates steps
        self.model = model
        self.alphas_cumprod = bars  # python floats: the coefficients are computed in float64
        self.prediction_type = prediction_type
        self.learned_sigma = learned_sigma
        self.timestep_scale = float(timestep_scale)
        self.steps = int(steps)
        self.clip = clip
        self.sigma: float | None = None
        self.timesteps: list[int] = []

    def set_sigma(self, sigma: float) -> DiffusionDenoiser:
        """Use the timestep whose noise matches σ (the run's smoothing noise) from now on."""
        start = timestep_for_sigma(self.alphas_cumprod, sigma)
        self.sigma = float(sigma)
        self.timesteps = reverse_timesteps(start, self.steps)
        return self

    def extra_repr(self) -> str:
        start = self.timesteps[0] if self.timesteps else None
        return f"sigma={self.sigma}, t*={start}, steps={self.steps}, prediction={self.prediction_type}"

    def _x0(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        """x̂₀ from one network evaluation at timestep t (float32, clipped to [-1, 1])."""
        timesteps = torch.full((x_t.shape[0],), t * self.timestep_scale, device=x_t.device, dtype=torch.float32)
        out = self.model(x_t, timesteps)
        out = getattr(out, "sample", out).float()
        if self.learned_sigma:
            out = out[:, : x_t.shape[1]]
        a = self.alphas_cumprod[t]
        if self.prediction_type == "epsilon":
            x0 = (x_t - math.sqrt(1 - a) * out) / math.sqrt(a)
        elif self.prediction_type == "v_prediction":
            x0 = math.sqrt(a) * x_t - math.sqrt(1 - a) * out
        else:
            x0 = out
        return x0.clamp(-1, 1) if self.clip else x0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.timesteps:
            raise RuntimeError("diffusion denoiser has no sigma: call set_sigma(sigma) with the run's noise level")
        x = x.float()
        t = self.timesteps[0]
        x_t = math.sqrt(self.alphas_cumprod[t]) * (2 * x - 1)
        for i, t in enumerate(self.timesteps):
            x0 = self._x0(x_t, t)
            if i + 1 == len(self.timesteps):
                break
            a, a_next = self.alphas_cumprod[t], self.alphas_cumprod[self.timesteps[i + 1]]
            eps = (x_t - math.sqrt(a) * x0) / math.sqrt(1 - a)
            x_t = math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * eps
        return (x0 + 1) / 2


def is_sigma_independent(model: nn.Module) -> bool:
    """True for denoisers that take the run's σ at load time instead of being trained for one."""
    return hasattr(model, "set_sigma")


@register_model("diffusers_unet", kind="denoiser")
def diffusers_unet(
    unet: dict[str, Any],
    alphas_cumprod: Sequence[float],
    prediction_type: str = "epsilon",
    steps: int = 1,
    clip: bool = True,
) -> DiffusionDenoiser:
    """A Hugging Face diffusers UNet2DModel (its config.json as `unet`) with its scheduler's ᾱ."""
    try:
        from diffusers import UNet2DModel
    except ImportError as error:  # pragma: no cover - diffusers is a declared dependency
        raise ImportError("diffusers UNets need the `diffusers` package (pip install 'dsmooth[diffusion]')") from error
    model = UNet2DModel.from_config(dict(unet))
    learned = int(model.config.out_channels) == 2 * int(model.config.in_channels)
    return DiffusionDenoiser(model, alphas_cumprod, prediction_type=prediction_type, learned_sigma=learned,
                             steps=steps, clip=clip)


@register_model("guided_unet", kind="denoiser")
def guided_unet(
    unet: dict[str, Any],
    alphas_cumprod: Sequence[float],
    prediction_type: str = "epsilon",
    timestep_scale: float = 1.0,
    steps: int = 1,
    clip: bool = True,
) -> DiffusionDenoiser:
    """An improved/guided-diffusion UNet (`unet` = GuidedUNet kwargs) with its schedule's ᾱ;
    `timestep_scale` is 1000/T for models trained with rescale_timesteps."""
    model = GuidedUNet(**unet)
    learned = model.out_channels == 2 * model.in_channels
    return DiffusionDenoiser(model, alphas_cumprod, prediction_type=prediction_type, learned_sigma=learned,
                             timestep_scale=timestep_scale, steps=steps, clip=clip)

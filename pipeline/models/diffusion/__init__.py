"""Diffusion models as σ-independent denoisers (diffusion denoised smoothing, Carlini et al. 2023).

    schedule     σ -> timestep t*, noise schedules (linear, cosine), reverse-step timesteps
    denoiser     DiffusionDenoiser (one-shot or deterministic multi-step x̂₀) and its registry
                 entries `diffusers_unet` and `guided_unet`
    guided_unet  a port of improved/guided-diffusion's UNet (their checkpoints load key for key)
    convert      a diffusers folder or a guided-diffusion .pt -> dsmooth checkpoint bytes

`diffusers` is imported only when a diffusers model is built or converted.
"""

from .denoiser import DiffusionDenoiser, is_sigma_independent
from .schedule import target_alpha_bar, timestep_for_sigma

__all__ = ["DiffusionDenoiser", "is_sigma_independent", "target_alpha_bar", "timestep_for_sigma"]

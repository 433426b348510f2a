"""The images queried for an image's samples: x + delta, optionally denoised.

Sample k of a phase takes row k % chunk_size of noise chunk k // chunk_size, drawn by
`pipeline.sampling.noise` from its address (seed, image id, phase, chunk) exactly as the local engine
draws it: so a resumed run re-creates the very same noisy images, and any sample can be (re)queried alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pipeline.sampling.noise import Chunk, chunk_noise
from pipeline.sampling.precision import DEFAULT_PRECISION, compute_dtype


@torch.inference_mode()
def noisy_images(
    image: torch.Tensor,
    chunk: Chunk,
    rows: Sequence[int],
    sigma: float,
    denoiser: nn.Module | None = None,
    batch_size: int = 8,
    precision: str = DEFAULT_PRECISION,
    noise: str = "gaussian",
) -> torch.Tensor:
    """[len(rows), C, H, W]: image + noise rows of `chunk` (a full noise address), through the
    denoiser when given, in `precision` (`pipeline.sampling.precision`; its output in fp32).

    Noise is always drawn on the CPU in fp32 (CPU and CUDA generators differ), then moved to the
    denoiser's device. The result is not clipped: encoding does that.
    """
    image = image.to("cpu", torch.float32)
    drawn = chunk_noise(chunk, tuple(image.shape), sigma, device="cpu", noise=noise)
    noisy = image.unsqueeze(0) + drawn[list(rows)]
    if denoiser is None:
        return noisy
    device = next(denoiser.parameters(), torch.empty(0)).device
    dtype = compute_dtype(precision, device)
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        parts = [denoiser(noisy[i : i + batch_size].to(device)).to("cpu", torch.float32)
                 for i in range(0, len(noisy), batch_size)]
    return torch.cat(parts)

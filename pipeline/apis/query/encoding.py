"""What is sent: the (denoised) noisy image, clipped to [0, 1], rounded to 8 bits, as PNG.

PNG is lossless, so the API sees exactly the rounded pixels we certify about; JPEG would
add its own (unmodelled) distortion on top of the Gaussian noise.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

PNG_COMPRESS_LEVEL = 1  # noise does not compress; spend no CPU trying


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """float [3, H, W] (any range) -> uint8 [H, W, 3]: clip to [0, 1], round to nearest."""
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"expected an image [C, H, W] with C = 1 or 3, got {tuple(image.shape)}")
    scaled = image.detach().to("cpu", torch.float32).clamp(0.0, 1.0).mul(255.0).round()
    return scaled.to(torch.uint8).permute(1, 2, 0).contiguous().numpy()


def encode_png(image: torch.Tensor) -> bytes:
    pixels = to_uint8(image)
    mode = "L" if pixels.shape[2] == 1 else "RGB"
    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode=mode).save(
        buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL
    )
    return buffer.getvalue()

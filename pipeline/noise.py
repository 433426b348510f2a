"""Deterministic Gaussian noise, addressed by (seed, image id, phase, chunk).

Each image's samples are cut into fixed-size *chunks*; every chunk draws its noise from
its own generator seeded from (seed, image id, phase, chunk index). So the noise an image
sees depends on nothing but its address: not on which other images share a forward
batch, not on the batch size, not on which worker ran it. That is what makes a killed
job resumable with identical counts, and selection/estimation noise independent (their
phases give them different seeds).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

PHASES: dict[str, int] = {"selection": 0, "estimation": 1, "prediction": 2}
DEFAULT_CHUNK_SIZE = 256


@dataclass(frozen=True)
class Chunk:
    """`size` consecutive samples of one image in one phase."""

    image_id: int
    phase: str
    index: int
    size: int


def chunk_seed(seed: int, image_id: int, phase: str, chunk: int) -> int:
    """A 63-bit seed mixed by NumPy's SeedSequence (so nearby addresses are unrelated)."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; expected one of {sorted(PHASES)}")
    if seed < 0 or image_id < 0 or chunk < 0:
        raise ValueError("seed, image_id and chunk must be non-negative")
    state = np.random.SeedSequence([seed, image_id, PHASES[phase], chunk]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


def plan_chunks(image_id: int, phase: str, num_samples: int, chunk_size: int = DEFAULT_CHUNK_SIZE) -> list[Chunk]:
    """Cut `num_samples` samples of one image into chunks (the last may be short)."""
    if num_samples < 0:
        raise ValueError(f"num_samples must be non-negative, got {num_samples}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return [
        Chunk(image_id, phase, i, min(chunk_size, num_samples - start))
        for i, start in enumerate(range(0, num_samples, chunk_size))
    ]


def chunk_noise(
    chunk: Chunk,
    shape: tuple[int, ...],
    sigma: float,
    seed: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """N(0, sigma^2 I) noise of shape [chunk.size, *shape] for this chunk's address.

    Identical for equal addresses on the same device type (CPU and CUDA generators differ).
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(chunk_seed(seed, chunk.image_id, chunk.phase, chunk.index))
    noise = torch.randn((chunk.size, *shape), generator=generator, device=device, dtype=dtype)
    return noise.mul_(sigma)

"""Noise and counts computed from first principles, to check the samplers against.

Deliberately not through `pipeline.sampling.noise`: a sample's noise is defined as N(0, sigma^2 I)
drawn by a torch CPU generator seeded with SeedSequence([seed, image, phase, chunk]) >> 1,
chunk k holding samples [k * chunk_size, (k + 1) * chunk_size) of the phase.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

PHASE_INDEX = {"selection": 0, "estimation": 1, "prediction": 2}


def direct_noise(seed: int, image_id: int, phase: str, chunk: int, size: int, shape, sigma: float) -> torch.Tensor:
    state = np.random.SeedSequence([seed, image_id, PHASE_INDEX[phase], chunk]).generate_state(1, np.uint64)[0]
    generator = torch.Generator().manual_seed(int(state >> np.uint64(1)))
    return sigma * torch.randn((size, *shape), generator=generator)


def direct_counts(model: nn.Module, image: torch.Tensor, seed: int, image_id: int, phase: str, total: int,
                  chunk_size: int, sigma: float, num_classes: int) -> np.ndarray:
    """Votes of `model` on the `total` samples of (seed, image, phase)."""
    counts = np.zeros(num_classes, dtype=np.int64)
    with torch.inference_mode():
        for index, start in enumerate(range(0, total, chunk_size)):
            size = min(chunk_size, total - start)
            noise = direct_noise(seed, image_id, phase, index, size, tuple(image.shape), sigma)
            counts += np.bincount(model(image + noise).argmax(1).numpy(), minlength=num_classes)
    return counts


def chunk_of(request, sample: int):
    """(chunk, row) of `request` (a `pipeline.sampling.noise.SampleRequest`) holding sample
    `sample` (0-based within the phase): the inverse of the cut the tests check it against
    (unlike the rest of this module, built on `pipeline.sampling.noise.chunk_span`)."""
    from pipeline.sampling.noise import chunk_span
    from pipeline.sampling.noise import Chunk

    if not 0 <= sample < request.total:
        raise ValueError(f"sample {sample} outside [0, {request.total})")
    index, head = 0, request.first_chunks
    while index < len(head) and sample >= sum(head[: index + 1]):
        index += 1
    if index == len(head):
        index += (sample - sum(head)) // request.chunk_size
    start, size = chunk_span(index, request.total, request.chunk_size, head)
    return Chunk(request.seed, request.image_id, request.phase, index, size), sample - start

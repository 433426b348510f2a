"""Deterministic noise (Gaussian, uniform or Laplace: `pipeline.sampling.noise_kinds`), addressed by
(seed, image id, phase, chunk).

Each image's samples in a phase are cut into fixed-size *chunks*; every chunk draws its noise
from its own generator seeded from its address. So the noise an image sees is a pure
function of the address: not of which other images share a forward batch, not of the batch
size, not of which worker ran it. That is what makes a killed job resumable with identical
counts, and selection/estimation noise independent (their phases give them other seeds).

`SampleRequest` is the one request type of every sampler (the batched engine, the model
actors, the API workers): it carries the full address of the samples it asks for, so no
sampler holds a seed of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.sampling.noise_kinds import DEFAULT_NOISE, noise_kind
from pipeline.sampling.chunks import chunk_span, count_chunks

PHASES: dict[str, int] = {"selection": 0, "estimation": 1, "prediction": 2}
DEFAULT_CHUNK_SIZE = 256


@dataclass(frozen=True)
class Chunk:
    """The noise address of `size` consecutive samples: chunk `index` of image `image_id`'s
    draw in `phase` under noise seed `seed`."""

    seed: int
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


@dataclass(frozen=True)
class SampleRequest:
    """Samples of one image in one phase, by address.

    The phase holds `total` samples cut into chunks of `chunk_size` (the last may be short:
    `total` fixes every chunk's size, hence its noise), after the sizes `first_chunks` when
    given (a sequential run's growing schedule, `chunk_span`); the request covers chunks
    [first_chunk, stop_chunk) of that plan (stop_chunk None = to the end).
    """

    seed: int
    image_id: int
    phase: str
    total: int
    chunk_size: int = DEFAULT_CHUNK_SIZE
    first_chunk: int = 0
    stop_chunk: int | None = None
    first_chunks: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"unknown phase {self.phase!r}; expected one of {sorted(PHASES)}")
        if self.seed < 0 or self.image_id < 0:
            raise ValueError("seed and image_id must be non-negative")
        if self.total < 0:
            raise ValueError(f"total must be non-negative, got {self.total}")
        if self.chunk_size < 1 or any(size < 1 for size in self.first_chunks):
            raise ValueError(f"chunk sizes must be positive, got {self.chunk_size} after {self.first_chunks}")
        stop = self.num_chunks_in_phase if self.stop_chunk is None else self.stop_chunk
        if not 0 <= self.first_chunk <= stop <= self.num_chunks_in_phase:
            raise ValueError(
                f"chunks [{self.first_chunk}, {stop}) outside the phase's {self.num_chunks_in_phase} chunks"
            )

    @property
    def num_chunks_in_phase(self) -> int:
        return count_chunks(self.total, self.chunk_size, self.first_chunks)

    def chunks(self) -> list[Chunk]:
        """The addresses of this request's chunks, in order."""
        stop = self.num_chunks_in_phase if self.stop_chunk is None else self.stop_chunk
        return [
            Chunk(self.seed, self.image_id, self.phase, index,
                  chunk_span(index, self.total, self.chunk_size, self.first_chunks)[1])
            for index in range(self.first_chunk, stop)
        ]

    @property
    def num_samples(self) -> int:
        return sum(chunk.size for chunk in self.chunks())


def chunk_noise(
    chunk: Chunk,
    shape: tuple[int, ...],
    sigma: float,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    noise: str = DEFAULT_NOISE,
) -> torch.Tensor:
    """Noise of kind `noise` (`pipeline.sampling.noise_kinds`; Gaussian N(0, sigma^2 I) by default) of
    shape [chunk.size, *shape] for this chunk's address.

    Identical for equal addresses on the same device type (CPU and CUDA generators differ).
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(chunk_seed(chunk.seed, chunk.image_id, chunk.phase, chunk.index))
    return noise_kind(noise).draw(generator, (chunk.size, *shape), sigma, device, dtype)

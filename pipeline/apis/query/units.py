"""Which queries an image needs, and how they are cut into work units for the actors.

An image needs one clean query (its ground-truth label, as in the paper), n0 selection
samples and n estimation samples. A work unit is the not-yet-done samples of one noise
chunk: its noise is drawn once and every query in it reuses the draw.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from pipeline.sampling.noise import Chunk, SampleRequest

CLEAN = "clean"
PHASES: tuple[str, ...] = (CLEAN, "selection", "estimation")

Key = tuple[str, int]  # (phase, sample index); the clean query is (CLEAN, 0)


@dataclass(frozen=True)
class WorkUnit:
    image_id: int
    phase: str
    samples: tuple[int, ...]  # sample indices within the phase
    chunk: Chunk | None = None  # None for the clean query
    rows: tuple[int, ...] = ()  # rows of `chunk` holding `samples`


def phase_sizes(n0: int, n: int) -> dict[str, int]:
    return {CLEAN: 1, "selection": n0, "estimation": n}


def needed_keys(n0: int, n: int) -> list[Key]:
    return [(phase, k) for phase, size in phase_sizes(n0, n).items() for k in range(size)]


def plan_image(image_id: int, n0: int, n: int, chunk_size: int, seed: int,
               done: Collection[Key] = ()) -> list[WorkUnit]:
    """Work units for the queries of one image not in `done`, in phase order; each noisy unit
    carries its chunk's full noise address (seed included)."""
    units: list[WorkUnit] = []
    if (CLEAN, 0) not in done:
        units.append(WorkUnit(image_id, CLEAN, (0,)))
    for phase, size in phase_sizes(n0, n).items():
        if phase == CLEAN:
            continue
        for chunk in SampleRequest(seed, image_id, phase, size, chunk_size).chunks():
            start = chunk.index * chunk_size
            pending = tuple(k for k in range(start, start + chunk.size) if (phase, k) not in done)
            if pending:
                units.append(WorkUnit(image_id, phase, pending, chunk, tuple(k - start for k in pending)))
    return units

"""How a phase's samples are cut into noise chunks. Plain arithmetic, no torch: the statistics
(`pipeline.stats.sequential`, `dsmooth reduce`) need it without loading a model stack."""

from __future__ import annotations


def chunk_span(index: int, total: int, chunk_size: int, first_chunks: tuple[int, ...] = ()) -> tuple[int, int]:
    """(first sample, size) of chunk `index` of a phase of `total` samples: the sizes
    `first_chunks` first (a growing schedule, fixed before any vote), then `chunk_size` each;
    the last chunk may be short. With no `first_chunks`: [index * chunk_size, ...), as always."""
    if index < len(first_chunks):
        start, size = sum(first_chunks[:index]), first_chunks[index]
    else:
        start = sum(first_chunks) + (index - len(first_chunks)) * chunk_size
        size = chunk_size
    return start, max(0, min(size, total - start))


def count_chunks(total: int, chunk_size: int, first_chunks: tuple[int, ...] = ()) -> int:
    """How many chunks a phase of `total` samples is cut into (see `chunk_span`)."""
    done = 0
    for index, size in enumerate(first_chunks):
        if done >= total:
            return index
        done += size
    return len(first_chunks) + max(0, -(-(total - done) // chunk_size))


def chunk_ends(total: int, chunk_size: int, first_chunks: tuple[int, ...] = ()) -> list[int]:
    """The running sample count after each chunk of a phase (see `chunk_span`): the points
    where a sequential test looks, fixed before any vote."""
    ends, done = [], 0
    for index in range(count_chunks(total, chunk_size, first_chunks)):
        done += chunk_span(index, total, chunk_size, first_chunks)[1]
        ends.append(done)
    return ends


SMALLEST_CHUNK = 32


def growing_schedule(chunk_size: int, smallest: int = SMALLEST_CHUNK) -> tuple[int, ...]:
    """The first chunks of a sequential model run: smallest, smallest, 2x, 4x, ... while they
    add up to at most `chunk_size` (256 -> 32, 32, 64, 128), then `chunk_size` each. Why: an
    image whose votes are all one class is decided after ~45 samples at R = sigma, alpha =
    0.001; chunks of 256 made it pay 256. () when chunk_size <= smallest (nothing to grow)."""
    sizes: list[int] = []
    size = smallest
    while size < chunk_size and sum(sizes) + size <= chunk_size:
        sizes.append(size)
        if len(sizes) > 1:
            size *= 2
    return tuple(sizes)

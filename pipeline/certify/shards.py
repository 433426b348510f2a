"""Shards and noise chunks: how the images of a run are cut into work, for `certify` and
`certify-api` alike (no model code, no Ray)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.data.core import ImageRecord
from pipeline.sampling.noise import SampleRequest


@dataclass(frozen=True)
class Shard:
    """Images certified together by one actor call and written together as one Parquet part."""

    index: int
    records: tuple[ImageRecord, ...]

    @property
    def image_ids(self) -> list[int]:
        return [r.image_id for r in self.records]


def plan_shards(records: Sequence[ImageRecord], shard_size: int) -> list[Shard]:
    """Cut the images still to do into shards, in data-set order."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    return [
        Shard(index, tuple(records[start : start + shard_size]))
        for index, start in enumerate(range(0, len(records), shard_size))
    ]


def chunk_requests(seed: int, image_ids: Sequence[int], tasks: Sequence[Any], chunk_size: int,
                   first_chunks: tuple[int, ...] = ()) -> list[SampleRequest]:
    """One one-chunk SampleRequest per `pipeline.certify.schedule.ChunkTask` (image row ->
    `image_ids[row]`): the same noise addresses as the fixed-n draw of the same plan."""
    return [SampleRequest(seed, image_ids[t.row], t.phase, t.total, chunk_size, first_chunk=t.chunk,
                          stop_chunk=t.chunk + 1, first_chunks=first_chunks) for t in tasks]

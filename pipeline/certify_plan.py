"""What a certification run is: its config, its identity, its shards and its vote rows.

Plain Python (no Ray), so the rules that make a run resumable -- which settings define the
votes, how images are cut into shards, what a Parquet row holds -- can be tested and reused
without a cluster. `jobs/certify.py` is the Ray layer on top.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline.config import ConfigError
from pipeline.data.core import ImageRecord

MODES = ("certify", "predict")
DATASET_KINDS = ("cifar10", "imagenet", "folder")
# A shard is the unit of work sent to an actor and of loss on a crash: about this many
# noisy samples (n = 100,000 -> 2 images per shard; n = 1,000 -> 200).
TARGET_SHARD_SAMPLES = 200_000
MAX_SHARD_IMAGES = 64
SHARDS_PER_ACTOR = 4


@dataclass
class CertifyConfig:
    """Settings of `dsmooth certify` (YAML keys = these field names; flags override them)."""

    dataset: Literal["cifar10", "imagenet", "folder"]
    data_root: Path
    classifier: Path
    sigma: float
    output: Path
    split: str = "test"
    skip: int = 1
    max: int | None = None
    image_size: int | None = None
    classifier_arch: str | None = None
    denoiser: Path | None = None
    mode: Literal["certify", "predict"] = "certify"
    n0: int = 100
    n: int = 100_000
    alpha: float = 0.001
    seed: int = 0
    chunk_size: int = 256
    batch_size: int = 400
    actors: int | None = None
    gpus_per_actor: float | None = None
    cpus_per_actor: float = 1.0
    amp: bool = True
    optimize: bool = True
    shard_size: int | None = None
    max_restarts: int = 3

    def validate(self) -> None:
        """Range checks; each error names its field (ConfigError)."""
        if str(self.denoiser).lower() in ("none", "null", ""):
            self.denoiser = None
        if not self.sigma > 0:
            raise ConfigError("sigma", f"must be positive (the noise level), got {self.sigma!r}")
        if not 0.0 < self.alpha < 1.0:
            raise ConfigError("alpha", f"must lie in (0, 1), got {self.alpha!r}")
        for name in ("n", "skip", "chunk_size", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be at least 1, got {getattr(self, name)!r}")
        if self.mode == "certify":
            if self.n0 < 1:
                raise ConfigError("n0", f"must be at least 1, got {self.n0!r}")
            if self.n0 > self.n:
                raise ConfigError("n0", f"n0={self.n0} must not exceed n={self.n} (selection uses fewer samples)")
        if self.max is not None and self.max < 0:
            raise ConfigError("max", f"must be >= 0 or null (all images), got {self.max!r}")
        if self.image_size is not None and self.image_size < 1:
            raise ConfigError("image_size", f"must be >= 1 or null, got {self.image_size!r}")
        if self.seed < 0:
            raise ConfigError("seed", f"must be >= 0, got {self.seed!r}")
        for name in ("actors", "shard_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(name, f"must be at least 1 or null (automatic), got {value!r}")
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            raise ConfigError("gpus_per_actor", f"must be >= 0 or null (automatic), got {self.gpus_per_actor!r}")
        if not self.cpus_per_actor > 0:
            raise ConfigError("cpus_per_actor", f"must be positive, got {self.cpus_per_actor!r}")
        if self.max_restarts < 0:
            raise ConfigError("max_restarts", f"must be >= 0, got {self.max_restarts!r}")

    def phases(self) -> list[tuple[str, int]]:
        """(phase, samples) drawn per image: CERTIFY's two independent draws, or PREDICT's one."""
        if self.mode == "certify":
            return [("selection", self.n0), ("estimation", self.n)]
        return [("prediction", self.n)]

    def samples_per_image(self) -> int:
        return sum(num for _, num in self.phases())


@dataclass(frozen=True)
class ModelIdentity:
    """A model as results record it: registry name + SHA-256 of the checkpoint file."""

    name: str
    sha256: str


def run_identity(
    config: CertifyConfig, classifier: ModelIdentity, denoiser: ModelIdentity | None, num_classes: int
) -> dict[str, Any]:
    """Every setting that changes what the votes mean; a resumed run must match all of them.

    Speed-only settings (batch size, actors, GPUs, AMP, shard size) are left out, so a run
    may be resumed on other hardware. The data set is named by its root's file name, not its
    full path, because `ray job submit --working-dir` unpacks to a new folder every time.
    """
    return {
        "mode": config.mode,
        "dataset": config.dataset,
        "data": Path(config.data_root).name,
        "split": config.split,
        "skip": config.skip,
        "max": config.max,
        "image_size": config.image_size,
        "classifier": classifier.name,
        "classifier_sha256": classifier.sha256,
        "denoiser": denoiser.name if denoiser else None,
        "denoiser_sha256": denoiser.sha256 if denoiser else None,
        "num_classes": num_classes,
        "sigma": config.sigma,
        "n0": config.n0 if config.mode == "certify" else None,
        "n": config.n,
        "seed": config.seed,
        "chunk_size": config.chunk_size,
    }


@dataclass(frozen=True)
class VoteItem:
    """Draw `num_samples` noisy copies of image `image_id` in `phase` with noise seed `seed`."""

    image_id: int
    phase: str
    num_samples: int
    seed: int


@dataclass(frozen=True)
class Shard:
    """Images certified together by one actor call and written together as one Parquet part."""

    index: int
    records: tuple[ImageRecord, ...]

    @property
    def image_ids(self) -> list[int]:
        return [r.image_id for r in self.records]


def shard_items(shard: Shard, config: CertifyConfig) -> list[VoteItem]:
    """The vote requests of a shard, image by image, phases in a fixed order."""
    return [
        VoteItem(record.image_id, phase, num, config.seed)
        for record in shard.records
        for phase, num in config.phases()
    ]


def default_shard_size(samples_per_image: int, pending: int, actors: int) -> int:
    """About TARGET_SHARD_SAMPLES samples per shard, but at least SHARDS_PER_ACTOR shards per
    actor, so that a slow actor does not hold the end of the run and progress moves often."""
    by_samples = max(1, TARGET_SHARD_SAMPLES // max(1, samples_per_image))
    by_balance = max(1, math.ceil(pending / (SHARDS_PER_ACTOR * max(1, actors))))
    return max(1, min(by_samples, by_balance, MAX_SHARD_IMAGES))


def plan_shards(records: Sequence[ImageRecord], shard_size: int) -> list[Shard]:
    """Cut the images still to do into shards, in data-set order."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    return [
        Shard(index, tuple(records[start : start + shard_size]))
        for index, start in enumerate(range(0, len(records), shard_size))
    ]


def vote_rows(
    *,
    run_id: str,
    config: CertifyConfig,
    records: Sequence[ImageRecord],
    items: Sequence[VoteItem],
    counts: np.ndarray,
    compute_s: float,
    worker: str,
    finished_at: datetime,
    classifier: ModelIdentity,
    denoiser: ModelIdentity | None,
    class_names: Sequence[str] | None,
) -> list[dict[str, Any]]:
    """Rows of storage.VOTE_SCHEMA for one shard's counts (row i <-> items[i]).

    `elapsed_s` is the row's share of the shard's compute time, split by samples drawn, so
    summing it over a run gives the actors' busy time.
    """
    if counts.shape[0] != len(items):
        raise ValueError(f"{counts.shape[0]} count rows for {len(items)} vote requests")
    by_id: Mapping[int, ImageRecord] = {r.image_id: r for r in records}
    total_samples = max(1, sum(item.num_samples for item in items))
    rows = []
    for item, row in zip(items, counts):
        record = by_id[item.image_id]
        label_name = (
            class_names[record.label] if class_names is not None and 0 <= record.label < len(class_names) else None
        )
        rows.append(
            {
                "run_id": run_id,
                "image_id": record.image_id,
                "image_name": record.name,
                "label": record.label,
                "label_name": label_name,
                "phase": item.phase,
                "n": item.num_samples,
                "classes": None,
                "counts": [int(c) for c in row],
                "sigma": config.sigma,
                "seed": item.seed,
                "chunk_size": config.chunk_size,
                "model": classifier.name,
                "model_sha256": classifier.sha256,
                "denoiser": denoiser.name if denoiser else None,
                "denoiser_sha256": denoiser.sha256 if denoiser else None,
                "worker": worker,
                "elapsed_s": compute_s * item.num_samples / total_samples,
                "finished_at": finished_at,
            }
        )
    return rows

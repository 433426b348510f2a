"""What a `certify` run (a model pair's) is made of: its identity, the samples of its shards
and its vote rows (its settings are declared in `pipeline.certify.config`; the shards, which
`certify-api` cuts too, in `pipeline.certify.shards`).

Plain Python (no Ray, and no model code: the pair is only named in type hints), so the rules
that make a run resumable -- which settings define the votes, what a Parquet row holds -- can
be tested and reused without a cluster. `jobs/certify.py` is the Ray layer on top.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.certify.shards import Shard
from pipeline.runs.identity import precision_identity, run_identity
from pipeline.runs.votes import VoteRow
from pipeline.sampling.noise import SampleRequest
from pipeline.certify.config import CertifyConfig  # declared there (light, for --help)

if TYPE_CHECKING:
    from pipeline.certify.pair import ModelIdentity, PairInfo
    from pipeline.data.core import ImageDataset, ImageRecord

# A shard (`pipeline.certify.shards`) is the unit of work sent to an actor, of what is saved
# (one Parquet part) and so of what the progress counts and Ctrl-C keeps: about this many noisy samples, so that the bar
# moves image by image once an image takes as many (n0 + n >= 10,000), and at least every
# ~10,000 samples per actor below that (n = 400: 23 images). Small shards cost little: the
# pool keeps two in flight per actor, so the driver writes one part while the actor counts
# the next (a smaller write unit, each image inside a shard, would need a streaming actor call).
TARGET_SHARD_SAMPLES = 10_000
MAX_SHARD_IMAGES = 64
SHARDS_PER_ACTOR = 8


def certify_identity(config: CertifyConfig, split: ImageDataset, info: PairInfo) -> dict[str, Any]:
    """The run identity (`pipeline.runs.identity`) of a certify run with these models."""
    return run_identity(
        "certify", config, config, split,
        classifier=info.classifier.name,
        classifier_sha256=info.classifier.sha256,
        denoiser=info.denoiser.name if info.denoiser else None,
        denoiser_sha256=info.denoiser.sha256 if info.denoiser else None,
        num_classes=info.num_classes,
        # Only for bundled classifiers, so runs of checkpoints made before keep their identity.
        **({"classifier_pipeline": json.loads(info.classifier_pipeline)} if info.classifier_pipeline else {}),
        **precision_identity(config.precision),
        # Only when set: another noise draw (`pipeline.sampling.sound`), the old identity otherwise.
        **({"sound": True} if config.sound else {}),
        # Only when given: labels from a file decide what is certified (and a sequential run's draws).
        **({"labels_sha256": _labels_sha256(config.labels)} if getattr(config, "labels", None) else {}),
    )


def _labels_sha256(path: str) -> str:
    from pipeline.data.labels import file_sha256

    return file_sha256(path)


def shard_requests(shard: Shard, config: CertifyConfig) -> list[SampleRequest]:
    """The sample requests of a shard, image by image, phases in a fixed order; each carries
    the full noise address (seed, image, phase, chunks) of its samples."""
    return [
        SampleRequest(config.seed, record.image_id, phase, num, config.chunk_size)
        for record in shard.records
        for phase, num in config.phases()
    ]


def default_shard_size(samples_per_image: int, pending: int, actors: int) -> int:
    """About TARGET_SHARD_SAMPLES samples per shard, but at least SHARDS_PER_ACTOR shards per
    actor, so that a slow actor does not hold the end of the run and progress moves often
    (the progress counts saved shards' images)."""
    by_samples = max(1, TARGET_SHARD_SAMPLES // max(1, samples_per_image))
    by_balance = max(1, math.ceil(pending / (SHARDS_PER_ACTOR * max(1, actors))))
    return max(1, min(by_samples, by_balance, MAX_SHARD_IMAGES))


def model_vote_rows(
    *,
    run_id: str,
    config: CertifyConfig,
    records: Sequence[ImageRecord],
    requests: Sequence[SampleRequest],
    counts: np.ndarray,
    compute_s: float,
    worker: str,
    finished_at: datetime,
    classifier: ModelIdentity,
    denoiser: ModelIdentity | None,
    class_names: Sequence[str] | None,
    per_chunk: bool = False,
) -> list[VoteRow]:
    """The `VoteRow`s of one work item's counts (row i <-> requests[i]) from model actors.

    `per_chunk` (sequential runs): every request is one noise chunk, and its row records the
    chunk's index, so the run can be replayed chunk by chunk (`pipeline.certify.schedule`).

    `elapsed_s` is the row's share of the item's compute time, split by samples drawn, so
    summing it over a run gives the actors' busy time.
    """
    if counts.shape[0] != len(requests):
        raise ValueError(f"{counts.shape[0]} count rows for {len(requests)} sample requests")
    by_id: Mapping[int, ImageRecord] = {r.image_id: r for r in records}
    total_samples = max(1, sum(request.num_samples for request in requests))
    rows = []
    for request, row in zip(requests, counts):
        if per_chunk and len(request.chunks()) != 1:
            raise ValueError(f"a per-chunk row needs a one-chunk request, got {request}")
        record = by_id[request.image_id]
        label_name = (
            class_names[record.label] if class_names is not None and 0 <= record.label < len(class_names) else None
        )
        rows.append(VoteRow(
            run_id=run_id, image_id=record.image_id, image_name=record.name, label=record.label,
            label_name=label_name, phase=request.phase, n=request.num_samples, classes=None,
            counts=[int(c) for c in row], sigma=config.sigma, seed=request.seed, chunk_size=request.chunk_size,
            model=classifier.name, model_sha256=classifier.sha256,
            denoiser=denoiser.name if denoiser else None, denoiser_sha256=denoiser.sha256 if denoiser else None,
            worker=worker, elapsed_s=compute_s * request.num_samples / total_samples, finished_at=finished_at,
            chunk=request.first_chunk if per_chunk else None,
        ))
    return rows


def vote_rows_of(context: Any, info: Any, class_names: Sequence[str] | None, per_chunk: bool):
    """(work, counts, compute seconds, worker) -> that work's `VoteRow`s: what a model sampler
    (on Ray or in this process) turns one item's counts into, for the run `context`
    (`pipeline.certify.run.RunContext`: its settings and selected images)."""
    from datetime import timezone

    config, records = context.settings, context.records

    def rows(work: Any, counts: np.ndarray, compute_s: float, worker: str) -> list[VoteRow]:
        return model_vote_rows(
            run_id=context.run_id, config=config, records=[records[r] for r in work.rows], requests=work.requests,
            counts=counts, compute_s=compute_s, worker=worker, finished_at=datetime.now(timezone.utc),
            classifier=info.classifier, denoiser=info.denoiser, class_names=class_names, per_chunk=per_chunk)

    return rows


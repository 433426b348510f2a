"""What a `certify` run (a model pair's) is made of: its identity and the size of its shards
(its settings are declared in `pipeline.certify.config`; the shards, the samples they draw and
the vote rows their counts make, which `certify-api` shares, in `pipeline.certify.run`).

Plain Python (no Ray, and no model code: the pair is only named in type hints), so the rules
that make a run resumable -- which settings define the votes, what a Parquet row holds -- can
be tested and reused without a cluster. `jobs/certify.py` is the Ray layer on top.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from pipeline.runs.identity import precision_identity, run_identity
from pipeline.certify.config import CertifyConfig  # declared there (light, for --help)

if TYPE_CHECKING:
    from pipeline.certify.pair import PairInfo
    from pipeline.certify.run import Shard
    from pipeline.sampling.noise import SampleRequest
    from pipeline.data.core import ImageDataset

# A shard (`pipeline.certify.run`) is the unit of work sent to an actor, of what is saved
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
    from pipeline.data.labels import labels_sha256

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
        **({"labels_sha256": labels_sha256(config.labels)} if getattr(config, "labels", None) else {}),
    )


def requests_of(config: CertifyConfig) -> Callable[[Shard], list[SampleRequest]]:
    """What a shard of this run draws (`pipeline.certify.run.shard_requests` with the run's seed,
    phases and chunk size, read once here rather than from the settings at every shard)."""
    from pipeline.certify.run import shard_requests

    return partial(shard_requests, seed=config.seed, phases=tuple(config.phases()), chunk_size=config.chunk_size)


def default_shard_size(samples_per_image: int, pending: int, actors: int) -> int:
    """About TARGET_SHARD_SAMPLES samples per shard, but at least SHARDS_PER_ACTOR shards per
    actor, so that a slow actor does not hold the end of the run and progress moves often
    (the progress counts saved shards' images)."""
    by_samples = max(1, TARGET_SHARD_SAMPLES // max(1, samples_per_image))
    by_balance = max(1, math.ceil(pending / (SHARDS_PER_ACTOR * max(1, actors))))
    return max(1, min(by_samples, by_balance, MAX_SHARD_IMAGES))

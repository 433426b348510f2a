"""Certify (or predict) a data set with a denoiser-classifier pair across Ray actors.

Every selected image gets n0 + n noisy samples (CERTIFY: selection then estimation, Cohen
et al.) or n samples (PREDICT) through f(D(x + noise)); a pool of Ray actors, each holding
the pair on a GPU (or CPU), counts the votes, and the counts stream to Parquet parts under
OUTPUT/votes as shards finish. Certificates are computed from the counts, at any alpha, by
`dsmooth reduce OUTPUT`.

Settings come from --config FILE.yaml (keys = the option names below with '_' for '-',
e.g. data_root, n0, gpus_per_actor); options given on the command line override the file.
Resume: rerun the same command with the same --output; finished images are skipped, and
a directory made with other settings (data, models, sigma, n0, n, seed, ...) is refused.

examples:
  dsmooth certify --config examples/certify_cifar10_small.yaml
  dsmooth certify --dataset cifar10 --data-root ../shared/data/cifar10-jpeg.tar.gz --skip 20 \\
      --classifier ckpt/resnet110.pt --denoiser ckpt/dncnn-0.25.pt --sigma 0.25 --n 10000 \\
      --output runs/c10-0.25
  ray job submit --working-dir . -- dsmooth certify --config my.yaml --output /shared/runs/x"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from jobs.ray_env import add_ray_arguments

def add_arguments(parser: argparse.ArgumentParser) -> None:
    from jobs.options import add_settings_arguments
    from pipeline.certify_plan import SPEED_GROUP, SPEED_NOTE, CertifyConfig

    parser.add_argument("--config", metavar="FILE.yaml", help="settings file; options below override its keys")
    add_settings_arguments(parser, CertifyConfig,
                           groups={"data": None, "models": None, "smoothing": None, SPEED_GROUP: SPEED_NOTE})
    add_ray_arguments(parser)


def load_settings(args: argparse.Namespace):
    """CertifyConfig from --config plus flags; errors name the field and its flag."""
    from jobs.options import load_settings as load
    from pipeline.certify_plan import CertifyConfig

    return load(CertifyConfig, args)


def run(args: argparse.Namespace) -> int:
    from pipeline.models import CheckpointError

    config = load_settings(args)
    split = config.open_split()
    selected = config.select(split)
    try:
        classifier, denoiser, info = _check_models(config, selected)
    except CheckpointError as error:
        raise ValueError(str(error)) from None
    return _certify(config, args, split, selected, classifier, denoiser, info)


def _check_models(config, selected):
    """Load f∘D once here, against the data, so a wrong file fails before any actor starts."""
    from pipeline.model_pair import ModelBytes, load_pair

    classifier = ModelBytes.read(config.classifier)
    denoiser = ModelBytes.read_denoiser(config.denoiser) if config.denoiser else None
    _, info = load_pair(classifier, denoiser, selected.describe(), config.classifier_arch,
                        config.allow_foreign_classifier, sigma=config.sigma)
    return classifier, denoiser, info


def _certify(config, args, split, selected, classifier, denoiser, info) -> int:
    from pipeline.certify_plan import certify_identity
    from pipeline.config import to_dict
    from pipeline.storage import completed_images, open_run

    identity = certify_identity(config, split, info)
    speed = {k: v for k, v in to_dict(config).items() if k not in identity}
    record = open_run(config.output, identity, extra=speed)
    phases = [phase for phase, _ in config.phases()]
    done = completed_images(config.output, phases)
    todo = [r for r in selected.records if r.image_id not in done]
    print(f"dsmooth certify: {len(selected)} images selected from {selected.name}, "
          f"{len(selected) - len(todo)} already in {config.output}, {len(todo)} to do", file=sys.stderr)
    started = time.monotonic()
    if todo:
        _warn_relative_output(config.output)
        _run_pool(config, args, selected, todo, classifier, denoiser, info, record["run_id"])
    _summary(config, selected, len(todo), time.monotonic() - started)
    return 0


def _run_pool(config, args, selected, todo, classifier, denoiser, info, run_id: str) -> None:
    import ray

    from actors.model_actor import start_model_actor
    from actors.shard_pool import ShardPool
    from jobs.ray_env import connect
    from pipeline.certify_plan import default_shard_size, plan_shards
    from pipeline.progress import Progress

    started_here = not ray.is_initialized() and not (args.address or os.environ.get("RAY_ADDRESS"))
    connect(args.address)
    try:
        num_actors, gpus, cpus = _size_pool(config, local=started_here)
        shard_size = config.shard_size or default_shard_size(config.samples_per_image(), len(todo), num_actors)
        shards = plan_shards(todo, shard_size)
        print(f"dsmooth certify: {num_actors} actor(s) x ({cpus:g} CPU, {gpus:g} GPU), {len(shards)} shards of "
              f"<= {shard_size} images, {config.samples_per_image():,} samples per image", file=sys.stderr)
        data = selected.describe()
        classifier_ref = ray.put(classifier)
        denoiser_ref = ray.put(denoiser) if denoiser else None
        settings = {
            "sigma": config.sigma, "classifier_arch": config.classifier_arch, "batch_size": config.batch_size,
            "allow_foreign_classifier": config.allow_foreign_classifier, "amp": config.amp,
            "optimize": config.optimize,
        }
        pool = ShardPool(
            lambda index: start_model_actor(
                index, classifier_ref=classifier_ref, denoiser_ref=denoiser_ref, expected=info,
                data=data, settings=settings, num_cpus=cpus, num_gpus=gpus,
                max_restarts=config.max_restarts,
            ),
            num_actors,
        )
        progress = Progress("certify" if config.mode == "certify" else "predict", total=len(todo))
        try:
            _drive(pool, _tasks(shards, selected, config), config, selected, info, run_id, progress)
        finally:
            pool.shutdown()
    finally:
        if started_here:
            ray.shutdown()


def _size_pool(config, local: bool) -> tuple[int, float, float]:
    """(actors, GPUs per actor, CPUs per actor), defaults from the cluster's resources."""
    import ray

    resources = ray.cluster_resources()
    total_gpus, total_cpus = resources.get("GPU", 0.0), resources.get("CPU", 0.0)
    gpus = config.gpus_per_actor if config.gpus_per_actor is not None else (1.0 if total_gpus >= 1 else 0.0)
    cpus = config.cpus_per_actor
    if config.actors is not None:
        actors = config.actors
    elif gpus > 0:
        actors = max(1, int(total_gpus // gpus))
    else:
        actors = max(1, int(total_cpus // cpus))
    if local and (gpus > total_gpus or cpus > total_cpus):
        raise ValueError(
            f"one actor needs {gpus:g} GPU and {cpus:g} CPU but this machine's Ray has {total_gpus:g} GPU and "
            f"{total_cpus:g} CPU (set --gpus-per-actor / --cpus-per-actor, or give --address of a cluster)"
        )
    return actors, gpus, cpus


def _tasks(shards, selected, config) -> Iterator[tuple[Any, dict]]:
    """(shard, images) with images loaded just in time; an unreadable image ends the stream.

    The images of a shard before the unreadable one still go out as a shorter shard, so
    everything readable up to that point is certified and written before the error.
    """
    from pipeline.certify_plan import Shard

    lookup = selected.by_ids
    for shard in shards:
        images = {}
        for position, record in enumerate(shard.records):
            try:
                images[record.image_id] = lookup([record.image_id]).as_uint8()[0]
            except Exception:
                if position:
                    yield Shard(shard.index, shard.records[:position]), images
                raise
        yield shard, images


def _drive(pool, tasks, config, selected, info, run_id, progress) -> None:
    """Feed shards to the pool as it has room, write each result as one Parquet part."""
    import ray

    from actors.shard_pool import ShardFailed
    from pipeline.certify_plan import shard_requests, vote_rows
    from pipeline.storage import write_votes

    pending: dict[int, tuple[Any, list]] = {}
    error: BaseException | None = None
    exhausted = False
    while True:
        while error is None and not exhausted and pool.has_capacity():
            try:
                shard, images = next(tasks)
            except StopIteration:
                exhausted = True
                break
            except Exception as load_error:  # noqa: BLE001 - stop feeding, keep what is in flight
                error = load_error
                break
            requests = shard_requests(shard, config)
            images_ref = ray.put(images)
            pending[shard.index] = (shard, requests)
            pool.submit(shard.index, lambda actor, requests=requests, ref=images_ref: actor.count.remote(requests, ref))
        if not pool.busy():
            if error is None and not exhausted:
                pool.next_result(timeout_s=1.0)  # no actor ready yet: wait on their pings
                continue
            break
        try:
            outcome = pool.next_result(timeout_s=5.0)
        except ShardFailed as failure:
            pending.pop(failure.key, None)
            if error is None:
                error = failure.cause
            continue
        if outcome is None:
            continue
        key, (counts, compute_s, worker) = outcome
        shard, requests = pending.pop(key)
        rows = vote_rows(
            run_id=run_id, config=config, records=shard.records, requests=requests, counts=counts,
            compute_s=compute_s, worker=worker, finished_at=datetime.now(timezone.utc),
            classifier=info.classifier, denoiser=info.denoiser, class_names=selected.classes,
        )
        write_votes(config.output, rows, worker=worker.split("@")[0])
        progress.update(len(shard.records), work=sum(request.num_samples for request in requests))
    if error is not None:
        if isinstance(error, (ValueError, KeyError, FileNotFoundError, PermissionError)):
            raise error
        raise RuntimeError(f"certification failed: {error}") from error


def _warn_relative_output(output: Path) -> None:
    """Inside `ray job submit --working-dir`, a relative path lands in a temporary folder."""
    in_submitted_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ  # set by Ray's job supervisor
    if in_submitted_job and not Path(output).is_absolute():
        print(f"dsmooth certify: warning: --output {output} is relative to this job's temporary working "
              f"directory ({Path(output).resolve()}); use an absolute path to keep the votes", file=sys.stderr)


def _summary(config, selected, new: int, seconds: float) -> None:
    """Where the votes are, how to resume and reduce them, and the certified accuracies of
    the images this command selected."""
    output = Path(config.output).resolve()
    print(f"\ndsmooth certify: {len(selected)} images in {output} ({new} certified now, {seconds:.1f}s)")
    print(f"  votes:  {output / 'votes'}/part-*.parquet  (settings: {output / 'run.json'})")
    print("  resume: rerun this same command; images already in the votes are skipped")
    print(f"  reduce: dsmooth reduce {output} --alpha {config.alpha:g}")
    try:
        from pipeline.reduce import DEFAULT_RADII, accuracy_table, load_run, render
    except ImportError:
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            certificates = load_run(output, config.alpha, name=output.name)
            certificates = certificates[certificates["image_id"].isin(set(selected.image_ids().tolist()))]
            print()
            print(render(accuracy_table([certificates], DEFAULT_RADII), "markdown"), end="")
    except Exception as error:  # noqa: BLE001 - the summary must never fail a finished run
        print(f"  (no summary table: {error})")

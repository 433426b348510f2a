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

# config field -> command-line flag, for options and for error messages.
FLAGS = {
    "dataset": "--dataset",
    "data_root": "--data-root",
    "split": "--split",
    "skip": "--skip",
    "max": "--max",
    "image_size": "--image-size",
    "classifier": "--classifier",
    "classifier_arch": "--classifier-arch",
    "denoiser": "--denoiser",
    "sigma": "--sigma",
    "mode": "--mode",
    "n0": "--n0",
    "n": "--n",
    "alpha": "--alpha",
    "seed": "--seed",
    "chunk_size": "--chunk-size",
    "batch_size": "--batch",
    "actors": "--actors",
    "gpus_per_actor": "--gpus-per-actor",
    "cpus_per_actor": "--cpus-per-actor",
    "amp": "--amp",
    "optimize": "--optimize",
    "shard_size": "--shard-size",
    "max_restarts": "--max-restarts",
    "output": "--output",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE.yaml", help="settings file; options below override its keys")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=["cifar10", "imagenet", "folder"],
                      help="layout: cifar10 (pickled batches, class folders or their .tar.gz), imagenet "
                      "(<split>/<wnid>/*.JPEG), folder (any images; class sub-folders give labels)")
    data.add_argument("--data-root", dest="data_root", metavar="PATH", help="data set folder or archive")
    data.add_argument("--split", metavar="NAME", help="split to certify (default test; imagenet test = val)")
    data.add_argument("--skip", type=int, metavar="K", help="take every K-th image (default 1; the papers use 20 / 100)")
    data.add_argument("--max", type=int, metavar="M", help="stop before position M of the split (default: all)")
    data.add_argument("--image-size", dest="image_size", type=int, metavar="PX",
                      help="resize + center-crop to PX (imagenet default 224; others: as stored)")
    models = parser.add_argument_group("models")
    models.add_argument("--classifier", metavar="CKPT", help="classifier f: dsmooth checkpoint (or raw state dict with --classifier-arch)")
    models.add_argument("--classifier-arch", dest="classifier_arch", metavar="NAME",
                        help="architecture of a raw state-dict classifier (e.g. resnet50; see `dsmooth models`)")
    models.add_argument("--denoiser", metavar="CKPT", help="denoiser D checkpoint, or 'none' for f alone (default none)")
    smoothing = parser.add_argument_group("smoothing")
    smoothing.add_argument("--sigma", type=float, metavar="S", help="Gaussian noise level (required, > 0)")
    smoothing.add_argument("--mode", choices=["certify", "predict"], help="CERTIFY (radius) or PREDICT (label) (default certify)")
    smoothing.add_argument("--n0", type=int, metavar="N0", help="selection samples per image, CERTIFY only (default 100)")
    smoothing.add_argument("--n", type=int, metavar="N", help="estimation / prediction samples per image (default 100000)")
    smoothing.add_argument("--alpha", type=float, metavar="A", help="failure probability of the summary printed at the end "
                           "(default 0.001; the votes do not depend on it)")
    smoothing.add_argument("--seed", type=int, metavar="S", help="noise seed; same seed = same counts (default 0)")
    smoothing.add_argument("--chunk-size", dest="chunk_size", type=int, metavar="N",
                           help="samples per noise chunk; part of the noise address (default 256)")
    speed = parser.add_argument_group(
        "speed (may change between resumptions)",
        "  --actors, --shard-size and --max-restarts never change a count, and the noise does not depend on\n"
        "  --batch either. Float rounding can: a sample on a near-tie may be classified differently with\n"
        "  another --batch, --amp or --optimize, and CPU and CUDA draw different noise. For bit-identical\n"
        "  counts keep these and the device type; any choice gives equally valid votes.",
    )
    speed.add_argument("--batch", dest="batch_size", type=int, metavar="N", help="noisy samples per forward pass (default 400)")
    speed.add_argument("--actors", type=int, metavar="N", help="actors in the pool (default: one per GPU, or one per CPU)")
    speed.add_argument("--gpus-per-actor", dest="gpus_per_actor", type=float, metavar="G",
                       help="GPUs per actor, fractions pack several on one GPU (default 1 if the cluster has GPUs, else 0)")
    speed.add_argument("--cpus-per-actor", dest="cpus_per_actor", type=float, metavar="C", help="CPUs (threads) per actor (default 1)")
    speed.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                       help="mixed precision on GPU (default on; CPUs always run fp32)")
    speed.add_argument("--optimize", action=argparse.BooleanOptionalAction, default=None,
                       help="fold BatchNorm into convolutions and run channels-last (default on)")
    speed.add_argument("--shard-size", dest="shard_size", type=int, metavar="N",
                       help="images per actor call and per Parquet part (default: ~200k samples' worth)")
    speed.add_argument("--max-restarts", dest="max_restarts", type=int, metavar="N",
                       help="Ray restarts of a crashed actor, and retries of its call (default 3)")
    parser.add_argument("--output", metavar="DIR", help="run directory: run.json + votes/part-*.parquet (required)")
    add_ray_arguments(parser)


def load_settings(args: argparse.Namespace):
    """CertifyConfig from --config plus flags; errors name the field and its flag."""
    from pipeline.certify_plan import CertifyConfig
    from pipeline.config import ConfigError, load_config

    overrides = {field: getattr(args, field, None) for field in FLAGS}
    try:
        return load_config(CertifyConfig, args.config if args.config else {}, overrides)
    except ConfigError as error:
        flag = FLAGS.get(error.field.split(".")[0].split("[")[0])
        raise ConfigError(error.field, f"{error.message} ({flag})" if flag else error.message) from None


def run(args: argparse.Namespace) -> int:
    from pipeline.data import open_dataset
    from pipeline.models import CheckpointError

    config = load_settings(args)
    dataset = open_dataset(config.dataset, config.data_root, config.split, image_size=config.image_size)
    selected = dataset.subset(config.skip, config.max)
    if len(selected) == 0:
        raise ValueError(f"no images selected from {dataset.name} (skip={config.skip}, max={config.max})")
    try:
        classifier, denoiser, info = _check_models(config, selected)
    except CheckpointError as error:
        raise ValueError(str(error)) from None
    return _certify(config, args, selected, classifier, denoiser, info)


def _check_models(config, selected):
    """Load f∘D once here, so a wrong file fails before any actor starts."""
    from pipeline.model_pair import ModelBytes, check_labels_fit, load_pair

    classifier = ModelBytes.read(config.classifier)
    denoiser = ModelBytes.read(config.denoiser) if config.denoiser else None
    image_shape = tuple(selected.load(0).shape)
    _, info = load_pair(classifier, denoiser, image_shape, config.classifier_arch)
    check_labels_fit(info, len(selected.classes) if selected.classes else None, classifier.source)
    if info.denoiser_sigma is not None and abs(info.denoiser_sigma - config.sigma) > 1e-12:
        print(f"dsmooth certify: warning: the denoiser was trained for sigma={info.denoiser_sigma}, "
              f"certifying at sigma={config.sigma}", file=sys.stderr)
    return classifier, denoiser, info


def _certify(config, args, selected, classifier, denoiser, info) -> int:
    from pipeline.certify_plan import run_identity
    from pipeline.config import to_dict
    from pipeline.storage import completed_images, open_run

    identity = run_identity(config, info.classifier, info.denoiser, info.num_classes)
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
    _summary(config, len(selected), len(todo), time.monotonic() - started)
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
        image_shape = tuple(selected.load(0).shape)
        classifier_ref = ray.put(classifier)
        denoiser_ref = ray.put(denoiser) if denoiser else None
        settings = {
            "sigma": config.sigma, "classifier_arch": config.classifier_arch, "batch_size": config.batch_size,
            "chunk_size": config.chunk_size, "amp": config.amp, "optimize": config.optimize,
        }
        pool = ShardPool(
            lambda index: start_model_actor(
                index, classifier_ref=classifier_ref, denoiser_ref=denoiser_ref, expected=info,
                image_shape=image_shape, settings=settings, num_cpus=cpus, num_gpus=gpus,
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
    from pipeline.certify_plan import shard_items, vote_rows
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
            items = shard_items(shard, config)
            images_ref = ray.put(images)
            pending[shard.index] = (shard, items)
            pool.submit(shard.index, lambda actor, items=items, ref=images_ref: actor.count.remote(items, ref))
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
        shard, items = pending.pop(key)
        rows = vote_rows(
            run_id=run_id, config=config, records=shard.records, items=items, counts=counts,
            compute_s=compute_s, worker=worker, finished_at=datetime.now(timezone.utc),
            classifier=info.classifier, denoiser=info.denoiser, class_names=selected.classes,
        )
        write_votes(config.output, rows, worker=worker.split("@")[0])
        progress.update(len(shard.records), work=sum(item.num_samples for item in items))
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


def _summary(config, total: int, new: int, seconds: float) -> None:
    """Where the votes are, how to resume and reduce them, and the certified accuracies."""
    output = Path(config.output).resolve()
    print(f"\ndsmooth certify: {total} images in {output} ({new} certified now, {seconds:.1f}s)")
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
            print()
            print(render(accuracy_table([certificates], DEFAULT_RADII), "markdown"), end="")
    except Exception as error:  # noqa: BLE001 - the summary must never fail a finished run
        print(f"  (no summary table: {error})")

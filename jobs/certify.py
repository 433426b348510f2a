"""Certify (or predict) a data set with a denoiser-classifier pair across Ray actors.

Every selected image gets n0 + n noisy samples (CERTIFY: selection then estimation, Cohen
et al.) or n samples (PREDICT) through f(D(x + noise)); a pool of Ray actors, each holding
the pair on a GPU (or CPU), counts the votes, and the counts stream to Parquet parts under
OUTPUT/votes as shards finish. Certificates are computed from the counts, at any alpha, by
`dsmooth reduce OUTPUT`.

Settings come from --config FILE.yaml (keys = the option names below with '_' for '-',
e.g. data_root, n0, gpus_per_actor); options given on the command line override the file.
OUTPUT, the data and the checkpoints may be local paths or s3:// / gs:// URIs.
Resume: rerun the same command with the same --output; finished images are skipped, and
a directory made with other settings (data, models, sigma, n0, n, seed, ...) is refused, as
is a directory another job is writing. Lost actors and nodes are replaced on the fly.

examples:
  dsmooth certify --config examples/certify_cifar10_small.yaml
  dsmooth certify --dataset cifar10 --data-root ../shared/data/cifar10-jpeg.tar.gz --skip 20 \\
      --classifier ckpt/resnet110.pt --denoiser ckpt/dncnn-0.25.pt --sigma 0.25 --n 10000 \\
      --output runs/c10-0.25
  ray job submit --working-dir . -- dsmooth certify --config my.yaml --output s3://bucket/runs/x"""

from __future__ import annotations

import argparse
import logging
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from jobs.ray_env import add_ray_arguments

log = logging.getLogger("dsmooth")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from jobs.options import add_settings_arguments
    from pipeline.certify.plan import SPEED_GROUP, SPEED_NOTE, CertifyConfig
    from pipeline.settings import SEQUENTIAL_GROUP

    parser.add_argument("--config", metavar="FILE.yaml", help="settings file; options below override its keys")
    add_settings_arguments(parser, CertifyConfig, groups={
        "data": None, "models": None, "smoothing": None, SEQUENTIAL_GROUP: None, SPEED_GROUP: SPEED_NOTE, "cluster": None,
    })
    add_ray_arguments(parser)


def load_settings(args: argparse.Namespace):
    """CertifyConfig from --config plus flags; errors name the field and its flag."""
    from jobs.options import load_settings as load
    from pipeline.certify.plan import CertifyConfig

    return load(CertifyConfig, args)


def run(args: argparse.Namespace) -> int:
    outcome = certify(load_settings(args), address=args.address)
    print(outcome.report())
    return 0


@dataclass
class CertifyOutcome:
    """What one `certify` call did: the run, how many images, what was skipped, how long."""

    output: str
    selected: list[int]
    certified_now: int
    seconds: float
    alpha: float
    skipped: list[dict[str, Any]] = field(default_factory=list)
    sequential: SequentialSummary | None = None
    decisions: Any = None  # a sequential run's pipeline.stats.sequential.SequentialDecisions, rows = `selected`

    def report(self) -> str:
        """Where the votes are, how to resume and reduce them, and the certified accuracies of
        the images this call selected."""
        lines = [
            f"dsmooth certify: {len(self.selected)} images in {self.output} ({self.certified_now} certified now, "
            f"{self.seconds:.1f}s)",
            f"  votes:  {self.output}/votes/part-*.parquet  (settings: {self.output}/run.json)",
            "  resume: rerun this same command; images already in the votes are skipped",
            f"  reduce: dsmooth reduce {self.output} --alpha {self.alpha:g}",
        ]
        if self.sequential is not None:
            lines.append(self.sequential.line())
        if self.skipped:
            names = ", ".join(s["name"] for s in self.skipped[:5]) + (" ..." if len(self.skipped) > 5 else "")
            lines.append(f"  skipped {len(self.skipped)} unreadable image(s) (listed in run.json): {names}")
        table = self.table()
        return "\n".join(lines) + (f"\n\n{table}" if table else "")

    def certificates(self, alpha: float | None = None, name: str | None = None):
        """The per-image certificates (`pipeline.reduce.Certificates`) of the images this call
        selected, from the run's votes at `alpha` (default: the run's); the run may hold more.
        `name` labels them (default: the run directory's name)."""
        from pipeline.reduce import load_run

        certificates = load_run(self.output, self.alpha if alpha is None else alpha,
                                name=name or self.output.rstrip("/").rsplit("/", 1)[-1])
        return certificates[certificates["image_id"].isin(set(self.selected))].reset_index(drop=True)

    def table(self) -> str:
        try:
            from pipeline.reduce import DEFAULT_RADII, accuracy_table, render

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return render(accuracy_table([self.certificates()], DEFAULT_RADII), "markdown").rstrip()
        except Exception as error:  # noqa: BLE001 - the summary must never fail a finished run
            return f"  (no summary table: {error})"


@dataclass
class SequentialSummary:
    """What a sequential run decided for the selected images, and what it cost."""

    radius: float | None
    images: int
    certified: int
    undecided: int
    samples_used: float  # mean per image: samples the decisions rest on
    samples_drawn: float  # mean per image: also those drawn after a decision (in flight then)
    fixed_n: int  # n0 + n, what a fixed-n run draws per image
    mean_radius: float
    drawn_now: int = 0  # samples this invocation drew (a resumed run draws only what is missing)

    @classmethod
    def of(cls, decisions: Any, rows: Any, radius: float | None, fixed_n: int) -> SequentialSummary:
        import numpy as np

        rows = np.asarray(rows, dtype=np.int64)
        used = decisions.samples[rows]
        drawn = used + decisions.unused_samples[rows]
        certified = decisions.certified[rows]
        return cls(radius, len(rows), int(certified.sum()), int(decisions.needs_samples[rows].sum()),
                   float(used.mean()) if len(rows) else 0.0, float(drawn.mean()) if len(rows) else 0.0, fixed_n,
                   float(decisions.radius[rows][certified].mean()) if certified.any() else 0.0)

    def line(self) -> str:
        where = (f"at R = {self.radius:g}" if self.radius is not None
                 else f"(largest-radius mode, mean radius reached {self.mean_radius:.3f})")
        ratio = self.fixed_n / self.samples_drawn if self.samples_drawn else float("inf")
        text = (f"  sequential: {self.certified} of {self.images} images certified {where}; "
                f"{self.samples_drawn:,.0f} samples per image drawn ({self.samples_used:,.0f} used by the decisions) "
                f"vs fixed n0 + n = {self.fixed_n:,}: {ratio:.1f}x fewer")
        if self.undecided:
            text += f"; {self.undecided} image(s) still undecided: rerun to resume"
        return text



@dataclass
class Prepared:
    """What `certify` checks and loads before Ray starts: the data, the images selected and
    the models (checked against the data), hence the run's identity. A caller that runs
    several jobs (the demo) prepares them all first, so a bad option fails in seconds."""

    config: Any
    split: Any
    selected: Any
    classifier: Any
    denoiser: Any
    info: Any

    @property
    def identity(self) -> dict[str, Any]:
        from pipeline.certify.plan import certify_identity

        return certify_identity(self.config, self.split, self.info)

    def pending(self) -> list[Any]:
        """The selected images the run directory holds no votes for yet (all of them when
        there is no run yet): what a `certify` call would sample now."""
        return _pending(self.config, self.selected)

    def conflicts(self) -> dict[str, tuple[Any, Any]]:
        """setting -> (the existing run's value, this config's) that would refuse the resume."""
        from pipeline.runs.storage import run_differences

        return run_differences(self.config.output, self.identity)


def prepare(config: Any, classifier: Any = None) -> Prepared:
    """Open the data, select the images and check the models: no Ray, no sampling.
    `classifier`: an nn.Module object standing for config.classifier (Python API).
    Unlabelled images are labelled with the classifier's clean-image prediction."""
    from pipeline.certify.clean_labels import label_by_classifier
    from pipeline.models import CheckpointError

    split = config.open_split()
    selected = config.select(split)
    try:
        f, denoiser, info, pair = _check_models(config, selected, classifier)
    except CheckpointError as error:
        raise ValueError(str(error)) from None
    selected = label_by_classifier(selected, pair.classifier, info.num_classes)
    return Prepared(config, split, selected, f, denoiser, info)


def certify(config: Any, address: str | None = None, *, prepared: Prepared | None = None,
            classifier: Any = None) -> CertifyOutcome:
    """Certify (or resume) the images `config` selects; see the module doc. `prepared`:
    `prepare(config)` done already; `classifier`: an nn.Module standing for config.classifier."""
    prepared = prepared if prepared is not None else prepare(config, classifier)
    return _certify(config, address, prepared.split, prepared.selected, prepared.classifier, prepared.denoiser,
                    prepared.info)


def _check_models(config, selected, classifier_object=None):
    """Load f∘D once here, against the data, so a wrong file fails before any actor starts."""
    from pipeline.certify.pair import ModelBytes, load_pair

    import dataclasses

    from pipeline.models.sources import ClassifierSpec

    spec = ClassifierSpec.of(config)
    if classifier_object is not None:
        spec = dataclasses.replace(spec, classifier=classifier_object)
    classifier = ModelBytes.classifier(spec)
    denoiser = ModelBytes.read_denoiser(config.denoiser) if config.denoiser else None
    pair, info = load_pair(classifier, denoiser, selected.describe(), config.classifier_arch,
                           config.allow_foreign_classifier, sigma=config.sigma)
    return classifier, denoiser, info, pair


def _certify(config, address, split, selected, classifier, denoiser, info) -> CertifyOutcome:
    from pipeline.certify.plan import certify_identity
    from pipeline.config import to_dict
    from pipeline.runs.fs import Location
    from pipeline.runs.lock import exclusive_run
    from pipeline.runs.storage import open_run, update_run_record

    output = Location.of(config.output)
    identity = certify_identity(config, split, info)
    speed = {k: v for k, v in to_dict(config).items() if k not in identity}
    with exclusive_run(output, "dsmooth certify") as lease:
        labels_from = getattr(selected, "labels_from", None)
        record = open_run(output, identity, extra={**speed, **({"labels_from": labels_from} if labels_from else {})})
        if config.sequential:
            return _certify_sequential(config, address, selected, classifier, denoiser, info, record, lease)
        todo = _pending(config, selected)
        log.info("%d images selected from %s, %d already in %s, %d to do",
                 len(selected), selected.name, len(selected) - len(todo), output, len(todo))
        started = time.monotonic()
        skipped: list[dict[str, Any]] = []
        if todo:
            _warn_relative_output(config.output)
            try:
                _run_pool(config, address, selected, todo, classifier, denoiser, info, record["run_id"], lease, skipped)
            finally:
                if skipped:
                    known = {s["image_id"] for s in record.get("skipped_images", [])}
                    update_run_record(output, skipped_images=record.get("skipped_images", [])
                                      + [s for s in skipped if s["image_id"] not in known])
    return CertifyOutcome(str(output), [r.image_id for r in selected.records], len(todo) - len(skipped),
                          time.monotonic() - started, config.alpha, skipped)


def _pending(config, selected) -> list[Any]:
    """Records of `selected` without votes for every phase in the run at config.output."""
    from pipeline.runs.storage import completed_images

    done = completed_images(config.output, [phase for phase, _ in config.phases()])
    return [r for r in selected.records if r.image_id not in done]


def _run_pool(config, address, selected, todo, classifier, denoiser, info, run_id, lease, skipped) -> None:
    from actors.pool import drive
    from pipeline.certify.plan import default_shard_size, plan_shards

    with _model_pool(config, address, selected, classifier, denoiser, info) as (pool, counter):
        shard_size = config.shard_size or default_shard_size(config.samples_per_image(), len(todo), pool.demand.actors)
        shards = plan_shards(todo, shard_size)
        log.info("%s, %d shards of <= %d images, %s samples per image", pool.demand, len(shards), shard_size,
                 f"{config.samples_per_image():,}")
        writer = _ShardWriter(config, selected, info, run_id, lease, counter, len(todo))
        pool.on_requeue = writer.forget
        try:
            error = drive(pool, writer.items(shards, skipped), writer.write, on_lost=writer.forget, tick=writer.tick)
        finally:
            writer.progress.close()
        _raise(error)


def _raise(error: BaseException | None) -> None:
    """A job's own errors as they are (one-line exit 2), anything else as a failed run."""
    if error is not None:
        if isinstance(error, (ValueError, KeyError, FileNotFoundError, PermissionError)):
            raise error
        raise RuntimeError(f"certification failed: {error}") from error


@contextmanager
def _model_pool(config, address, selected, classifier, denoiser, info) -> Iterator[tuple[Any, Any]]:
    """Ray, the checkpoints in a blob store, and a WorkPool of model actors (with a progress
    counter): what fixed-n and sequential runs share. Everything is stopped on exit."""
    import ray

    from actors.blob_store import put_blob, start_blob_store
    from actors.model_actor import start_model_actor
    from actors.pool import PlacementError, WorkPool, placement_problem
    from actors.progress_counter import start_progress_counter
    from jobs.ray_env import connect

    started_here = connect(address)
    try:
        demand = _demand(config)
        problem, autoscaling = placement_problem(demand)
        if problem and started_here:
            raise PlacementError(f"{problem} (set --gpus-per-actor / --cpus-per-actor, or give --address of a cluster)")
        store, store_name = start_blob_store()
        classifier_key = put_blob(store, classifier.data, classifier.source)
        denoiser_key = put_blob(store, denoiser.data, denoiser.source) if denoiser else None
        counter = start_progress_counter()
        settings = {
            "sigma": config.sigma, "classifier_arch": classifier.arch or config.classifier_arch, "batch_size": config.batch_size,
            "allow_foreign_classifier": config.allow_foreign_classifier, "amp": config.amp,
            "optimize": config.optimize,
        }
        pool = WorkPool(
            lambda index: start_model_actor(
                index, store=store_name, classifier=classifier_key, denoiser=denoiser_key, expected=info,
                data=selected.describe(), settings=settings, num_cpus=demand.cpus, num_gpus=demand.gpus,
                max_restarts=config.max_restarts,
            ),
            demand,
            wait_timeout_s=config.wait_timeout,
        )
        try:
            yield pool, counter
        finally:
            pool.shutdown()
            for actor in (store, counter):
                ray.kill(actor)
    finally:
        if started_here:
            ray.shutdown()


def _certify_sequential(config, address, selected, classifier, denoiser, info, record, lease) -> CertifyOutcome:
    """A sequential run (`pipeline.stats.sequential`): replay the stored chunk votes, then sample the
    undecided images chunk by chunk until each is decided (see `_SequentialDriver`)."""
    import numpy as np

    from actors.pool import drive
    from pipeline.runs.fs import Location
    from pipeline.stats.sequential import SequentialTest, replay
    from pipeline.certify.schedule import ChunkScheduler, chunk_votes_from_rows
    from pipeline.runs.storage import read_votes, update_run_record

    output = Location.of(config.output)
    records = selected.records
    test = SequentialTest.from_settings(config)
    rows_of = {r.image_id: row for row, r in enumerate(records)}
    labels = np.array([r.label for r in records], dtype=np.int64) if config.certify_class == "label" else None
    certifier = replay(test, chunk_votes_from_rows(read_votes(output), rows_of), labels=labels,
                       num_images=len(records))
    scheduler = ChunkScheduler(certifier)
    undecided = int(certifier.decisions().needs_samples.sum())
    log.info("sequential: %d images selected from %s, %d decided by the votes in %s, %d to go (%s)",
             len(records), selected.name, len(records) - undecided, output, undecided, test)
    started = time.monotonic()
    skipped: list[dict[str, Any]] = []
    if undecided:
        _warn_relative_output(config.output)
        driver = _SequentialDriver(config, selected, info, record["run_id"], lease, scheduler, undecided, skipped)
        try:
            with _model_pool(config, address, selected, classifier, denoiser, info) as (pool, _):
                try:
                    error = drive(pool, driver.items(), driver.write, on_lost=driver.lost, tick=driver.tick)
                finally:
                    driver.progress.close()
                _raise(error)
        finally:
            if skipped:
                known = {s["image_id"] for s in record.get("skipped_images", [])}
                update_run_record(output, skipped_images=record.get("skipped_images", [])
                                  + [s for s in skipped if s["image_id"] not in known])
    decisions = certifier.decisions()
    summary = SequentialSummary.of(decisions, np.arange(len(records)), test.radius, config.n0 + config.n)
    summary.drawn_now = driver.samples if undecided else 0
    return CertifyOutcome(str(output), [r.image_id for r in records], undecided - len(skipped),
                          time.monotonic() - started, config.alpha, skipped, sequential=summary, decisions=decisions)


class _SequentialDriver:
    """The driver's side of a sequential run: work items of chunks of undecided images out,
    chunk votes in (to Parquet first, then to the scheduler, which decides in chunk order)."""

    def __init__(self, config, selected, info, run_id, lease, scheduler, undecided: int, skipped) -> None:
        from pipeline.progress import Progress

        self.config, self.selected, self.info, self.run_id = config, selected, info, run_id
        self.lease, self.scheduler, self.skipped = lease, scheduler, skipped
        self.image_ids = [r.image_id for r in selected.records]
        self.pending: dict[int, tuple[list, list]] = {}
        self.pixels: dict[int, Any] = {}  # uint8 images of undecided rows, read once
        # Several forward batches per actor call: the device stays busy between round trips.
        self.item_samples = max(config.batch_size * 4, config.chunk_size)
        self.progress = Progress("certify", total=undecided)
        self.decided = self.samples = 0

    def items(self) -> Iterator[tuple[int, Any] | None]:
        import ray

        from pipeline.certify.plan import chunk_requests

        key = 0
        while not self.scheduler.finished:
            tasks = [t for t in self.scheduler.next_chunks(self.item_samples) if self._readable(t.row)]
            if not tasks:
                yield None  # every undecided image has chunks in flight: wait for a result
                continue
            requests = chunk_requests(self.config.seed, self.image_ids, tasks, self.config.chunk_size)
            images = ray.put({self.image_ids[t.row]: self.pixels[t.row] for t in tasks})
            self.pending[key] = (tasks, requests)
            yield key, lambda actor, r=requests, ref=images: actor.count.remote(r, ref)
            key += 1

    def _readable(self, row: int) -> bool:
        """Read an image the first time it is sampled; an unreadable one stops the run (after
        what was written) or, with on_bad_image: skip, is withdrawn without a certificate."""
        from pipeline.data import DatasetError

        if row in self.pixels:
            return True
        record = self.selected.records[row]
        try:
            self.pixels[row] = self.selected.by_ids([record.image_id]).as_uint8()[0]
            return True
        except DatasetError as error:
            if self.config.on_bad_image == "fail":
                raise
            log.warning("skipping %s: %s", record.name, error)
            self.skipped.append({"image_id": record.image_id, "name": record.name, "error": str(error)[:300]})
            self.scheduler.cert.withdraw([row])
            self.progress.total -= 1
            return False

    def write(self, key: int, result: Any) -> None:
        import numpy as np

        from pipeline.certify.plan import vote_rows
        from pipeline.runs.storage import write_votes

        counts, compute_s, worker = result
        tasks, requests = self.pending.pop(key)
        rows = vote_rows(
            run_id=self.run_id, config=self.config, records=self.selected.records, requests=requests, counts=counts,
            compute_s=compute_s, worker=worker, finished_at=datetime.now(timezone.utc),
            classifier=self.info.classifier, denoiser=self.info.denoiser, class_names=self.selected.classes,
            per_chunk=True,
        )
        self.lease.check()
        write_votes(self.config.output, rows, worker=worker.split("@")[0])  # durable before it counts
        for phase in dict.fromkeys(t.phase for t in tasks):
            mine = [i for i, t in enumerate(tasks) if t.phase == phase]
            self.decided += self.scheduler.accept(
                phase, [tasks[i].row for i in mine], [tasks[i].chunk for i in mine],
                [requests[i].num_samples for i in mine], counts[mine])
        for row in np.nonzero(~self.scheduler.cert.decisions().needs_samples)[0].tolist():
            self.pixels.pop(row, None)
        self.samples += sum(r.num_samples for r in requests)
        self.progress.set(self.decided, self.samples)

    def lost(self, key: Any) -> None:
        """An item that failed for good: its chunks may be handed out again."""
        tasks, _ = self.pending.pop(key, ([], []))
        self.scheduler.forget(tasks)

    def tick(self) -> None:
        self.progress.set(self.decided, self.samples)


def _demand(config) -> Any:
    """Actors and what each asks for, defaults from the cluster's resources."""
    import ray

    from actors.pool import Demand

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
    return Demand(actors, cpus, gpus)


class _ShardWriter:
    """The driver's side of the pool: shards out (images loaded just in time), votes in."""

    def __init__(self, config, selected, info, run_id, lease, counter, total: int) -> None:
        from pipeline.progress import Progress

        self.config, self.selected, self.info, self.run_id = config, selected, info, run_id
        self.lease, self.counter = lease, counter
        self.pending: dict[int, tuple[Any, list]] = {}
        self.written_images = self.written_samples = 0
        self.progress = Progress("certify" if config.mode == "certify" else "predict", total=total)
        self._last_poll = 0.0

    def items(self, shards, skipped: list[dict[str, Any]]) -> Iterator[tuple[int, Any]]:
        import ray

        from pipeline.certify.plan import Shard, shard_requests
        from pipeline.data import DatasetError

        for shard in shards:
            records, images = [], {}
            for record in shard.records:
                try:
                    images[record.image_id] = self.selected.by_ids([record.image_id]).as_uint8()[0]
                except DatasetError as error:
                    if self.config.on_bad_image == "fail":
                        if records:  # what was readable before it still goes out
                            yield from self._submit(Shard(shard.index, tuple(records)), images)
                        raise
                    log.warning("skipping %s: %s", record.name, error)
                    skipped.append({"image_id": record.image_id, "name": record.name, "error": str(error)[:300]})
                    self.progress.total -= 1
                    continue
                records.append(record)
            if records:
                yield from self._submit(Shard(shard.index, tuple(records)), images)

    def _submit(self, shard, images) -> Iterator[tuple[int, Any]]:
        import ray

        from pipeline.certify.plan import shard_requests

        requests = shard_requests(shard, self.config)
        images_ref = ray.put(images)
        self.pending[shard.index] = (shard, requests)
        counter, key = self.counter, shard.index
        yield key, lambda actor, r=requests, ref=images_ref: actor.count.remote(r, ref, counter, key)

    def write(self, key: int, result: Any) -> None:
        from pipeline.certify.plan import vote_rows
        from pipeline.runs.storage import write_votes

        counts, compute_s, worker = result
        shard, requests = self.pending.pop(key)
        rows = vote_rows(
            run_id=self.run_id, config=self.config, records=shard.records, requests=requests, counts=counts,
            compute_s=compute_s, worker=worker, finished_at=datetime.now(timezone.utc),
            classifier=self.info.classifier, denoiser=self.info.denoiser, class_names=self.selected.classes,
        )
        self.lease.check()
        write_votes(self.config.output, rows, worker=worker.split("@")[0])
        self.forget(key)
        self.written_images += len(shard.records)
        self.written_samples += sum(r.num_samples for r in requests)
        self.tick(force=True)

    def forget(self, key: Any) -> None:
        self.counter.forget.remote(key)

    def tick(self, force: bool = False) -> None:
        import ray

        now = time.monotonic()
        if not force and now - self._last_poll < 1.0:
            return
        self._last_poll = now
        try:
            images, samples = ray.get(self.counter.totals.remote(), timeout=5)
        except Exception:  # noqa: BLE001 - progress is best effort
            images, samples = 0, 0
        self.progress.set(self.written_images + images, self.written_samples + samples)


def _warn_relative_output(output: str) -> None:
    """Inside `ray job submit --working-dir`, a relative path lands in a temporary folder."""
    from pipeline.runs.fs import is_uri

    in_submitted_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ  # set by Ray's job supervisor
    if in_submitted_job and not is_uri(output) and not os.path.isabs(output):
        log.warning("--output %s is relative to this job's temporary working directory (%s); use an absolute "
                    "path or an s3:// URI to keep the votes", output, os.path.abspath(output))

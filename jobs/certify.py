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

from dataclasses import dataclass, field

from typing import Any

from jobs.ray_env import add_ray_arguments

log = logging.getLogger("dsmooth")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from jobs.options import add_settings_arguments
    from pipeline.certify.config import SPEED_GROUP, SPEED_NOTE, CertifyConfig
    from pipeline.settings import SEQUENTIAL_GROUP

    parser.add_argument("--config", metavar="FILE.yaml", help="settings file; options below override its keys")
    add_settings_arguments(parser, CertifyConfig, groups={
        "data": None, "models": None, "smoothing": None, SEQUENTIAL_GROUP: None, SPEED_GROUP: SPEED_NOTE, "cluster": None,
    })
    add_ray_arguments(parser)


def load_settings(args: argparse.Namespace):
    """CertifyConfig from --config plus flags; errors name the field and its flag."""
    from jobs.options import load_settings as load
    from pipeline.certify.config import CertifyConfig

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
    finished_now: int  # images whose work this call finished (fixed n) or decided (sequential)
    seconds: float
    alpha: float
    skipped: list[dict[str, Any]] = field(default_factory=list)
    sequential: SequentialSummary | None = None
    decisions: Any = None  # a sequential run's pipeline.stats.sequential.SequentialDecisions, rows = `selected`
    mode: str = "certify"

    def report(self) -> str:
        """Where the votes are, how to resume and reduce them, and the certified accuracies of
        the images this call selected. "finished"/"decided" name work done; "certified" only
        ever counts certificates."""
        verb = "decided" if self.sequential is not None else "finished"
        lines = [
            f"dsmooth certify: {len(self.selected)} images in {self.output} ({self.finished_now} {verb} now, "
            f"{self.seconds:.1f}s)",
            f"  votes:  {self.output}/votes/part-*.parquet  (settings: {self.output}/run.json)",
            "  resume: rerun this same command; images already in the votes are skipped",
            f"  reduce: dsmooth reduce {self.output} --alpha {self.alpha:g}",
        ]
        if self.sequential is not None:
            lines.append(self.sequential.line())
        else:
            outcome = self.outcome_line()
            if outcome:
                lines.append(outcome)
        if self.skipped:
            names = ", ".join(s["name"] for s in self.skipped[:5]) + (" ..." if len(self.skipped) > 5 else "")
            lines.append(f"  skipped {len(self.skipped)} unreadable image(s) (listed in run.json): {names}")
        table = self.table()
        return "\n".join(lines) + (f"\n\n{table}" if table else "")

    def outcome_line(self) -> str:
        """Fixed n: of the selected images, how many are certified, abstained, not finished."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                certificates = self.certificates()
        except Exception:  # noqa: BLE001 - the summary must never fail a finished run
            return ""
        done = len(certificates)
        abstained = int(certificates["abstained"].sum()) if done else 0
        skipped = len({s["image_id"] for s in self.skipped} & set(self.selected))
        left = len(self.selected) - done - skipped
        verb = "certified" if self.mode == "certify" else "predicted"
        return (f"  outcome: {done - abstained} of {len(self.selected)} images {verb}, {abstained} abstained"
                + (f", {left} not finished: rerun to resume" if left > 0 else ""))

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
            from pipeline.reduce import accuracy_table, render

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return render(accuracy_table([self.certificates()]), "markdown")  # default radii and an at-R run's R.rstrip()
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
        not_certified = self.images - self.certified - self.undecided
        text = (f"  sequential: {self.certified} of {self.images} images certified {where}, {not_certified} not "
                f"certified; "
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

    config = _keep_recorded_schedule(config)
    split = config.open_split()
    selected = config.select(split)
    try:
        f, denoiser, info, pair = _check_models(config, selected, classifier)
    except CheckpointError as error:
        raise ValueError(str(error)) from None
    selected = label_by_classifier(selected, pair.classifier, info.num_classes)
    return Prepared(config, split, selected, f, denoiser, info)


def _keep_recorded_schedule(config: Any) -> Any:
    """A sequential run recorded before the growing first chunks (or the geometric futility
    rule) existed resumes with its fixed chunks (its mixture futility rule), unless the user
    sets them: its identity, noise and decisions are unchanged. Returns the config to use."""
    from pipeline.runs.fs import Location
    from pipeline.runs.storage import RUN_FILE, read_run_record

    if not config.sequential or not (Location.of(config.output) / RUN_FILE).exists():
        return config
    recorded = (read_run_record(config.output).get("identity") or {}).get("sequential")
    if not recorded:
        return config
    # Each key absent from the record held its old value then (`sequential_identity` drops it).
    old = {"first_chunks": [], "futility": "mixture"}
    update = {name: value for name, value in old.items()
              if name not in recorded and name not in config.model_fields_set}
    return config.model_copy(update=update) if update else config


def certify(config: Any, address: str | None = None, *, prepared: Prepared | None = None,
            classifier: Any = None) -> CertifyOutcome:
    """Certify (or resume) the images `config` selects; see the module doc. `prepared`:
    `prepare(config)` done already; `classifier`: an nn.Module standing for config.classifier.
    The run's lock comes first: a second writer is refused before any data or model is loaded."""
    from pipeline.certify.run import claimed_run

    with claimed_run(config.output, "dsmooth certify") as lease:
        prepared = prepared if prepared is not None else prepare(config, classifier)
        return _certify(prepared.config, address, prepared, lease)


def _check_models(config, selected, classifier_object=None):
    """Load f∘D once here, against the data, so a wrong file fails before any actor starts.
    The classifier is any spec (`pipeline.models.sources`), or an nn.Module object."""
    import dataclasses

    from pipeline.certify.pair import ModelBytes, load_pair
    from pipeline.models.sources import ClassifierSpec

    spec = ClassifierSpec.of(config)
    if classifier_object is not None:
        spec = dataclasses.replace(spec, classifier=classifier_object)
    classifier = ModelBytes.classifier(spec)
    denoiser = ModelBytes.read_denoiser(config.denoiser) if config.denoiser else None
    pair, info = load_pair(classifier, denoiser, selected.describe(), config.classifier_arch,
                           config.allow_foreign_classifier, sigma=config.sigma, noise=config.noise,
                           allow_foreign_denoiser=config.allow_foreign_denoiser)
    return classifier, denoiser, info, pair


def _certify(config, address, prepared: Prepared, lease) -> CertifyOutcome:
    """Wire one `CertifyRun`: the model sampler with the fixed or the sequential schedule."""
    from actors.model_sampler import ModelSampler
    from pipeline.certify.run import RunContext
    from pipeline.config import to_dict
    from pipeline.runs.fs import Location
    from pipeline.runs.storage import open_run

    output = Location.of(config.output)
    identity = prepared.identity
    speed = {k: v for k, v in to_dict(config).items() if k not in identity}
    selected = prepared.selected
    labels_from = getattr(selected, "labels_from", None)  # unlabelled data: the classifier's clean predictions
    # The classifier as the user named it (a path, a spec): for humans; the identity holds its content's hash.
    source = {"classifier_source": str(prepared.classifier.source)}
    record = open_run(output, identity, extra={**speed, **source,
                                               **({"labels_from": labels_from} if labels_from else {})})
    context = RunContext(output, record, selected.records, lease, config, config.on_bad_image)
    started = time.monotonic()
    schedule, summarise = (_sequential_schedule if config.sequential else _fixed_schedule)(config, context, output,
                                                                                       selected)
    run = None
    if schedule is not None:
        _warn_relative_output(config.output)
        with ModelSampler(context, selected, prepared.classifier, prepared.denoiser, prepared.info, address,
                          per_chunk=config.sequential) as sampler:
            run = model_run(config, context, sampler, schedule)
            run.run()
    return summarise(CertifyOutcome(str(output), context.image_ids, 0, time.monotonic() - started, config.alpha,
                                    context.skipped, mode=config.mode), run)


def model_run(config, context, sampler, schedule, progress: Any = None) -> Any:
    """The `CertifyRun` of a model sampler just started: a fixed run's shards sized for its
    pool, a sequential run's items spread over its calls in flight; votes written in batched
    parts (`pipeline.certify.run.WRITE_EVERY_S`)."""
    from pipeline.certify.run import WRITE_EVERY_S, CertifyRun, item_seconds

    if callable(schedule):  # fixed n: shards sized for the pool just started
        schedule = schedule(sampler.demand.actors)
    else:
        schedule.slots = sampler.demand.actors * sampler.pool.per_actor
        schedule.item_seconds, schedule.least_seconds = item_seconds(sampler.demand.actors)
    return CertifyRun(context, sampler, schedule, label="certify" if config.mode == "certify" else "predict",
                      progress=progress, write_every_s=WRITE_EVERY_S)


def _fixed_schedule(config, context, output, selected):
    """(a FixedSchedule maker or None when nothing is left, the outcome's finisher)."""
    from pipeline.certify.plan import default_shard_size, plan_shards, shard_requests
    from pipeline.certify.run import FixedSchedule

    todo = _pending(config, selected)
    log.info("%d images selected from %s, %d already in %s, %d to do",
             len(selected), selected.name, len(selected) - len(todo), output, len(todo))

    def make(actors: int) -> FixedSchedule:
        shard_size = config.shard_size or default_shard_size(config.samples_per_image(), len(todo), actors)
        shards = plan_shards(todo, shard_size)
        log.info("%d shards of <= %d images, %s samples per image", len(shards), shard_size,
                 f"{config.samples_per_image():,}")
        return FixedSchedule(shards, {image_id: row for row, image_id in enumerate(context.image_ids)},
                             lambda shard: shard_requests(shard, config))

    def finish(outcome: CertifyOutcome, run: Any) -> CertifyOutcome:
        outcome.finished_now = run.finished if run is not None else 0
        return outcome

    return (make if todo else None), finish


def _sequential_schedule(config, context, output, selected):
    """A sequential run (`pipeline.stats.sequential`): replay the stored chunk votes, then the
    schedule of chunks of the undecided images (None when every image is decided)."""
    import numpy as np

    from pipeline.certify.run import SequentialSchedule
    from pipeline.certify.schedule import ChunkScheduler, chunk_votes_from_rows
    from pipeline.runs.storage import read_votes
    from pipeline.stats.sequential import SequentialTest, replay

    records = selected.records
    test = SequentialTest.from_settings(config)
    rows_of = {r.image_id: row for row, r in enumerate(records)}
    labels = np.array([r.label for r in records], dtype=np.int64) if config.certify_class == "label" else None
    certifier = replay(test, chunk_votes_from_rows(read_votes(output), rows_of), labels=labels,
                       num_images=len(records))
    undecided = int(certifier.decisions().needs_samples.sum())
    log.info("sequential: %d images selected from %s, %d decided by the votes in %s, %d to go (%s)",
             len(records), selected.name, len(records) - undecided, output, undecided, test.describe())
    # Several forward batches per actor call until the actors' rate is known, then about a
    # second of an actor's work (`model_run`): the device stays busy between round trips.
    schedule = SequentialSchedule(ChunkScheduler(certifier), context.image_ids, config.seed, config.chunk_size,
                                  max(config.batch_size * 4, config.chunk_size))
    def finish(outcome: CertifyOutcome, run: Any) -> CertifyOutcome:
        decisions = certifier.decisions()
        outcome.finished_now = undecided - int(decisions.needs_samples.sum()) - len(context.skipped)
        outcome.sequential = SequentialSummary.of(decisions, np.arange(len(records)), test.radius,
                                                  config.n0 + config.n)
        outcome.sequential.drawn_now = run.samples if run is not None else 0  # a resume draws only what is missing
        outcome.decisions = decisions
        return outcome

    return (schedule if undecided else None), finish


def _pending(config, selected) -> list[Any]:
    """Records of `selected` without votes for every phase in the run at config.output."""
    from pipeline.runs.storage import completed_images

    done = completed_images(config.output, [phase for phase, _ in config.phases()])
    return [r for r in selected.records if r.image_id not in done]


def _warn_relative_output(output: str) -> None:
    """Inside `ray job submit --working-dir`, a relative path lands in a temporary folder."""
    from pipeline.runs.fs import is_uri

    in_submitted_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ  # set by Ray's job supervisor
    if in_submitted_job and not is_uri(output) and not os.path.isabs(output):
        log.warning("--output %s is relative to this job's temporary working directory (%s); use an absolute "
                    "path or an s3:// URI to keep the votes", output, os.path.abspath(output))

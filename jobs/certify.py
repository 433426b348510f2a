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
from contextlib import contextmanager

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
    """The run's lock first (before the settings' checks import scipy, before torch), then the job."""
    from pipeline.runs.claim import claimed_output, claimed_run

    output = claimed_output(args)
    if output is None:  # no --output anywhere: the settings say so, in one line
        load_settings(args)
    with claimed_run(output, "dsmooth certify") as lease:
        outcome = certify(load_settings(args), address=args.address, lease=lease)
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
    labels_from: str | None = None  # unlabelled data: the labels are the classifier's clean predictions

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
        """Fixed n: of the selected images, how many are certified -- the right class (the
        label, or on unlabelled data the clean prediction) with a radius >= 0, as in the
        tables at r = 0 -- and how many are not (abstained, another class) or not finished."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                certificates = self.certificates()
        except Exception:  # noqa: BLE001 - the summary must never fail a finished run
            return ""
        return outcome_counts(certificates, len(self.selected), self.skipped, self.selected, self.mode,
                              self.labels_from)

    def certificates(self, alpha: float | None = None, name: str | None = None):
        """The per-image certificates (`pipeline.reduce.Certificates`) of the images this call
        selected, from the run's votes at `alpha` (default: the run's); the run may hold more.
        `name` labels them (default: the run directory's name)."""
        from pipeline.reduce import load_run

        certificates = load_run(self.output, self.alpha if alpha is None else alpha,
                                name=name or self.output.rstrip("/").rsplit("/", 1)[-1])
        return certificates[certificates["image_id"].isin(set(self.selected))].reset_index(drop=True)

    def table(self) -> str:
        """The accuracy table over every selected image: a sequential run's undecided images
        (in flight when it stopped, or not started) count as not certified, and it says so."""
        try:
            from pipeline.reduce import accuracy_table, render

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                certificates = self.certificates()
                note = ""
                if self.sequential is not None and self.sequential.undecided:
                    certificates = _with_unstarted(certificates, self.selected, self.skipped)
                    note = (f"\n\n{self.sequential.undecided} of {self.sequential.images} images undecided "
                            "(the run stopped before their decision): counted as not certified")
                return render(accuracy_table([certificates]), "markdown") + note
        except Exception as error:  # noqa: BLE001 - the summary must never fail a finished run
            return f"  (no summary table: {error})"


def _with_unstarted(certificates: Any, selected: list[int], skipped: list[dict[str, Any]]) -> Any:
    """`certificates` plus a not-certified row for each selected image without any vote yet."""
    import pandas as pd

    from pipeline.stats.smoothing import ABSTAIN

    missing = sorted(set(selected) - set(certificates["image_id"].tolist()) - {s["image_id"] for s in skipped})
    if not missing:
        return certificates
    extra = pd.DataFrame({"image_id": missing, "label": -1, "predict": ABSTAIN, "p_a_lower": float("nan"),
                          "radius": 0.0, "correct": False, "abstained": True, "time_s": 0.0})
    if "samples" in certificates:
        extra["samples"] = 0
    merged = type(certificates)(pd.concat([pd.DataFrame(certificates), extra], ignore_index=True))
    for name in certificates._metadata:
        setattr(merged, name, getattr(certificates, name, None))
    return merged


def certified_mask(certificates: Any) -> Any:
    """The one meaning of "certified": the right class with a radius >= 0 (`accuracy_table`'s
    r = 0 column counts exactly these)."""
    return (~certificates["abstained"].astype(bool)) & certificates["correct"].astype(bool) & (certificates["radius"].fillna(0.0) >= 0)


def outcome_counts(certificates: Any, selected: int, skipped: list[dict[str, Any]], selected_ids: list[int],
                   mode: str, labels_from: str | None) -> str:
    """The summary line of a fixed-n run (see CertifyOutcome.outcome_line)."""
    done = len(certificates)
    abstained = int(certificates["abstained"].sum()) if done else 0
    right = int(certified_mask(certificates).sum()) if done else 0
    wrong = done - abstained - right
    skipped_n = len({s["image_id"] for s in skipped} & set(selected_ids))
    left = selected - done - skipped_n
    verb = "certified" if mode == "certify" else "predicted correctly"
    which = "agreed with the clean prediction" if labels_from else "the correct class"
    return (f"  outcome: {right} of {selected} images {verb} ({which}), {abstained} abstained, "
            f"{wrong} {'certified' if mode == 'certify' else 'predicted'} another class"
            + (f", {left} not finished: rerun to resume" if left > 0 else ""))


@dataclass
class SequentialSummary:
    """What a sequential run decided for the selected images, and what it cost. "certified"
    has the one meaning (`certified_mask`): a certificate of the right class."""

    radius: float | None
    images: int
    certified: int
    undecided: int
    samples_used: float  # mean per image: samples the decisions rest on
    samples_drawn: float  # mean per image: also those drawn after a decision (in flight then)
    cap: int  # the most samples this run draws per image (n_max, plus n0 when it selects the class)
    mean_radius: float
    drawn_now: int = 0  # samples this invocation drew (a resumed run draws only what is missing)
    labels_from: str | None = None

    @classmethod
    def of(cls, decisions: Any, rows: Any, radius: float | None, cap: int, labels: Any = None,
           labels_from: str | None = None) -> SequentialSummary:
        import numpy as np

        rows = np.asarray(rows, dtype=np.int64)
        used = decisions.samples[rows]
        drawn = used + decisions.unused_samples[rows]
        certified = decisions.certified[rows]
        if labels is not None:  # a certificate of another class certifies nothing about the image
            certified = certified & (decisions.target[rows] == np.asarray(labels, dtype=np.int64)[rows])
        return cls(radius, len(rows), int(certified.sum()), int(decisions.needs_samples[rows].sum()),
                   float(used.mean()) if len(rows) else 0.0, float(drawn.mean()) if len(rows) else 0.0, cap,
                   float(decisions.radius[rows][certified].mean()) if certified.any() else 0.0,
                   labels_from=labels_from)

    def line(self) -> str:
        where = (f"at R = {self.radius:g}" if self.radius is not None
                 else f"(largest-radius mode, mean radius reached {self.mean_radius:.3f})")
        ratio = self.cap / self.samples_drawn if self.samples_drawn else float("inf")
        not_certified = self.images - self.certified - self.undecided
        which = " (agreed with the clean prediction)" if self.labels_from else ""
        text = (f"  sequential: {self.certified} of {self.images} images certified{which} {where}, {not_certified} not "
                f"certified, {self.undecided} undecided; "
                f"{self.samples_drawn:,.0f} samples per image drawn ({self.samples_used:,.0f} used by the decisions) "
                f"vs the run's cap of {self.cap:,}: {ratio:.1f}x fewer")
        if self.undecided:
            text += "; rerun to resume the undecided (counted as not certified in the table)"
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


def prepare(config: Any, classifier: Any = None, classifier_preprocessing: Any = None) -> Prepared:
    """Open the data, select the images and check the models: no Ray, no sampling.
    `classifier`: an nn.Module object standing for config.classifier (Python API);
    `classifier_preprocessing`: an object saying its preprocessing (Python API).
    Unlabelled images are labelled with the classifier's clean-image prediction."""
    from pipeline.certify.clean_labels import label_by_classifier
    from pipeline.models import CheckpointError

    config = _keep_recorded_schedule(config)
    split = config.open_split()
    selected = config.select(split)
    try:
        f, denoiser, info, pair, selected = _check_models(config, selected, classifier, classifier_preprocessing)
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
            classifier: Any = None, classifier_preprocessing: Any = None, lease: Any = None,
            in_process: bool = False) -> CertifyOutcome:
    """Certify (or resume) the images `config` selects; see the module doc. `prepared`:
    `prepare(config)` done already; `classifier`: an nn.Module standing for config.classifier;
    `lease`: the run's lock, already taken by the caller (`run`); `in_process`: count in this
    process, without Ray (`pipeline.certify.inprocess`: the same votes, for small runs,
    notebooks and debuggers).
    The run's lock comes first: a second writer is refused before any data or model is loaded."""
    from contextlib import nullcontext

    from pipeline.runs.claim import claimed_run

    with (nullcontext(lease) if lease is not None else claimed_run(config.output, "dsmooth certify")) as lease:
        prepared = prepared if prepared is not None else prepare(config, classifier, classifier_preprocessing)
        return _certify(prepared.config, address, prepared, lease, in_process)


def _check_models(config, selected, classifier_object=None, preprocessing_object=None):
    """Load f∘D once here, against the data, so a wrong file fails before any actor starts.
    The classifier is any spec (`pipeline.models.sources`), or an nn.Module object."""
    import dataclasses

    from pipeline.certify.pair import ModelBytes, load_pair
    from pipeline.models.sources import ClassifierSpec

    spec = ClassifierSpec.of(config)
    if classifier_object is not None:
        spec = dataclasses.replace(spec, classifier=classifier_object)
    if preprocessing_object is not None:
        spec = dataclasses.replace(spec, preprocessing=preprocessing_object)
    classifier = ModelBytes.classifier(spec)
    selected = _own_labels(config, selected, classifier)
    denoiser = ModelBytes.read_denoiser(config.denoiser) if config.denoiser else None
    pair, info = load_pair(classifier, denoiser, selected.describe(), config.classifier_arch,
                           config.allow_foreign_classifier, sigma=config.sigma, noise=config.noise,
                           allow_foreign_denoiser=config.allow_foreign_denoiser)
    return classifier, denoiser, info, pair, selected


def _own_labels(config, selected, classifier):
    """--labels FILE, or class folders mapped to the model's class names (`pipeline.data.labels`),
    before the models are checked against the data's classes."""
    from pipeline.data.labels import own_labels, read_class_names
    from pipeline.models.sources import is_bundle
    from pipeline.models.sources.bundle import read_bundle

    names = read_class_names(config.class_names) if config.class_names else None
    if names is None and is_bundle(classifier.data):
        names = read_bundle(classifier.data)[0].get("labels")
    return own_labels(selected, names, config.labels)


def _certify(config, address, prepared: Prepared, lease, in_process: bool = False) -> CertifyOutcome:
    """Wire one `CertifyRun`: the model sampler with the fixed or the sequential schedule."""
    from actors.model_sampler import ModelSampler
    from pipeline.certify.run import RunContext
    from pipeline.config import to_dict

    identity = prepared.identity
    speed = {k: v for k, v in to_dict(config).items() if k not in identity and k != "amp"}  # amp: a precision now
    selected = prepared.selected
    labels_from = getattr(selected, "labels_from", None)  # unlabelled data: the classifier's clean predictions
    # The classifier as the user named it (a path, a spec): for humans; the identity holds its content's hash.
    source = {"classifier_source": str(prepared.classifier.source)}
    context = RunContext.open(config.output, identity, {**speed, **source,
                                                        **({"labels_from": labels_from} if labels_from else {})},
                              selected.records, lease, config)
    output = context.output
    started = time.monotonic()
    schedule, summarise = (_sequential_schedule if config.sequential else _fixed_schedule)(config, context, output,
                                                                                       selected)
    run = None
    if schedule is not None:
        _warn_relative_output(config.output)
        sampler_of = _in_process_sampler if in_process else ModelSampler
        with sampler_of(context, selected, prepared.classifier, prepared.denoiser, prepared.info, address,
                        per_chunk=config.sequential) as sampler:
            run = model_run(config, context, sampler, schedule)
            run.run()
    return summarise(CertifyOutcome(str(output), context.image_ids, 0, time.monotonic() - started, config.alpha,
                                    context.skipped, mode=config.mode, labels_from=labels_from), run)


@contextmanager
def _in_process_sampler(context, selected, classifier, denoiser, info, address, per_chunk: bool):
    """The model sampler's counterpart without Ray: the pair counted on this machine's CPU."""
    from types import SimpleNamespace

    from pipeline.certify.inprocess import InProcessSampler
    from pipeline.certify.run import vote_rows_of

    config = context.settings
    counter = config.pair_settings(classifier).counter(classifier, denoiser, info, selected.describe(), "cpu")
    sampler = InProcessSampler(
        context, read=lambda row: selected.by_ids([context.records[row].image_id]).as_uint8()[0],
        count=lambda requests, images: counter.count(requests, images)[0],
        rows=vote_rows_of(context, info, selected.classes, per_chunk))
    sampler.demand = SimpleNamespace(actors=1)  # one "actor": this process
    yield sampler


def model_run(config, context, sampler, schedule, progress: Any = None) -> Any:
    """The `CertifyRun` of a model sampler just started: a fixed run's shards sized for its
    pool, a sequential run's items spread over its calls in flight; votes written in batched
    parts (`pipeline.certify.run.WRITE_EVERY_S`)."""
    from pipeline.certify.run import WRITE_EVERY_S, CertifyRun, item_seconds

    if callable(schedule):  # fixed n: shards sized for the pool just started
        schedule = schedule(sampler.demand.actors)
    else:
        schedule.slots = sampler.slots
        schedule.item_seconds, schedule.least_seconds = item_seconds(sampler.demand.actors)
    return CertifyRun(context, sampler, schedule, label="certify" if config.mode == "certify" else "predict",
                      progress=progress, write_every_s=WRITE_EVERY_S)


def _fixed_schedule(config, context, output, selected):
    """(a FixedSchedule maker or None when nothing is left, the outcome's finisher)."""
    from pipeline.certify.plan import default_shard_size, requests_of
    from pipeline.certify.run import FixedSchedule

    todo = _pending(config, selected)
    log.info("%d images selected from %s, %d already in %s, %d to do",
             len(selected), selected.name, len(selected) - len(todo), output, len(todo))

    def make(actors: int) -> FixedSchedule:
        shard_size = config.shard_size or default_shard_size(config.samples_per_image(), len(todo), actors)
        # A --shard-size given is kept exactly; the default one tapers at the end of the run.
        schedule = FixedSchedule.of(context, todo, shard_size, requests_of(config),
                                    actors=0 if config.shard_size else actors)
        log.info("%d shards of <= %d images, %s samples per image", len(schedule.shards), shard_size,
                 f"{config.samples_per_image():,}")
        return schedule

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
    stored = chunk_votes_from_rows(read_votes(output), rows_of)
    certifier = replay(test, stored, labels=labels, num_images=len(records))
    undecided = int(certifier.decisions().needs_samples.sum())
    log.info("sequential: %d images selected from %s, %d decided by the votes in %s, %d to go (%s)",
             len(records), selected.name, len(records) - undecided, output, undecided, test.describe())
    # Several forward batches per actor call until the actors' rate is known, then about a
    # second of an actor's work (`model_run`): the device stays busy between round trips.
    scheduler = ChunkScheduler(certifier)
    scheduler.resume(stored)  # chunks stored past a lost one are not drawn again (no duplicate rows)
    schedule = SequentialSchedule(scheduler, context.image_ids, config.seed, config.chunk_size,
                                  max(config.batch_size * 4, config.chunk_size))
    def finish(outcome: CertifyOutcome, run: Any) -> CertifyOutcome:
        decisions = certifier.decisions()
        outcome.finished_now = undecided - int(decisions.needs_samples.sum()) - len(context.skipped)
        all_labels = np.array([r.label for r in records], dtype=np.int64)
        cap = test.n_max + (config.n0 if config.certify_class == "top" else 0)
        outcome.sequential = SequentialSummary.of(decisions, np.arange(len(records)), test.radius, cap,
                                                  all_labels, getattr(selected, "labels_from", None))
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

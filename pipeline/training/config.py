"""The `dsmooth train` config: a sweep of sigmas x objectives x archs x surrogate sets.

Every setting is a typed `pipeline.config.Settings` field, declared once with its default,
range and help: the YAML key, the `dsmooth train` flag (`jobs/options.py`) and the
validation message all come from it. Two validation passes, both before any training
starts and both naming the bad field: the models' own validation (types, ranges, and the
cross-field rules in their `model_validator`s) when the config is parsed, and
``check_files``, which loads every classifier the sweep will use and checks it against the
training data, because a surrogate trained on another data set found after an hour of
training is an hour lost.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BeforeValidator, field_validator, model_validator

from pipeline.config import (
    ConfigError,
    NonNegativeFloat,
    NonNegativeInt,
    OptionalPath,
    PositiveFloat,
    PositiveInt,
    Noise,
    Seed,
    Settings,
    Sigma,
    check_value,
    load_config,
    option,
)
from pipeline.settings import ClassifierFlags, DatasetLayout, Precision

# The training objectives by name (their losses: pipeline.training.objectives), declared here so that
# the settings import no torch.
DENOISER_OBJECTIVES: tuple[str, ...] = ("mse", "stab", "stab_mse", "clf")
CLASSIFIER_OBJECTIVES: tuple[str, ...] = ("xent",)
OBJECTIVES: tuple[str, ...] = DENOISER_OBJECTIVES + CLASSIFIER_OBJECTIVES
# Objectives whose loss goes through a classifier (white-box) or surrogates (black-box).
NEEDS_CLASSIFIER: frozenset[str] = frozenset({"stab", "stab_mse", "clf"})
# Objectives that start from a trained MSE denoiser of the same sigma and architecture.
NEEDS_MSE_INIT: frozenset[str] = frozenset({"stab_mse"})

if TYPE_CHECKING:
    from pipeline.data import DataDescription

# Paper settings (Salman et al. 2020 for denoisers, Cohen et al. 2019 for classifiers):
# MSE denoisers Adam 1e-3 with step decay; STAB/CLF Adam (1e-3 from scratch, 1e-5 when
# fine-tuning an MSE denoiser); classifiers SGD 0.1, momentum 0.9, wd 1e-4, x0.1 every 30.
PAPER_OPTIMIZERS: dict[str, dict[str, Any]] = {
    "mse": {"name": "adam", "lr": 1e-3, "momentum": 0.9, "weight_decay": 0.0, "step_size": 30, "gamma": 0.1},
    "stab": {"name": "adam", "lr": 1e-3, "momentum": 0.9, "weight_decay": 0.0, "step_size": 30, "gamma": 0.1},
    "clf": {"name": "adam", "lr": 1e-3, "momentum": 0.9, "weight_decay": 0.0, "step_size": 30, "gamma": 0.1},
    "stab_mse": {"name": "adam", "lr": 1e-5, "momentum": 0.9, "weight_decay": 0.0, "step_size": 30, "gamma": 0.1},
    "xent": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "step_size": 30, "gamma": 0.1},
}
# Epochs: 90 as in both papers; the STAB+MSE fine-tune is shorter (our default).
DEFAULT_EPOCHS: dict[str, int] = {"mse": 90, "stab": 90, "clf": 90, "stab_mse": 30, "xent": 90}
# Global batch sizes per data set (split evenly over the Ray Train workers).
DEFAULT_BATCH_SIZE: dict[str, int] = {"cifar10": 256, "imagenet": 64, "folder": 64}


def _one_or_more(value: Any) -> Any:
    """A single value where a list is expected means a one-element list (`sigmas: 0.25`)."""
    return [value] if value is not None and not isinstance(value, (list, tuple)) else value


Objective = Literal[OBJECTIVES]  # type: ignore[valid-type]
Task = Literal["denoiser", "classifier"]
UseGpu = Literal["auto"] | bool


def _use_gpu(value: Any) -> Any:
    """auto, true or false (YAML booleans, or the words, as typed on a command line)."""
    if isinstance(value, str) and value.strip().lower() in ("auto", "true", "false"):
        word = value.strip().lower()
        return "auto" if word == "auto" else word == "true"
    if isinstance(value, bool):
        return value
    raise ValueError(f"must be auto, true or false, got {value!r}")


class DatasetConfig(Settings):
    """Where the images come from; `max_*` take that many images evenly spread over the
    split (every k-th), so a small run still sees every class of a class-sorted listing."""

    root: Path = option(..., flag="--data-root", metavar="PATH", help="data set folder or archive (required)")
    kind: DatasetLayout = option("cifar10", flag="--dataset")
    train_split: str = option("train", metavar="NAME", help="split to train on")
    test_split: str = option("test", metavar="NAME", help="split evaluated after every epoch (imagenet: test = val)")
    max_train: PositiveInt | None = option(None, metavar="N", help=(
        "training images, taken evenly over the split (default: all)"))
    max_test: PositiveInt | None = option(500, metavar="N", help=(
        "test images evaluated per epoch, taken evenly over the split (empty for all)"))
    image_size: PositiveInt | None = option(None, metavar="PX", help=(
        "resize + center-crop to PX (imagenet default 224; others: as stored)"))
    cache_dir: OptionalPath = option(None, metavar="DIR", help=(
        "where archives are extracted (default $DSMOOTH_CACHE/datasets or ~/.cache/dsmooth/datasets)"))


class OptimizerConfig(Settings):
    """Overrides of the paper's optimizer for one objective; empty fields keep the default."""

    name: Literal["adam", "sgd"] | None = option(None, help="optimizer")
    lr: PositiveFloat | None = option(None, help="learning rate")
    momentum: float | None = option(None, ge=0, lt=1, strict=True, allow_inf_nan=False,
                                    help="SGD momentum, in [0, 1)")
    weight_decay: NonNegativeFloat | None = option(None, help="L2 weight decay")
    step_size: PositiveInt | None = option(None, help="epochs between learning-rate decays (StepLR)")
    gamma: float | None = option(None, gt=0, le=1, strict=True, allow_inf_nan=False,
                                 help="learning-rate decay factor, in (0, 1]")


class ClassifierEntry(ClassifierFlags):
    """A classifier of the sweep given in full: any spec `certify` takes (a checkpoint,
    timm:NAME, a timm or Hugging Face folder, a .pt2 / TorchScript archive, a registry
    name or package.module:callable) with its weights and preprocessing, as in certify's
    flags (classifier_weights, classifier_input_size, ...). A plain string is a spec alone."""

    classifier: str = option(..., metavar="SPEC", help="the classifier spec (see `dsmooth models`)")


def _none_or_text(value: Any) -> Any:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    return str(value) if isinstance(value, Path) else value


def _entry(value: Any) -> Any:
    return {"classifier": str(value)} if isinstance(value, (str, Path)) else value


SurrogateEntry = Annotated[ClassifierEntry, BeforeValidator(_entry)]


class SweepConfig(Settings):
    """The grid: one training run per combination (see pipeline.training.sweep)."""

    # Any noise level is >= 0 (0 = standard classifier training); a denoiser's must be > 0
    # (the `Sigma` type), checked by TrainConfig, which knows the task.
    sigmas: Annotated[list[NonNegativeFloat], BeforeValidator(_one_or_more)] = option(
        ..., metavar="S", help=(
            "noise levels, one run each (> 0 for denoisers; classifiers: >= 0, 0 = standard training)"))
    noises: Annotated[list[Noise], BeforeValidator(_one_or_more)] = option(
        default_factory=lambda: ["gaussian"], metavar="NAME", help=(
            "smoothing noises, one run each: gaussian (l2), uniform or laplace (l1); a model is trained "
            "for one noise, and certify refuses a denoiser trained for another (default: gaussian)"))
    objectives: Annotated[list[Objective], BeforeValidator(_one_or_more)] | None = option(
        None, metavar="NAME", help=(
            f"training objectives, one run each: {', '.join(DENOISER_OBJECTIVES)} for denoisers, "
            f"{', '.join(CLASSIFIER_OBJECTIVES)} for classifiers (default: mse / xent)"))
    archs: Annotated[list[str], BeforeValidator(_one_or_more)] | None = option(
        None, metavar="NAME", help=(
            "architectures, one run each (default: dncnn for denoisers, cifar_resnet110 for "
            "classifiers; see `dsmooth models`)"))
    surrogate_sets: Annotated[
        list[Annotated[list[SurrogateEntry], BeforeValidator(_one_or_more)]], BeforeValidator(_one_or_more)
    ] = option(default_factory=list, cli=False, help=(
        "black-box: sets of frozen surrogate classifiers, one run per set (YAML only); each a spec as "
        "`certify --classifier` takes, or {classifier: SPEC, classifier_weights: FILE, ...}"))

    @field_validator("sigmas")
    @classmethod
    def _some_sigma(cls, value: list[float]) -> list[float]:
        if not value:
            raise ValueError("must list at least one noise level")
        return value

    @field_validator("objectives", "archs")
    @classmethod
    def _not_empty(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("must not be an empty list")
        return value

    @model_validator(mode="after")
    def _sets_not_empty(self) -> SweepConfig:
        for i, surrogates in enumerate(self.surrogate_sets):
            if not surrogates:
                raise ConfigError(f"surrogate_sets[{i}]", "must list at least one classifier checkpoint")
        return self


RUNS = "runs and resources"
OUTPUTS = "outputs"


class TrainConfig(ClassifierFlags):
    """A whole `dsmooth train` job; see examples/train_cifar10_small.yaml."""

    dataset: DatasetConfig = option(..., help="the training and test images")
    sweep: SweepConfig = option(..., help="the grid of runs")
    task: Task = option("denoiser", group="sweep", help="what the sweep trains")
    name: str = option("train", group="sweep", metavar="NAME", help=(
        "prefix of every run's name (letters, digits, '-', '_', '.')"))
    classifier: Annotated[str | None, BeforeValidator(_none_or_text)] = option(
        None, group="sweep", metavar="SPEC", help=(
            "white-box: the classifier to defend (gradients flow through it, it never changes) and to "
            "evaluate classifier∘denoiser with; needed by stab / stab_mse / clf unless sweep.surrogate_sets is "
            "given. Any spec `certify --classifier` takes, completed by --classifier-weights / -input-size / ..."))
    init_checkpoints: Annotated[list[Path], BeforeValidator(_one_or_more)] = option(
        default_factory=list, group="sweep", metavar="CKPT", help=(
            "MSE denoisers that stab_mse runs of the same arch and sigma start from "
            "(default: the sweep trains them first)"))
    optimizer: dict[str, OptimizerConfig] = option(default_factory=dict, cli=False, help=(
        "per objective: overrides of the paper's optimizer (name, lr, momentum, weight_decay, "
        "step_size, gamma; YAML only)"))
    epochs: PositiveInt | None = option(None, group="training", metavar="N", help=(
        "epochs per run (default 90 as in the papers; 30 for stab_mse)"))
    batch_size: PositiveInt | None = option(None, group="training", metavar="N", help=(
        "global batch size, split over the workers (default 256 on CIFAR-10, 64 otherwise)"))
    augment: bool | None = option(None, group="training", strict=True, help=(
        "random crop (CIFAR-10) + flip of training images (default on)"))
    precision: Precision = option("fp32", group="training", help=(
        "arithmetic of the training forward passes: bf16/fp16 autocast with fp32 master weights (fp16 with "
        "a gradient scaler), auto = bf16 where the device has it natively (pays only there: emulated bf16 "
        "is slower), fp32 (default). Part of each run's identity when not fp32"))
    seed: Seed = option(0, group="training", metavar="S", help=(
        "seed of initialisation, batches, noise and augmentation"))
    num_workers: PositiveInt = option(1, group=RUNS, metavar="N", help="Ray Train workers (DDP ranks) per run")
    cpus_per_worker: PositiveFloat = option(1.0, group=RUNS, metavar="C", help="CPUs reserved per worker")
    use_gpu: Annotated[UseGpu, BeforeValidator(_use_gpu)] = option(
        "auto", group=RUNS, help="a GPU per worker: auto = when the Ray cluster has GPUs")
    max_concurrent: NonNegativeInt = option(0, group=RUNS, metavar="N", help=(
        "runs at once (Ray Tune's max_concurrent_trials); 0 = as many as the cluster's CPUs (GPUs) fit"))
    max_failures: int = option(0, group=RUNS, ge=-1, strict=True, metavar="N", help=(
        "restarts of a run from its last checkpoint when a worker (Ray Train) or the run's driver "
        "(Ray Tune trial) fails (-1 = unlimited)"))
    stop_after_epochs: PositiveInt | None = option(None, group=RUNS, metavar="N", help=(
        "train each run at most this many epochs now (rerun to continue)"))
    output_dir: Path = option(Path("runs/train"), group=OUTPUTS, metavar="DIR", help=(
        "<run>/model.pt, metrics.json and grid.png per run; summary.md / summary.csv"))
    storage_path: str | None = option(None, group=OUTPUTS, metavar="PATH", help=(
        "Ray Train checkpoints: a folder or s3://... (default OUTPUT_DIR/checkpoints)"))
    eval_batch_size: PositiveInt = option(256, group=OUTPUTS, metavar="N",
                                          help="batch size of the per-epoch evaluation")
    grid_images: NonNegativeInt = option(8, group=OUTPUTS, metavar="N", help=(
        "images in each run's clean / noisy / denoised grid.png (0 = no grid)"))

    @field_validator("name")
    @classmethod
    def _name_chars(cls, value: str) -> str:
        if not value or any(not (c.isalnum() or c in "-_.") for c in value):
            raise ValueError(f"must be non-empty letters, digits, '-', '_' or '.', got {value!r}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        self._validate_sweep()
        for key in self.optimizer:
            if key not in self.objectives:
                known = ", ".join(self.objectives)
                raise ConfigError(f"optimizer.{key}", f"is not an objective of this sweep ({known})")
        return self

    def _validate_sweep(self) -> None:
        from pipeline.models import model_info

        allowed = DENOISER_OBJECTIVES if self.task == "denoiser" else CLASSIFIER_OBJECTIVES
        for i, objective in enumerate(self.objectives):
            if objective not in allowed:
                raise ConfigError(
                    f"sweep.objectives[{i}]", f"{objective!r} does not train a {self.task}; use one of {list(allowed)}"
                )
        for i, sigma in enumerate(self.sweep.sigmas):
            # The one sigma rule (> 0, <= MAX_SIGMA pixel units); a classifier may train at 0 (no noise).
            if self.task == "denoiser" or sigma != 0:
                try:
                    check_value(Sigma, sigma, "a denoiser's noise level" if self.task == "denoiser" else "a noise level")
                except ValueError as error:
                    raise ConfigError(f"sweep.sigmas[{i}]", str(error)) from None
        for i, arch in enumerate(self.archs):
            try:
                info = model_info(arch)
            except ValueError as error:
                raise ConfigError(f"sweep.archs[{i}]", str(error)) from None
            if info.kind != self.task:
                raise ConfigError(f"sweep.archs[{i}]", f"{arch!r} is a {info.kind}, but task is {self.task!r}")
        flags = [name for name in ClassifierFlags.model_fields if name != "classifier" and getattr(self, name) is not None]
        if self.task == "classifier" and (self.sweep.surrogate_sets or self.classifier or self.init_checkpoints
                                          or flags):
            bad = "sweep.surrogate_sets" if self.sweep.surrogate_sets else (
                "classifier" if self.classifier else "init_checkpoints" if self.init_checkpoints else flags[0])
            raise ConfigError(bad, "only applies to task 'denoiser'")
        if flags and self.classifier is None:
            raise ConfigError(flags[0], "completes the white-box classifier: give classifier too")
        needs = [o for o in self.objectives if o in NEEDS_CLASSIFIER]
        if needs and self.classifier is None and not self.sweep.surrogate_sets:
            raise ConfigError(
                "classifier",
                f"objective {needs[0]!r} needs a classifier to defend (white-box) or "
                "sweep.surrogate_sets (black-box)",
            )
        if self.init_checkpoints and not any(o in NEEDS_MSE_INIT for o in self.objectives):
            raise ConfigError("init_checkpoints", "only used by objective 'stab_mse', which the sweep does not train")

    # -- resolved values -------------------------------------------------------------------

    @property
    def objectives(self) -> list[str]:
        return list(self.sweep.objectives or (["mse"] if self.task == "denoiser" else ["xent"]))

    @property
    def archs(self) -> list[str]:
        return list(self.sweep.archs or (["dncnn"] if self.task == "denoiser" else ["cifar_resnet110"]))

    def hparams(self, objective: str) -> dict[str, Any]:
        """Optimizer, schedule, epochs, batch size and augmentation of one objective's runs."""
        settings = dict(PAPER_OPTIMIZERS[objective])
        override = self.optimizer.get(objective)
        if override is not None:
            settings.update(override.model_dump(exclude_none=True))
        settings["epochs"] = self.epochs or DEFAULT_EPOCHS[objective]
        settings["batch_size"] = self.batch_size or DEFAULT_BATCH_SIZE[self.dataset.kind]
        settings["augment"] = True if self.augment is None else self.augment
        if self.precision != "fp32":  # absent for fp32: runs trained before --precision keep their identity
            settings["precision"] = self.precision
        return settings

    def storage(self) -> str:
        """Where Ray Train keeps checkpoints: as configured, else output_dir/checkpoints."""
        return self.storage_path or str(self.output_dir / "checkpoints")


# -- file checks --------------------------------------------------------------------------


def _is_uri(path: str) -> bool:
    return "://" in path


def resolve_paths(config: TrainConfig, base: Path | None = None) -> TrainConfig:
    """Absolute local paths: Ray Train workers run in their own working directories."""
    base = (base or Path.cwd()).resolve()

    def absolute(p: Path | None) -> Path | None:
        return None if p is None else (base / Path(p).expanduser()).resolve()

    storage = config.storage_path
    if storage and not _is_uri(storage):
        storage = str(absolute(Path(storage)))
    # model_copy(update=...) does not validate: every value below has its field's type already.
    dataset = config.dataset.model_copy(
        update={"root": absolute(config.dataset.root), "cache_dir": absolute(config.dataset.cache_dir)})
    def located(text: str | None) -> str | None:
        """A spec or weights file made absolute when it names a local file or folder;
        timm:NAME, registry names, module:callable and URIs stay as they are."""
        if text is None or _is_uri(text):
            return text
        path = (base / Path(text).expanduser())
        return str(path.resolve()) if path.exists() else text

    def entry(e: ClassifierEntry) -> ClassifierEntry:
        return e.model_copy(update={"classifier": located(e.classifier),
                                    "classifier_weights": located(e.classifier_weights)})

    sweep = config.sweep.model_copy(
        update={"surrogate_sets": [[entry(e) for e in s] for s in config.sweep.surrogate_sets]})
    return config.model_copy(update={
        "dataset": dataset,
        "sweep": sweep,
        "classifier": located(config.classifier),
        "classifier_weights": located(config.classifier_weights),
        "init_checkpoints": [absolute(p) for p in config.init_checkpoints],
        "output_dir": absolute(config.output_dir),
        "storage_path": storage,
    })


def describe_data(dataset: DatasetConfig) -> DataDescription:
    """What a classifier used in training must fit: the training split's data set, classes
    and image size (CIFAR-10 from its spec, without decoding; others from the opened split)."""
    from pipeline.data import CIFAR10, open_dataset

    if dataset.kind == "cifar10":
        return CIFAR10.describe(dataset.image_size)
    opened = open_dataset(dataset.kind, dataset.root, dataset.train_split, image_size=dataset.image_size,
                          cache_dir=dataset.cache_dir)
    if not opened.classes:
        raise ConfigError("dataset.root", f"{dataset.root} has no class sub-folders, so nothing to train on")
    return opened.describe()


def _read_meta(path: Path, field_name: str) -> Any:
    from pipeline.models import ModelMeta, read_checkpoint

    if not path.is_file():
        raise ConfigError(field_name, f"checkpoint {path} does not exist")
    try:
        return ModelMeta.from_dict(read_checkpoint(path)["meta"])
    except (RuntimeError, ValueError, TypeError) as error:
        raise ConfigError(field_name, f"{path} is not a usable dsmooth checkpoint: {error}") from None


def _check_classifier(entry: Any, field_name: str, data: DataDescription) -> None:
    """A classifier spec that loads and fits the training data, checked as `certify` checks
    one (`load_pair`: its kind, classes, label order and input size; one line naming the field).

    Checkpoints that do not record their data set are accepted, as `dsmooth train` always
    did (it has no --allow-foreign-classifier); their classes and input size are still checked."""
    from pipeline.certify.pair import ModelBytes, load_pair
    from pipeline.models import CheckpointError
    from pipeline.models.sources import ClassifierSpec

    try:
        load_pair(ModelBytes.classifier(ClassifierSpec.of(entry)), None, data, allow_foreign_classifier=True)
    except CheckpointError as error:
        raise ConfigError(field_name, str(error)) from None


def check_files(config: TrainConfig) -> None:
    """Every path the sweep reads exists and fits: data set root, classifier, surrogates,
    MSE init checkpoints (their arch and sigma must match a STAB+MSE run of the sweep)."""
    from pipeline.data import DatasetError

    if not Path(config.dataset.root).exists():
        raise ConfigError("dataset.root", f"{config.dataset.root} does not exist")
    try:
        data = describe_data(config.dataset)
    except DatasetError as error:
        raise ConfigError("dataset.root", str(error)) from None
    if config.classifier is not None:
        _check_classifier(config, "classifier", data)
    for i, surrogates in enumerate(config.sweep.surrogate_sets):
        for j, entry in enumerate(surrogates):
            _check_classifier(entry, f"sweep.surrogate_sets[{i}][{j}]", data)
    for i, path in enumerate(config.init_checkpoints):
        meta = _read_meta(path, f"init_checkpoints[{i}]")
        if meta.kind != "denoiser":
            raise ConfigError(f"init_checkpoints[{i}]", f"{path} holds a {meta.kind}, not a denoiser")
        if meta.arch not in config.archs or meta.sigma not in config.sweep.sigmas:
            raise ConfigError(
                f"init_checkpoints[{i}]",
                f"{path} is a {meta.arch} denoiser for sigma={meta.sigma}, which matches no "
                f"STAB+MSE run of the sweep (archs {config.archs}, sigmas {config.sweep.sigmas})",
            )


def load_train_config(
    source: str | Path | dict, overrides: dict | None = None, check: bool = True
) -> TrainConfig:
    """Parse, validate, make paths absolute, and (check=True) open every referenced file."""
    config = resolve_paths(load_config(TrainConfig, source, overrides))
    if check:
        check_files(config)
    return config

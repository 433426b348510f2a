"""The `dsmooth train` config: a sweep of sigmas x objectives x archs x surrogate sets.

Two validation passes, both before any training starts and both naming the bad field:
``TrainConfig.validate`` (run by ``parse_config``) checks values and names; ``check_files``
opens every checkpoint the sweep will use, because a surrogate trained on another data set
found after an hour of training is an hour lost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from pipeline.config import ConfigError, load_config
from pipeline.objectives import (
    CLASSIFIER_OBJECTIVES,
    DENOISER_OBJECTIVES,
    NEEDS_CLASSIFIER,
    NEEDS_MSE_INIT,
    OBJECTIVES,
)

Task = Literal["denoiser", "classifier"]

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


@dataclass
class DatasetConfig:
    """Where the images come from; `max_*` take that many images evenly spread over the
    split (every k-th), so a small run still sees every class of a class-sorted listing."""

    root: Path
    kind: Literal["cifar10", "imagenet", "folder"] = "cifar10"
    train_split: str = "train"
    test_split: str = "test"
    max_train: int | None = None
    max_test: int | None = 500
    image_size: int | None = None
    cache_dir: Path | None = None

    def validate(self) -> None:
        for name in ("max_train", "max_test", "image_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(name, f"must be >= 1 (or empty for all), got {value}")


@dataclass
class OptimizerConfig:
    """Overrides of the paper's optimizer for one objective; empty fields keep the default."""

    name: Literal["adam", "sgd"] | None = None
    lr: float | None = None
    momentum: float | None = None  # SGD only
    weight_decay: float | None = None
    step_size: int | None = None  # epochs between learning-rate decays (StepLR)
    gamma: float | None = None  # decay factor

    def validate(self) -> None:
        if self.lr is not None and not self.lr > 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")
        if self.momentum is not None and not 0 <= self.momentum < 1:
            raise ConfigError("momentum", f"must lie in [0, 1), got {self.momentum}")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise ConfigError("weight_decay", f"must be >= 0, got {self.weight_decay}")
        if self.step_size is not None and self.step_size < 1:
            raise ConfigError("step_size", f"must be >= 1, got {self.step_size}")
        if self.gamma is not None and not 0 < self.gamma <= 1:
            raise ConfigError("gamma", f"must lie in (0, 1], got {self.gamma}")


@dataclass
class SweepConfig:
    """The grid: one training run per combination (see pipeline.training.sweep)."""

    sigmas: list[float]
    objectives: list[str] | None = None  # default: [mse] for denoisers, [xent] for classifiers
    archs: list[str] | None = None  # default: [dncnn] for denoisers, [cifar_resnet110] for classifiers
    surrogate_sets: list[list[Path]] = field(default_factory=list)  # black-box: each set is one run

    def validate(self) -> None:
        if not self.sigmas:
            raise ConfigError("sigmas", "must list at least one noise level")
        for i, sigma in enumerate(self.sigmas):
            if not math.isfinite(sigma):
                raise ConfigError(f"sigmas[{i}]", f"must be a finite number, got {sigma}")
        for name in ("objectives", "archs"):
            values = getattr(self, name)
            if values is not None and not values:
                raise ConfigError(name, "must not be an empty list")
        for i, objective in enumerate(self.objectives or []):
            if objective not in OBJECTIVES:
                raise ConfigError(f"objectives[{i}]", f"{objective!r} is not one of {list(OBJECTIVES)}")
        for i, surrogates in enumerate(self.surrogate_sets):
            if not surrogates:
                raise ConfigError(f"surrogate_sets[{i}]", "must list at least one classifier checkpoint")


@dataclass
class TrainConfig:
    """A whole `dsmooth train` job; see examples/train_cifar10_small.yaml."""

    dataset: DatasetConfig
    sweep: SweepConfig
    task: Task = "denoiser"
    name: str = "train"  # prefix of every run name
    classifier: Path | None = None  # white-box classifier to defend (and to evaluate f∘D with)
    init_checkpoints: list[Path] = field(default_factory=list)  # MSE denoisers STAB+MSE starts from
    optimizer: dict[str, OptimizerConfig] = field(default_factory=dict)  # per objective
    epochs: int | None = None
    batch_size: int | None = None  # global, split over the workers
    augment: bool | None = None  # random crop (CIFAR) + flip; default on
    num_workers: int = 1  # Ray Train workers (DDP ranks) per run
    cpus_per_worker: float = 1.0
    use_gpu: bool | Literal["auto"] = "auto"
    max_concurrent: int = 0  # runs at once; 0 = as many as the cluster's CPUs/GPUs allow
    max_failures: int = 0  # restarts of a run's worker group from its last checkpoint
    stop_after_epochs: int | None = None  # stop each run after this many epochs this time (resumable)
    storage_path: str | None = None  # Ray Train checkpoints: a folder or s3://...; default output_dir/checkpoints
    output_dir: Path = Path("runs/train")
    seed: int = 0
    eval_batch_size: int = 256
    grid_images: int = 8

    def validate(self) -> None:
        if not self.name or any(not (c.isalnum() or c in "-_.") for c in self.name):
            raise ConfigError("name", f"must be non-empty letters, digits, '-', '_' or '.', got {self.name!r}")
        self._validate_sweep()
        for key in self.optimizer:
            if key not in self.objectives:
                known = ", ".join(self.objectives)
                raise ConfigError(f"optimizer.{key}", f"is not an objective of this sweep ({known})")
        for name in ("epochs", "batch_size", "num_workers", "eval_batch_size", "stop_after_epochs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(name, f"must be >= 1, got {value}")
        if self.grid_images < 0:
            raise ConfigError("grid_images", f"must be >= 0, got {self.grid_images}")
        if not self.cpus_per_worker > 0:
            raise ConfigError("cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}")
        if self.max_concurrent < 0:
            raise ConfigError("max_concurrent", f"must be >= 0, got {self.max_concurrent}")
        if self.max_failures < -1:
            raise ConfigError("max_failures", f"must be >= -1 (-1 = unlimited), got {self.max_failures}")
        if self.seed < 0:
            raise ConfigError("seed", f"must be >= 0, got {self.seed}")

    def _validate_sweep(self) -> None:
        from pipeline.models import model_info

        allowed = DENOISER_OBJECTIVES if self.task == "denoiser" else CLASSIFIER_OBJECTIVES
        for i, objective in enumerate(self.objectives):
            if objective not in allowed:
                raise ConfigError(
                    f"sweep.objectives[{i}]", f"{objective!r} does not train a {self.task}; use one of {list(allowed)}"
                )
        for i, sigma in enumerate(self.sweep.sigmas):
            if self.task == "denoiser" and not sigma > 0:
                raise ConfigError(f"sweep.sigmas[{i}]", f"a denoiser's noise level must be > 0, got {sigma}")
            if self.task == "classifier" and sigma < 0:
                raise ConfigError(f"sweep.sigmas[{i}]", f"must be >= 0 (0 = standard training), got {sigma}")
        for i, arch in enumerate(self.archs):
            try:
                info = model_info(arch)
            except ValueError as error:
                raise ConfigError(f"sweep.archs[{i}]", str(error)) from None
            if info.kind != self.task:
                raise ConfigError(f"sweep.archs[{i}]", f"{arch!r} is a {info.kind}, but task is {self.task!r}")
        if self.task == "classifier" and (self.sweep.surrogate_sets or self.classifier or self.init_checkpoints):
            bad = "sweep.surrogate_sets" if self.sweep.surrogate_sets else (
                "classifier" if self.classifier else "init_checkpoints")
            raise ConfigError(bad, "only applies to task 'denoiser'")
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
            settings.update({k: v for k, v in vars(override).items() if v is not None})
        settings["epochs"] = self.epochs or DEFAULT_EPOCHS[objective]
        settings["batch_size"] = self.batch_size or DEFAULT_BATCH_SIZE[self.dataset.kind]
        settings["augment"] = True if self.augment is None else self.augment
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
    dataset = replace(config.dataset, root=absolute(config.dataset.root), cache_dir=absolute(config.dataset.cache_dir))
    sweep = replace(config.sweep, surrogate_sets=[[absolute(p) for p in s] for s in config.sweep.surrogate_sets])
    return replace(
        config,
        dataset=dataset,
        sweep=sweep,
        classifier=absolute(config.classifier),
        init_checkpoints=[absolute(p) for p in config.init_checkpoints],
        output_dir=absolute(config.output_dir),
        storage_path=storage,
    )


def dataset_classes(dataset: DatasetConfig) -> int:
    """Number of classes of the training split, without decoding images where avoidable."""
    from pipeline.data import CIFAR10_CLASSES, open_dataset

    if dataset.kind == "cifar10":
        return len(CIFAR10_CLASSES)
    opened = open_dataset(dataset.kind, dataset.root, dataset.train_split, image_size=dataset.image_size)
    if not opened.classes:
        raise ConfigError("dataset.root", f"{dataset.root} has no class sub-folders, so nothing to train on")
    return len(opened.classes)


def _read_meta(path: Path, field_name: str) -> Any:
    from pipeline.models import ModelMeta, read_checkpoint

    if not path.is_file():
        raise ConfigError(field_name, f"checkpoint {path} does not exist")
    try:
        return ModelMeta.from_dict(read_checkpoint(path)["meta"])
    except (RuntimeError, ValueError, TypeError) as error:
        raise ConfigError(field_name, f"{path} is not a usable dsmooth checkpoint: {error}") from None


def _check_classifier(path: Path, field_name: str, num_classes: int, dataset: str) -> None:
    meta = _read_meta(path, field_name)
    if meta.kind != "classifier":
        raise ConfigError(field_name, f"{path} holds a {meta.kind} ({meta.arch}), not a classifier")
    if meta.num_classes != num_classes:
        raise ConfigError(
            field_name,
            f"{path} is a {meta.num_classes}-class classifier ({meta.arch}, data set {meta.dataset}) "
            f"but data set {dataset} has {num_classes} classes",
        )


def check_files(config: TrainConfig) -> None:
    """Every path the sweep reads exists and fits: data set root, classifier, surrogates,
    MSE init checkpoints (their arch and sigma must match a STAB+MSE run of the sweep)."""
    from pipeline.data import DatasetError

    if not Path(config.dataset.root).exists():
        raise ConfigError("dataset.root", f"{config.dataset.root} does not exist")
    try:
        num_classes = dataset_classes(config.dataset)
    except DatasetError as error:
        raise ConfigError("dataset.root", str(error)) from None
    if config.classifier is not None:
        _check_classifier(config.classifier, "classifier", num_classes, config.dataset.kind)
    for i, surrogates in enumerate(config.sweep.surrogate_sets):
        for j, path in enumerate(surrogates):
            _check_classifier(path, f"sweep.surrogate_sets[{i}][{j}]", num_classes, config.dataset.kind)
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

"""Expand a TrainConfig into runs ("combinations"), named, deduplicated, ordered and staged.

A run's name ends in a hash of everything that changes what it learns (data, arch,
objective, sigma, the *contents* of its classifiers, optimizer, batch size, seed), so a
rerun of the same config finds and resumes the same Ray Train run, and a changed config
starts a new one instead of resuming an incompatible checkpoint. Epochs are left out of
the hash on purpose: raising them continues a finished run.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import to_dict
from pipeline.training.objectives import NEEDS_CLASSIFIER, NEEDS_MSE_INIT
from pipeline.training.config import TrainConfig

MODEL_FILE = "model.pt"
METRICS_FILE = "metrics.json"
GRID_FILE = "grid.png"


@dataclass(frozen=True)
class Combination:
    """One training run of the sweep."""

    name: str
    task: str
    arch: str
    objective: str
    sigma: float
    noise: str = "gaussian"  # the smoothing noise it is trained for (pipeline.sampling.noise)
    surrogates: tuple[str, ...] = ()  # keys of the classifiers in the loss (white-box: the one classifier)
    surrogate_label: str = "-"  # "-" none, "wb:<stem>" white-box, "bb:<stem>+<stem>" black-box
    eval_classifier: str | None = None  # f in "accuracy of f∘D under noise"
    init_checkpoint: str | None = None  # STAB+MSE: the MSE denoiser to start from
    depends_on: str | None = None  # run that must finish first (it produces init_checkpoint)
    hparams: dict[str, Any] = field(default_factory=dict)
    # key -> the ClassifierSpec fields of each classifier above (`pipeline.models.sources`)
    classifier_specs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))


def _sha(path: str | Path, cache: dict[str, str]) -> str:
    from pipeline.models import file_sha256

    key = str(path)
    if key not in cache:
        cache[key] = file_sha256(path)
    return cache[key]


def classifier_key(spec: Any) -> str:
    """How a run names one of its classifiers: the spec itself when nothing completes it (a
    checkpoint's path, as before specs), else the spec with its flags, as JSON."""
    # preprocessing "auto" is the default: left out, so runs named before it existed keep their name.
    fields = {k: v for k, v in asdict(spec).items() if v is not None and not (k == "preprocessing" and v == "auto")}
    return str(spec.classifier) if fields.keys() == {"classifier"} else json.dumps(fields, sort_keys=True, default=list)


def _classifier_sha(spec: Any, cache: dict[str, str]) -> str:
    """SHA-256 of the classifier as certify ships it: a checkpoint's file hash (so run names
    made before specs do not change), a bundle's (weights, preprocessing, kind) otherwise."""
    from pipeline.models.sources import resolve_classifier

    key = classifier_key(spec)
    if key not in cache:
        cache[key] = hashlib.sha256(resolve_classifier(spec).data).hexdigest()
    return cache[key]


def _stem(path: str | Path) -> str:
    name = Path(path).name
    for suffix in (".pt", ".pth", ".tar", ".ckpt"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if name == "model":  # our own outputs are <run name>/model.pt
        name = Path(path).parent.name
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in name) or "clf"
    # Keep both ends: our run names differ in their tails (sigma, hash), others in their heads.
    return safe if len(safe) <= 24 else f"{safe[:12]}~{safe[-11:]}"


def _sigma_text(sigma: float) -> str:
    return f"{sigma:g}"


def _name(config: TrainConfig, objective: str, arch: str, sigma: float, label: str, identity: dict,
          noise: str = "gaussian") -> str:
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:8]
    parts = [config.name, objective, arch, f"s{_sigma_text(sigma)}"]
    if noise != "gaussian":  # Gaussian runs keep the names (and identities) they had before noise kinds
        parts.append(noise)
    if label != "-":
        parts.append(label.replace(":", "-").replace("+", "_")[:40])
    parts.append(digest)
    return "-".join(parts)


def _identity(config: TrainConfig, **run: Any) -> dict[str, Any]:
    dataset = to_dict(config.dataset)
    dataset.pop("cache_dir", None)  # where archives are extracted does not change the pixels
    hparams = dict(run.pop("hparams"))
    hparams.pop("epochs")
    return {"dataset": dataset, "task": config.task, "seed": config.seed, "hparams": hparams, **run}


def plan_sweep(config: TrainConfig) -> list[Combination]:
    """All runs, dependencies before dependants, each run once.

    MSE runs ignore surrogate sets (the loss never sees a classifier), so one MSE denoiser
    per (sigma, arch) serves the whole sweep; STAB+MSE runs start from a matching
    ``init_checkpoints`` entry or else from the sweep's own MSE run, added when missing.
    """
    from pipeline.models import ModelMeta, read_checkpoint
    from pipeline.models.sources import ClassifierSpec

    shas: dict[str, str] = {}
    inits: dict[tuple[str, float, str], str] = {}
    for path in config.init_checkpoints:
        meta = ModelMeta.from_dict(read_checkpoint(path)["meta"])
        inits.setdefault((meta.arch, float(meta.sigma), meta.noise or "gaussian"), str(path))

    specs: dict[str, ClassifierSpec] = {}

    def keyed(spec: ClassifierSpec) -> str:
        specs[classifier_key(spec)] = spec
        return classifier_key(spec)

    if config.sweep.surrogate_sets:
        settings = [
            (tuple(keyed(ClassifierSpec.of(e)) for e in s), "bb:" + "+".join(_stem(e.classifier) for e in s))
            for s in config.sweep.surrogate_sets
        ]
    elif config.classifier is not None:
        settings = [((keyed(ClassifierSpec.of(config)),), "wb:" + _stem(config.classifier))]
    else:
        settings = [((), "-")]
    default_eval = settings[0][0][0] if settings[0][0] else None

    runs: dict[str, Combination] = {}

    def add(objective: str, arch: str, sigma: float, surrogates: tuple[str, ...], label: str,
            init: str | None = None, depends_on: str | None = None) -> Combination:
        noise_part = {"noise": noise} if noise != "gaussian" else {}  # Gaussian identities as before
        hparams = config.hparams(objective)
        eval_classifier = default_eval if config.classifier or not surrogates else surrogates[0]
        if config.task == "classifier":
            eval_classifier = None
        identity = _identity(
            config, arch=arch, objective=objective, sigma=sigma, hparams=hparams,
            surrogates=[_classifier_sha(specs[k], shas) for k in surrogates],
            eval_classifier=_classifier_sha(specs[eval_classifier], shas) if eval_classifier else None,
            init=(depends_on or _sha(init, shas)) if init else None, **noise_part,
        )
        name = _name(config, objective, arch, sigma, label, identity, noise)
        if name not in runs:
            runs[name] = Combination(
                name=name, task=config.task, arch=arch, objective=objective, sigma=float(sigma), noise=noise,
                surrogates=surrogates, surrogate_label=label, eval_classifier=eval_classifier,
                init_checkpoint=init, depends_on=depends_on, hparams=hparams,
                classifier_specs={k: asdict(specs[k]) for k in sorted({*surrogates, *([eval_classifier] or [])} - {None})},
            )
        return runs[name]

    for noise in config.sweep.noises:
        for sigma in config.sweep.sigmas:
            for arch in config.archs:
                for objective in config.objectives:
                    if objective not in NEEDS_CLASSIFIER:
                        add(objective, arch, sigma, (), "-")
                        continue
                    for surrogates, label in settings:
                        if objective not in NEEDS_MSE_INIT:
                            add(objective, arch, sigma, surrogates, label)
                            continue
                        init = inits.get((arch, float(sigma), noise))
                        if init is not None:
                            add(objective, arch, sigma, surrogates, label, init=init)
                            continue
                        mse = add("mse", arch, sigma, (), "-")
                        add(objective, arch, sigma, surrogates, label,
                            init=str(config.output_dir / mse.name / MODEL_FILE), depends_on=mse.name)
    return order(list(runs.values()))


def order(runs: list[Combination]) -> list[Combination]:
    """Stable order with every run after the run it depends on."""
    names = {r.name for r in runs}
    done: set[str] = set()
    ordered: list[Combination] = []
    pending = list(runs)
    while pending:
        ready = [r for r in pending if r.depends_on is None or r.depends_on in done or r.depends_on not in names]
        if not ready:
            raise ValueError(f"circular dependencies among runs: {[r.name for r in pending]}")
        for run in ready:
            ordered.append(run)
            done.add(run.name)
        pending = [r for r in pending if r.name not in done]
    return ordered


def stages(runs: list[Combination]) -> list[list[Combination]]:
    """The runs in dependency stages: stage 0 needs nothing from `runs`, stage k starts from
    a run of stage k-1 (STAB+MSE from its MSE denoiser). Runs of one stage are independent,
    so a stage can run all at once; a run whose dependency is not in `runs` (finished
    before) is in stage 0."""
    depth: dict[str, int] = {}
    for run in order(runs):
        depth[run.name] = depth[run.depends_on] + 1 if run.depends_on in depth else 0
    grouped: list[list[Combination]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
    for run in runs:
        grouped[depth[run.name]].append(run)
    return grouped


def worker_spec(config: TrainConfig, run: Combination) -> dict[str, Any]:
    """Everything a training worker needs, as plain JSON (it also goes into the checkpoint meta)."""
    return {
        "run": run.to_dict(),
        "dataset": to_dict(config.dataset),
        "seed": config.seed,
        "eval_batch_size": config.eval_batch_size,
        "grid_images": config.grid_images,
        "stop_after_epochs": config.stop_after_epochs,
    }


# -- finished runs --------------------------------------------------------------------------


def read_metrics(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's metrics.json, or None when absent or unreadable."""
    path = Path(run_dir) / METRICS_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def finished(run_dir: str | Path, epochs: int) -> dict[str, Any] | None:
    """metrics.json of a run that completed at least `epochs` epochs and left its model file."""
    metrics = read_metrics(run_dir)
    if metrics is None or not (Path(run_dir) / MODEL_FILE).is_file():
        return None
    if not metrics.get("complete") or int(metrics.get("epoch", 0)) < epochs:
        return None
    return metrics


def json_safe(value: Any) -> Any:
    """NaN/inf -> None, recursively, so metrics files are strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value

"""The sweep's runs as Ray Tune trials, each one the driver of a Ray Train TorchTrainer.

Why Tune: it is Ray's own way to run many trainings at once, and what Ray recommends for
Ray Train V2, whose trainers no longer go into a `Tuner` themselves ("Hyperparameter Tuning
with Ray Tune" in Ray's Train docs). A trial runs `train_driver_fn`, which builds one
TorchTrainer and calls fit(); Tune decides how many trials run at once
(`TuneConfig(max_concurrent_trials)`, since a Train driver's own resources are tiny and
do not limit it), places each trial (`tune.with_resources`: a little memory and no CPU,
so that every CPU and GPU stays with the Train workers), restarts a trial whose process
died (`tune.FailureConfig`; Train then resumes from its checkpoints) and carries each
epoch's report from the Train workers to the driver (`TuneReportCallback`, then
`SweepProgress.on_trial_result`). Ray Train does the rest: DDP workers, per-epoch
checkpoints in `storage_path` (a folder or s3://...), restarts of a failed worker group
(`ray.train.FailureConfig`) and, since a run's Train name is the sweep run's name,
resuming it from its last checkpoint when the same sweep is run again after a kill.

What is still by hand (`jobs/train.py`): the stage order. A STAB+MSE run starts from the
MSE denoiser of the same sweep, and a Tune experiment has no dependencies between trials,
so the sweep runs one Tuner per dependency stage (`pipeline.training.sweep.stages`); Tune's
concurrency applies within each stage.

Nothing a run produces travels through Tune but its metrics: the final checkpoint stays in
storage, and the driver reads its files from there with Ray's own `Checkpoint`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ray.tune import Callback

from pipeline.training.loops import REPLAYED, epoch_line
from pipeline.training.sweep import GRID_FILE, METRICS_FILE, MODEL_FILE

log = logging.getLogger("dsmooth.train")

FINAL = "dsmooth_final"  # key of the last result of a trial: how its Train run ended
# What a trial (a Ray Train driver: it starts the run and waits) reserves for itself.
DRIVER_RESOURCES = {"CPU": 0.0, "memory": 256 * 1024**2}


def scaling_config(settings: dict[str, Any]) -> Any:
    """Workers, CPUs (and one GPU each when use_gpu) per run."""
    from ray.train import ScalingConfig

    resources = {"CPU": float(settings["cpus_per_worker"])}
    if settings["use_gpu"]:
        resources["GPU"] = 1.0
    return ScalingConfig(
        num_workers=int(settings["num_workers"]), use_gpu=bool(settings["use_gpu"]), resources_per_worker=resources
    )


def ray_storage(storage: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray's RunConfigs: a local folder as it is; an
    object store (s3://, gs://) through the project's own pyarrow file system
    (`pipeline.runs.fs`: the endpoint of AWS_ENDPOINT_URL_S3, and small files written in one
    request, which S3-compatible servers need; pyarrow's default, which Ray would build from
    the URI, sends even Ray's empty marker files as multipart uploads)."""
    from pipeline.runs.fs import Location, is_uri

    if not is_uri(storage):
        return storage, None
    location = Location.of(storage)
    return location.path, location.fs


def train_driver_fn(
    config: dict[str, Any], specs: dict[str, dict[str, Any]], settings: dict[str, Any]
) -> dict[str, Any]:
    """Tune's trainable: train run `config["run"]` to completion (or stop_after_epochs),
    resuming from its Ray Train checkpoints in storage. Returns the trial's final result;
    a failed run is a result too, so that Tune does not treat it as a crash to retry."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from actors.train_worker import train_loop_per_worker

    spec = specs[config["run"]]
    name = spec["run"]["name"]
    started = time.monotonic()
    storage_path, storage_filesystem = ray_storage(settings["storage_path"])
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=spec,
        scaling_config=scaling_config(settings),
        run_config=ray.train.RunConfig(
            name=name,  # the same name each time the sweep runs: Train resumes from its checkpoints
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=int(settings["max_failures"])),
            callbacks=[TuneReportCallback()],
        ),
    )
    try:
        result = trainer.fit()
    except Exception as error:  # noqa: BLE001 - one failed run must not stop the sweep
        return {FINAL: {"status": "failed", "error": describe_failure(error)[:2000],
                        "details": f"{type(error).__name__}: {error}"[:8000], "wall_s": time.monotonic() - started}}
    if result.checkpoint is None:
        return {FINAL: {"status": "failed", "error": "the run reported no checkpoint",
                        "wall_s": time.monotonic() - started}}
    return {FINAL: {"status": "trained", "checkpoint_path": result.checkpoint.path,
                    "wall_s": time.monotonic() - started}}


def read_checkpoint_files(storage_path: str, checkpoint_path: str) -> dict[str, bytes]:
    """model.pt, metrics.json (and grid.png) of a run's checkpoint (`checkpoint_path` in the
    storage's file system, as Ray Train reports it), read with Ray's own Checkpoint."""
    import pyarrow.fs
    import ray.train

    _, filesystem = ray_storage(storage_path)
    filesystem = filesystem or pyarrow.fs.LocalFileSystem()
    files: dict[str, bytes] = {}
    with ray.train.Checkpoint(checkpoint_path, filesystem=filesystem).as_directory() as folder:
        for file_name in (MODEL_FILE, METRICS_FILE, GRID_FILE):
            path = Path(folder) / file_name
            if path.is_file():
                files[file_name] = path.read_bytes()
    if MODEL_FILE not in files or METRICS_FILE not in files:
        raise FileNotFoundError(f"checkpoint {checkpoint_path} lacks {MODEL_FILE} or {METRICS_FILE}")
    return files


def describe_failure(error: BaseException) -> str:
    """What went wrong, in one line where possible: the first failed worker's own exception
    (`WorkerGroupError.worker_failures`: Ray keeps the original beside a traceback text that
    it may cut), the controller's, or the error itself."""
    failures = getattr(error, "worker_failures", None) or {}
    cause: BaseException | None = None
    prefix = ""
    if failures:
        rank = min(failures)
        cause, prefix = failures[rank], f"worker {rank}: " if len(failures) > 1 else ""
    elif getattr(error, "controller_failure", None) is not None:
        cause = error.controller_failure  # type: ignore[attr-defined]
    cause = getattr(cause, "_base_exc", cause)  # UserExceptionWithTraceback: the user's exception
    if cause is None:
        cause = error
    return f"{prefix}{type(cause).__name__}: {cause}"


class SweepProgress(Callback):
    """Tune callback on the driver: one plain line per run start, epoch, end; each run's
    end handed to `on_end(run name, final result)` as soon as its trial ends."""

    def __init__(self, specs: dict[str, dict[str, Any]], on_end: Callable[[str, dict[str, Any]], None],
                 numbering: Iterator[int], total: int) -> None:
        self.specs, self.on_end, self.numbering, self.total = specs, on_end, numbering, total
        self.last_epoch: dict[str, int] = {}
        self.ended: set[str] = set()

    @staticmethod
    def _name(trial: Any) -> str:
        return str(trial.config["run"])

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run = self.specs[self._name(trial)]["run"]
        log.info("starting %d/%d: %s (%s, %s, sigma %g, surrogates %s)", next(self.numbering), self.total,
                 run["name"], run["objective"], run["arch"], run["sigma"], run["surrogate_label"])

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        log.warning("%s: its Ray Train driver died; Ray Tune restarts it, and training resumes from "
                    "the last checkpoint", self._name(trial))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        name = self._name(trial)
        if FINAL in result or "epoch" not in result or "train_loss" not in result:
            return
        epoch = int(result["epoch"])
        epochs = int(self.specs[name]["run"]["hparams"]["epochs"])
        if result.get(REPLAYED):
            log.info("%s: already trained to epoch %d/%d; collecting its results", name, epoch, epochs)
            return
        if name not in self.last_epoch and epoch > 1:
            log.info("%s: resuming after epoch %d from its checkpoint", name, epoch - 1)
        self.last_epoch[name] = epoch
        log.info("%s", epoch_line(name, result, epochs))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        final = (trial.last_result or {}).get(FINAL) or {
            "status": "failed", "error": "the trial ended without a result"}
        self._end(self._name(trial), final)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        error: Any = None
        try:
            error = trial.get_pickled_error() or trial.get_error()
        except Exception:  # noqa: BLE001 - the error file may be unreadable; say what we know
            pass
        self._end(self._name(trial), {"status": "failed", "error": f"its Ray Tune trial failed: {error or 'unknown error'}"})

    def _end(self, name: str, final: dict[str, Any]) -> None:
        if name in self.ended:
            return
        self.ended.add(name)
        if final.get("status") == "failed":
            log.error("%s: failed: %s", name, final.get("error"))
            if final.get("details"):
                log.debug("%s: %s", name, final["details"])
        self.on_end(name, final)


@contextmanager
def _tune_console(verbose: bool) -> Iterator[None]:
    """Tune's console output only when verbose. Its new output engine prints an experiment
    table even at verbose=0, the legacy one (RAY_AIR_NEW_OUTPUT=0) prints nothing at 0.
    Ctrl-C is left to Python (TUNE_DISABLE_SIGINT_HANDLER): the command stops at once, and
    a rerun resumes from the checkpoints, as after a kill."""
    settings = {"TUNE_DISABLE_SIGINT_HANDLER": "1"}
    if not verbose:
        settings["RAY_AIR_NEW_OUTPUT"] = "0"
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_stage(
    names: list[str],
    specs: dict[str, dict[str, Any]],
    settings: dict[str, Any],
    *,
    experiment: str,
    max_concurrent: int,
    on_end: Callable[[str, dict[str, Any]], None],
    numbering: Iterator[int],
    total: int,
    verbose: bool = False,
) -> None:
    """One Tuner over independent runs: a trial each, at most `max_concurrent` at once;
    `on_end(name, final)` is called on the driver as each run ends (also when it failed)."""
    from ray import tune

    progress = SweepProgress(specs, on_end, numbering, total)
    storage_path, storage_filesystem = ray_storage(settings["storage_path"])
    trainable = tune.with_resources(
        tune.with_parameters(train_driver_fn, specs=specs, settings=settings), DRIVER_RESOURCES)

    def trial_name(trial: Any) -> str:
        return str(trial.config["run"])

    tuner = tune.Tuner(
        trainable,
        param_space={"run": tune.grid_search(list(names))},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=max_concurrent, trial_name_creator=trial_name, trial_dirname_creator=trial_name),
        run_config=tune.RunConfig(
            name=experiment,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=tune.FailureConfig(max_failures=int(settings["max_failures"])),
            callbacks=[progress],
            verbose=None if verbose else 0,
        ),
    )
    with _tune_console(verbose):
        tuner.fit()
    for name in names:  # a trial Tune never ended (it should not happen) is a failed run
        if name not in progress.ended:
            progress._end(name, {"status": "failed", "error": "Ray Tune did not run it"})

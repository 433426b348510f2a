"""Training of denoisers (MSE, STAB, STAB+MSE, CLF; white-box or black-box) and of
classifiers (standard or Gaussian-noise augmented), in plain PyTorch.

Modules:
    config      the `dsmooth train` YAML config, its defaults and validation
    sweep       the sweep's runs: names, deduplication, dependency order and stages, finished runs
    data        uint8 training tensors and on-device augmentation
    objectives  the losses (mse, stab, stab_mse, clf; xent) and the noise they train under
    loops       one run on one data-parallel worker (hooks for Ray Train or a local process)
    evaluation  test MSE / PSNR / accuracy under fixed noise; frozen-classifier digests
    grids       clean / noisy / denoised PNG grids
    summary     the end-of-sweep table
"""

from importlib import import_module
from typing import Any

# Loaded on first use (PEP 562): `pipeline.training.config`, the settings declarations, must
# be importable without torch, so that `dsmooth train --help` answers at once.
_HOME = {
    "DatasetConfig": "config", "OptimizerConfig": "config", "SweepConfig": "config", "TrainConfig": "config",
    "check_files": "config", "load_train_config": "config",
    "WorkerHooks": "loops", "run_local": "loops", "train_run": "loops",
    "Combination": "sweep", "finished": "sweep", "plan_sweep": "sweep", "worker_spec": "sweep",
}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'pipeline.training' has no attribute {name!r}")
    return getattr(import_module(f"pipeline.training.{_HOME[name]}"), name)


__all__ = [
    "Combination",
    "DatasetConfig",
    "OptimizerConfig",
    "SweepConfig",
    "TrainConfig",
    "WorkerHooks",
    "check_files",
    "finished",
    "load_train_config",
    "plan_sweep",
    "run_local",
    "train_run",
    "worker_spec",
]

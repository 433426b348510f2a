"""Training of denoisers (MSE, STAB, STAB+MSE, CLF; white-box or black-box) and of
classifiers (standard or Gaussian-noise augmented), in plain PyTorch.

Modules:
    config      the `dsmooth train` YAML config, its defaults and validation
    sweep       the sweep's runs: names, deduplication, dependency order and stages, finished runs
    data        uint8 training tensors and on-device augmentation
    loops       one run on one data-parallel worker (hooks for Ray Train or a local process)
    evaluation  test MSE / PSNR / accuracy under fixed noise; frozen-classifier digests
    grids       clean / noisy / denoised PNG grids
    summary     the end-of-sweep table
"""

from pipeline.training.config import (
    DatasetConfig,
    OptimizerConfig,
    SweepConfig,
    TrainConfig,
    check_files,
    load_train_config,
)
from pipeline.training.loops import WorkerHooks, run_local, train_run
from pipeline.training.sweep import Combination, finished, plan_sweep, worker_spec

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

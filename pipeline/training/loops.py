"""One training run (denoiser or classifier) on one worker of a data-parallel group.

Plain PyTorch: the distributed layer (actors/train_worker.py for Ray Train, or
``run_local`` here) plugs in through ``WorkerHooks``: rank, device, how to wrap the
model (DDP), how to report an epoch (metrics + checkpoint folder) and which checkpoint
folder to resume from. Each epoch's checkpoint folder holds

    model.pt        the model in the foundation format (pipeline.models.save_checkpoint)
    train_state.pt  epoch, optimizer and LR-schedule state (loads with weights_only=True)
    metrics.json    history of every epoch so far, baseline, summary row, classifier digests
    grid.png        labelled rows of clean / noisy / denoised test images (denoisers)

so a run killed at any point resumes at the epoch after its last checkpoint with the
same optimizer state, noise and data order (all seeded by (seed, epoch, rank)).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from pipeline.training.objectives import NEEDS_CLASSIFIER, add_noise, classifier_loss, denoiser_loss
from pipeline.progress import Progress
from pipeline.sampling.precision import DEFAULT_PRECISION, compute_dtype
from pipeline.training.data import CIFAR_CROP_PADDING, augment, load_split, to_float
from pipeline.training.evaluation import NoisyTestSet, evaluate_classifier, evaluate_denoiser, state_digest
from pipeline.training.grids import denoising_grid, grid_title, save_grid
from pipeline.training.sweep import GRID_FILE, METRICS_FILE, MODEL_FILE, json_safe

STATE_FILE = "train_state.pt"
REPLAYED = "replayed"  # key of a report that repeats the last epoch of a finished run


def _no_report(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
    return None


@dataclass
class WorkerHooks:
    """How a run talks to its distributed environment (defaults: one local process)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    wrap_model: Callable[[nn.Module], nn.Module] = lambda model: model
    report: Callable[[dict[str, Any], Path | None], None] = _no_report  # every rank, every epoch
    restore_dir: Path | None = None  # checkpoint folder to resume from
    stream: TextIO | None = None  # progress and epoch lines (None: sys.stdout)

    def log(self, line: str) -> None:
        """One line of progress, from rank 0 only (every rank runs the same loop)."""
        if self.rank != 0:
            return
        stream = self.stream or sys.stdout
        stream.write(line + "\n")
        stream.flush()


class ClassifierChangedError(RuntimeError):
    """A frozen classifier's weights or BatchNorm statistics changed during training."""


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (SeedSequence: nearby inputs give unrelated seeds)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


def build_optimizer(
    params: Any, hparams: dict[str, Any]
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.StepLR]:
    """Adam or SGD (momentum) with step decay, as in the papers."""
    if hparams["name"] == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=hparams["lr"], momentum=hparams["momentum"], weight_decay=hparams["weight_decay"]
        )
    elif hparams["name"] == "adam":
        optimizer = torch.optim.Adam(params, lr=hparams["lr"], weight_decay=hparams["weight_decay"])
    else:
        raise ValueError(f"unknown optimizer {hparams['name']!r}")
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=hparams["step_size"], gamma=hparams["gamma"])
    return optimizer, scheduler


def load_frozen_classifier(spec: dict[str, Any], device: torch.device) -> nn.Module:
    """A classifier spec's network (any form `certify` takes, `pipeline.models.sources`),
    loaded as certify's actors load it, then frozen (no grads, eval mode that survives
    .train()); its preprocessing is inside it, so gradients flow from its logits to the
    denoiser's [0, 1] output."""
    from pipeline.certify.pair import ModelBytes, load_classifier_source
    from pipeline.models import freeze
    from pipeline.models.sources import ClassifierSpec

    source = ModelBytes.classifier(ClassifierSpec(**spec))
    model = load_classifier_source(source)[0]
    return freeze(model.to(device))


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class RunState:
    """Everything one run holds: data, model, classifiers, optimizer, history."""

    def __init__(self, spec: dict[str, Any], hooks: WorkerHooks) -> None:
        from pipeline.models import build_model, load_checkpoint

        self.spec, self.hooks = spec, hooks
        self.run: dict[str, Any] = spec["run"]
        self.hp: dict[str, Any] = self.run["hparams"]
        self.name: str = self.run["name"]
        self.task: str = self.run["task"]
        self.sigma: float = float(self.run["sigma"])
        self.noise: str = str(self.run.get("noise", "gaussian"))  # the smoothing noise it is trained for
        self.seed: int = int(spec["seed"])
        self.device = hooks.device
        dataset = spec["dataset"]

        torch.manual_seed(self.seed)  # identical initial weights on every rank
        self.train_x, self.train_y, self.num_classes = load_split(dataset, dataset["train_split"], dataset["max_train"])
        self.test_x = self.test_y = None
        if hooks.rank == 0:
            self.test_x, self.test_y, _ = load_split(dataset, dataset["test_split"], dataset["max_test"])

        self.arch_kwargs: dict[str, Any] = {"num_classes": self.num_classes} if self.task == "classifier" else {}
        self.model = build_model(self.run["arch"], **self.arch_kwargs)
        if self.run.get("init_checkpoint") and hooks.restore_dir is None:
            init, _ = load_checkpoint(self.run["init_checkpoint"], arch=self.run["arch"])
            self.model.load_state_dict(init.state_dict())
            hooks.log(f"[{self.name}] starting from {self.run['init_checkpoint']}")
        self.model.to(self.device)

        cache: dict[str, nn.Module] = {}

        specs = self.run.get("classifier_specs") or {}

        def classifier(key: str) -> nn.Module:
            if key not in cache:
                cache[key] = load_frozen_classifier(specs.get(key, {"classifier": key}), self.device)
            return cache[key]

        self.loss_classifiers = (
            [classifier(p) for p in self.run["surrogates"]] if self.run["objective"] in NEEDS_CLASSIFIER else []
        )
        self.eval_classifier = classifier(self.run["eval_classifier"]) if self.run.get("eval_classifier") else None
        self.classifiers = cache
        self.digests = {path: state_digest(model) for path, model in cache.items()}

        self.optimizer, self.scheduler = build_optimizer(self.model.parameters(), self.hp)
        # --precision: autocast of the forward passes over fp32 master weights; fp16 needs a
        # gradient scaler (its small gradients underflow), bf16 has fp32's range.
        self.amp_dtype = compute_dtype(self.hp.get("precision", DEFAULT_PRECISION), self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.start_epoch = 1
        self.history: list[dict[str, Any]] = []
        self.baseline: dict[str, Any] | None = None
        self.sessions: list[dict[str, Any]] = []
        if hooks.restore_dir is not None:
            self._restore(Path(hooks.restore_dir))
        self.session = {"session": uuid.uuid4().hex[:8], "start_epoch": self.start_epoch}
        self.sessions.append(self.session)
        self.net = hooks.wrap_model(self.model)

    def _restore(self, folder: Path) -> None:
        from pipeline.models import load_checkpoint

        restored, _ = load_checkpoint(folder / MODEL_FILE, arch=self.run["arch"])
        self.model.load_state_dict(restored.state_dict())
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.start_epoch = int(state["epoch"]) + 1
        previous = json.loads((folder / METRICS_FILE).read_text())
        self.history = list(previous.get("history", []))
        self.baseline = previous.get("baseline")
        self.sessions = list(previous.get("sessions", []))
        self.hooks.log(f"[{self.name}] resuming after epoch {state['epoch']} from its checkpoint")

    # -- one epoch ---------------------------------------------------------------------------

    def loader(self) -> tuple[DataLoader, DistributedSampler]:
        dataset = TensorDataset(self.train_x, self.train_y)
        sampler = DistributedSampler(
            dataset, num_replicas=self.hooks.world_size, rank=self.hooks.rank, shuffle=True, seed=self.seed
        )
        per_worker = max(1, int(self.hp["batch_size"]) // self.hooks.world_size)
        return DataLoader(dataset, batch_size=per_worker, sampler=sampler), sampler

    def train_epoch(self, epoch: int, loader: DataLoader, sampler: DistributedSampler) -> dict[str, Any]:
        sampler.set_epoch(epoch)
        cpu_gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch, self.hooks.rank, 0))
        noise_gen = torch.Generator(device=self.device).manual_seed(mix_seed(self.seed, epoch, self.hooks.rank, 1))
        pad = CIFAR_CROP_PADDING if self.train_x.shape[-1] <= 64 else 0
        lr = self.optimizer.param_groups[0]["lr"]
        progress = None
        if self.hooks.rank == 0:
            progress = Progress(f"[{self.name}] epoch {epoch}/{self.hp['epochs']}", len(loader),
                                unit="batches", rate_unit="images", every_s=15.0,
                                stream=self.hooks.stream or sys.stdout)
        self.net.train()
        started = time.monotonic()
        loss_sum, seen = 0.0, 0
        for xb, yb in loader:
            x, y = to_float(xb, self.device), yb.to(self.device)
            if self.hp.get("augment"):
                x = augment(x, cpu_gen, pad)
            noisy = add_noise(x, self.sigma, noise_gen, self.noise)
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                if self.task == "classifier":
                    loss = classifier_loss(self.net, noisy, y)
                else:
                    loss = denoiser_loss(self.run["objective"], self.net, x, noisy, y, self.loss_classifiers)
            loss = loss.float()
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()  # the weights and their gradients stay fp32
            self.scaler.step(self.optimizer)
            self.scaler.update()
            loss_sum += float(loss.detach()) * len(y)
            seen += len(y)
            if progress is not None:
                progress.update(1, work=len(y) * self.hooks.world_size)
        self.scheduler.step()
        train_s = time.monotonic() - started
        loss_sum, seen_all = _all_reduce_sum([loss_sum, float(seen)], self.device)
        return {
            "epoch": epoch,
            "train_loss": loss_sum / max(seen_all, 1.0),
            "images_per_s": seen_all / max(train_s, 1e-9),
            "train_s": train_s,
            "lr": lr,
        }

    # -- evaluation (rank 0) -------------------------------------------------------------------

    def evaluate(self) -> dict[str, Any]:
        test = NoisyTestSet(self.test_x, self.test_y, self.sigma, self.seed, int(self.spec["eval_batch_size"]),
                            self.device, self.noise)
        model = _unwrap(self.net)
        if self.task == "classifier":
            result = evaluate_classifier(model, test)
            return {"acc_clean": result["acc_clean"], "acc_noisy_after": result["acc_noisy"],
                    "test_loss": result["test_loss"]}
        if self.baseline is None:
            base = evaluate_denoiser(None, self.eval_classifier, test)
            self.baseline = {"noisy_mse": base["mse"], "noisy_psnr": base["psnr"],
                             "acc_clean": base["acc_clean"], "acc_noisy_before": base["acc"]}
        result = evaluate_denoiser(model, self.eval_classifier, test)
        return {"test_mse": result["mse"], "test_psnr": result["psnr"], "acc_noisy_after": result["acc"]}

    def check_classifiers(self) -> list[dict[str, str]]:
        """Raise if any frozen classifier changed; else their digests for metrics.json."""
        rows = []
        for path, model in self.classifiers.items():
            after = state_digest(model)
            if after != self.digests[path]:
                raise ClassifierChangedError(f"[{self.name}] classifier {path} changed during training")
            rows.append({"path": path, "digest_before": self.digests[path], "digest_after": after})
        return rows

    def summary(self) -> dict[str, Any]:
        """The run's row of the summary table (latest epoch's evaluation)."""
        last = self.history[-1] if self.history else {}
        base = self.baseline or {}
        nan = float("nan")
        return {
            "name": self.name, "task": self.task, "sigma": self.sigma, "objective": self.run["objective"],
            "surrogates": self.run["surrogate_label"], "arch": self.run["arch"],
            "epoch": last.get("epoch", 0), "epochs": int(self.hp["epochs"]),
            "noisy_mse": base.get("noisy_mse", nan), "test_mse": last.get("test_mse", nan),
            "noisy_psnr": base.get("noisy_psnr", nan), "test_psnr": last.get("test_psnr", nan),
            "acc_clean": last.get("acc_clean", base.get("acc_clean", nan)),
            "acc_noisy_before": base.get("acc_noisy_before", nan),
            "acc_noisy_after": last.get("acc_noisy_after", nan),
            "train_s": sum(float(h.get("epoch_s", 0.0)) for h in self.history),
        }

    def write_checkpoint(self, epoch: int, classifiers: list[dict[str, str]]) -> Path:
        """A fresh folder with model.pt, train_state.pt, metrics.json and grid.png."""
        from pipeline.models import ModelMeta, save_checkpoint

        folder = Path(tempfile.mkdtemp(prefix=f"dsmooth-{self.name[:40]}-e{epoch}-"))
        complete = epoch >= int(self.hp["epochs"])
        summary = json_safe(self.summary())
        meta = ModelMeta(
            arch=self.run["arch"], kind=self.task, dataset=self.spec["dataset"]["kind"],
            num_classes=self.num_classes if self.task == "classifier" else None,
            sigma=self.sigma, noise=self.noise, objective=self.run["objective"], config=json_safe(self.spec),
            arch_kwargs=self.arch_kwargs,
            extra={"epoch": epoch, "complete": complete, "metrics": summary,
                   "surrogates": list(self.run["surrogates"]), "init_checkpoint": self.run.get("init_checkpoint")},
        )
        save_checkpoint(folder / MODEL_FILE, self.model, meta)
        torch.save({"epoch": epoch, "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict()}, folder / STATE_FILE)
        record = {
            "name": self.name, "run": self.run, "epoch": epoch, "epochs": int(self.hp["epochs"]),
            "complete": complete, "summary": summary, "baseline": self.baseline, "history": self.history,
            "sessions": self.sessions, "classifiers": classifiers,
        }
        (folder / METRICS_FILE).write_text(json.dumps(json_safe(record), indent=2))
        count = min(int(self.spec.get("grid_images", 0)), len(self.test_x))
        if self.task == "denoiser" and count > 0:
            tiles = denoising_grid(_unwrap(self.net), self.test_x, self.sigma, self.seed, count, self.device,
                                   self.noise)
            headline, detail = grid_title(self.run, self.spec["dataset"]["kind"], epoch, int(self.hp["epochs"]))
            save_grid(tiles, count, folder / GRID_FILE, self.sigma, headline, detail)
        return folder


def epoch_line(name: str, m: dict[str, Any], epochs: int) -> str:
    """`[run] epoch 3/10 | loss ... | test MSE ... | PSNR ... | acc under noise ...`: one epoch's
    report (the worker's, or the same metrics as they reach the driver through Ray Tune)."""

    def pct(v: Any) -> str:
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}%"

    parts = [f"[{name}] epoch {m['epoch']}/{epochs}", f"loss {m['train_loss']:.5f}",
             f"{m['images_per_s']:,.0f} img/s", f"lr {m['lr']:.2g}"]
    if "test_mse" in m:
        parts.append(f"test MSE {m['test_mse']:.5f} (noisy {m.get('noisy_mse', float('nan')):.5f})")
        parts.append(f"PSNR {m['test_psnr']:.2f} dB")
        parts.append(f"acc under noise {pct(m.get('acc_noisy_before'))} -> {pct(m.get('acc_noisy_after'))}")
    else:
        parts.append(f"acc clean {pct(m.get('acc_clean'))}, noisy {pct(m.get('acc_noisy_after'))}")
    parts.append(f"{m['epoch_s']:.1f}s")
    return " | ".join(parts)


def train_run(spec: dict[str, Any], hooks: WorkerHooks | None = None) -> dict[str, Any] | None:
    """Train one run to spec["run"]["hparams"]["epochs"] (or stop_after_epochs this time),
    reporting every epoch; returns the summary row on rank 0 (None on other ranks)."""
    hooks = hooks or WorkerHooks()
    state = RunState(spec, hooks)
    epochs = int(state.hp["epochs"])
    stop_after = spec.get("stop_after_epochs")
    if state.start_epoch > epochs:
        _report_again(state)
        return state.summary() if hooks.rank == 0 else None

    loader, sampler = state.loader()
    for count, epoch in enumerate(range(state.start_epoch, epochs + 1)):
        if stop_after is not None and count >= int(stop_after):
            hooks.log(f"[{state.name}] stopping after {count} epoch(s) as asked (stop_after_epochs); rerun to resume")
            break
        started = time.monotonic()
        metrics = state.train_epoch(epoch, loader, sampler)
        folder = None
        if hooks.rank == 0:
            metrics.update(state.evaluate())
            metrics.update({k: v for k, v in (state.baseline or {}).items() if k not in metrics})
            metrics["epoch_s"] = time.monotonic() - started
            metrics["session"] = state.session["session"]
            state.history.append(json_safe(metrics))
            classifiers = state.check_classifiers()
            folder = state.write_checkpoint(epoch, classifiers)
            hooks.log(epoch_line(state.name, metrics, epochs))
        try:
            hooks.report(json_safe({k: v for k, v in metrics.items() if k != "session"}), folder)
        finally:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
    return state.summary() if hooks.rank == 0 else None


def _report_again(state: RunState) -> None:
    """Nothing left to train (the run finished before): re-report the last checkpoint so
    the caller's result points at it."""
    folder = None
    if state.hooks.rank == 0 and state.hooks.restore_dir is not None:
        folder = Path(tempfile.mkdtemp(prefix="dsmooth-final-"))
        shutil.copytree(state.hooks.restore_dir, folder, dirs_exist_ok=True)
    try:
        last = state.history[-1] if state.history else {}
        metrics = {k: v for k, v in last.items() if k != "session"}
        metrics[REPLAYED] = True  # no epoch was trained: the driver does not log it as one
        state.hooks.report(json_safe(metrics), folder)
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


# -- without Ray ------------------------------------------------------------------------------


def latest_checkpoint(storage: Path) -> Path | None:
    """Newest epoch folder written by run_local."""
    folders = sorted(storage.glob("epoch_*"))
    return folders[-1] if folders else None


def run_local(spec: dict[str, Any], storage: str | Path, device: str = "cpu") -> dict[str, Any] | None:
    """One process, no Ray: the same run, checkpoints in storage/epoch_NNNN (resumes from
    the newest). For debugging and for checking a loop without a cluster."""
    storage = Path(storage)

    def report(metrics: dict[str, Any], folder: Path | None) -> None:
        if folder is not None:
            target = storage / f"epoch_{int(metrics.get('epoch', 0)):04d}"
            shutil.copytree(folder, target, dirs_exist_ok=True)

    hooks = WorkerHooks(device=torch.device(device), report=report, restore_dir=latest_checkpoint(storage))
    return train_run(spec, hooks)

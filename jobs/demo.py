"""Show the paper's claim in minutes: a denoiser makes a non-robust classifier certifiably robust.

Certifies the shipped CIFAR-10 test sample (pipeline/assets/cifar10-sample) at sigma = 0.25
with the shipped standard-trained ResNet-20 four ways -- no denoiser, an MSE denoiser, a
STAB+MSE denoiser trained through the classifier (white-box), and a STAB+MSE denoiser
trained only through a *different* surrogate classifier (black-box) -- on a local Ray (or
--address), then prints the certified-accuracy table in the paper's style and writes a
certified-accuracy-vs-radius plot and a denoising example grid. `--diffusion` adds a fifth
way: the shipped small DDPM as a one-shot diffusion denoiser (Carlini et al., 2023), one model
for every sigma, trained for neither this classifier nor this sigma.

Every run is an ordinary `dsmooth certify` run directory under --output: rerunning the
demo certifies only the selected images without votes there (--images may change; --alpha,
--batch and --actors too), and `dsmooth reduce OUTPUT/* --alpha A` re-reduces the
votes. Other --n0 or --n than the runs there are refused in one line, before Ray starts,
naming the options; --fresh starts over.
The models are reproduced by examples/demo/train_all.sh."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pipeline
from jobs.ray_env import add_ray_arguments

log = logging.getLogger("dsmooth")

ASSETS = Path(pipeline.__file__).resolve().parent / "assets"
SAMPLE = ASSETS / "cifar10-sample"
MODELS = ASSETS / "models" / "cifar10"
SIGMA = 0.25
RADII = [0.0, 0.25, 0.5, 0.75]


@dataclass(frozen=True)
class Setting:
    slug: str
    label: str
    denoiser: str | None  # file name under MODELS


SETTINGS = [
    Setting("no_denoiser", "no denoiser", None),
    Setting("mse", "MSE denoiser", "denoiser_mse_s0.25.pt"),
    Setting("stab_mse_whitebox", "STAB+MSE (white-box)", "denoiser_stab_mse_s0.25.pt"),
    Setting("stab_mse_blackbox", "STAB+MSE (black-box, surrogate)", "denoiser_blackbox_s0.25.pt"),
]
# --diffusion: diffusion denoised smoothing (Carlini et al., 2023) with the shipped small DDPM,
# one-shot: one model for every sigma, never trained for this classifier or this sigma.
DIFFUSION = Setting("ddpm_one_shot", "small DDPM, one-shot (off the shelf)", "ddpm_small")


# --noise uniform: l1 certificates (Yang et al., 2020) with the classifier alone and behind the
# small MSE denoiser trained for uniform noise (examples/demo/denoiser_mse_uniform.yaml).
UNIFORM_SETTINGS = [
    Setting("no_denoiser", "no denoiser", None),
    Setting("mse", "MSE denoiser (trained for uniform noise)", "denoiser_mse_uniform_s0.25.pt"),
]
# The l1 radii shown under uniform noise: lambda = 2 sigma = 0.5 bounds every l1 radius.
UNIFORM_RADII = [0.0, 0.1, 0.2, 0.3, 0.4]


def demo_settings(args: Any) -> list[Setting]:
    if getattr(args, "noise", "gaussian") != "gaussian":
        if getattr(args, "diffusion", False):
            raise ValueError("--diffusion serves Gaussian noise only (its DDPM was trained for it); drop it "
                             "or --noise")
        return UNIFORM_SETTINGS
    return SETTINGS + ([DIFFUSION] if getattr(args, "diffusion", False) else [])


def run_folder(output: Path, setting: Setting, noise: str = "gaussian") -> Path:
    """A row's run directory: OUTPUT/<slug>, OUTPUT/<slug>-<noise> for a non-Gaussian noise (the
    two noises never share a run)."""
    return output / (setting.slug if noise == "gaussian" else f"{setting.slug}-{noise}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from jobs.options import add_settings_arguments
    from pipeline.command_settings import DemoSettings

    add_settings_arguments(parser, DemoSettings)
    add_ray_arguments(parser)


def option_of() -> dict[str, str]:
    """`dsmooth certify` setting -> the demo flag that sets it, so that a setting's error, or
    a conflict with an earlier run, names the option the user typed (from the declarations)."""
    from jobs.options import flags
    from pipeline.command_settings import DemoSettings

    known = flags(DemoSettings)
    return {**{k: v for k, v in known.items() if k in ("n0", "n", "alpha", "batch_size", "precision", "actors",
                                                                "output")},
            "ids": known["images"]}


def demo_options(args: argparse.Namespace) -> Any:
    """DemoSettings from the command line (errors name the flag), with the Ray address."""
    from jobs.options import load_settings
    from pipeline.command_settings import DemoSettings

    if isinstance(args, DemoSettings):
        return args
    return load_settings(DemoSettings, args)


def run(args: argparse.Namespace) -> int:
    from jobs import certify
    from actors.ray_env import connect

    address, args = args.address, demo_options(args)
    sample, plans = _prepare(args)  # every option checked, models loaded: no Ray yet
    log.info("demo: %d CIFAR-10 test images, sigma=%g, n0=%d, n=%d, alpha=%g; %d settings; output in %s",
             args.images, SIGMA, args.n0, args.n, args.alpha, len(demo_settings(args)), args.output)
    if args.fresh:
        _remove_runs(args.output)
    # Ray only when some image lacks votes: a rerun with fewer images just reports.
    started_here = connect(address) if args.fresh or any(p.pending() for p in plans) else False
    try:
        outcomes = []
        for setting, prepared in zip(demo_settings(args), plans):
            outcome = certify.certify(prepared.config, address, prepared=prepared)
            # One line per setting that did work: the one table and its notes come at the end.
            if outcome.finished_now or outcome.skipped:
                log.info("%s: %d of %d images finished now (%.0fs)%s", setting.label, outcome.finished_now,
                         len(outcome.selected), outcome.seconds,
                         f", {len(outcome.skipped)} unreadable skipped" if outcome.skipped else "")
            outcomes.append(outcome)
    finally:
        if started_here:
            import ray

            ray.shutdown()
    table = _report(args, outcomes)
    suffix = "" if args.noise == "gaussian" else f"_{args.noise}"
    _denoising_grid(sample, args.output / f"denoising{suffix}.png", demo_settings(args), noise=args.noise)
    print(f"\nvotes (Parquet): {args.output}/<setting>/votes/   plot: {args.output}/certified_accuracy{suffix}.png   "
          f"denoising examples: {args.output}/denoising{suffix}.png")
    folders = " ".join(str(run_folder(args.output, s, args.noise)) for s in demo_settings(args))
    radii = " ".join(f"{r:g}" for r in (RADII if args.noise == "gaussian" else UNIFORM_RADII))
    print(f"resume: rerun this command with the same --output; re-reduce at another alpha: "
          f"dsmooth reduce {folders} --alpha 0.01 --radii {radii}")
    return 0 if len(table) else 1


def demo_ids(sample: Any, images: int) -> list[int]:
    """Every k-th image of the class-sorted sample, k = len // images: each class covered.
    A rerun with another --images certifies only the images of its selection that lack votes."""
    skip = len(sample) // images
    return [record.image_id for record in sample.subset(skip, skip * images).records]


def _prepare(args: Any) -> tuple[Any, list[Any]]:
    """Check every option and each run's fit with what --output already holds, and load
    the models -- all before Ray starts, so a bad or conflicting option costs seconds."""
    from jobs import certify
    from pipeline.certify.config import CertifyConfig
    from pipeline.config import ConfigError, parse_config
    from pipeline.data import open_dataset
    from pipeline.runs.fs import Location
    from pipeline.runs.fs import check_writable

    args = demo_options(args)
    sample = open_dataset("cifar10", SAMPLE, "test")
    if not 1 <= args.images <= len(sample):
        raise ValueError(f"--images must lie in [1, {len(sample)}], got {args.images}")
    missing = [s.denoiser for s in demo_settings(args) if s.denoiser and not (MODELS / s.denoiser).exists()]
    if not (MODELS / "classifier.pt").is_file() or missing:
        raise FileNotFoundError(f"demo models missing in {MODELS} ({missing or 'classifier.pt'}); "
                                "run examples/demo/train_all.sh to make them")
    ids = demo_ids(sample, args.images)
    plans = []
    for setting in demo_settings(args):
        values = {
            "dataset": "cifar10", "data_root": str(SAMPLE), "split": "test", "ids": ids,
            "classifier": str(MODELS / "classifier.pt"),
            "denoiser": str(MODELS / setting.denoiser) if setting.denoiser else None,
            "sigma": SIGMA, "n0": args.n0, "n": args.n, "alpha": args.alpha, "batch_size": args.batch_size,
            "precision": args.precision, "actors": args.actors,
            "output": str(run_folder(args.output, setting, args.noise)), "noise": args.noise,
        }
        try:
            config = parse_config(CertifyConfig, values)
        except ConfigError as error:
            raise error.with_flag(option_of().get(error.field.split("[")[0])) from None
        check_writable(Location.of(config.output))
        plans.append(certify.prepare(config))
    if not args.fresh:
        _refuse_conflicts(args, plans)
    return sample, plans


def _refuse_conflicts(args: argparse.Namespace, plans: list[Any]) -> None:
    """One line naming the options that differ from the runs under --output, and the way out."""
    from pipeline.errors import Refused

    differences: dict[str, tuple[Any, Any]] = {}
    for prepared in plans:
        differences.update(prepared.conflicts())
    if not differences:
        return
    known = option_of()
    options = [(flag, *differences[key]) for key, flag in known.items() if key in differences]
    others = [key for key in differences if key not in known]
    fresh = f"add --fresh to start over, or use another --output than {args.output}"
    if options and not others:
        made = " ".join(f"{flag} {old}" for flag, old, _ in options)
        now = " ".join(f"{flag} {new}" for flag, _, new in options)
        raise Refused(f"{args.output} holds demo runs made with {made} (now {now}): rerun with {made} to reuse "
                      f"their votes, or {fresh}")
    raise Refused(f"{args.output} holds demo runs made with other models or data ({', '.join(sorted(differences))} "
                  f"differ): {fresh}")


def _remove_runs(output: Path) -> None:
    """--fresh: delete the demo's own run directories (a folder without a run record is kept)."""
    import shutil

    from pipeline.runs.storage import RUN_FILE

    folders = [output / s.slug for s in SETTINGS + [DIFFUSION]]
    folders += [run_folder(output, s, "uniform") for s in UNIFORM_SETTINGS]
    for folder in folders:
        if (folder / RUN_FILE).is_file():
            log.info("--fresh: removing %s", folder)
            shutil.rmtree(folder)


def _report(args: argparse.Namespace, outcomes: list[Any]):
    """Print the table (clean accuracy, then certified accuracy per certifiable radius) of the
    images this run selected (the runs may hold more, from earlier runs); write it as
    markdown and CSV, and the accuracy plot titled from the runs' records."""
    from pipeline.reduce import accuracy_table, plot_certified_accuracy, render

    inputs = [outcome.certificates(args.alpha, name=s.label) for s, outcome in zip(demo_settings(args), outcomes)]
    gaussian = args.noise == "gaussian"
    table = accuracy_table(inputs, RADII if gaussian else UNIFORM_RADII)
    markdown = render(table, "markdown")
    noise = "" if gaussian else f", {args.noise} noise (certified ℓ1 radii)"
    print(f"\nCertified accuracy on {args.images} CIFAR-10 test images, sigma={SIGMA}{noise}, n={args.n}, "
          f"alpha={args.alpha} (ResNet-20 trained without noise):\n")
    print(markdown)
    suffix = "" if gaussian else f"_{args.noise}"
    (args.output / f"table{suffix}.md").write_text(markdown + "\n")
    (args.output / f"table{suffix}.csv").write_text(render(table, "csv"))
    plot_certified_accuracy(inputs, args.output / f"certified_accuracy{suffix}.png",
                            title="CIFAR-10 sample: ResNet-20 trained without noise, alone and behind each denoiser"
                            + ("" if gaussian else f" ({args.noise} noise, ℓ1)"))
    return table


def _denoising_grid(sample, path: Path, settings: list[Setting] = SETTINGS, count: int = 8, noise: str = "gaussian"):
    """Rows: clean, noisy, then each denoiser's output (as the paper's Figure 5), each row
    labelled, so a reader can tell the noisy input from each denoiser. Returns the figure
    it wrote."""
    import torch

    from pipeline.figures import image_grid, save_png
    from pipeline.certify.pair import ModelBytes, load_from_bytes
    from pipeline.models import load_checkpoint
    from pipeline.sampling.noise import Chunk, chunk_noise

    positions = range(0, len(sample), max(1, len(sample) // count))[:count]
    clean = torch.stack([sample[i][1] for i in positions])
    noisy = clean + chunk_noise(Chunk(0, 0, "prediction", 0, len(clean)), tuple(clean.shape[1:]), SIGMA, noise=noise)
    rows = [("clean", clean), (f"noisy σ={SIGMA:g}", noisy.clamp(0, 1))]
    trained = []  # each denoiser with its own sigma, so none is read against another's
    with torch.inference_mode():
        for setting in settings[1:]:
            denoiser, meta = load_from_bytes(ModelBytes.read_denoiser(MODELS / setting.denoiser))
            if meta.sigma_independent:  # a diffusion model: sigma picks its timestep
                denoiser.set_sigma(SIGMA)
            rows.append((setting.label, denoiser.eval()(noisy).clamp(0, 1)))
            trained.append(f"{meta.arch} (any σ, diffusion)" if meta.sigma_independent
                           else f"{meta.arch} (trained at σ = {meta.sigma:g})")
    _, classifier = load_checkpoint(MODELS / "classifier.pt")
    figure = image_grid(
        [(label, images.numpy()) for label, images in rows],
        f"CIFAR-10 test images under {noise.capitalize()} noise σ = {SIGMA:g}, and each denoiser's output",
        f"denoisers: {', '.join(dict.fromkeys(trained))}; the {classifier.arch} classifier sees the denoised rows",
    )
    save_png(figure, path)
    return figure

"""Show the paper's claim in minutes: a denoiser makes a non-robust classifier certifiably robust.

Certifies the shipped CIFAR-10 test sample (pipeline/assets/cifar10-sample) at sigma = 0.25
with the shipped standard-trained ResNet-20 four ways -- no denoiser, an MSE denoiser, a
STAB+MSE denoiser trained through the classifier (white-box), and a STAB+MSE denoiser
trained only through a *different* surrogate classifier (black-box) -- on a local Ray (or
--address), then prints the certified-accuracy table in the paper's style and writes a
certified-accuracy-vs-radius plot and a denoising example grid.

Every run is an ordinary `dsmooth certify` run directory under --output: rerunning the
demo resumes what is missing, and `dsmooth reduce OUTPUT/* --alpha A` re-reduces the votes.
The models are reproduced by examples/demo/train_all.sh."""

from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path

import pipeline
from jobs.ray_env import add_ray_arguments

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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=100,
                        help="test images to certify, spread over the 10 classes (max 500; default 100)")
    parser.add_argument("--n0", type=int, default=20, help="selection samples per image (default 20)")
    parser.add_argument("--n", type=int, default=400,
                        help="estimation samples per image (default 400; the paper uses 10,000-100,000). "
                        "No radius above 0.25*Phi^-1(alpha^(1/n)) can be certified, so n caps the radii: "
                        "the table leaves out the radii beyond it and says so, the plot marks it")
    parser.add_argument("--alpha", type=float, default=0.001, help="failure probability (default 0.001)")
    parser.add_argument("--batch", type=int, default=400, help="noisy samples per forward pass (default 400)")
    parser.add_argument("--actors", type=int, default=None, help="certification actors (default: one per CPU)")
    parser.add_argument("--output", type=Path, default=Path("runs/demo"), help="where runs, table and plots go")
    add_ray_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from jobs.ray_env import connect
    from pipeline.data import open_dataset

    sample = open_dataset("cifar10", SAMPLE, "test")
    if not 1 <= args.images <= len(sample):
        raise ValueError(f"--images must lie in [1, {len(sample)}], got {args.images}")
    skip = len(sample) // args.images  # class-sorted listing: a stride covers every class
    missing = [s.denoiser for s in SETTINGS if s.denoiser and not (MODELS / s.denoiser).is_file()]
    if not (MODELS / "classifier.pt").is_file() or missing:
        raise FileNotFoundError(f"demo models missing in {MODELS} ({missing or 'classifier.pt'}); "
                                "run examples/demo/train_all.sh to make them")
    print(f"dsmooth demo: {args.images} CIFAR-10 test images, sigma={SIGMA}, n0={args.n0}, n={args.n}, "
          f"alpha={args.alpha}; {len(SETTINGS)} settings; output in {args.output}", file=sys.stderr)
    connect(args.address)
    for setting in SETTINGS:
        print(f"\n== {setting.label} ==", file=sys.stderr)
        with contextlib.redirect_stdout(sys.stderr):  # stdout keeps only the final table
            status = _certify(setting, args, skip)
        if status != 0:
            return status
    table = _report(args)
    _denoising_grid(sample, args.output / "denoising.png")
    print(f"\nvotes (Parquet): {args.output}/<setting>/votes/   plot: {args.output}/certified_accuracy.png   "
          f"denoising examples: {args.output}/denoising.png")
    print(f"resume: rerun this command with the same --output; re-reduce at another alpha: "
          f"dsmooth reduce {args.output}/* --alpha 0.01 --radii 0 0.25 0.5 0.75")
    return 0 if len(table) else 1


def _certify(setting: Setting, args: argparse.Namespace, skip: int) -> int:
    from jobs import certify

    parser = argparse.ArgumentParser(prog="dsmooth certify")
    certify.add_arguments(parser)
    argv = [
        "--dataset", "cifar10", "--data-root", str(SAMPLE), "--split", "test",
        "--skip", str(skip), "--max", str(skip * args.images),
        "--classifier", str(MODELS / "classifier.pt"),
        "--denoiser", str(MODELS / setting.denoiser) if setting.denoiser else "none",
        "--sigma", str(SIGMA), "--n0", str(args.n0), "--n", str(args.n), "--alpha", str(args.alpha),
        "--batch", str(args.batch), "--output", str(args.output / setting.slug),
    ]
    if args.actors:
        argv += ["--actors", str(args.actors)]
    return certify.run(parser.parse_args(argv))


def _report(args: argparse.Namespace):
    """Print the table (clean accuracy, then certified accuracy per certifiable radius);
    write it as markdown and CSV, and the accuracy plot titled from the runs' records."""
    from pipeline.reduce import accuracy_table, load_run, plot_certified_accuracy, render

    inputs = [load_run(args.output / s.slug, args.alpha, name=s.label) for s in SETTINGS]
    table = accuracy_table(inputs, RADII)
    markdown = render(table, "markdown")
    print(f"\nCertified accuracy on {args.images} CIFAR-10 test images, sigma={SIGMA}, n={args.n}, "
          f"alpha={args.alpha} (ResNet-20 trained without noise):\n")
    print(markdown)
    (args.output / "table.md").write_text(markdown + "\n")
    (args.output / "table.csv").write_text(render(table, "csv"))
    plot_certified_accuracy(inputs, args.output / "certified_accuracy.png",
                            title="CIFAR-10 sample: ResNet-20 trained without noise, alone and behind each denoiser")
    return table


def _denoising_grid(sample, path: Path, count: int = 8):
    """Rows: clean, noisy, then each denoiser's output (as the paper's Figure 5), each row
    labelled, so a reader can tell the noisy input from each denoiser. Returns the figure
    it wrote."""
    import torch

    from pipeline.figures import image_grid, save_png
    from pipeline.models import load_checkpoint
    from pipeline.noise import Chunk, chunk_noise

    positions = range(0, len(sample), max(1, len(sample) // count))[:count]
    clean = torch.stack([sample[i][1] for i in positions])
    noisy = clean + chunk_noise(Chunk(0, 0, "prediction", 0, len(clean)), tuple(clean.shape[1:]), SIGMA)
    rows = [("clean", clean), (f"noisy σ={SIGMA:g}", noisy.clamp(0, 1))]
    archs, sigmas = [], []
    with torch.inference_mode():
        for setting in SETTINGS[1:]:
            denoiser, meta = load_checkpoint(MODELS / setting.denoiser)
            rows.append((setting.label, denoiser.eval()(noisy).clamp(0, 1)))
            archs.append(meta.arch)
            sigmas.append(f"{meta.sigma:g}")
    _, classifier = load_checkpoint(MODELS / "classifier.pt")
    figure = image_grid(
        [(label, images.numpy()) for label, images in rows],
        f"CIFAR-10 test images under Gaussian noise σ = {SIGMA:g}, and each denoiser's output",
        f"denoisers: {', '.join(dict.fromkeys(archs))}, trained at σ = {', '.join(dict.fromkeys(sigmas))}; "
        f"the {classifier.arch} classifier sees the denoised rows",
    )
    save_png(figure, path)
    return figure

"""Accuracy under noise of a classifier with and without a diffusion denoiser in front.

Why: the figure that says whether one-shot diffusion denoising helps a standard-trained
classifier (the premise of Carlini et al. 2023) before paying for a certification run. The
denoiser is named by its path exactly as `dsmooth certify --denoiser` names it; the noise is
seeded, so a rerun prints the same table. Also prints PSNR of the denoised images.

  python examples/diffusion/evaluate.py --denoiser pipeline/assets/models/cifar10/ddpm_small \\
      --classifier pipeline/assets/models/cifar10/classifier.pt --skip 25 --sigmas 0.12,0.25,0.5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

import torch  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--denoiser", required=True, help="diffusers folder, guided-diffusion .pt or dsmooth checkpoint")
    p.add_argument("--classifier", default="pipeline/assets/models/cifar10/classifier.pt")
    p.add_argument("--data-root", default="../shared/data/cifar10-jpeg.tar.gz")
    p.add_argument("--skip", type=int, default=25, help="every skip-th CIFAR-10 test image (25: 400 images)")
    p.add_argument("--sigmas", default="0.12,0.25,0.5")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, help="also write the figures here")
    return p.parse_args(argv)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over images of 10·log10(1 / MSE), pixels in [0, 1]."""
    mse = ((a.clamp(0, 1) - b) ** 2).flatten(1).mean(1)
    return float((10 * torch.log10(1 / mse)).mean())


def main(argv: list[str] | None = None) -> int:
    from pipeline.data import open_dataset
    from pipeline.certify.pair import ModelBytes, load_pair

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    data = open_dataset("cifar10", args.data_root, "test").subset(skip=args.skip)
    images = torch.stack([data.load(i) for i in range(len(data))])
    labels = torch.as_tensor(data.labels())
    classifier, denoiser = ModelBytes.read(args.classifier), ModelBytes.read_denoiser(args.denoiser)
    rows = []
    print(f"{len(data)} CIFAR-10 test images | denoiser {args.denoiser} | classifier {args.classifier}")
    print("| sigma | t* | accuracy without | accuracy with | PSNR noisy | PSNR denoised | denoiser ms/image |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for sigma in (float(s) for s in args.sigmas.split(",")):
        pair, _ = load_pair(classifier, denoiser, data.describe(), sigma=sigma)
        noisy = images + sigma * torch.randn(images.shape, generator=torch.Generator().manual_seed(args.seed))
        with torch.inference_mode():
            started = time.process_time()
            denoised = torch.cat([pair.denoiser(b) for b in noisy.split(100)])
            ms = 1000 * (time.process_time() - started) / len(images)
            plain = torch.cat([pair.classifier(b) for b in noisy.split(100)]).argmax(1)
            cleaned = torch.cat([pair.classifier(b) for b in denoised.split(100)]).argmax(1)
        row = {"sigma": sigma, "t": pair.denoiser.timesteps[0],
               "accuracy_without": float((plain == labels).float().mean()),
               "accuracy_with": float((cleaned == labels).float().mean()),
               "psnr_noisy": psnr(noisy, images), "psnr_denoised": psnr(denoised, images), "cpu_ms_per_image": ms}
        rows.append(row)
        print(f"| {sigma:g} | {row['t']} | {100 * row['accuracy_without']:.1f} % | {100 * row['accuracy_with']:.1f} % "
              f"| {row['psnr_noisy']:.1f} dB | {row['psnr_denoised']:.1f} dB | {ms:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"images": len(data), "seed": args.seed, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Convert a diffusion model into a dsmooth denoiser checkpoint (.pt), once.

SOURCE is a local Hugging Face diffusers folder (UNet2DModel + scheduler config) or an
improved/guided-diffusion state dict (e.g. cifar10_uncond_50M_500K.pt,
256x256_diffusion_uncond.pt; other configs need their training flags in SOURCE.yaml).
`dsmooth certify --denoiser SOURCE` does the same conversion in memory, so this is only
needed to ship one file, to skip the conversion on every run, or for --steps: the written
file is byte for byte what naming SOURCE gives (with --steps 1), so runs resume across both.

examples:
  dsmooth convert-diffusion ~/models/ddpm-cifar10-32 ddpm-cifar10.pt
  dsmooth convert-diffusion 256x256_diffusion_uncond.pt guided-256-5steps.pt --steps 5"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", type=Path, help="diffusers folder or improved/guided-diffusion .pt")
    parser.add_argument("output", type=Path, help="dsmooth checkpoint to write")
    parser.add_argument("--steps", type=int, default=1, help=(
        "reverse steps from t* to 0: 1 = one-shot denoising (the paper's main method); more = "
        "deterministic multi-step (DDIM, eta=0), each step one more network evaluation"))


def run(args: argparse.Namespace) -> int:
    import hashlib

    from pipeline.runs.fs import atomic_open
    from pipeline.models import CheckpointError
    from pipeline.models.diffusion.convert import read_diffusion_source

    if args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    try:
        data = read_diffusion_source(args.source, steps=args.steps)
    except CheckpointError as error:
        raise ValueError(str(error)) from None
    if data is None:
        raise ValueError(f"{args.source}: neither a diffusers folder nor an improved/guided-diffusion checkpoint")
    with atomic_open(args.output, "wb") as handle:
        handle.write(data)
    print(f"{args.output}  sha256 {hashlib.sha256(data).hexdigest()}  ({len(data) / 2**20:.1f} MiB)")
    return 0

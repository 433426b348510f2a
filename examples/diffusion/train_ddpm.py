"""Train a small CIFAR-10 DDPM on a CPU, for one-shot diffusion denoised smoothing.

Why this exists: the diffusion denoiser (Carlini et al. 2023) takes any ε-prediction DDPM;
the published ones are 50M-550M parameters, too big to ship or test with. This trains a
tiny `diffusers` UNet2DModel with the standard DDPM objective (linear β schedule, 1000
steps, ε prediction) and diffusers' own training utilities (DDPMScheduler.add_noise,
EMAModel, cosine LR schedule), on the project's CIFAR-10 loader, for a bounded time.

One-shot denoising at σ ≤ 0.5 only uses timesteps with ᾱ_t ≥ 0.5 (t ≲ 170 here), so
timesteps are drawn from [0, --low-t-max) with probability --low-t-fraction and uniformly
from [0, 1000) otherwise: the model stays a DDPM usable at any t, but spends most of a short
CPU budget where denoised smoothing needs it. For the same reason it trains on random 16×16
patches (--crop): the UNet is convolutional, a step costs a quarter, and denoising at low
noise is local. One torch thread: on a busy 2-core machine it does the most per CPU-second.

The result is a diffusers folder (UNet config + safetensors, scheduler config, a model card
whose `datasets:` names CIFAR-10) that `dsmooth certify --denoiser FOLDER` reads, plus
`training.json` (settings, steps done, loss curve). Stopping at --steps (not --minutes)
with the same --lr-horizon makes a run reproducible on the same machine and thread count:
the shipped model's training.json says which, e.g. `--minutes 0 --steps N --lr-horizon H`.

  python examples/diffusion/train_ddpm.py --data-root ../shared/data/cifar10-jpeg.tar.gz \\
      --output pipeline/assets/models/cifar10/ddpm_small --minutes 40
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402

log = logging.getLogger("train_ddpm")

MODEL_CARD = """---
library_name: diffusers
pipeline_tag: unconditional-image-generation
datasets:
- cifar10
tags:
- ddpm
- dsmooth
---
# Small CIFAR-10 DDPM (dsmooth)

A {params:,}-parameter `UNet2DModel` trained by `examples/diffusion/train_ddpm.py` for
{steps:,} steps (batch {batch}) on the CIFAR-10 training set, DDPM objective (ε prediction,
linear β schedule, 1000 steps), timesteps biased towards low noise, on random {crop}x{crop} patches. Made to be used as a
one-shot denoiser for diffusion denoised smoothing at σ ≤ 0.5; its samples are poor.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default="../shared/data/cifar10-jpeg.tar.gz")
    p.add_argument("--output", required=True, help="diffusers folder to write (overwritten)")
    p.add_argument("--minutes", type=float, default=40.0, help="wall-clock budget (0: none)")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps (0: until --minutes)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--lr-horizon", type=int, default=0,
                   help="steps of the cosine LR decay (0: --steps, or the steps --minutes allows, "
                   "estimated at step 50; recorded in training.json)")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--channels", default="32,32,64", help="block_out_channels")
    p.add_argument("--attention", action="store_true", help="self-attention at the lowest resolution")
    p.add_argument("--norm-groups", type=int, default=8)
    p.add_argument("--layers-per-block", type=int, default=1)
    p.add_argument("--low-t-fraction", type=float, default=0.8)
    p.add_argument("--low-t-max", type=int, default=250)
    p.add_argument("--crop", type=int, default=16,
                   help="train on random CROPxCROP patches (0: whole images); the UNet is convolutional")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is the most work per CPU-second on a busy 2-core machine)")
    p.add_argument("--save-every", type=float, default=5.0, help="minutes between saves")
    return p.parse_args(argv)


def build_unet(channels: tuple[int, ...], layers_per_block: int, attention: bool = False, groups: int = 8):
    """Tiny UNet2DModel; attention (optional) only at the lowest resolution, where it is cheap.
    Without it one-shot denoising at low noise loses little and a CPU step costs a third less."""
    from diffusers import UNet2DModel

    last = "AttnDownBlock2D" if attention else "DownBlock2D"
    downs = ["DownBlock2D"] * (len(channels) - 1) + [last]
    ups = [last.replace("Down", "Up")] + ["UpBlock2D"] * (len(channels) - 1)
    return UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=channels,
        layers_per_block=layers_per_block, down_block_types=tuple(downs), up_block_types=tuple(ups),
        norm_num_groups=groups, attention_head_dim=channels[-1],
    )


def sample_timesteps(n: int, args: argparse.Namespace, total: int, generator: torch.Generator) -> torch.Tensor:
    """Mixture: uniform on [0, low_t_max) with prob low_t_fraction, else uniform on [0, total)."""
    low = torch.randint(0, args.low_t_max, (n,), generator=generator)
    anywhere = torch.randint(0, total, (n,), generator=generator)
    pick_low = torch.rand(n, generator=generator) < args.low_t_fraction
    return torch.where(pick_low, low, anywhere)


def random_crops(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """A random size×size patch of each image: 4× cheaper steps at 16 of 32 pixels, and
    denoising at the low noise levels used here is local, so the full-size model loses little."""
    if not size or size >= x.shape[-1]:
        return x
    n = x.shape[0]
    offsets = torch.randint(0, x.shape[-1] - size + 1, (n, 2), generator=generator)
    span = torch.arange(size)
    rows = (offsets[:, 0, None] + span)[:, None, :, None]
    cols = (offsets[:, 1, None] + span)[:, None, None, :]
    return x[torch.arange(n)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None], rows, cols]


def load_train_images(root: str) -> torch.Tensor:
    """The 50,000 CIFAR-10 training images as uint8 [N, 3, 32, 32]."""
    from pipeline.data import open_dataset

    images = open_dataset("cifar10", root, "train", labels=False).as_uint8()
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()


def save(unet, ema, scheduler, output: Path, record: dict) -> None:
    """EMA weights as a diffusers folder, beside the scheduler config, card and record."""
    ema.store(unet.parameters())
    ema.copy_to(unet.parameters())
    output.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(output)
    ema.restore(unet.parameters())
    scheduler.save_pretrained(output)
    params = sum(p.numel() for p in unet.parameters())
    (output / "README.md").write_text(
        MODEL_CARD.format(params=params, steps=record["steps_done"], batch=record["settings"]["batch_size"],
                          crop=record["settings"]["crop"] or 32))
    (output / "training.json").write_text(json.dumps(record, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    images = load_train_images(args.data_root)
    channels = tuple(int(c) for c in args.channels.split(","))
    unet = build_unet(channels, args.layers_per_block, args.attention, args.norm_groups)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    ema = EMAModel(unet.parameters(), decay=args.ema_decay, use_ema_warmup=True, power=2 / 3)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    planned = args.steps or 10**9
    # Cosine decay over the planned steps; with a time budget, over an estimate refined below.
    estimate = args.lr_horizon or args.steps or 2000
    lr_schedule = get_cosine_schedule_with_warmup(optimizer, args.warmup, estimate)
    params = sum(p.numel() for p in unet.parameters())
    log.info("UNet2DModel %s params, %d training images", f"{params:,}", len(images))
    record = {"settings": vars(args), "parameters": params, "steps_done": 0, "lr_horizon": estimate,
              "loss": [], "seconds": 0.0}
    output = Path(args.output)
    started = last_save = time.monotonic()
    running, step = 0.0, 0
    unet.train()
    while step < planned:
        elapsed = time.monotonic() - started
        if args.minutes and elapsed > args.minutes * 60:
            break
        index = torch.randint(0, len(images), (args.batch_size,), generator=generator)
        x0 = random_crops(images[index], args.crop, generator).float() / 127.5 - 1.0
        flip = torch.rand(args.batch_size, generator=generator) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(3), x0)
        noise = torch.randn(x0.shape, generator=generator)
        t = sample_timesteps(args.batch_size, args, scheduler.config.num_train_timesteps, generator)
        xt = scheduler.add_noise(x0, noise, t)
        loss = torch.nn.functional.mse_loss(unet(xt, t).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        ema.step(unet.parameters())
        step += 1
        running += loss.item()
        if step == 50 and not (args.lr_horizon or args.steps) and args.minutes:
            # Steps the budget allows at the speed measured so far: the cosine ends there.
            rate = step / (time.monotonic() - started)
            estimate = max(args.warmup + 1, int(rate * args.minutes * 60))
            lr_schedule = get_cosine_schedule_with_warmup(optimizer, args.warmup, estimate, last_epoch=step - 1)
            log.info("about %d steps fit in %.0f minutes", estimate, args.minutes)
            record["lr_horizon"] = estimate
        if step % 50 == 0:
            record["loss"].append([step, running / 50])
            log.info("step %d loss %.4f lr %.2e", step, running / 50, lr_schedule.get_last_lr()[0])
            running = 0.0
        if time.monotonic() - last_save > args.save_every * 60:
            record.update(steps_done=step, seconds=time.monotonic() - started)
            save(unet, ema, scheduler, output, record)
            last_save = time.monotonic()
    record.update(steps_done=step, seconds=time.monotonic() - started)
    save(unet, ema, scheduler, output, record)
    log.info("saved %s after %d steps (%.0f s)", output, step, record["seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tiny random stand-ins, in the formats of the diffusion-denoised-smoothing recipe
(examples/certify_imagenet_diffusion_beit.yaml), built with the libraries' public functions only:

    OUT/diffusion/   a diffusers folder: UNet2DModel + DDPMScheduler (`save_pretrained`)
    OUT/classifier/  a timm folder: config.json + model.safetensors (`timm.models.save_for_hf`)

They let you run the recipe's command end to end (wiring, formats, run directory) before you
download the real weights; their certificates mean nothing. Needs the `diffusion` and `timm`
extras (`dev` has both).

    python examples/diffusion/make_standins.py --output standins
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def make(output: Path, image_size: int = 64, seed: int = 0) -> dict[str, Path]:
    import timm
    from diffusers import DDPMScheduler, UNet2DModel
    from timm.models import save_for_hf

    torch.manual_seed(seed)
    diffusion, classifier = output / "diffusion", output / "classifier"
    unet = UNet2DModel(sample_size=image_size, block_out_channels=(16, 16), layers_per_block=1, norm_num_groups=8,
                       add_attention=False, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    unet.save_pretrained(diffusion)
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").save_pretrained(diffusion)
    net = timm.create_model("test_resnet", pretrained=False, num_classes=1000).eval()
    save_for_hf(net, classifier, safe_serialization=True)
    return {"diffusion": diffusion, "classifier": classifier}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("standins"))
    parser.add_argument("--image-size", type=int, default=64, help="the UNet's sample size (default 64)")
    args = parser.parse_args()
    for name, path in make(args.output, args.image_size).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()

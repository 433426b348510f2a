"""List the architectures in dsmooth's model registry.

Denoisers (DnCNN, DnCNN-wide, MemNet, a small DnCNN for CPU demos; diffusers_unet and
guided_unet are diffusion models, made by naming a diffusers folder or an improved/guided-
diffusion checkpoint as the denoiser) and classifiers (CIFAR ResNets, WRN-28-10, and any
torchvision ImageNet model by name, weights from a local file), then the forms a classifier
may be given in (timm, Hugging Face, torch.export, TorchScript, a factory...)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kind", choices=["denoiser", "classifier"], help="only this kind")


def run(args: argparse.Namespace) -> int:
    from pipeline.models import list_models, model_info

    print(f"{'name':24s} {'kind':11s} dataset")
    for name in list_models(kind=args.kind, include_families=False):
        info = model_info(name)
        print(f"{name:24s} {info.kind:11s} {info.dataset or '-'}")
    print("\n(any torchvision classification model name also works, e.g. resnet50; weights from a local file)")
    if args.kind in (None, "classifier"):
        from pipeline.models.sources import FORMS

        print("\nclassifier forms (--classifier SPEC; preprocessing runs inside f, after noise and denoiser):")
        for name, usage, what in FORMS:
            print(f"  {name:13s} {usage:40s} {what}")
    return 0

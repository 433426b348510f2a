"""f∘D samples/s of one ResNet-50 given in three classifier forms (`certify_throughput.py --forms`).

The same weights as a torchvision name with a local file (`resnet50 --classifier-weights`),
as a timm spec (`timm:resnet50`, the same state-dict keys; timm's own preprocessing, which
at 224 px data is the ImageNet mean/std only) and as a torch.export `.pt2` archive (mean/std
by flags). Each goes through `ModelBytes.classifier` + `PairCounter` as an actor does, and the
forms are timed interleaved (A, B, C, C, B, A, ...) so machine load hits them alike. The
preprocessing adapter runs in the batch on the device, and `optimize_for_inference` gives
every form the same program (BatchNorm folded -- at the aten level inside an archive -- and
residual additions in place, which fx tracing had made out-of-place for the nn.Module forms
only), so the forms should differ by noise alone.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _files(folder: Path, size: int) -> dict[str, dict]:
    import torchvision

    from pipeline.data.specs import IMAGENET

    torch.manual_seed(0)
    net = torchvision.models.resnet50(weights=None).eval()
    torch.save(net.state_dict(), folder / "resnet50.pth")
    example = torch.rand(2, 3, size, size)
    program = torch.export.export(net, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},))
    torch.export.save(program, folder / "resnet50.pt2")
    norm = dict(mean=list(IMAGENET.mean), std=list(IMAGENET.std))
    return {
        "torchvision name": dict(classifier="resnet50", weights=str(folder / "resnet50.pth")),
        "timm spec": dict(classifier="timm:resnet50", weights=str(folder / "resnet50.pth")),
        ".pt2 archive": dict(classifier=str(folder / "resnet50.pt2"), **norm),
    }


def run(args) -> int:
    from pipeline.certify.pair import ModelBytes, PairCounter, load_pair
    from pipeline.data.specs import DataDescription
    from pipeline.models.sources import ClassifierSpec
    from pipeline.sampling.noise import SampleRequest

    torch.set_num_threads(args.threads)
    size = args.image_size or 224
    data = DataDescription(None, None, (size, size))
    rng = np.random.default_rng(0)
    images = {i: rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for i in range(args.images)}
    requests = [SampleRequest(0, i, "estimation", args.n, 256) for i in images]
    samples = args.n * args.images
    with tempfile.TemporaryDirectory(prefix="dsmooth-forms-") as tmp:
        counters = {}
        for name, spec in _files(Path(tmp), size).items():
            source = ModelBytes.classifier(ClassifierSpec(**spec))
            _, info = load_pair(source, None, data, allow_foreign_classifier=True)  # a raw state dict
            counters[name] = PairCounter(source, None, info, data, sigma=args.sigma, batch_size=args.batch,
                                         allow_foreign_classifier=True,
                                         device=args.device,
                                         precision="fp16" if args.amp and args.device.startswith("cuda") else "fp32",
                                         optimize=not args.no_optimize)
            counters[name].count(requests[:1], images)  # warm-up
        device = torch.device(args.device)
        print(f"device {device.type}{'' if device.type == 'cuda' else f' ({args.threads} threads)'} | ResNet-50 "
              f"at {size} px, classifier alone | {args.images} images x n {args.n} = {samples:,} samples per "
              f"repetition | batch {args.batch}", flush=True)
        rates: dict[str, list[float]] = {name: [] for name in counters}
        for rep in range(args.reps):
            order = list(counters) if rep % 2 == 0 else list(reversed(counters))
            for name in order:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
                counters[name].count(requests, images)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                rates[name].append(samples / (time.perf_counter() - started))
            print(f"rep {rep + 1}: " + ", ".join(f"{n} {rates[n][-1]:,.1f}" for n in counters) + " samples/s",
                  flush=True)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    best = max(medians.values())
    for name, value in medians.items():
        print(f"{name:18s} {value:>10,.1f} samples/s  ({value / best:.3f} of the fastest)")
    print(f"spread between forms: {100 * (best - min(medians.values())) / best:.1f}%")
    return 0

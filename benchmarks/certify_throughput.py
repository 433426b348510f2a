"""Noisy samples per second: dsmooth's engine vs the reference implementation's sampling loop.

Both certify the same images with the same model, n0 and n, side by side in one run, with
interleaved repetitions (reference, engine, reference, engine, ...) so that machine load
hits both alike. Each method lives in its own worker process, so its peak memory is its
own: torch.cuda.max_memory_allocated on GPU, the process's peak RSS (ru_maxrss) on CPU.

reference  Cohen et al.'s core.py `Smooth._sample_noise`, verbatim in substance: one image
           repeated `batch` times per forward pass (so every image ends on a short batch),
           `torch.randn_like(batch) * sigma`, fp32, `torch.no_grad`, predictions
           `.argmax(1)` moved to the CPU and counted with numpy per batch (`_count_arr`).
engine     pipeline.sampling.engine.VoteCounter on pipeline.sampling.engine.optimize_for_inference(model):
           samples of several images share forward batches, noise is written into a reused
           buffer, votes are counted on the device, torch.inference_mode, BatchNorm folded
           into the convolutions, channels-last memory, and mixed precision with --amp (GPU).

With --vs-denoiser NAME the two methods are both the engine, with the --model pair and
with NAME in front of the same classifier instead: samples/s of each and the cost of one
sample relative to NAME (e.g. a diffusion denoiser against DnCNN, as Carlini et al.'s
one-shot denoising is priced against Salman et al.'s trained denoisers). A denoiser in
--model may be a registry name or a path: a dsmooth checkpoint, a diffusers folder or an
improved/guided-diffusion checkpoint (given --sigma, as `dsmooth certify` gives it).

Imports only torch and pipeline.* (no Ray), so it runs on any machine with the project.

examples:
  python benchmarks/certify_throughput.py                       # CPU, small models
  python benchmarks/certify_throughput.py --device cuda --model dncnn+cifar_resnet110 \\
      --n 10000 --images 8 --amp
  python benchmarks/certify_throughput.py --model pipeline/assets/models/cifar10/ddpm_small+cifar_resnet20 \\
      --vs-denoiser dncnn
  python benchmarks/certify_throughput.py --forms --n 200 --images 2 --batch 50   # classifier forms
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402


# --------------------------------------------------------------------------- the two methods


def reference_sample_noise(model, x: torch.Tensor, num: int, batch_size: int, sigma: float, num_classes: int):
    """Cohen et al.'s `_sample_noise` (core.py), with its `_count_arr`."""
    with torch.no_grad():
        counts = np.zeros(num_classes, dtype=int)
        for _ in range(math.ceil(num / batch_size)):
            this_batch_size = min(batch_size, num)
            num -= this_batch_size
            batch = x.repeat((this_batch_size, 1, 1, 1))
            noise = torch.randn_like(batch, device=x.device) * sigma
            predictions = model(batch + noise).argmax(1)
            counts += _count_arr(predictions.cpu().numpy(), num_classes)
        return counts


def _count_arr(arr: np.ndarray, length: int) -> np.ndarray:
    counts = np.zeros(length, dtype=int)
    for idx in arr:
        counts[idx] += 1
    return counts


class Reference:
    def __init__(self, model, sigma: float, num_classes: int, batch: int) -> None:
        self.model, self.sigma, self.num_classes, self.batch = model.eval(), sigma, num_classes, batch

    def certify_all(self, images: torch.Tensor, n0: int, n: int) -> None:
        for x in images:  # CERTIFY per image: selection draw, then estimation draw
            reference_sample_noise(self.model, x, n0, self.batch, self.sigma, self.num_classes)
            reference_sample_noise(self.model, x, n, self.batch, self.sigma, self.num_classes)


class Engine:
    def __init__(self, model, sigma: float, num_classes: int, batch: int, device: torch.device, amp: bool,
                 optimize: bool, precision: str = "fp32") -> None:
        from pipeline.sampling.engine import VoteCounter
        from pipeline.sampling.engine import optimize_for_inference

        model = optimize_for_inference(model, device) if optimize else model.to(device).eval()
        self.counter = VoteCounter(model, num_classes, sigma, batch_size=batch, device=device, amp=amp,
                                   precision=precision)

    def certify_all(self, images: torch.Tensor, n0: int, n: int):
        from pipeline.sampling.noise import SampleRequest

        requests = [SampleRequest(0, i, phase, num) for i in range(len(images))
                    for phase, num in (("selection", n0), ("estimation", n))]
        return self.counter.count({i: image for i, image in enumerate(images)}, requests)


def gemm_rate(dtype: torch.dtype, device: torch.device, size: int = 1024, seconds: float = 1.0) -> float:
    """This machine's measured matmul rate in GFLOP/s (the roof a conv net can approach)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    torch.matmul(a, b)
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        torch.matmul(a, b)
        calls += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * calls / (time.perf_counter() - started) / 1e9


# --------------------------------------------------------------------------- worker processes


def build_denoiser(name: str, sigma: float, dataset: str | None, size: int):
    """A registry name (seeded random weights: speed does not depend on them) or a path
    (loaded as `dsmooth certify` loads it, σ given to a diffusion denoiser)."""
    from pipeline.models import build_model

    if not Path(name).exists():
        return build_model(name)
    from pipeline.data import DataDescription
    from pipeline.certify.pair import ModelBytes, load_denoiser_bytes

    model, _ = load_denoiser_bytes(ModelBytes.read_denoiser(name), DataDescription(dataset, None, (size, size)), sigma)
    return model


def build_pair(spec: str, sigma: float = 0.25):
    """'denoiser+classifier' or 'classifier' -> (f∘D, classes, image size), seeded weights."""
    from pipeline.models import build_model, compose, model_info

    names = spec.split("+")
    if len(names) > 2:
        raise SystemExit(f"--model: expected DENOISER+CLASSIFIER or CLASSIFIER, got {spec!r}")
    classifier_name = names[-1]
    info = model_info(classifier_name)
    if info.kind != "classifier":
        raise SystemExit(f"--model: {classifier_name!r} is a {info.kind}, not a classifier")
    from pipeline.data import dataset_spec

    spec = dataset_spec(info.dataset)
    size = spec.input_size if spec else 32
    torch.manual_seed(0)
    denoiser = build_denoiser(names[0], sigma, info.dataset, size) if len(names) == 2 else None
    classifier = build_model(classifier_name)
    return compose(classifier, denoiser).eval(), info.num_classes or 1000, size


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def _cpu_seconds() -> float:
    """CPU time of this process, all threads: what the work cost, whatever else runs beside it."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def worker(method: str, args: argparse.Namespace, connection) -> None:
    """Hold one method; answer 'run' with (seconds, peak bytes) until told to stop."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    spec = f"{args.vs_denoiser}+{args.model.split('+')[-1]}" if method == "baseline" else args.model
    model, num_classes, size = build_pair(spec, args.sigma)
    size = args.image_size or size
    images = torch.rand((args.images, 3, size, size), generator=torch.Generator().manual_seed(1)).to(device)
    if method == "reference":
        runner = Reference(model.to(device), args.sigma, num_classes, args.batch)
    else:
        precision = method.split("-", 1)[1] if method.startswith("engine-") else "fp32"
        runner = Engine(model, args.sigma, num_classes, args.batch, device, args.amp, not args.no_optimize, precision)
    runner.certify_all(images[:1], 1, min(args.batch, args.n))  # warm-up: kernels, allocator
    baseline = _peak_bytes(device)
    connection.send(("ready", baseline))
    while connection.recv() == "run":
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        started, cpu_started = time.perf_counter(), _cpu_seconds()
        counts = runner.certify_all(images, args.n0, args.n)
        if device.type == "cuda":
            torch.cuda.synchronize()
        connection.send((time.perf_counter() - started, _cpu_seconds() - cpu_started, _peak_bytes(device), counts))


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda[:k] (default: cuda when available)")
    parser.add_argument("--model", default="dncnn_small+cifar_resnet20",
                        help="DENOISER+CLASSIFIER or CLASSIFIER registry names, e.g. dncnn+cifar_resnet110 "
                        "(default dncnn_small+cifar_resnet20; random seeded weights: speed does not depend on them)")
    parser.add_argument("--n", type=int, default=1000, help="estimation samples per image (default 1000)")
    parser.add_argument("--n0", type=int, default=100, help="selection samples per image (default 100)")
    parser.add_argument("--images", type=int, default=4, help="images certified per repetition (default 4)")
    parser.add_argument("--batch", type=int, default=400, help="noisy samples per forward pass, both methods (default 400)")
    parser.add_argument("--amp", action="store_true", help="engine in mixed precision (GPU only; the reference is fp32)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16", "auto"), default="fp32",
                        help="also time the engine at this precision (side by side with fp32), with the votes' "
                        "agreement and this machine's fp32 and bf16 matmul rates")
    parser.add_argument("--no-optimize", action="store_true",
                        help="engine without BatchNorm folding / channels-last (to see what the rewrite adds)")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions (default 3)")
    parser.add_argument("--sigma", type=float, default=0.25, help="noise level (default 0.25)")
    parser.add_argument("--vs-denoiser", metavar="NAME",
                        help="compare the engine with --model against the engine with this denoiser (e.g. dncnn) "
                        "in front of the same classifier, instead of the reference against the engine")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads per method")
    parser.add_argument("--image-size", type=int, help="image side (default 32 for CIFAR models, 224 for ImageNet)")
    parser.add_argument("--forms", action="store_true", help=(
        "instead: f∘D samples/s of a ResNet-50 (224 px) given as a torchvision name, a timm spec and a .pt2 "
        "archive (benchmarks/classifier_forms.py)"))
    args = parser.parse_args(argv)
    for name in ("n", "n0", "images", "batch", "reps", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.amp and not args.device.startswith("cuda"):
        print("note: --amp has no effect on CPU (use --precision)", file=sys.stderr)
    return args


def _report_precision(method, first, rates, cpu_rates, counts, device, threads: int) -> None:
    """Median speed of the low-precision engine beside fp32 and the reference, the votes that
    moved, and the machine's matmul roof (measured here, now: a loaded machine lowers it too)."""
    import numpy as np

    med = {m: statistics.median(r) for m, r in rates.items()}
    cpu = {m: statistics.median(r) for m, r in cpu_rates.items()}
    print(f"median wall-clock samples/s: {first} {med[first]:,.0f} | engine fp32 {med['engine']:,.0f} "
          f"({med['engine'] / med[first]:.2f}x) | {method} {med[method]:,.0f} ({med[method] / med[first]:.2f}x, "
          f"{med[method] / med['engine']:.2f}x fp32)")
    print(f"median samples per CPU-second: {first} {cpu[first]:,.1f} | engine fp32 {cpu['engine']:,.1f} "
          f"({cpu['engine'] / cpu[first]:.2f}x) | {method} {cpu[method]:,.1f} ({cpu[method] / cpu[first]:.2f}x)")
    fp32, low = np.asarray(counts["engine"]), np.asarray(counts[method])
    moved = np.abs(fp32 - low).sum(axis=1) / 2
    estimation = slice(1, None, 2)  # rows: (selection, estimation) per image
    same_top = (fp32[estimation].argmax(axis=1) == low[estimation].argmax(axis=1)).mean()
    print(f"vote agreement ({method} vs fp32, same noise): {same_top:.0%} of images keep their top class; "
          f"{moved.mean():.1f} of {fp32.sum(axis=1).mean():,.0f} votes moved per request on average")
    torch.set_num_threads(threads)
    rates32, rates16 = gemm_rate(torch.float32, device), gemm_rate(torch.bfloat16, device)
    print(f"roof: matmul 1024^3 at {threads} threads: fp32 {rates32:,.0f} GFLOP/s, bf16 {rates16:,.0f} GFLOP/s "
          f"({rates16 / rates32:.2f}x)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.forms:
        from classifier_forms import run as run_forms

        return run_forms(args)
    first = "baseline" if args.vs_denoiser else "reference"  # the method the engine is measured against
    context = mp.get_context("spawn")  # a fresh process per method: separate peak memory, no shared state
    pipes, processes, baselines = {}, {}, {}
    low = [f"engine-{args.precision}"] if args.precision != "fp32" else []
    for method in (first, "engine", *low):
        parent, child = context.Pipe()
        process = context.Process(target=worker, args=(method, args, child), daemon=True)
        process.start()
        pipes[method], processes[method] = parent, process
    try:
        for method, pipe in pipes.items():
            _, baselines[method] = pipe.recv()
        samples = args.images * (args.n0 + args.n)
        device = torch.device(args.device)
        print(f"device {device.type}{'' if device.type == 'cuda' else f' ({args.threads} threads)'} | "
              f"model {args.model} | {args.images} images x (n0 {args.n0} + n {args.n}) = {samples:,} samples "
              f"per repetition | batch {args.batch} | engine amp {'on' if args.amp and device.type == 'cuda' else 'off'}"
              f"{' | engine not optimized' if args.no_optimize else ''}", flush=True)
        on_cpu = device.type != "cuda"
        print(f"{'rep':>4} {first + ' samples/s':>20} {'engine samples/s':>17} {'ratio':>7}"
              + (f" {first[:4] + ' samples/CPU-s':>18} {'engine samples/CPU-s':>21} {'ratio':>7}" if on_cpu else ""))
        rates: dict[str, list[float]] = {m: [] for m in pipes}
        cpu_rates: dict[str, list[float]] = {m: [] for m in pipes}
        peaks = {m: 0 for m in pipes}
        counts: dict[str, object] = {}
        for rep in range(1, args.reps + 1):
            order = list(pipes) if rep % 2 else list(pipes)[::-1]
            for method in order:
                pipes[method].send("run")
                seconds, cpu_seconds, peak, counts[method] = pipes[method].recv()
                rates[method].append(samples / seconds)
                cpu_rates[method].append(samples / max(cpu_seconds, 1e-9))
                peaks[method] = max(peaks[method], peak)
            line = (f"{rep:>4} {rates[first][-1]:>20,.0f} {rates['engine'][-1]:>17,.0f} "
                    f"{rates['engine'][-1] / rates[first][-1]:>6.2f}x")
            if on_cpu:
                line += (f" {cpu_rates[first][-1]:>18,.1f} {cpu_rates['engine'][-1]:>21,.1f} "
                         f"{cpu_rates['engine'][-1] / cpu_rates[first][-1]:>6.2f}x")
            for method in low:
                line += (f" | {method} {rates[method][-1]:,.0f} samples/s {rates[method][-1] / rates[first][-1]:.2f}x"
                         f" ({cpu_rates[method][-1]:,.1f}/CPU-s)")
            print(line, flush=True)
        for method in low:
            _report_precision(method, first, rates, cpu_rates, counts, device, args.threads)
        reference, engine = statistics.median(rates[first]), statistics.median(rates["engine"])
        ratios = [e / r for e, r in zip(rates["engine"], rates[first])]
        print(f"median wall-clock: {first} {reference:,.0f} samples/s, engine {engine:,.0f} samples/s, "
              f"ratio {engine / reference:.2f}x (median of the per-repetition ratios {statistics.median(ratios):.2f}x)")
        if on_cpu:  # on a shared machine wall-clock swings with other load; CPU time much less so
            reference, engine = statistics.median(cpu_rates[first]), statistics.median(cpu_rates["engine"])
            print(f"median per CPU-second: {first} {reference:,.1f}, engine {engine:,.1f} samples, "
                  f"ratio {engine / reference:.2f}x")
        if args.vs_denoiser:
            name = args.model.split("+")[0]
            print(f"cost per sample of {name} relative to {args.vs_denoiser}: {reference / engine:.1f}x "
                  f"({'CPU time' if on_cpu else 'wall-clock'}, same classifier, same engine)")
        what = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS of the method's process"
        print(f"peak memory ({what}): {first} {peaks[first] / 2**20:,.0f} MiB, "
              f"engine {peaks['engine'] / 2**20:,.0f} MiB")
        if device.type != "cuda":  # RSS includes the libraries each process imported
            print(f"  of which above the process's peak after warm-up: {first} "
                  f"{(peaks[first] - baselines[first]) / 2**20:,.0f} MiB, engine "
                  f"{(peaks['engine'] - baselines['engine']) / 2**20:,.0f} MiB")
    finally:
        for method, pipe in pipes.items():
            try:
                pipe.send("stop")
            except (BrokenPipeError, OSError):
                pass
        for process in processes.values():
            process.join(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())

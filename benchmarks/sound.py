"""Certified accuracy and samples/s with and without `--sound`, side by side on the demo models.

Both modes certify the same images of the shipped CIFAR-10 sample with the same shipped pair
(classifier + a sigma = 0.25 denoiser), the same engine settings and noise addresses; only
the draw differs: `randn` added in float (plain) or the rounded Gaussian on the 8-bit grid
added in integers (`pipeline.sampling.sound`). The modes alternate over --repeats so that
machine load hits both alike; the table reports the median samples/s (wall clock, and per
CPU-second of this process: steadier on a shared machine), the draw alone (one 256-sample
chunk of noise, the part `--sound` changes), and the certified accuracy of the
(identical in every repeat) certificates at a few L2 radii.

Plain PyTorch, no Ray. Example (the README's table):
  python benchmarks/sound.py --images 20 --n0 100 --n 1000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "pipeline" / "assets" / "models" / "cifar10"
SAMPLE = REPO / "pipeline" / "assets" / "cifar10-sample"
RADII = (0.0, 0.25, 0.5)


def _counter(denoiser: str, sound: bool, batch: int):
    from pipeline.certify.pair import ModelBytes, load_pair
    from pipeline.data import open_dataset
    from pipeline.sampling.engine import VoteCounter
    from pipeline.sampling.engine import optimize_for_inference

    pair, info = load_pair(ModelBytes.read(MODELS / "classifier.pt"), ModelBytes.read_denoiser(MODELS / denoiser),
                           open_dataset("cifar10", SAMPLE, "test").describe(), sigma=0.25)
    return VoteCounter(optimize_for_inference(pair, "cpu"), info.num_classes, 0.25, batch_size=batch, device="cpu",
                       sound=sound)


def _draw_seconds(sound: bool, repeats: int = 5) -> float:
    """Median CPU seconds to draw one 256-sample chunk of 3x32x32 model inputs."""
    from pipeline.sampling.noise import Chunk, chunk_noise
    from pipeline.sampling.sound import sound_inputs

    levels = torch.full((3, 32, 32), 128, dtype=torch.int64)
    image = levels.float() / 255
    times = []
    for index in range(repeats + 1):
        chunk = Chunk(0, 0, "estimation", index, 256)
        started = time.process_time()
        if sound:
            sound_inputs(levels, chunk, 0.25)
        else:
            chunk_noise(chunk, (3, 32, 32), 0.25).add_(image)
        times.append(time.process_time() - started)
    return statistics.median(times[1:])  # the first pays sound's one-off thresholds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20, help="images of the shipped sample, every class covered")
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--batch", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per mode, alternating")
    parser.add_argument("--denoiser", default="denoiser_stab_mse_s0.25.pt", help="file under the shipped models")
    args = parser.parse_args(argv)

    from jobs.demo import demo_ids
    from pipeline.data import open_dataset
    from pipeline.sampling.noise import SampleRequest
    from pipeline.stats.smoothing import certify_matrix

    sample = open_dataset("cifar10", SAMPLE, "test")
    ids = demo_ids(sample, args.images)
    images = {i: sample.load(i) for i in ids}
    labels = np.array([sample.records[i].label for i in ids])
    requests = [SampleRequest(0, i, phase, num) for i in ids for phase, num in (("selection", args.n0),
                                                                                  ("estimation", args.n))]
    counters = {mode: _counter(args.denoiser, mode == "sound", args.batch) for mode in ("plain", "sound")}
    counters["sound"].count(images, requests[:1])  # the thresholds, once per process, outside the timing
    rates: dict[str, list[float]] = {mode: [] for mode in counters}
    cpu_rates: dict[str, list[float]] = {mode: [] for mode in counters}
    counts: dict[str, np.ndarray] = {}
    for _ in range(args.repeats):
        for mode, counter in counters.items():
            started, cpu = time.perf_counter(), time.process_time()
            counts[mode] = counter.count(images, requests)
            samples = len(ids) * (args.n0 + args.n)
            rates[mode].append(samples / (time.perf_counter() - started))
            cpu_rates[mode].append(samples / (time.process_time() - cpu))
    print(f"{len(ids)} images of the shipped CIFAR-10 sample, {args.denoiser} + classifier, sigma 0.25, "
          f"n0 {args.n0}, n {args.n}, alpha {args.alpha}, batch {args.batch}, {torch.get_num_threads()} threads")
    head = " | ".join(f"R={r}" for r in RADII)
    print(f"| sampling | samples/s (wall) | samples per CPU-second | draw of a 256-sample chunk (CPU) "
          f"| certified accuracy {head} |")
    print("|---|---|---|---|" + "---|" * len(RADII))
    for mode in counters:
        decided = certify_matrix(counts[mode][0::2], counts[mode][1::2], 0.25, args.alpha)
        correct = decided.prediction == labels
        accuracy = " | ".join(f"{np.mean(correct & (decided.radius >= r)):.0%}" for r in RADII)
        print(f"| {mode} | {statistics.median(rates[mode]):,.0f} | {statistics.median(cpu_rates[mode]):,.0f} "
              f"| {_draw_seconds(mode == 'sound') * 1e3:.0f} ms "
              f"| {accuracy} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

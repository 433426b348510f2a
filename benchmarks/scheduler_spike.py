"""The scheduler spike: dsmooth's WorkPool against Ray Data's actor pool, same certify work.

Prints, side by side in one Ray session (so machine load affects both alike):
- wall time of the same shards on 1 and 2 actors through `actors.pool.WorkPool` (the job's
  own path, `jobs.certify.certify`), and through Ray Data `map_batches` with an actor pool
  (`ActorPoolStrategy`), each repeated and interleaved;
- the lines of code each scheduler takes.
Run from the repository root:  python benchmarks/scheduler_spike.py [--images 16] [--reps 2]
"""

from __future__ import annotations

import argparse
import inspect
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import ray  # noqa: E402

SAMPLE = REPO / "pipeline" / "assets" / "cifar10-sample"
MODELS = REPO / "pipeline" / "assets" / "models" / "cifar10"


def config(output: Path, images: int, actors: int):
    from pipeline.certify.plan import CertifyConfig
    from pipeline.config import parse_config

    return parse_config(CertifyConfig, {
        "dataset": "cifar10", "data_root": str(SAMPLE), "classifier": str(MODELS / "classifier.pt"),
        "denoiser": str(MODELS / "denoiser_mse_s0.25.pt"), "sigma": 0.25, "n0": 20, "n": 400,
        "skip": 500 // images, "max": images * (500 // images), "actors": actors, "shard_size": 1,
        "output": str(output),
    })


def run_pool(images: int, actors: int) -> float:
    from jobs.certify import certify

    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        certify(config(Path(folder) / "run", images, actors))
        return time.perf_counter() - started


class Counting:
    """The Ray Data variant's actor: the same PairCounter behind map_batches."""

    def __init__(self, classifier: bytes, denoiser: bytes, info, data, settings) -> None:
        import torch

        from pipeline.certify.pair import ModelBytes, PairCounter

        torch.set_num_threads(1)
        self.counter = PairCounter(ModelBytes("f", classifier), ModelBytes("d", denoiser), info, data, **settings)

    def __call__(self, batch: dict) -> dict:
        from pipeline.sampling.noise import SampleRequest

        rows, seconds = [], []
        for image_id, image, seed, n0, n, chunk in zip(batch["image_id"], batch["image"], batch["seed"],
                                                       batch["n0"], batch["n"], batch["chunk"]):
            requests = [SampleRequest(int(seed), int(image_id), "selection", int(n0), int(chunk)),
                        SampleRequest(int(seed), int(image_id), "estimation", int(n), int(chunk))]
            started = time.perf_counter()
            counts, _ = self.counter.count(requests, {int(image_id): image})
            rows.append(counts)
            seconds.append(time.perf_counter() - started)
        return {"image_id": batch["image_id"], "counts": np.stack(rows), "compute_s": np.array(seconds)}


def run_ray_data(images: int, actors: int) -> float:
    """Certify the same images with Ray Data; parts are written as batches come back, as the
    job's `VoteRow`s (`pipeline.certify.run.model_vote_rows`), so both variants write alike."""
    from datetime import datetime, timezone

    from pipeline.certify.pair import ModelBytes, load_pair
    from pipeline.certify.plan import requests_of
    from pipeline.certify.run import Shard, model_vote_rows
    from pipeline.runs.storage import write_votes

    cfg = config(Path("unused"), images, actors)
    split = cfg.open_split()
    selected = cfg.select(split)
    f, d = ModelBytes.read(cfg.classifier), ModelBytes.read(cfg.denoiser)
    data = selected.describe()
    _, info = load_pair(f, d, data, sigma=cfg.sigma)
    items = [{"image_id": r.image_id, "image": selected.by_ids([r.image_id]).as_uint8()[0], "seed": 0,
              "n0": cfg.n0, "n": cfg.n, "chunk": cfg.chunk_size} for r in selected.records]
    settings = {"sigma": cfg.sigma, "batch_size": cfg.batch_size}
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        dataset = ray.data.from_items(items).map_batches(
            Counting, fn_constructor_args=(f.data, d.data, info, data, settings), batch_size=1,
            concurrency=actors, num_cpus=1)
        records = {r.image_id: r for r in selected.records}
        for batch in dataset.iter_batches(batch_size=1):
            for image_id, counts, compute_s in zip(batch["image_id"], batch["counts"], batch["compute_s"]):
                record = records[int(image_id)]
                write_votes(folder, model_vote_rows(
                    run_id="scheduler-spike", config=cfg, records=[record],
                    requests=requests_of(cfg)(Shard(0, (record,))), counts=counts,
                    compute_s=float(compute_s), worker="ray-data", finished_at=datetime.now(timezone.utc),
                    classifier=info.classifier, denoiser=info.denoiser, class_names=selected.classes))
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    ray.data.DataContext.get_current().enable_progress_bars = False
    runs = {"WorkPool, 1 actor": (run_pool, 1), "WorkPool, 2 actors": (run_pool, 2),
            "Ray Data, 1 actor": (run_ray_data, 1), "Ray Data, 2 actors": (run_ray_data, 2)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.reps):  # interleaved: each rep runs every variant once
        for name, (fn, actors) in runs.items():
            times[name].append(fn(args.images, actors))
    ray.shutdown()
    samples = args.images * 420
    print(f"{args.images} CIFAR-10 images x 420 samples (dncnn_small + ResNet-20), median of {args.reps}:")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:<20} {median:7.1f} s  {samples / median:8.0f} samples/s  (runs: "
              f"{', '.join(f'{v:.1f}' for v in values)})")
    pool_ratio = statistics.median(times["WorkPool, 1 actor"]) / statistics.median(times["WorkPool, 2 actors"])
    data_ratio = statistics.median(times["Ray Data, 1 actor"]) / statistics.median(times["Ray Data, 2 actors"])
    print(f"  2 actors vs 1: WorkPool {pool_ratio:.2f}x faster, Ray Data {data_ratio:.2f}x faster")
    import actors.pool as pool

    print(f"  code: actors/pool.py {len(inspect.getsource(pool).splitlines())} lines (the scheduler, shared by "
          f"certify and certify-api); the Ray Data variant above {len(inspect.getsource(run_ray_data).splitlines())}"
          f" + {len(inspect.getsource(Counting).splitlines())} lines, certify only")


if __name__ == "__main__":
    main()

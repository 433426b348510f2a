"""Samples per futile image (p_A below the threshold): the futility rules side by side.

    python benchmarks/futility_sim.py [--images 20000] [--seed 0]

An image whose label has probability p < q = Phi(R / sigma) can never be certified at R; a
sequential run should give it up as early as it can while rarely giving up an image with
p >= q. Simulated through the project's own `SequentialCertifier` (Bernoulli(p) votes, chunk
by chunk, the real thresholds), at R = sigma = 0.25 (q = 0.841), alpha = 0.001,
n_max = 100,000, chunk size 256, futility_alpha = 0.05, for three schedules:

* fixed chunks of 256 + the mixture upper sequence after every chunk (runs before issue 23);
* growing first chunks 32, 32, 64, 128 + the mixture rule;
* growing first chunks + the geometric rule (Clopper-Pearson at looks growing 1.5x,
  futility_alpha split over them; the default of new runs).

Prints one markdown table: mean samples per image at each p, and the share of images with
p = q given up by the futility rule (each rule bounds it by futility_alpha).
"""

from __future__ import annotations

import argparse

import numpy as np

from pipeline.sampling.noise import growing_schedule
from pipeline.stats.sequential import ChunkVotes, Reason, SequentialCertifier, SequentialTest

P_VALUES = (0.5, 0.6, 0.7, 0.8, 0.82)
SCHEDULES = {
    "fixed chunks of 256, mixture futility (before)": {"futility": "mixture"},
    "growing first chunks, mixture futility": {"futility": "mixture", "first_chunks": growing_schedule(256)},
    "growing first chunks, geometric futility (now)": {"futility": "geometric", "first_chunks": growing_schedule(256)},
}


def simulate(test: SequentialTest, p: float, images: int, rng: np.random.Generator):
    """Decisions of `images` images whose votes are Bernoulli(p), one chunk at a time."""
    certifier = SequentialCertifier(test, labels=np.zeros(images, dtype=np.int64))
    while work := certifier.pending():
        (w,) = work
        sizes = {int(c): test.chunk_samples(w.phase, int(c)) for c in np.unique(w.first_chunk)}
        size = np.array([sizes[int(c)] for c in w.first_chunk], dtype=np.int64)
        certifier.decide(ChunkVotes(w.phase, w.image, w.first_chunk, size, rng.binomial(size, p)))
    return certifier.decisions()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20_000, help="simulated images per p and schedule")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    lines = ["| schedule | " + " | ".join(f"p = {p:g}" for p in P_VALUES) + " | given up at p = q |",
             "|---|" + "---:|" * (len(P_VALUES) + 1)]
    for name, extra in SCHEDULES.items():
        test = SequentialTest(sigma=0.25, alpha=0.001, n_max=100_000, chunk_size=256, radius=0.25,
                              futility_alpha=0.05, **extra)
        rng = np.random.default_rng(args.seed)
        cells = [f"{simulate(test, p, args.images, rng).samples.mean():,.0f}" for p in P_VALUES]
        at_q = simulate(test, test.threshold, args.images, rng)
        cells.append(f"{(at_q.reason == Reason.UPPER_BOUND).mean():.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

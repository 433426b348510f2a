"""Floating-point-sound Gaussian sampling (`--sound`; Voráček & Hein, ICLR 2023, "Sound
Randomized Smoothing in Floating-Point Arithmetic").

Why the usual implementation is unsound: the certificate of Cohen et al. is about the smoothed
classifier of a function f on R^d, evaluated at x + delta with delta ~ N(0, sigma^2 I) exactly.
In practice x + delta is a float sum: `x` is rounded, `randn` draws from a finite set of floats
and the addition rounds again, so what f receives is not a function of the real point x + delta
but depends on x and delta separately (two pairs with the same exact sum can give different
floats), and the noise is not Gaussian. Voráček & Hein build classifiers for which this
certifies points with an adversarial example well inside the certified radius.

The construction (for 8-bit images, the inputs `certify` reads): put the image *and the noise*
on the grid (1/255) Z. Each noise coordinate is r = round(255 * eps), eps ~ N(0, sigma^2), i.e.
the discrete distribution P(r) = Phi((r + 1/2) / (255 sigma)) - Phi((r - 1/2) / (255 sigma)),
drawn *exactly* from fair random bits (a uniform U compared with the thresholds Phi(.), more
bits drawn lazily in the rare case that U's first 62 bits do not decide; the thresholds come
from mpmath with guard bits, never float64). The model sees q / 255 with the integer
q = clamp(255 x + r, -255 K, 255 (K + 1)), K = max(1, ceil(6 sigma)): integer arithmetic is
exact, and one float division of q makes the input a function of q alone. For x on the grid,
255 x + round(255 eps) = round(255 (x + eps)), so the input is h(x + eps) for the fixed map
h(z) = clamp(round(255 z)) / 255 of R^d (the clamp keeps it one map whatever x is). The votes
are therefore exactly those of the base classifier f o h smoothed by the *continuous*
Gaussian, and Cohen's radius sigma * Phi^-1(p_A) holds unchanged, with no radius correction:
every 8-bit image within that l2 distance of x, certified the same way, gets the same class.

Where this differs from the authors' released samplers (which compare uniform integers of a
fixed width, 32 or 60 bits, with thresholds rounded to that width): every comparison here is decided exactly, so the draw has the
rounded Gaussian's law, not an approximation of it, and needs no correction of p_A.

Cost: the same number of forward passes; per noise coordinate a 64-bit random integer and a
look-up in a table of U's top 16 bits (a binary search in the 255 * 2 (K + 1) thresholds for the
~1% of draws whose bucket holds one) instead of one `randn`: ~7x the draw's CPU time, ~12% of
the demo pair's samples per CPU-second (README, "Floating-point-sound sampling"), plus the thresholds once per sigma and process
(~1 s at sigma = 0.25). The noise differs slightly from N(0, sigma^2) (rounded to the
grid, std sqrt(sigma^2 + 1/(12 * 255^2))), so certified accuracy barely moves. It assumes
that f computes the same output for the same input (true for the engine's deterministic CPU
kernels; GPU kernels that depend on the batch make f itself random, as for any certificate).
"""

from __future__ import annotations

import functools
import math

import mpmath
import numpy as np
import torch

from pipeline.sampling.noise import Chunk, chunk_seed

LEVELS = 255  # 8-bit images: values i / 255
WORD_BITS = 62  # bits of U drawn per round (torch.randint's int64 holds them)
_MAX_BITS = 4096  # a comparison still undecided after this many bits of U has probability 2^-4000
_GUARD_BITS = 64


def reach(sigma: float) -> int:
    """K: the noisy input is clamped to [-K, K + 1] (pixel units), > 6 sigma from any image."""
    return max(1, math.ceil(6 * sigma))


def half_width(sigma: float) -> int:
    """R: the noise steps r are clamped to [-R, R] (enough, see `noisy_levels`)."""
    return LEVELS * (reach(sigma) + 1)


def _threshold_floor(sigma: float, index: int, bits: int) -> int:
    """floor(2^bits * Phi((index - R + 1/2) / (255 sigma))), exactly: mpmath with guard bits
    (more when the value lies too close to an integer to tell), the upper tail through
    1 - Phi(z) = Phi(-z) so that no threshold rounds to 1."""
    radius = half_width(sigma)
    guard = _GUARD_BITS
    while guard <= _MAX_BITS:
        with mpmath.mp.workprec(bits + guard):
            z = (mpmath.mpf(index - radius) + mpmath.mpf(0.5)) / (LEVELS * mpmath.mpf(sigma))
            scaled_tail = mpmath.ldexp(mpmath.ncdf(-abs(z)), bits)  # 2^bits * Phi(-|z|), relative error ~2^-prec
            whole = int(mpmath.floor(scaled_tail))
            fraction = scaled_tail - whole
            margin = mpmath.ldexp(scaled_tail, -(bits + guard) + 8)
            if margin < fraction < 1 - margin:
                return whole if z < 0 else (1 << bits) - whole - 1  # floor(2^bits - v) = 2^bits - ceil(v)
        guard *= 2
    raise ArithmeticError(f"cannot round threshold {index} at sigma={sigma}")


_cached_floor = functools.lru_cache(maxsize=65536)(_threshold_floor)


@functools.lru_cache(maxsize=8)
def threshold_cells(sigma: float, bits: int = WORD_BITS) -> np.ndarray:
    """int64 [2R]: the `bits`-bit cell of each threshold t_a = Phi((a - R + 1/2) / (255 sigma));
    the noise step is r = -R + #{a : t_a <= U} for U uniform on [0, 1)."""
    return np.array([_cached_floor(sigma, a, bits) for a in range(2 * half_width(sigma))], dtype=np.int64)


@functools.lru_cache(maxsize=8)
def _tables(sigma: float, bits: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """The threshold cells, and per bucket of U's top `bucket_bits` bits: the number of
    thresholds below the bucket, and whether one lies inside it (then U must search)."""
    cells = threshold_cells(sigma, bits)
    bucket_bits = min(16, bits)
    shift = bits - bucket_bits
    starts = np.arange(1 << bucket_bits, dtype=np.int64) << shift
    below = np.searchsorted(cells, starts)  # thresholds with cell < the bucket's first cell
    ends = np.searchsorted(cells, starts + (1 << shift))
    return bucket_bits, cells, below.astype(np.int64), ends > below


class _LazyUniform:
    """The bits of one U after its first word, drawn on demand from its own generator."""

    def __init__(self, first: int, rng: np.random.Generator, bits: int) -> None:
        self.words, self.rng, self.bits = [first], rng, bits

    def prefix(self, total_bits: int) -> int:
        while len(self.words) * self.bits < total_bits:
            self.words.append(int(self.rng.integers(0, 1 << self.bits)))
        value = 0
        for word in self.words[: total_bits // self.bits]:
            value = (value << self.bits) | word
        return value


def _threshold_below(sigma: float, index: int, uniform: _LazyUniform, bits: int) -> bool:
    """t_index <= U, decided exactly by reading as many bits of U as it takes."""
    total = bits
    while total <= _MAX_BITS:
        cell, prefix = _cached_floor(sigma, index, total), uniform.prefix(total)
        if cell != prefix:
            return cell < prefix
        total += bits
    raise ArithmeticError("a uniform draw equal to a threshold in 4096 bits")


def _resolve(sigma: float, first: int, low: int, high: int, rng: np.random.Generator, bits: int) -> int:
    """#{a : t_a <= U} when the thresholds low..high-1 share U's first cell: a binary search
    with exact comparisons (thresholds below `low` are below U, those from `high` above)."""
    uniform = _LazyUniform(first, rng, bits)
    while low < high:
        middle = (low + high) // 2
        if _threshold_below(sigma, middle, uniform, bits):
            low = middle + 1
        else:
            high = middle
    return low


def sound_steps(seed: int, count: int, sigma: float, device: torch.device | str = "cpu",
                bits: int = WORD_BITS) -> torch.Tensor:
    """int64 [count]: noise steps r (noise r / 255) of the rounded Gaussian, a pure function of
    `seed` (and the device type, as for `randn`); `bits` < 62 only for tests of the lazy path."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    # 1 << bits is a power of two: torch's 64-bit draw reduced modulo it is exactly uniform.
    first = torch.randint(0, 1 << bits, (count,), generator=generator, device=device, dtype=torch.int64)
    bucket_bits, *tables = _tables(sigma, bits)
    cells, below, crowded = (torch.as_tensor(table, device=device) for table in tables)
    # Most U fall in a bucket of their top bits that holds no threshold: the step is read off
    # a table; the others search the thresholds.
    bucket = first >> (bits - bucket_bits)
    low = below[bucket]
    searched = torch.nonzero(crowded[bucket]).flatten()
    low[searched] = torch.searchsorted(cells, first[searched])  # #{cells < U's cell}: certainly below U
    shared = torch.zeros_like(crowded[bucket])
    shared[searched] = cells[low[searched].clamp(max=len(cells) - 1)] == first[searched]  # undecided
    if shared.any():  # probability ~ 2R / 2^62 per coordinate at the default bits
        undecided = torch.nonzero(shared).flatten().tolist()
        high = torch.searchsorted(cells, first[undecided], right=True).tolist()
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 0x50D])))
        first_cpu, low_cpu = first[undecided].cpu().tolist(), low[undecided].cpu().tolist()
        for position, u, lo, hi in zip(undecided, first_cpu, low_cpu, high):
            low[position] = _resolve(sigma, u, lo, hi, rng, bits)
    return low - half_width(sigma)


def image_levels(image: torch.Tensor, image_id: int | str = "") -> torch.Tensor:
    """int64 255 * image for an image on the 8-bit grid; refuses any other (the construction
    certifies 8-bit images, and quietly rounding would certify another image)."""
    scaled = image.to(torch.float64) * LEVELS
    levels = scaled.round()
    if (scaled - levels).abs().max().item() > 1e-3 or levels.min().item() < 0 or levels.max().item() > LEVELS:
        raise ValueError(f"--sound certifies 8-bit images (values i/255 in [0, 1]); image {image_id} is not one")
    return levels.to(torch.int64)


def noisy_levels(levels: torch.Tensor, steps: torch.Tensor, sigma: float) -> torch.Tensor:
    """q = clamp(levels + steps, -255 K, 255 (K + 1)): exact integers. The clamp makes q a
    function of levels + round(255 eps) alone, even for the steps clamped at +-R (an image
    level lies in [0, 255], so 255 K <= level + R and level - R <= -255 K)."""
    k = reach(sigma)
    return (levels + steps).clamp_(-LEVELS * k, LEVELS * (k + 1))


def sound_inputs(levels: torch.Tensor, chunk: Chunk, sigma: float) -> torch.Tensor:
    """float32 [chunk.size, *levels.shape]: the model's inputs q / 255 for the samples of
    `chunk`, a pure function of its address like `chunk_noise`; each element is one float
    division of its integer q, so a function of q alone."""
    seed = chunk_seed(chunk.seed, chunk.image_id, chunk.phase, chunk.index)
    steps = sound_steps(seed, chunk.size * levels.numel(), sigma, levels.device).view(chunk.size, *levels.shape)
    return noisy_levels(levels, steps, sigma).to(torch.float32).div_(LEVELS)

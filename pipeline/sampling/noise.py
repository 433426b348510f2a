"""The smoothing noise: what each kind is, how a phase's samples are cut into chunks, and the
deterministic draw of each chunk, addressed by (seed, image id, phase, chunk).

**Kinds.** Each smoothing noise is defined once (`noise_kind`): how a chunk is drawn, its scale
from sigma, the norm it certifies and the certified radius from a lower bound p_A on the top
class's probability. Sampling, training, the fixed-n and sequential certificates, the reach
checks and the tables all need the same answer to "what does p_A buy at this sigma?"; a second
copy of a radius formula is how a run ends up certifying under one noise with another's radius.

The convention relating sigma to a noise's own scale lambda (Yang et al., ICML 2020,
"Randomized Smoothing of All Shapes and Sizes", and their code rs4a): `--sigma` is the
*per-coordinate size* of the noise in the norm it certifies. For l2 it is the standard
deviation (Gaussian N(0, sigma^2 I), as in Cohen et al.). For l1 it is the mean absolute
deviation E|delta_i| = sigma, rs4a's l1 choice:

* uniform on [-lambda, lambda]^d with lambda = 2 sigma (rs4a: `lambd = 2 * sigma if p == 1`);
  radius 2 lambda (p_A - 1/2) = 4 sigma (p_A - 1/2), at most lambda (p_A = 1);
* Laplace(0, lambda) per coordinate with lambda = sigma (rs4a: `lambd = sigma if p == 1`);
  radius max(lambda/2 log(p_A / (1 - p_A)), -lambda log(2 (1 - p_A))) (Teng et al. 2020 and
  Yang et al.'s tight bound; the second is never smaller, since their difference is
  -log 2 - log(p_A (1 - p_A)) / 2 >= 0, so it is the radius and its inverse the threshold).

Matching E|delta_i| rather than the variance keeps a sigma = 0.25 uniform run and a
sigma = 0.25 Laplace run comparable on the l1 axis, as in the rs4a tables; the uniform noise
is then a little wider (std 2 sigma / sqrt(3) = 1.15 sigma) than the Gaussian of the same sigma.
Every radius is 0 when p_A <= 1/2 (the certificate abstains).

**Chunks.** Each image's samples in a phase are cut into chunks (`chunk_span`: a sequential
run's growing first chunks, then fixed-size ones), fixed before any vote.

**Addresses.** Every chunk draws its noise from its own generator seeded from its address
(`chunk_noise`). So the noise an image sees is a pure function of the address: not of which
other images share a forward batch, not of the batch size, not of which worker ran it. That is
what makes a killed job resumable with identical counts, and selection/estimation noise
independent (their phases give them other seeds). `SampleRequest` is the one request type of
every sampler (the batched engine, the model actors, the API workers): it carries the full
address of the samples it asks for, so no sampler holds a seed of its own. Noise is added in
[0, 1] pixel space: `to_tensor` brings an 8-bit image there.

NumPy at import; SciPy and torch only inside the functions that need them, so the statistics
and the settings (which cut chunks) stay light.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch


# -- the kinds ----------------------------------------------------------------------------------

# The names, in the order --help lists them (declared, light, in pipeline.settings.Noise).
NAMES: tuple[str, ...] = ("gaussian", "uniform", "laplace")
DEFAULT_NOISE = "gaussian"

Draw = Callable[["torch.Generator", tuple, float, Any, Any], "torch.Tensor"]


def _above_half(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(p > 1/2 mask, p with the others replaced by 0.75 so no formula warns on them)."""
    above = p > 0.5
    return above, np.where(above, p, 0.75)


# -- the draws: `generator` is already seeded from the chunk's noise address ---------------------


def _draw_gaussian(generator: torch.Generator, shape: tuple, sigma: float, device: Any, dtype: Any) -> torch.Tensor:
    import torch

    # Exactly the draw of every run before noise kinds existed: golden counts depend on it.
    return torch.randn(shape, generator=generator, device=device, dtype=dtype).mul_(sigma)


def _draw_uniform(generator: torch.Generator, shape: tuple, sigma: float, device: Any, dtype: Any) -> torch.Tensor:
    import torch

    lam = UNIFORM_LAMBDA_PER_SIGMA * sigma
    return torch.rand(shape, generator=generator, device=device, dtype=dtype).mul_(2 * lam).sub_(lam)


def _draw_laplace(generator: torch.Generator, shape: tuple, sigma: float, device: Any, dtype: Any) -> torch.Tensor:
    import torch

    # Inverse CDF of Laplace(0, lambda): u uniform on (-1/2, 1/2), -lambda sign(u) log(1 - 2|u|).
    # Drawn in float64 so that log(1 - 2|u|) never meets 0 (|u| < 1/2 strictly).
    lam = LAPLACE_LAMBDA_PER_SIGMA * sigma
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float64).sub_(0.5)
    u = u.clamp(min=-0.5 + 2.0 ** -53)
    return (-lam * torch.sign(u) * torch.log1p(-2 * u.abs())).to(dtype)


# -- the radii and their inverses (the threshold a radius needs) --------------------------------

UNIFORM_LAMBDA_PER_SIGMA = 2.0  # rs4a's l1 convention: E|delta_i| = lambda / 2 = sigma
LAPLACE_LAMBDA_PER_SIGMA = 1.0  # rs4a's l1 convention: E|delta_i| = lambda = sigma


def _radius_gaussian(p: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    from scipy.stats import norm

    above, safe = _above_half(p)
    return np.where(above, sigma * norm.ppf(safe), 0.0)


def _needed_gaussian(radius: float, sigma: float) -> float:
    from scipy.stats import norm

    return float(norm.cdf(radius / sigma))


def _radius_uniform(p: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    above, safe = _above_half(p)
    lam = UNIFORM_LAMBDA_PER_SIGMA * sigma
    return np.where(above, 2 * lam * (safe - 0.5), 0.0)


def _needed_uniform(radius: float, sigma: float) -> float:
    return float(min(1.0, 0.5 + radius / (2 * UNIFORM_LAMBDA_PER_SIGMA * sigma)))


def _radius_laplace(p: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    above, safe = _above_half(p)
    lam = LAPLACE_LAMBDA_PER_SIGMA * sigma
    with np.errstate(divide="ignore"):  # p = 1: an infinite radius, as Phi^-1(1) for the Gaussian
        teng = 0.5 * lam * np.log(safe / (1 - safe))
        tight = -lam * np.log(2 * (1 - safe))
    return np.where(above, np.maximum(teng, tight), 0.0)


def _needed_laplace(radius: float, sigma: float) -> float:
    # Inverse of the tight branch (which is the maximum, see the module docstring).
    return float(1.0 - 0.5 * np.exp(-radius / (LAPLACE_LAMBDA_PER_SIGMA * sigma)))


@dataclass(frozen=True)
class NoiseKind:
    """One smoothing noise: its draw, the norm it certifies and its radius (see the module
    docstring for the sigma <-> lambda convention)."""

    name: str
    norm: str  # "ℓ2" or "ℓ1": what the radii measure
    lambda_per_sigma: float  # the noise's own scale parameter per unit of sigma
    _draw: Draw
    _radius: Callable[[np.ndarray, np.ndarray], np.ndarray]
    _needed: Callable[[float, float], float]

    def scale(self, sigma: float) -> float:
        """The noise's own scale parameter at `sigma` (Gaussian: sigma; uniform: half-width; Laplace: b)."""
        return self.lambda_per_sigma * float(sigma)

    def draw(self, generator: torch.Generator, shape: tuple, sigma: float, device: Any = "cpu",
             dtype: Any = None) -> torch.Tensor:
        """Noise of `shape` at level `sigma`, a pure function of the generator's state."""
        import torch

        return self._draw(generator, tuple(shape), float(sigma), device, dtype or torch.float32)

    def radius(self, p_lower: np.ndarray | float, sigma: float | np.ndarray) -> np.ndarray:
        """The certified radius (in `norm`) of a lower bound p_A; 0 where p_A <= 1/2.
        Vectorised: sigma a scalar or one per row."""
        p = np.asarray(p_lower, dtype=np.float64)
        sigmas = np.broadcast_to(np.asarray(sigma, dtype=np.float64), p.shape)
        if np.any(~(sigmas > 0)):
            raise ValueError("sigma must be > 0")
        return self._radius(p, sigmas)

    def needed_p(self, radius: float, sigma: float) -> float:
        """The probability p_A must exceed to certify `radius` (1/2 at radius 0; >= 1 when the
        noise cannot certify that far at all): the inverse of `radius`, the sequential test's q."""
        return self._needed(float(radius), float(sigma))


KINDS: dict[str, NoiseKind] = {
    "gaussian": NoiseKind("gaussian", "ℓ2", 1.0, _draw_gaussian, _radius_gaussian, _needed_gaussian),
    "uniform": NoiseKind("uniform", "ℓ1", UNIFORM_LAMBDA_PER_SIGMA, _draw_uniform, _radius_uniform, _needed_uniform),
    "laplace": NoiseKind("laplace", "ℓ1", LAPLACE_LAMBDA_PER_SIGMA, _draw_laplace, _radius_laplace, _needed_laplace),
}
assert tuple(KINDS) == NAMES


def noise_kind(name: str | None) -> NoiseKind:
    """The kind named `name` (None = Gaussian: runs and checkpoints from before noise kinds)."""
    key = DEFAULT_NOISE if name is None else str(name)
    if key not in KINDS:
        raise ValueError(f"unknown noise {name!r}; expected one of {', '.join(NAMES)}")
    return KINDS[key]


# -- the chunks of a phase ----------------------------------------------------------------------

def chunk_span(index: int, total: int, chunk_size: int, first_chunks: tuple[int, ...] = ()) -> tuple[int, int]:
    """(first sample, size) of chunk `index` of a phase of `total` samples: the sizes
    `first_chunks` first (a growing schedule, fixed before any vote), then `chunk_size` each;
    the last chunk may be short. With no `first_chunks`: [index * chunk_size, ...), as always."""
    if index < len(first_chunks):
        start, size = sum(first_chunks[:index]), first_chunks[index]
    else:
        start = sum(first_chunks) + (index - len(first_chunks)) * chunk_size
        size = chunk_size
    return start, max(0, min(size, total - start))


def count_chunks(total: int, chunk_size: int, first_chunks: tuple[int, ...] = ()) -> int:
    """How many chunks a phase of `total` samples is cut into (see `chunk_span`)."""
    done = 0
    for index, size in enumerate(first_chunks):
        if done >= total:
            return index
        done += size
    return len(first_chunks) + max(0, -(-(total - done) // chunk_size))


def chunk_ends(total: int, chunk_size: int, first_chunks: tuple[int, ...] = ()) -> list[int]:
    """The running sample count after each chunk of a phase (see `chunk_span`): the points
    where a sequential test looks, fixed before any vote."""
    ends, done = [], 0
    for index in range(count_chunks(total, chunk_size, first_chunks)):
        done += chunk_span(index, total, chunk_size, first_chunks)[1]
        ends.append(done)
    return ends


SMALLEST_CHUNK = 32


def growing_schedule(chunk_size: int, smallest: int = SMALLEST_CHUNK) -> tuple[int, ...]:
    """The first chunks of a sequential model run: smallest, smallest, 2x, 4x, ... while they
    add up to at most `chunk_size` (256 -> 32, 32, 64, 128), then `chunk_size` each. Why: an
    image whose votes are all one class is decided after ~45 samples at R = sigma, alpha =
    0.001; chunks of 256 made it pay 256. () when chunk_size <= smallest (nothing to grow)."""
    sizes: list[int] = []
    size = smallest
    while size < chunk_size and sum(sizes) + size <= chunk_size:
        sizes.append(size)
        if len(sizes) > 1:
            size *= 2
    return tuple(sizes)


# -- the noise of a chunk, by address -----------------------------------------------------------

PHASES: dict[str, int] = {"selection": 0, "estimation": 1, "prediction": 2}
DEFAULT_CHUNK_SIZE = 256


@dataclass(frozen=True)
class Chunk:
    """The noise address of `size` consecutive samples: chunk `index` of image `image_id`'s
    draw in `phase` under noise seed `seed`."""

    seed: int
    image_id: int
    phase: str
    index: int
    size: int


def chunk_seed(seed: int, image_id: int, phase: str, chunk: int) -> int:
    """A 63-bit seed mixed by NumPy's SeedSequence (so nearby addresses are unrelated)."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; expected one of {sorted(PHASES)}")
    if seed < 0 or image_id < 0 or chunk < 0:
        raise ValueError("seed, image_id and chunk must be non-negative")
    state = np.random.SeedSequence([seed, image_id, PHASES[phase], chunk]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


@dataclass(frozen=True)
class SampleRequest:
    """Samples of one image in one phase, by address.

    The phase holds `total` samples cut into chunks of `chunk_size` (the last may be short:
    `total` fixes every chunk's size, hence its noise), after the sizes `first_chunks` when
    given (a sequential run's growing schedule, `chunk_span`); the request covers chunks
    [first_chunk, stop_chunk) of that plan (stop_chunk None = to the end).
    """

    seed: int
    image_id: int
    phase: str
    total: int
    chunk_size: int = DEFAULT_CHUNK_SIZE
    first_chunk: int = 0
    stop_chunk: int | None = None
    first_chunks: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"unknown phase {self.phase!r}; expected one of {sorted(PHASES)}")
        if self.seed < 0 or self.image_id < 0:
            raise ValueError("seed and image_id must be non-negative")
        if self.total < 0:
            raise ValueError(f"total must be non-negative, got {self.total}")
        if self.chunk_size < 1 or any(size < 1 for size in self.first_chunks):
            raise ValueError(f"chunk sizes must be positive, got {self.chunk_size} after {self.first_chunks}")
        stop = self.num_chunks_in_phase if self.stop_chunk is None else self.stop_chunk
        if not 0 <= self.first_chunk <= stop <= self.num_chunks_in_phase:
            raise ValueError(
                f"chunks [{self.first_chunk}, {stop}) outside the phase's {self.num_chunks_in_phase} chunks"
            )

    @property
    def num_chunks_in_phase(self) -> int:
        return count_chunks(self.total, self.chunk_size, self.first_chunks)

    def chunks(self) -> list[Chunk]:
        """The addresses of this request's chunks, in order."""
        stop = self.num_chunks_in_phase if self.stop_chunk is None else self.stop_chunk
        return [
            Chunk(self.seed, self.image_id, self.phase, index,
                  chunk_span(index, self.total, self.chunk_size, self.first_chunks)[1])
            for index in range(self.first_chunk, stop)
        ]

    @property
    def num_samples(self) -> int:
        return sum(chunk.size for chunk in self.chunks())


def chunk_noise(
    chunk: Chunk,
    shape: tuple[int, ...],
    sigma: float,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    noise: str = DEFAULT_NOISE,
) -> torch.Tensor:
    """Noise of kind `noise` (`noise_kind`; Gaussian N(0, sigma^2 I) by default) of
    shape [chunk.size, *shape] for this chunk's address.

    Identical for equal addresses on the same device type (CPU and CUDA generators differ).
    """
    import torch

    generator = torch.Generator(device=device)
    generator.manual_seed(chunk_seed(chunk.seed, chunk.image_id, chunk.phase, chunk.index))
    return noise_kind(noise).draw(generator, (chunk.size, *shape), sigma, device, dtype)


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` (or ``[B, H, W, 3]``) -> float32 channels-first in [0, 1]: the pixel
    space the noise is added in."""
    # Permute while still uint8 (4x less to move); the float32 copy is writable, so torch
    # shares it without a warning, and uint8 -> float32 is exact, as in ``ToTensor``.
    import torch

    axes = (2, 0, 1) if array.ndim == 3 else (0, 3, 1, 2)
    chw = np.ascontiguousarray(np.transpose(array, axes), dtype=np.float32)
    return torch.from_numpy(chw).div_(255)

"""The smoothing noises, defined once: how a chunk is drawn, its scale from sigma, the norm it
certifies and the certified radius from a lower bound p_A on the top class's probability.

Why one place: sampling, training, the fixed-n and sequential certificates, the reach checks
and the tables all need the same answer to "what does p_A buy at this sigma?"; a second copy
of a radius formula is how a run ends up certifying under one noise with another's radius.

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

Every radius is 0 when p_A <= 1/2 (the certificate abstains). NumPy/SciPy at import; torch
only inside the draws, so the statistics stay torch-free.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.stats import norm as _normal

if TYPE_CHECKING:
    import torch

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
    above, safe = _above_half(p)
    return np.where(above, sigma * _normal.ppf(safe), 0.0)


def _needed_gaussian(radius: float, sigma: float) -> float:
    return float(_normal.cdf(radius / sigma))


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

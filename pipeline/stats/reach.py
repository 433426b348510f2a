"""How far a run can certify at all: the largest radius its settings can reach, and the
sample count a radius needs -- one function for settings validation, reports and reduce.

Why: with n samples even an image whose every vote goes to its class has a bounded lower
confidence bound on p_A, so no radius above the noise's radius of that bound (Gaussian: sigma *
Phi^-1) can be certified.
Which bound depends on the run:

* fixed n (CERTIFY, Clopper-Pearson at alpha): alpha^(1/n);
* sequential (`pipeline.stats.sequential`, the mixture confidence sequence of
  `pipeline.stats.confidence_sequences`): the lower sequence L after n_max votes out of
  n_max, strictly lower than alpha^(1/n) (the price of validity under any stopping rule).

For the sequential test the ceiling is exact: E_n(q) at s = n grows with n (every factor of
the mixture is >= 1) and falls with q, so "some n <= n_max certifies q" is the same event as
"n_max all-positive votes certify q", i.e. success_thresholds(n_max, q) <= n_max. The
radius reported is computed by the same bisection as the certificates' own radii, so no
certified radius exceeds it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.stats.confidence_sequences import DEFAULT_SHAPE, lower_confidence_sequence, success_thresholds
from pipeline.sampling.noise import DEFAULT_NOISE, noise_kind
from pipeline.stats.smoothing import certified_radii, max_certifiable_radius

# Beyond this many samples the search for the n a radius needs gives up ("more than ...").
LARGEST_N = 10**12


def largest_radius(sigma: float, alpha: float, n: int, sequential: bool = False,
                   shape: float = DEFAULT_SHAPE, noise: str | None = DEFAULT_NOISE) -> float:
    """The largest radius (in the noise's norm) a run can certify with `n` estimation samples
    (n_max for a sequential run) at `alpha`: radius(alpha^(1/n)) for fixed n, radius(L) of the
    confidence sequence after n all-positive votes for a sequential run (Gaussian: sigma *
    Phi^-1 of them); 0 when n is too small to certify anything."""
    if not sequential:
        return float(max_certifiable_radius(int(n), alpha, sigma, noise))
    bound = float(lower_confidence_sequence(int(n), int(n), alpha, shape))
    return float(certified_radii(np.array([bound]), sigma, noise)[0])


def reaches(radius: float, sigma: float, alpha: float, n: int, sequential: bool = False,
            shape: float = DEFAULT_SHAPE, noise: str | None = DEFAULT_NOISE) -> bool:
    """Can some image be certified at `radius` with these settings? The exact test (not the
    rounded ceiling): fixed n, alpha^(1/n) >= q (the p_A that R needs, Gaussian Phi(R/sigma))
    and > 1/2 (CERTIFY abstains unless p_A_lower > 1/2); sequential, n all-positive votes pass
    the mixture test at q."""
    q = noise_kind(noise).needed_p(radius, sigma)
    if not q < 1.0:
        return False
    if not sequential:
        bound = float(np.exp(np.log(alpha) / n))
        return bound > 0.5 and bound >= q
    return bool(success_thresholds(int(n), q, alpha, shape) <= n)


def samples_needed(radius: float, sigma: float, alpha: float, sequential: bool = False,
                   shape: float = DEFAULT_SHAPE, noise: str | None = DEFAULT_NOISE) -> int | None:
    """The fewest samples (n, or n_max) with which `radius` can be certified; None when
    more than LARGEST_N would be needed (or Phi(R/sigma) rounds to 1)."""
    if not reaches(radius, sigma, alpha, LARGEST_N, sequential, shape, noise):
        return None
    low, high = 0, 1  # reaches() is monotone in n: not at low (or low = 0), yes at high
    while not reaches(radius, sigma, alpha, high, sequential, shape, noise):
        low, high = high, 2 * high
    while high - low > 1:
        mid = (low + high) // 2
        if reaches(radius, sigma, alpha, mid, sequential, shape, noise):
            high = mid
        else:
            low = mid
    return high


@dataclass(frozen=True)
class Reach:
    """What a run's settings can certify: `limit`, the largest radius, and whether the
    asked `radius` lies within it (with the samples it would need when not)."""

    radius: float
    limit: float
    within: bool
    needed: int | None
    n: int
    sequential: bool

    def message(self) -> str:
        """One line for the user: the largest reachable radius, and the n that would reach R."""
        what = "n_max" if self.sequential else "n"
        bound = "the confidence sequence" if self.sequential else "Clopper-Pearson"
        need = (f"{what} >= {self.needed:,} would reach it" if self.needed is not None
                else f"no {what} up to {LARGEST_N:.0e} reaches it")
        if self.radius == 0:  # nothing at all can be certified
            return (f"no radius can be certified with {what} = {self.n:,}: even all {self.n:,} votes for the class "
                    f"leave the lower bound ({bound}) at or below 1/2; {need}")
        return (f"radius {self.radius:g} cannot be certified with {what} = {self.n:,}: the largest reachable "
                f"radius is {self.limit:.3f} ({bound} at all {self.n:,} votes for the class); {need}")


def check_reach(radius: float, sigma: float, alpha: float, n: int, sequential: bool = False,
                shape: float = DEFAULT_SHAPE, noise: str | None = DEFAULT_NOISE) -> Reach:
    """Whether `radius` can be certified with these settings, and what to change if not."""
    within = reaches(radius, sigma, alpha, n, sequential, shape, noise)
    needed = None if within else samples_needed(radius, sigma, alpha, sequential, shape, noise)
    return Reach(float(radius), largest_radius(sigma, alpha, n, sequential, shape, noise), within, needed, int(n),
                 sequential)

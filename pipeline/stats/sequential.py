"""Sequential certification: stop sampling each image as soon as its certificate is decided.

Why: a fixed n (100,000 per image for models, 100 for APIs) is spent on every image, but most
images are decided after a few hundred votes (p_A near 1, or a wrong label). Here each image
is sampled chunk by chunk and leaves the pool as soon as an anytime-valid test
(`pipeline.stats.confidence_sequences`) decides it, with the same (1 - alpha) guarantee as CERTIFY.

Three modes, one state machine (`SequentialCertifier`, vectorised over images):

* labelled, radius R: is the image's label (the data set's, or an API's answer on the clean
  image) certified at L2 radius >= R? That is the test of p > q = Phi(R / sigma) for
  p = P(f(x + noise) = label). CERTIFIED as soon as E_n(q) >= 1/alpha (the lower confidence
  sequence passes q); NOT_CERTIFIED as soon as the futility rule gives up (below), or when
  even all-positive remaining samples could not certify by n_max, or at n_max.
  Futility (`futility`): "geometric" (new runs) looks at pre-set chunk ends growing by
  FUTILITY_GROWTH (32, 64, 128, 256, 512, 768, 1280, ...) and gives up when the one-sided
  Clopper-Pearson upper bound at level futility_alpha / (number of looks up to n_max) falls
  below q; "mixture" (runs recorded before it) gives up when the upper confidence sequence at
  `futility_alpha` falls below q after any chunk. Either way P(giving up | p >= q) <=
  futility_alpha (Bonferroni over the pre-set looks; Ville), and the geometric rule stops a
  hopeless image sooner (README: 1,071 -> 889 samples at p = 0.8, q = Phi(1)).
* deployment (no label): a selection phase on its own samples picks the top class (it stops
  once that class's lower sequence at `selection_alpha` passes 1/2, or when no class can
  reach q, or at `selection_max`), then the labelled test runs on fresh estimation samples.
* largest radius (radius None): sample until the certified radius sigma * Phi^-1(L_n) grows
  by less than `tolerance` per doubling of the samples (or the upper sequence shows it cannot
  grow by `tolerance` any more), or n_max; report the largest radius reached.

Guarantees (for each image; the label, or the selected class, is fixed independently of the
estimation samples):

* G1 (labelled, radius R). If p <= Phi(R/sigma), P(CERTIFIED) <= alpha, whatever the chunk
  sizes (even chosen from past votes), n_max, or when the engine stops, pauses or resumes.
  A sample that gives no vote for the class (another class, or an API answer naming no label)
  counts against it, which only lowers the evidence. A failed query (an API error) is not a
  sample: its chunk is held, the query asked again (`pipeline.apis.run.state`), and the
  chunk decided only once every query in it has been answered. `futility_alpha`,
  curtailment and n_max only cause missed certificates.
* G2 (deployment). P(a class c is CERTIFIED at R while p_c <= Phi(R/sigma)) <= alpha. Split:
  all of alpha goes to the estimation test and none to the selection: the selection samples
  are a separate noise phase, independent of the estimation samples, so G1 holds given the
  selected class. `selection_alpha` only sets when the selection stops (a wrong pick costs
  samples and a missed certificate, never a wrong one).
* G3 (largest radius). P(reported radius > sigma * Phi^-1(p)) <= alpha for any stopping rule:
  the radius comes from the lower confidence sequence, valid at all n simultaneously, and is
  the largest over the checkpoints looked at.

Determinism (for `dsmooth reduce` and resume). Votes arrive as per-chunk counts (chunk k of a
phase = samples [k*chunk_size, (k+1)*chunk_size) of `pipeline.sampling.noise.SampleRequest`); every
rule is evaluated after each chunk, in chunk order, on the running totals only. So the
decisions are a pure function of each image's sequence of chunk counts: the same whatever
the grouping of chunks into `decide` calls, and `replay` of the stored chunks reproduces them
exactly (chunks drawn after an image was decided are ignored and reported as unused).

Driving it from an engine (many images at once):

    test = SequentialTest.from_settings(settings)
    cert = SequentialCertifier(test, labels=label_columns)   # deployment: num_images=len(ids)
    while work := cert.pending(growth=0.5):                   # [] once every image is decided
        for w in work:                                        # one entry per phase with work
            requests = [SampleRequest(seed, image_ids[row], w.phase, w.total, test.chunk_size,
                                      first_chunk=first, stop_chunk=first + count)
                        for row, first, count in zip(w.image, w.first_chunk, w.num_chunks)]
            ...                 # sample them; store one row per (image, phase, chunk)
            cert.decide(ChunkVotes(w.phase, image=rows, chunk=chunks, samples=sizes, counts=votes))
    result = cert.decisions()                                 # result.as_decisions() for reduce

`decide` may be called with any part of the returned chunks as they come back, provided
each image's chunks of a phase arrive in order (rows within one call may be in any order;
buffer a chunk that comes back before its predecessor).

Resume / reduce: `replay(test, stored_chunk_votes, labels=...)` (or `num_images=...` for a
deployment run) returns the certifier in the state the run had reached; keep driving it to
resume, or read `.decisions()`. Since alpha decides when sampling stops, it belongs to the
run's identity. Replaying at another alpha (`dsmooth reduce --alpha`) is still valid (Ville's
inequality holds up to any stopping time, the run's included) but can only use the samples
that were drawn: an image the replay leaves undecided is not certified.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np
from scipy.stats import binom

from pipeline.stats.confidence_sequences import (
    DEFAULT_SHAPE,
    MAX_SHAPE,
    failure_thresholds,
    lower_confidence_sequence,
    success_thresholds,
    upper_confidence_sequence,
)
from pipeline.sampling.noise import chunk_ends, chunk_span, count_chunks
from pipeline.sampling.noise import DEFAULT_NOISE, noise_kind
from pipeline.stats.smoothing import ABSTAIN, Decisions, certified_radii

SELECTION = "selection"
ESTIMATION = "estimation"
_PHASE_CODE = {SELECTION: 0, ESTIMATION: 1}
_DONE = 2
# Futility rules: "mixture" = the upper confidence sequence after every chunk (the rule of runs
# recorded before the geometric one, which is what `SequentialTest` defaults to so that they
# replay unchanged); "geometric" = Clopper-Pearson at geometrically spaced looks (new runs).
FUTILITY_RULES = ("mixture", "geometric")
FUTILITY_GROWTH = 1.5  # a look at the first chunk end >= 1.5 x the previous look (simulated best of 1.25-2)


class Status(IntEnum):
    """Per image: still sampling, certified, or finished without a certificate."""

    UNDECIDED = 0
    CERTIFIED = 1
    NOT_CERTIFIED = 2


class Reason(IntEnum):
    """Why an image stopped (NONE while undecided)."""

    NONE = 0
    LOWER_BOUND = 1  # certified: the lower confidence sequence passed the threshold
    UPPER_BOUND = 2  # the upper sequence (futility_alpha) fell below the threshold
    CANNOT_REACH = 3  # even all-positive samples up to n_max could not certify
    N_MAX = 4  # the sample cap was reached undecided
    CONVERGED = 5  # largest radius: it stopped growing by `tolerance`
    NO_CLASS = 6  # no label given, or the selection found no class that can reach the threshold


@dataclass(frozen=True)
class SequentialTest:
    """The rule of a sequential run; every field changes which samples are drawn, so all of
    them belong to the run's identity.

    sigma, alpha: noise level and the certificates' failure probability (G1-G3).
    n_max: estimation samples per image at most. chunk_size: samples per noise chunk.
    radius: the radius to certify, in the noise's norm (l2 Gaussian, l1 uniform/Laplace); None =
    largest-radius mode.
    futility_alpha: level of the upper sequence that gives up on an image (power only).
    tolerance: largest-radius mode, the radius gain per doubling below which sampling stops.
    selection_alpha, selection_max: deployment mode, the selection's stopping level and cap.
    shape: the mixture's prior shape (`pipeline.stats.confidence_sequences`).
    futility: how an image that cannot reach the threshold is given up (FUTILITY_RULES; module
    doc); "mixture" is the default here because runs recorded without it used that rule.
    first_chunks: sizes of each phase's first chunks before `chunk_size` ones (a growing
    schedule such as 32, 32, 64, 128: a clear image stops after a few dozen samples while a
    long run still writes few rows). Fixed before any vote, as G1-G3 need of the decision points
    (the confidence sequences hold at every n, so any pre-set points keep them); () = every
    chunk of `chunk_size`, as runs made before the schedule existed.
    noise: the smoothing noise (`pipeline.sampling.noise`): its radius function gives both the
    threshold q a radius needs and the radius a bound certifies.
    """

    sigma: float
    alpha: float
    n_max: int
    chunk_size: int
    radius: float | None = None
    futility_alpha: float = 0.05
    tolerance: float = 0.01
    selection_alpha: float = 0.01
    selection_max: int = 1000
    shape: float = DEFAULT_SHAPE
    first_chunks: tuple[int, ...] = ()
    futility: str = "mixture"
    noise: str = DEFAULT_NOISE

    def describe(self) -> str:
        """The rule in a user's words (log lines show this, never the dataclass repr)."""
        goal = f"certify at R = {self.radius:g}" if self.radius is not None else "the largest radius per image"
        noise = "" if self.noise == DEFAULT_NOISE else f" ({self.noise} noise, {noise_kind(self.noise).norm} radii)"
        return (f"{goal}{noise}, sigma = {self.sigma:g}, alpha = {self.alpha:g}, at most {self.n_max:,} samples "
                f"per image "
                f"in chunks of {self.chunk_size:,}")

    def __post_init__(self) -> None:
        object.__setattr__(self, "first_chunks", tuple(self.first_chunks))  # a list from run.json
        if any(int(size) != size or size < 1 for size in self.first_chunks):
            raise ValueError(f"first_chunks must be positive integers, got {self.first_chunks!r}")
        if self.futility not in FUTILITY_RULES:
            raise ValueError(f"futility must be one of {', '.join(FUTILITY_RULES)}, got {self.futility!r}")
        if not self.sigma > 0 or not np.isfinite(self.sigma):
            raise ValueError(f"sigma must be > 0, got {self.sigma!r}")
        for name in ("alpha", "futility_alpha", "selection_alpha"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must lie in (0, 1), got {getattr(self, name)!r}")
        for name in ("n_max", "chunk_size", "selection_max"):
            if int(getattr(self, name)) != getattr(self, name) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        kind = noise_kind(self.noise)  # raises on an unknown noise
        if self.radius is not None and not (0 <= self.radius and kind.needed_p(self.radius, self.sigma) < 1):
            raise ValueError(f"radius must be >= 0 and within the {self.noise} noise's reach at sigma={self.sigma:g} "
                             f"(the p_A it needs < 1), got {self.radius!r}")
        if not self.tolerance > 0:
            raise ValueError(f"tolerance must be > 0, got {self.tolerance!r}")
        if not 0 < self.shape <= MAX_SHAPE:
            raise ValueError(f"shape must lie in (0, {MAX_SHAPE}], got {self.shape!r}")

    @property
    def threshold(self) -> float:
        """q, the p_A that certifies radius R (Gaussian: Phi(R/sigma); the inverse of the noise's
        radius function); 1/2 in largest-radius mode."""
        return 0.5 if self.radius is None else noise_kind(self.noise).needed_p(self.radius, self.sigma)

    def total(self, phase: str) -> int:
        """Samples planned in a phase: the `total` of its SampleRequest (fixes chunk sizes)."""
        return {SELECTION: self.selection_max, ESTIMATION: self.n_max}[_check_phase(phase)]

    def num_chunks(self, phase: str) -> int:
        return count_chunks(self.total(phase), self.chunk_size, self.first_chunks)

    def chunk_samples(self, phase: str, chunk: int) -> int:
        """Samples in chunk `chunk` of `phase` (`pipeline.sampling.noise.chunk_span`)."""
        return chunk_span(chunk, self.total(phase), self.chunk_size, self.first_chunks)[1]

    @classmethod
    def from_settings(cls, settings: Any) -> SequentialTest:
        """From a job's settings: SmoothingSettings (sigma, alpha, n0, n, chunk_size) with the
        SequentialSettings mixin; n_max defaults to n, the selection cap is n0."""
        n_max = settings.n_max if settings.n_max is not None else settings.n
        return cls(sigma=settings.sigma, alpha=settings.alpha, n_max=n_max, chunk_size=settings.chunk_size,
                   radius=settings.radius, futility_alpha=settings.futility_alpha, tolerance=settings.tolerance,
                   selection_alpha=settings.selection_alpha, selection_max=settings.n0,
                   first_chunks=tuple(getattr(settings, "first_chunks", None) or ()),
                   futility=getattr(settings, "futility", None) or "mixture",
                   noise=getattr(settings, "noise", DEFAULT_NOISE))

    def chunk_ends(self, phase: str) -> np.ndarray:
        """The running sample count after each chunk of `phase`: where the rules look."""
        return np.asarray(chunk_ends(self.total(phase), self.chunk_size, self.first_chunks), dtype=np.int64)

    def futility_looks(self) -> np.ndarray:
        """The estimation chunk ends where the geometric futility rule looks: the first chunk
        end, then each first chunk end >= FUTILITY_GROWTH x the previous look. Fixed by the
        test alone (before any vote), so the Bonferroni split over them is valid."""
        looks: list[int] = []
        for end in self.chunk_ends(ESTIMATION).tolist():
            if not looks or end >= FUTILITY_GROWTH * looks[-1]:
                looks.append(end)
        return np.asarray(looks, dtype=np.int64)


def _check_phase(phase: str) -> str:
    if phase not in _PHASE_CODE:
        raise ValueError(f"unknown phase {phase!r}; expected {SELECTION!r} or {ESTIMATION!r}")
    return phase


@dataclass(frozen=True)
class ChunkVotes:
    """Votes of whole noise chunks, one row per (image, chunk), rows in any order.

    image: the image's row in the certifier (0..num_images-1); chunk: the chunk index in the
    phase; samples: samples drawn in the chunk (answered queries that named no class included;
    a failed query is asked again before its chunk is complete); counts: either
    [rows] votes for the image's tested class (estimation only), or [rows, classes] votes
    per class column (a column absent from the matrix had no votes).
    """

    phase: str
    image: np.ndarray
    chunk: np.ndarray
    samples: np.ndarray
    counts: np.ndarray

    def __post_init__(self) -> None:
        _check_phase(self.phase)
        for name in ("image", "chunk", "samples", "counts"):
            array = np.asarray(getattr(self, name))
            if array.size and not np.issubdtype(array.dtype, np.integer):
                raise ValueError(f"{name} must hold integers, got {array.dtype}")
            object.__setattr__(self, name, array.astype(np.int64))
        rows = len(self.image)
        if any(a.ndim != 1 or len(a) != rows for a in (self.image, self.chunk, self.samples)):
            raise ValueError("image, chunk and samples must be 1-D arrays of the same length")
        if self.counts.ndim not in (1, 2) or self.counts.shape[0] != rows:
            raise ValueError(f"counts must have {rows} rows, got shape {self.counts.shape}")
        if self.counts.ndim == 1 and self.phase == SELECTION:
            raise ValueError("selection votes need per-class counts [rows, classes]")
        if np.any(self.image < 0) or np.any(self.chunk < 0) or np.any(self.samples < 1) or np.any(self.counts < 0):
            raise ValueError("image and chunk must be >= 0, samples >= 1 and counts >= 0")
        row_votes = self.counts if self.counts.ndim == 1 else self.counts.sum(axis=1)
        if np.any(row_votes > self.samples):
            raise ValueError("a chunk holds more votes than samples")

    def __len__(self) -> int:
        return len(self.image)


@dataclass(frozen=True)
class Work:
    """Chunks to sample next in one phase: for each image row, chunks
    [first_chunk, first_chunk + num_chunks) of a phase of `total` samples."""

    phase: str
    total: int
    image: np.ndarray
    first_chunk: np.ndarray
    num_chunks: np.ndarray


@dataclass(frozen=True)
class SequentialDecisions:
    """Per image: status (Status), reason (Reason), the class column tested (-1 none), the
    certified radius (>= R when CERTIFIED at R; 0 when NOT_CERTIFIED; the best so far while
    a largest-radius image is UNDECIDED), the lower confidence bound behind it (NaN when not
    computed), the estimation votes for the tested class, the samples used per phase, and
    the samples drawn after the decision (ignored). Only CERTIFIED rows carry a claim."""

    status: np.ndarray
    reason: np.ndarray
    target: np.ndarray
    radius: np.ndarray
    p_lower: np.ndarray
    estimation_votes: np.ndarray
    selection_samples: np.ndarray
    estimation_samples: np.ndarray
    unused_samples: np.ndarray

    @property
    def certified(self) -> np.ndarray:
        return self.status == Status.CERTIFIED

    @property
    def needs_samples(self) -> np.ndarray:
        return self.status == Status.UNDECIDED

    @property
    def samples(self) -> np.ndarray:
        return self.selection_samples + self.estimation_samples

    def as_decisions(self) -> Decisions:
        """The project's CERTIFY output (`pipeline.stats.smoothing.Decisions`): the class column when
        certified, else ABSTAIN, with its radius; what `dsmooth reduce` tabulates."""
        prediction = np.where(self.certified, self.target, ABSTAIN).astype(np.int64)
        return Decisions(prediction, np.where(self.certified, self.radius, 0.0), self.p_lower.copy())


class _Thresholds:
    """A memoised table n -> success (or failure) threshold for one (q, level, shape).

    A miss also fills the phase's chunk boundaries up to twice the largest n asked for, in
    one vectorised bisection: with regular chunks each table is computed a handful of times.
    """

    def __init__(self, q: float, level: float, shape: float, kind: str, boundaries: np.ndarray) -> None:
        self.q, self.level, self.shape, self.kind = q, level, shape, kind
        self.boundaries = boundaries
        self.table: dict[int, int] = {}

    def __call__(self, n: np.ndarray) -> np.ndarray:
        unique, inverse = np.unique(n, return_inverse=True)
        missing = [m for m in unique.tolist() if m not in self.table]
        if missing:
            ahead = self.boundaries[self.boundaries <= 2 * max(missing)].tolist()
            wanted = np.array(sorted({*missing, *(m for m in ahead if m not in self.table)}), dtype=np.int64)
            compute = success_thresholds if self.kind == "success" else failure_thresholds
            self.table.update(zip(wanted.tolist(), compute(wanted, self.q, self.level, self.shape).tolist()))
        return np.array([self.table[m] for m in unique.tolist()], dtype=np.int64)[inverse]


class _GeometricFutility:
    """n -> the most successes at which the geometric rule gives up (-1: no look at n).

    At a look n the image is given up when the one-sided Clopper-Pearson upper bound on p at
    level a = futility_alpha / (number of looks) is below q, i.e. when
    P(Binomial(n, q) <= s) <= a. For p >= q that event has probability <= a at each look, so
    <= futility_alpha over all of them: a certifiable image is rarely lost, and never is a
    wrong one certified (giving up only abstains)."""

    def __init__(self, q: float, looks: np.ndarray, futility_alpha: float) -> None:
        level = futility_alpha / max(len(looks), 1)
        self.table = dict(zip(looks.tolist(), binomial_failure_thresholds(looks, q, level).tolist()))

    def __call__(self, n: np.ndarray) -> np.ndarray:
        return np.array([self.table.get(m, -1) for m in np.asarray(n).tolist()], dtype=np.int64)


def binomial_failure_thresholds(samples: np.ndarray, q: float, level: float) -> np.ndarray:
    """Per n: the largest s with P(Binomial(n, q) <= s) <= level (-1 if none): s successes
    in n put the one-sided Clopper-Pearson upper bound at `level` below q exactly then."""
    n = np.asarray(samples, dtype=np.int64)
    k = binom.ppf(level, n, q).astype(np.int64)  # the smallest k with cdf(k) >= level
    return np.where(binom.cdf(k, n, q) <= level, k, k - 1)


class SequentialCertifier:
    """Per-image state of a sequential run, updated chunk by chunk (see the module doc).

    `labels` (class column per image; negative = no label, never certified) makes a labelled
    run; `labels=None` with `num_images` makes a deployment run that selects the class first.
    The state arrays (`successes` and `samples` of the estimation phase, `selection_counts`,
    `target`, `next_chunk`, ...) are for reading; only `decide` changes them.
    """

    def __init__(self, test: SequentialTest, labels: np.ndarray | None = None, num_images: int | None = None) -> None:
        self.test = test
        if labels is None and num_images is None:
            raise ValueError("give labels (labelled run) or num_images (deployment run)")
        n = len(labels) if labels is not None else int(num_images)  # type: ignore[arg-type]
        if labels is not None and num_images is not None and num_images != n:
            raise ValueError(f"{n} labels for num_images={num_images}")
        self.labelled = labels is not None
        self.phase = np.full(n, _PHASE_CODE[ESTIMATION if self.labelled else SELECTION], dtype=np.int8)
        self.target = np.asarray(labels, dtype=np.int64).copy() if labels is not None else np.full(n, -1, np.int64)
        self.status = np.full(n, Status.UNDECIDED, dtype=np.int8)
        self.reason = np.full(n, Reason.NONE, dtype=np.int8)
        self.radius = np.zeros(n)
        self.p_lower = np.full(n, np.nan)
        self.selection_counts = np.zeros((n, 0), dtype=np.int64)
        self.selection_samples = np.zeros(n, dtype=np.int64)
        self.successes = np.zeros(n, dtype=np.int64)
        self.samples = np.zeros(n, dtype=np.int64)
        self.next_chunk = {SELECTION: np.zeros(n, dtype=np.int64), ESTIMATION: np.zeros(n, dtype=np.int64)}
        self.unused = np.zeros(n, dtype=np.int64)
        self.checkpoint_samples = np.zeros(n, dtype=np.int64)  # largest-radius mode
        self.checkpoint_radius = np.zeros(n)
        q = test.threshold
        boundaries = {phase: test.chunk_ends(phase) for phase in _PHASE_CODE}
        self._certify = _Thresholds(q, test.alpha, test.shape, "success", boundaries[ESTIMATION])
        self._futile: _Thresholds | _GeometricFutility = (
            _GeometricFutility(q, test.futility_looks(), test.futility_alpha) if test.futility == "geometric"
            else _Thresholds(q, test.futility_alpha, test.shape, "failure", boundaries[ESTIMATION]))
        self._select = _Thresholds(0.5, test.selection_alpha, test.shape, "success", boundaries[SELECTION])
        self._select_futile = _Thresholds(q, test.futility_alpha, test.shape, "failure", boundaries[SELECTION])
        # Votes against never decrease and n - k(n) never decreases (one more vote for the class
        # cannot hurt), so more than n_max - k(n_max) votes against rule out any certificate.
        self._max_failures = test.n_max - int(success_thresholds(test.n_max, q, test.alpha, test.shape))
        if self.labelled:
            no_label = self.target < 0
            self._stop(np.nonzero(no_label)[0], Status.NOT_CERTIFIED, Reason.NO_CLASS)

    def __len__(self) -> int:
        return len(self.status)

    # -- the engine's side ----------------------------------------------------------------

    def pending(self, growth: float = 0.0) -> list[Work]:
        """The chunks to sample next, per phase, for every undecided image.

        Each image gets max(1, floor(growth * chunks done)) further chunks (capped by its
        plan): growth 0 = one chunk at a time (nothing wasted), growth g wastes at most about a
        fraction g of an image's samples after its decision, in O(log n_max) round trips.
        """
        if growth < 0:
            raise ValueError(f"growth must be >= 0, got {growth!r}")
        work = []
        for phase, code in _PHASE_CODE.items():
            rows = np.nonzero((self.phase == code) & (self.status == Status.UNDECIDED))[0]
            if rows.size == 0:
                continue
            first = self.next_chunk[phase][rows]
            left = self.test.num_chunks(phase) - first
            count = np.clip(np.floor(growth * first).astype(np.int64), 1, None)
            work.append(Work(phase, self.test.total(phase), rows, first, np.minimum(count, left)))
        return work

    def decide(self, votes: ChunkVotes) -> SequentialDecisions:
        """Apply chunk votes, deciding after each chunk in chunk order; return all decisions.

        For an image still sampling in `votes.phase`, its rows must continue its chunk
        sequence without gap or repeat (ValueError otherwise). Rows for an image already
        decided, or past this phase, are ignored and counted as unused samples.
        """
        if len(votes) == 0:
            return self.decisions()
        if votes.image.max() >= len(self):
            raise ValueError(f"image row {votes.image.max()} out of range for {len(self)} images")
        order = np.lexsort((votes.chunk, votes.image))
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = _rank_within(votes.image[order])
        self._check_sequence(votes, rank)
        code = _PHASE_CODE[votes.phase]
        for r in range(int(rank.max()) + 1):
            rows = np.nonzero(rank == r)[0]
            img = votes.image[rows]
            live = (self.phase[img] == code) & (self.status[img] == Status.UNDECIDED)
            np.add.at(self.unused, img[~live], votes.samples[rows[~live]])
            rows, img = rows[live], img[live]
            if rows.size == 0:
                continue
            self.next_chunk[votes.phase][img] += 1
            if votes.phase == SELECTION:
                self._add_selection(img, votes.counts[rows], votes.samples[rows])
            else:
                self._add_estimation(img, votes.counts[rows], votes.samples[rows])
        return self.decisions()

    def _check_sequence(self, votes: ChunkVotes, rank: np.ndarray) -> None:
        """Before any change: each still-sampling image's rows continue its chunks without gap
        or repeat, and stay within the phase's planned samples."""
        live = (self.phase[votes.image] == _PHASE_CODE[votes.phase]) & (self.status[votes.image] == Status.UNDECIDED)
        expected = self.next_chunk[votes.phase][votes.image] + rank
        wrong = live & (votes.chunk != expected)
        if wrong.any():
            i = int(np.nonzero(wrong)[0][0])
            raise ValueError(f"image row {votes.image[i]}: got {votes.phase} chunk {votes.chunk[i]}, expected chunk "
                             f"{expected[i]} (chunks must arrive in sequence, without gaps or repeats)")
        drawn = self.selection_samples if votes.phase == SELECTION else self.samples
        added = np.bincount(votes.image[live], weights=votes.samples[live], minlength=len(self)).astype(np.int64)
        if np.any(drawn + added > self.test.total(votes.phase)):
            raise ValueError(f"more than the planned {self.test.total(votes.phase)} {votes.phase} samples for an image")

    def decisions(self) -> SequentialDecisions:
        return SequentialDecisions(
            status=self.status.copy(), reason=self.reason.copy(), target=self.target.copy(),
            radius=self.radius.copy(), p_lower=self.p_lower.copy(), estimation_votes=self.successes.copy(),
            selection_samples=self.selection_samples.copy(), estimation_samples=self.samples.copy(),
            unused_samples=self.unused.copy())

    def withdraw(self, rows: np.ndarray) -> None:
        """Stop sampling these undecided images without a certificate (e.g. an image that
        cannot be read): fewer certificates, never a wrong one."""
        rows = np.asarray(rows, dtype=np.int64)
        rows = rows[self.status[rows] == Status.UNDECIDED]
        self._stop(rows, Status.NOT_CERTIFIED, Reason.NO_CLASS)

    # -- the rules ----------------------------------------------------------------------

    def _stop(self, img: np.ndarray, status: Status, reason: Reason | np.ndarray) -> None:
        self.status[img] = status
        self.reason[img] = reason
        self.phase[img] = _DONE

    def _add_selection(self, img: np.ndarray, counts: np.ndarray, samples: np.ndarray) -> None:
        width = max(self.selection_counts.shape[1], counts.shape[1], 1)
        if width > self.selection_counts.shape[1]:
            self.selection_counts = np.pad(self.selection_counts, ((0, 0), (0, width - self.selection_counts.shape[1])))
        self.selection_counts[img, : counts.shape[1]] += counts
        self.selection_samples[img] += samples
        n = self.selection_samples[img]
        votes = self.selection_counts[img]
        top = votes.argmax(axis=1)  # ties -> lowest column, as CERTIFY's selection
        top_votes = votes[np.arange(len(img)), top]
        hopeless = top_votes <= self._select_futile(n)  # even the top class cannot reach q (at futility_alpha)
        exhausted = (n >= self.test.selection_max) | (
            self.next_chunk[SELECTION][img] >= self.test.num_chunks(SELECTION))
        chosen = ~hopeless & ((top_votes >= self._select(n)) | (exhausted & (top_votes > 0)))
        given_up = ~chosen & (hopeless | exhausted)
        self._stop(img[given_up], Status.NOT_CERTIFIED, Reason.NO_CLASS)
        picked = img[chosen]
        self.target[picked] = top[chosen]
        self.phase[picked] = _PHASE_CODE[ESTIMATION]

    def _add_estimation(self, img: np.ndarray, counts: np.ndarray, samples: np.ndarray) -> None:
        if counts.ndim == 2:
            column = self.target[img]
            inside = column < counts.shape[1]
            counts = np.where(inside, counts[np.arange(len(img)), np.where(inside, column, 0)], 0)
        self.successes[img] += counts
        self.samples[img] += samples
        if self.test.radius is None:
            self._largest_radius(img)
        else:
            self._at_radius(img)

    def _exhausted(self, img: np.ndarray) -> np.ndarray:
        return (self.samples[img] >= self.test.n_max) | (
            self.next_chunk[ESTIMATION][img] >= self.test.num_chunks(ESTIMATION))

    def _at_radius(self, img: np.ndarray) -> None:
        s, n = self.successes[img], self.samples[img]
        certified = s >= self._certify(n)
        futile = s <= self._futile(n)
        unreachable = n - s > self._max_failures  # failures only grow: no n <= n_max can certify
        exhausted = self._exhausted(img)
        done = img[certified]
        if done.size:
            low = lower_confidence_sequence(self.successes[done], self.samples[done], self.test.alpha, self.test.shape)
            low = np.maximum(low, self.test.threshold)  # certified means E_n(q) >= 1/alpha, i.e. L_n >= q
            self.p_lower[done] = low
            self.radius[done] = np.maximum(self.test.radius, certified_radii(low, self.test.sigma, self.test.noise))
            self._stop(done, Status.CERTIFIED, Reason.LOWER_BOUND)
        reason = np.select([futile, unreachable, exhausted], [Reason.UPPER_BOUND, Reason.CANNOT_REACH, Reason.N_MAX],
                           Reason.NONE)
        stop = ~certified & (reason != Reason.NONE)
        self._stop(img[stop], Status.NOT_CERTIFIED, reason[stop])

    def _largest_radius(self, img: np.ndarray) -> None:
        n = self.samples[img]
        exhausted = self._exhausted(img)
        look = (n >= 2 * self.checkpoint_samples[img]) | exhausted  # the first chunk, then each doubling
        img, exhausted = img[look], exhausted[look]
        if img.size == 0:
            return
        s, n = self.successes[img], self.samples[img]
        low = lower_confidence_sequence(s, n, self.test.alpha, self.test.shape)
        high = upper_confidence_sequence(s, n, self.test.futility_alpha, self.test.shape)
        radius = certified_radii(low, self.test.sigma, self.test.noise)
        better = radius > self.radius[img]
        self.p_lower[img] = np.where(better | np.isnan(self.p_lower[img]), low, self.p_lower[img])
        best = np.maximum(self.radius[img], radius)
        self.radius[img] = best
        ceiling = certified_radii(high, self.test.sigma, self.test.noise)  # 0 when U <= 1/2; Gaussian +inf at U = 1
        gain = best - self.checkpoint_radius[img]
        stalled = (self.checkpoint_samples[img] > 0) & (best > 0) & (gain < self.test.tolerance)
        capped = ceiling < best + self.test.tolerance  # the radius cannot grow by tolerance any more
        self.checkpoint_samples[img] = n
        self.checkpoint_radius[img] = best
        stop = stalled | capped | exhausted
        reason = np.select([stalled | (capped & (best > 0)), capped, exhausted],
                           [Reason.CONVERGED, Reason.UPPER_BOUND, Reason.N_MAX])
        status = np.where(best > 0, Status.CERTIFIED, Status.NOT_CERTIFIED)
        for value in (Status.CERTIFIED, Status.NOT_CERTIFIED):
            chosen = stop & (status == value)
            self._stop(img[chosen], value, reason[chosen])


def _rank_within(sorted_groups: np.ndarray) -> np.ndarray:
    """Position of each element within its run of equal values (the array is sorted)."""
    if len(sorted_groups) == 0:
        return np.zeros(0, dtype=np.int64)
    start = np.r_[0, np.nonzero(np.diff(sorted_groups))[0] + 1]
    return np.arange(len(sorted_groups)) - np.repeat(start, np.diff(np.r_[start, len(sorted_groups)]))


def _concatenate(votes: Iterable[ChunkVotes], phase: str) -> ChunkVotes | None:
    parts = [v for v in votes if v.phase == phase and len(v)]
    if not parts:
        return None
    width = max((p.counts.shape[1] for p in parts if p.counts.ndim == 2), default=None)
    if width is not None and any(p.counts.ndim == 1 for p in parts):
        raise ValueError(f"{phase} votes mix per-class and single-class counts")
    counts = [np.pad(p.counts, ((0, 0), (0, width - p.counts.shape[1]))) if width is not None else p.counts
              for p in parts]
    return ChunkVotes(phase, np.concatenate([p.image for p in parts]), np.concatenate([p.chunk for p in parts]),
                      np.concatenate([p.samples for p in parts]), np.concatenate(counts))


def _contiguous(votes: ChunkVotes) -> ChunkVotes:
    """One row per (image, chunk), and per image only its chunks 0, 1, 2, ... up to the first
    gap (a chunk lost in a crash: a resumed run draws it, and the ones after it, again)."""
    order = np.lexsort((votes.chunk, votes.image))
    image, chunk = votes.image[order], votes.chunk[order]
    repeat = np.r_[False, (image[1:] == image[:-1]) & (chunk[1:] == chunk[:-1])]
    if repeat.any():
        here, before = order[repeat], order[np.nonzero(repeat)[0] - 1]
        differs = votes.counts[here] != votes.counts[before]
        differs = differs.any(axis=1) if differs.ndim == 2 else differs
        if np.any(differs | (votes.samples[here] != votes.samples[before])):
            raise ValueError("the stored votes hold one chunk twice with different counts")
    order, image, chunk = order[~repeat], image[~repeat], chunk[~repeat]
    # Within an image the distinct sorted chunks minus their rank never decrease, so
    # `chunk == rank` keeps exactly the prefix before the first gap.
    keep = order[chunk == _rank_within(image)]
    return ChunkVotes(votes.phase, votes.image[keep], votes.chunk[keep], votes.samples[keep], votes.counts[keep])


def replay(test: SequentialTest, votes: Iterable[ChunkVotes], labels: np.ndarray | None = None,
           num_images: int | None = None) -> SequentialCertifier:
    """Rebuild a run's state from its stored chunk votes: the certifier is exactly where the
    run was (same decisions, same next chunks), whatever the order or grouping of the rows.

    A pure function of (test, labels, chunk counts): `dsmooth reduce` reads `.decisions()`,
    a resumed run keeps driving the returned certifier. Repeated rows of a chunk are merged
    (they must agree), and an image's chunks after a missing one are dropped (the resumed
    run draws them again, with the same noise). Selection chunks are applied before
    estimation chunks.
    """
    votes = list(votes)
    certifier = SequentialCertifier(test, labels=labels, num_images=num_images)
    for phase in (SELECTION, ESTIMATION):
        merged = _concatenate(votes, phase)
        if merged is not None:
            certifier.decide(_contiguous(merged))
    return certifier

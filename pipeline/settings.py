"""Settings that `certify` and `certify-api` share, declared once: which images, and how to
smooth them (noise level, sample counts, noise seed and chunking, the denoiser).

Both jobs' settings models inherit these classes, so a flag, a YAML key, a default range or
a help text of a shared setting exists in exactly one place. A job may choose its own
default (an API run samples 100, a model run 100,000), never its own meaning.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Annotated, ClassVar, Literal

from pydantic import AfterValidator, Field, model_validator

from pipeline.errors import setting
from pipeline.config import (
    Alpha,
    ConfigError,
    Noise,
    NonNegativeFloat,
    NonNegativeInt,
    OptionalWhere,
    PositiveFloat,
    PositiveInt,
    Seed,
    Settings,
    Sigma,
    Where,
    option,
)
from pipeline.data.kinds import KINDS, DatasetKind  # noqa: F401 - light (no torch); KINDS for the callers here

if TYPE_CHECKING:  # declarations import nothing heavy: `dsmooth COMMAND --help` loads no torch
    from pipeline.data.core import ImageDataset


log = logging.getLogger(__name__)

# The sample counts, typed once with their meaning; each job picks its defaults.
SelectionSamples = Annotated[int, Field(ge=1, strict=True, description=(
    "selection samples per image: CERTIFY's first draw, which only picks the top class"))]
EstimationSamples = Annotated[int, Field(ge=1, strict=True, description=(
    "estimation samples per image (CERTIFY's fresh second draw; PREDICT's only draw)"))]
ChunkSize = Annotated[int, Field(ge=1, strict=True, description=(
    "samples per noise chunk; part of every sample's noise address (seed, image, phase, chunk)"))]
def _resolve_auto_precision(value: str) -> str:
    """`auto` becomes fp32 or bf16 as the settings are made (`resolve_here`): what is recorded
    is the arithmetic used. Only `auto` imports torch, so parsing stays fast."""
    if value != "auto":
        return value
    from pipeline.sampling.precision import resolve_here

    return resolve_here(value)


# The arithmetic of f∘D's forward passes (`pipeline.sampling.precision`): in the run identity
# when not fp32, since votes are those of the model as computed.
Precision = Annotated[Literal["fp32", "bf16", "fp16", "auto"], AfterValidator(_resolve_auto_precision), Field(description=(
    "arithmetic of the forward passes: fp32, bf16 or fp16 autocast (CPU too), or auto = bf16 where the "
    "device has it natively (CUDA with bf16, a CPU with AVX512-BF16/AMX), else fp32, resolved where the "
    "run is set up and recorded as what it resolved to. Part of the run identity when not fp32: a certificate is of the model as computed"))]

DatasetLayout = Annotated[DatasetKind, Field(description=(
    "layout: cifar10 (pickled batches, class folders or their .tar.gz), imagenet "
    "(<split>/<wnid>/*.JPEG), folder (any images; class sub-folders give labels)"))]


class DataSelection(Settings):
    """Which images of which data set: the layout, its root, the split and a slice of it."""

    dataset: DatasetLayout = option(..., group="data")
    data_root: Where = option(..., group="data", metavar="PATH", help=(
        "data set folder or archive: a local path, s3://bucket/... or gs://bucket/... (copied to a local "
        "cache once)"))
    split: str = option("test", group="data", metavar="NAME",
                        help="split to certify (imagenet: test = val; folder: ignored)")
    skip: PositiveInt = option(1, group="data", metavar="K",
                               help="take every K-th image of the split (the papers use 20 / 100)")
    max: NonNegativeInt | None = option(None, group="data", metavar="M",
                                        help="stop before position M of the split (default: all)")
    ids: list[NonNegativeInt] | None = option(None, group="data", metavar="ID",
                                              help="certify exactly these image ids (instead of --skip/--max)")
    image_size: PositiveInt | None = option(None, group="data", metavar="PX", help=(
        "resize + center-crop to PX (imagenet default 224; others: as stored)"))
    on_bad_image: Literal["fail", "skip"] = option("fail", group="data", help=(
        "an image that cannot be read: stop the job (after writing what was done), or skip it "
        "(listed in run.json and the summary)"))

    def open_split(self, labels: bool = True) -> ImageDataset:
        """The whole split (image ids are positions in it); a remote root is read through a
        local cached copy."""
        from pipeline.data.sources import open_dataset
        from pipeline.runs.fs import Location

        root = Location.of(self.data_root).local_copy()
        return open_dataset(self.dataset, root, self.split, image_size=self.image_size, labels=labels)

    def select(self, split: ImageDataset) -> ImageDataset:
        """The images of `split` these settings select (ids, or every skip-th before max)."""
        selected = split.by_ids(self.ids) if self.ids is not None else split.subset(self.skip, self.max)
        if len(selected) == 0:
            raise ConfigError("max" if self.max is not None else "data_root",
                              f"no images selected from {split.name} (skip={self.skip}, max={self.max})")
        return selected

    @model_validator(mode="after")
    def _one_way_to_select(self) -> DataSelection:
        if self.ids is not None and (self.skip != 1 or self.max is not None):
            raise ConfigError("ids", "give either ids or skip/max, not both")
        return self


class PoolSettings(Settings):
    """How a job waits for its Ray actors."""

    wait_timeout: PositiveFloat = option(300.0, group="cluster", metavar="S", help=(
        "seconds to wait for the first actor to start; then stop with the reason if none can be placed "
        "(an autoscaling cluster that can add a fitting node keeps waiting)"))


class SmoothingSettings(Settings):
    """The smoothing: noise level and sample counts, the noise seed and chunking, and the
    optional denoiser in front of the classifier (or API)."""

    sigma: Sigma = option(..., group="smoothing", metavar="S", help=(
        "noise level sigma, in [0, 1] pixel units (required, > 0): the Gaussian's std; for uniform and "
        "laplace the mean absolute noise per pixel (see --noise)"))
    noise: Noise = option("gaussian", group="smoothing", help=(
        "smoothing noise: gaussian certifies l2 radii; uniform (on [-2 sigma, 2 sigma]) and laplace (scale "
        "sigma) certify l1 radii (Yang et al. 2020). Part of the run identity when not gaussian; the "
        "denoiser must have been trained for it"))
    allow_foreign_denoiser: bool = option(False, group="models", help=(
        "accept a denoiser trained for another noise than --noise (an experiment: 'trained on Gaussian, "
        "tested on uniform'); certificates stay valid, only weaker. Part of the run identity when set"))
    alpha: Alpha = option(0.001, group="smoothing", metavar="A", help=(
        "failure probability of the certificates reported at the end (with fixed n the votes do not "
        "depend on it: `dsmooth reduce --alpha` recomputes them; with --sequential it also decides "
        "when each image stops)"))
    seed: Seed = option(0, group="smoothing", metavar="S", help="noise seed; same seed = same noise = same counts")
    denoiser: OptionalWhere = option(None, group="models", metavar="CKPT",
                                     help="denoiser D checkpoint (path or URI), or 'none' for the classifier alone")

    def phases(self) -> list[tuple[str, int]]:
        """(phase, samples) drawn per image: CERTIFY's two independent draws, or PREDICT's one."""
        if getattr(self, "mode", "certify") == "certify":
            return [("selection", self.n0), ("estimation", self.n)]  # type: ignore[attr-defined]
        return [("prediction", self.n)]  # type: ignore[attr-defined]

    def samples_per_image(self) -> int:
        return sum(num for _, num in self.phases())

    @model_validator(mode="after")
    def _selection_within_estimation(self) -> SmoothingSettings:
        n0, n = getattr(self, "n0", None), getattr(self, "n", None)
        if getattr(self, "mode", "certify") == "certify" and n0 is not None and n is not None and n0 > n:
            raise ConfigError("n0", f"n0={n0} must not exceed n={n} (selection uses fewer samples)")
        if getattr(self, "mode", "certify") == "certify" and n is not None and not getattr(self, "sequential", False):
            from pipeline.stats.reach import check_reach  # scipy: not for every --help

            # A fixed-n run asks no radius, but one whose n certifies none (not even R = 0)
            # would spend every sample for abstentions: say so in one line (it may be a dry test).
            reach = check_reach(0.0, self.sigma, self.alpha, n, noise=self.noise)
            if not reach.within:
                log.warning("%s", reach.message())
        return self


SEQUENTIAL_GROUP = "sequential certification (anytime-valid; see pipeline/stats/sequential.py)"
# Settings that mean nothing without `sequential`: giving one alone is a mistake, not a no-op.
SEQUENTIAL_ONLY = ("radius", "n_max", "tolerance", "futility_alpha", "selection_alpha", "certify_class")


class SequentialSettings(Settings):
    """Sequential certification (`pipeline.stats.sequential`): each image is sampled chunk by chunk
    (`chunk_size`) and stops as soon as an anytime-valid test at level `alpha` decides it.

    Mixed into a job's settings next to SmoothingSettings, whose `sigma`, `alpha`, `n0` (the
    cap of the deployment mode's adaptive selection), `n` and `chunk_size` it uses. Every
    field here changes which samples are drawn, so a job puts them all (and `alpha`) in its
    run identity when `sequential` is on.
    """

    sequential: bool = option(False, group=SEQUENTIAL_GROUP, help=(
        "stop sampling each image as soon as its certificate is decided, with the same (1 - alpha) "
        "guarantee (a confidence sequence, valid under any stopping); n becomes a cap, see --n-max"))
    radius: NonNegativeFloat | None = option(None, group=SEQUENTIAL_GROUP, metavar="R", help=(
        "certify at this radius (l2 for gaussian noise, l1 for uniform/laplace): test p_A > q(R) (Gaussian: "
        "Phi(R/sigma)) and stop once decided; none = largest-radius "
        "mode: sample until the certified radius grows by less than --tolerance per doubling"))
    n_max: PositiveInt | None = option(None, group=SEQUENTIAL_GROUP, metavar="N", help=(
        "at most N estimation samples per image; an image still undecided there is not certified "
        "(default: n)"))
    tolerance: PositiveFloat = option(0.01, group=SEQUENTIAL_GROUP, metavar="DR", help=(
        "largest-radius mode: stop when the certified radius grows by less than DR per doubling "
        "of the samples"))
    futility_alpha: Alpha = option(0.05, group=SEQUENTIAL_GROUP, metavar="B", help=(
        "give up on an image once an upper bound at level B falls below Phi(R/sigma) (certify: see "
        "--futility; certify-api: the upper confidence sequence); B bounds the chance of missing a "
        "certificate, never of a wrong one"))
    selection_alpha: Alpha = option(0.01, group=SEQUENTIAL_GROUP, metavar="A0", help=(
        "deployment mode: the adaptive selection stops once the top class's lower confidence sequence "
        "at level A0 passes 1/2 (or at n0 samples); it spends none of alpha, its samples being separate"))
    certify_class: Literal["label", "top"] = option("label", group=SEQUENTIAL_GROUP, help=(
        "label: test the image's label (for APIs, the answer on the clean image); top: deployment, "
        "select the top class adaptively, then test it on fresh samples"))
    # A job's own cap when the user sets no n_max (None: n); applied here, before the reach check.
    default_n_max: ClassVar[int | None] = None

    @model_validator(mode="after")
    def _radius_within_reach(self) -> SequentialSettings:
        if not self.sequential:
            given = [name for name in SEQUENTIAL_ONLY if name in self.model_fields_set]
            if given:
                raise ConfigError(given[0], f"{given[0]} only applies with sequential: true "
                                            f"({setting('sequential', True)})")
            return self
        if getattr(self, "mode", "certify") != "certify":
            raise ConfigError("sequential", "sequential certification needs mode certify (PREDICT has no radius)")
        sigma = getattr(self, "sigma", None)
        noise = getattr(self, "noise", "gaussian")
        if noise == "gaussian" and self.radius is not None and sigma is not None and self.radius / sigma > 8.0:
            raise ConfigError("radius", f"radius {self.radius} = {self.radius / sigma:.1f} sigma cannot be "
                              "certified (Phi(R/sigma) rounds to 1); use R <= 8 sigma")
        if self.n_max is None and self.default_n_max is not None:
            self.__dict__["n_max"] = self.default_n_max  # not setattr: that would validate again
        n_max = self.n_max if self.n_max is not None else getattr(self, "n", None)
        alpha = getattr(self, "alpha", None)
        if sigma is not None and n_max is not None and alpha is not None:
            from pipeline.stats.reach import check_reach  # scipy: not for every --help

            # Refused before any sample or query: every image would spend a chunk and stop
            # unreachable (largest-radius mode: nothing at all, R = 0, can be certified).
            reach = check_reach(self.radius or 0.0, sigma, alpha, n_max, sequential=True, noise=noise)
            if not reach.within:
                raise ConfigError("radius" if self.radius is not None else "n_max", reach.message())
        return self


class ClassifierFlags(Settings):
    """What completes a classifier spec (`pipeline.models.sources.ClassifierSpec.of`): its
    weights and its preprocessing. `certify` and `train` (the frozen white-box classifier)
    share them, so a classifier is named the same way wherever one is named. Each job
    declares its own `classifier` (required or not); this one fixes its place in --help."""

    classifier: str | None = option(None, group="models", metavar="SPEC", help="the classifier spec")
    classifier_weights: str | None = option(None, group="models", metavar="FILE", help=(
        "weights of a timm:NAME, registry NAME or factory classifier (.safetensors, or .pth/.bin read "
        "with weights_only)"))
    classifier_input_size: PositiveInt | None = option(None, group="models", metavar="PX", help=(
        "resize (shorter side) and centre-crop to PX inside f, after the noise and the denoiser "
        "(default: the model's own config)"))
    classifier_resize: PositiveInt | None = option(None, group="models", metavar="PX", help=(
        "resize the shorter side to PX before the centre crop (default: the input size)"))
    classifier_mean: list[float] | None = option(None, group="models", metavar="M", help=(
        "per-channel mean the classifier subtracts (default: the model's own config)"))
    classifier_std: list[float] | None = option(None, group="models", metavar="S", help=(
        "per-channel std the classifier divides by (default: the model's own config)"))
    classifier_interpolation: Literal["bilinear", "bicubic", "nearest"] | None = option(
        None, group="models", help="resize interpolation (default: the model's own config, else bilinear)")
    classifier_preprocessing: Literal["auto", "none"] | None = option(None, group="models", help=(
        "auto (default): the model's own preprocessing (timm/Hugging Face config, an archive's, a factory's), "
        "refused before any sample when the model carries none and no --classifier-mean/-std is given; "
        "none: the network normalises its input itself"))

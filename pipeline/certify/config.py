"""The settings of `dsmooth certify`, declared once: YAML keys, flags, defaults, help and
validation. Light on purpose (pydantic only, no torch, Ray or data loaders), so that
`dsmooth certify --help` and a mistyped flag answer at once."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import model_validator

from pipeline.errors import setting
from pipeline.config import (
    ConfigError,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Where,
    option,
    sound_noise_problem,
)
from pipeline.settings import (
    ChunkSize,
    ClassifierFlags,
    DataSelection,
    EstimationSamples,
    PoolSettings,
    Precision,
    SelectionSamples,
    SEQUENTIAL_GROUP,
    SequentialSettings,
    SmoothingSettings,
)

if TYPE_CHECKING:
    from pipeline.certify.pair import PairSettings


SPEED_GROUP = "speed (may change between resumptions)"
SPEED_NOTE = (
    "  --actors, --shard-size and --max-restarts never change a count, and the noise does not depend on\n"
    "  --batch either. Float rounding can: a sample on a near-tie may be classified differently with\n"
    "  another --batch, --precision or --optimize, and CPU and CUDA draw different noise. For bit-identical\n"
    "  counts keep these and the device type; any choice gives equally valid votes."
)


class CertifyConfig(DataSelection, SmoothingSettings, SequentialSettings, PoolSettings, ClassifierFlags):
    """Settings of `dsmooth certify` (YAML keys = these field names; flags override them)."""

    classifier: Where = option(..., group="models", metavar="SPEC", help=(
        "classifier f: a dsmooth checkpoint (or raw state dict with --classifier-arch; path or URI); a "
        "registry/torchvision NAME, timm:NAME or package.module:callable (with --classifier-weights); a "
        "timm or Hugging Face folder; a torch.export .pt2 or TorchScript file (archives run their own "
        "code: trusted files only). See `dsmooth models`"))
    classifier_arch: str | None = option(None, group="models", metavar="NAME", help=(
        "architecture of a raw state-dict classifier (e.g. resnet50; see `dsmooth models`)"))
    allow_foreign_classifier: bool = option(False, group="models", help=(
        "accept a classifier that does not record the data set it was trained on (a raw state dict "
        "or a foreign checkpoint); one that records another data set is refused regardless"))
    labels: str | None = option(None, group="data", metavar="FILE", help=(
        "each image's label from FILE: a CSV image,label (image: its path, file name or stem; label: a class "
        "index or a class name), ImageNet's val.txt ('ILSVRC2012_val_00000001.JPEG 65'), Kaggle's "
        "LOC_val_solution.csv, or the devkit's ILSVRC2012_validation_ground_truth.txt (its IDs mapped to wnids by "
        "the devkit's meta.mat, beside it or in ../data/). Part of the run identity (its SHA-256) when given"))
    class_names: str | None = option(None, group="data", metavar="FILE", help=(
        "the model's class names, one per line in class-index order (default: the model's own: Hugging Face "
        "id2label, timm's ImageNet wnids); class folders and --labels names are matched to them"))
    mode: Literal["certify", "predict"] = option("certify", group="smoothing",
                                                 help="CERTIFY (label + radius) or PREDICT (label only)")
    n0: SelectionSamples = option(100, group="smoothing", metavar="N0")
    n: EstimationSamples = option(100_000, group="smoothing", metavar="N")
    chunk_size: ChunkSize = option(256, group="smoothing", metavar="N")
    first_chunks: list[PositiveInt] | None = option(None, group=SEQUENTIAL_GROUP, metavar="N", help=(
        "sequential: the sizes of each image's first chunks, before chunks of --chunk-size; fixed before any "
        "vote (default: 32, 32, 64, ... up to chunk_size, so a clear image stops after a few dozen samples; "
        "a run recorded with fixed chunks resumes with them). Part of the run identity"))
    futility: Literal["geometric", "mixture"] | None = option(None, group=SEQUENTIAL_GROUP, help=(
        "sequential: how an image that cannot reach R is given up (both miss a certificate with "
        "probability <= --futility-alpha): geometric = Clopper-Pearson at looks growing 1.5x (default; "
        "stops sooner), mixture = the upper confidence sequence after every chunk (runs recorded before "
        "resume with it). Part of the run identity"))
    batch_size: PositiveInt = option(400, group=SPEED_GROUP, flag="--batch", metavar="N",
                                     help="noisy samples per forward pass")
    actors: PositiveInt | None = option(None, group=SPEED_GROUP, metavar="N",
                                        help="actors in the pool (default: one per GPU, or one per CPU)")
    gpus_per_actor: NonNegativeFloat | None = option(None, group=SPEED_GROUP, metavar="G", help=(
        "GPUs per actor, fractions pack several on one GPU (default 1 if the cluster has GPUs, else 0)"))
    cpus_per_actor: PositiveFloat = option(1.0, group=SPEED_GROUP, metavar="C", help="CPUs (threads) per actor")
    precision: Precision = option("fp32", group="smoothing")
    sound: bool = option(False, group="smoothing", help=(
        "floating-point-sound sampling (Voráček & Hein 2023, pipeline/sampling/sound.py): noise rounded to the "
        "8-bit grid and added exactly, so the certificate holds for the computation performed (Gaussian only; "
        "8-bit images). Part of the run identity when set"))
    amp: bool | None = option(None, group=SPEED_GROUP, help=(
        "deprecated: read as --precision fp16 on a GPU (with a warning); --precision decides the arithmetic"))
    optimize: bool = option(True, group=SPEED_GROUP,
                            help="fold BatchNorm into convolutions and run channels-last")
    shard_size: PositiveInt | None = option(None, group=SPEED_GROUP, metavar="N", help=(
        "images per actor call and per Parquet part, the unit the progress counts and Ctrl-C keeps "
        "(default: ~10,000 samples' worth, at least 8 per actor, one image when n0 + n >= 10,000)"))
    max_restarts: NonNegativeInt = option(3, group=SPEED_GROUP, metavar="N",
                                          help="Ray restarts of a crashed actor, and retries of its call")
    output: Where = option(..., metavar="DIR", help=(
        "run directory (local, s3://bucket/... or gs://bucket/...): run.json + votes/part-*.parquet (required)"))

    @model_validator(mode="after")
    def _amp_is_a_precision(self) -> CertifyConfig:
        """The deprecated --amp becomes --precision fp16 where it used to compute fp16 (a GPU under
        fp32), so what the run records is what it computes; then it is forgotten."""
        if self.amp:
            import torch

            from pipeline.sampling.precision import amp_as_precision

            device = "cuda" if torch.cuda.is_available() else "cpu"
            self.__dict__["precision"] = amp_as_precision(True, self.precision, device)  # not setattr: validates again
        self.__dict__["amp"] = None
        return self

    @model_validator(mode="after")
    def _sound_is_gaussian(self) -> CertifyConfig:
        """`pipeline.config.sound_noise_problem`, before any work."""
        problem = sound_noise_problem(self.sound, self.noise)
        if problem:
            raise ConfigError("sound", problem)
        return self

    @model_validator(mode="after")
    def _first_chunks(self) -> CertifyConfig:
        """Sequential runs grow their first chunks (`growing_schedule`) and give up futile images
        by the geometric rule unless told otherwise (`jobs.certify` resumes older runs with theirs)."""
        if not self.sequential:
            for name in ("first_chunks", "futility"):
                if getattr(self, name) is not None:
                    raise ConfigError(name, f"{name} only applies with sequential: true "
                                                 f"({setting('sequential', True)})")
            return self
        if self.first_chunks is None:
            from pipeline.sampling.noise import growing_schedule

            self.__dict__["first_chunks"] = list(growing_schedule(self.chunk_size))  # not setattr: validates again
        if self.futility is None:
            self.__dict__["futility"] = "geometric"
        return self

    def pair_settings(self, classifier: Any = None) -> PairSettings:
        """What each model actor builds its pair with; `classifier` (`ModelBytes`): where a spec
        (`NAME --classifier-weights FILE`) named the architecture, that name."""
        from pipeline.certify.pair import PairSettings

        arch = getattr(classifier, "arch", None) or self.classifier_arch
        return PairSettings(sigma=self.sigma, classifier_arch=arch, batch_size=self.batch_size,
                            allow_foreign_classifier=self.allow_foreign_classifier,
                            optimize=self.optimize, precision=self.precision, sound=self.sound, noise=self.noise,
                            allow_foreign_denoiser=self.allow_foreign_denoiser)

"""The settings of `dsmooth reduce`, `dsmooth demo` and `dsmooth api-emulator`, declared
once like every other command's (`pipeline.certify.config`, `pipeline.apis.config`,
`pipeline.training.config`): flag, default, range and help in one field.

They live here, not beside their code, because `pipeline.reduce` and `pipeline.apis.emulator`
import pandas, scipy or torch: this module imports pydantic only, so `dsmooth COMMAND --help`
and a mistyped flag answer at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from pipeline.config import Alpha, NonNegativeFloat, PositiveInt, Seed, Settings, option
from pipeline.settings import EstimationSamples, Precision, SelectionSamples

# The radii of a certified-accuracy table unless told otherwise (reduce, certify's summary).
DEFAULT_RADII: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)

Probability = Annotated[float, Field(ge=0, le=1, strict=True)]
Port = Annotated[int, Field(ge=0, le=65535, strict=True)]


class ReduceSettings(Settings):
    """`dsmooth reduce`: which inputs, at which alpha, and what to write."""

    inputs: list[str] = option(..., cli=False, min_length=1)  # positional RUN arguments
    alpha: Alpha | None = option(None, metavar="A", help=(
        "recompute runs' certificates at this failure probability (default: each run's own, as it decided)"))
    radii: list[NonNegativeFloat] | None = option(None, metavar="R", min_length=1, help=(
        "radii of the table: l2, or l1 for uniform / laplace runs (default: 0 0.25 0.5 0.75 1.0 1.25 1.5 and "
        "each sequential run's R)"))
    names: list[str] | None = option(None, metavar="NAME", help=(
        "one label per RUN argument (a directory's inputs become NAME/relative-path)"))
    envelope: bool = option(False, help="add the best certified accuracy per radius over all inputs")
    format: Literal["markdown", "csv", "latex"] = option("markdown", help="table format")
    output: str | None = option(None, metavar="FILE", help="write the table here instead of stdout")
    plot: str | None = option(None, metavar="FILE.png", help=(
        "certified accuracy vs radius, one line per input, the largest certifiable radius marked"))
    per_image: str | None = option(None, metavar="FILE.csv", help="every input's per-image certificates")


class DemoSettings(Settings):
    """`dsmooth demo`: how many shipped CIFAR-10 images, how many samples, where."""

    images: PositiveInt = option(100, metavar="N", help=(
        "test images to certify, spread over the 10 classes (max 500); a rerun certifies only those without "
        "votes under --output"))
    n0: SelectionSamples = option(20, metavar="N0", help="selection samples per image")
    n: EstimationSamples = option(400, metavar="N", help=(
        "estimation samples per image (the paper uses 10,000-100,000). No radius above "
        "0.25*Phi^-1(alpha^(1/n)) can be certified, so n caps the radii: the table leaves out the radii "
        "beyond it and says so, the plot marks it"))
    alpha: Alpha = option(0.001, metavar="A", help="failure probability (the votes do not depend on it)")
    batch_size: PositiveInt = option(400, flag="--batch", metavar="N", help="noisy samples per forward pass")
    precision: Precision = option("fp32")
    actors: PositiveInt | None = option(None, metavar="N", help="certification actors (default: one per CPU)")
    output: Path = option(Path("runs/demo"), metavar="DIR", help=(
        "where runs, table and plots go; a rerun resumes the runs there, which needs the same --n0 and --n"))
    noise: Literal["gaussian", "uniform"] = option("gaussian", help=(
        "smoothing noise: gaussian (l2 radii, the four denoisers) or uniform (l1 radii, Yang et al. 2020: no "
        "denoiser vs the shipped MSE denoiser trained for uniform noise; runs under OUTPUT/<row>-uniform)"))
    diffusion: bool = option(False, help=(
        "add a fifth row: the shipped small DDPM as a one-shot diffusion denoiser (off the shelf, one model "
        "for every sigma); its row alone takes about 3x as long as a denoiser row (measured on 2 idle CPU cores: "
        "350 s vs 111-115 s), so the demo takes about twice as long"))
    fresh: bool = option(False, help="delete the demo's runs under --output first (to change --n0 or --n there)")


class EmulatorSettings(Settings):
    """`dsmooth api-emulator`: where it listens, what answers, and which faults it injects."""

    port: Port = option(8790, metavar="PORT", help="port on 127.0.0.1 (0 picks a free one)")
    classifier: str | None = option(None, metavar="CKPT", help=(
        "answer with this dsmooth classifier checkpoint instead of the built-in colour classifier"))
    seed: Seed = option(0, metavar="S", help="seed of the fault draws")
    throttle: Probability = option(0.0, metavar="P", help="probability of a throttling answer (429)")
    server_error: Probability = option(0.0, metavar="P", help="probability of a 5xx answer")
    malformed: Probability = option(0.0, metavar="P", help="probability of a 200 with a broken body")
    latency: NonNegativeFloat = option(0.0, metavar="S", help="seconds added before answering")
    latency_rate: Probability = option(1.0, metavar="P", help="fraction of answers delayed")
    auth_failure: bool = option(False, help="refuse every call as with invalid credentials")
    refusal: Probability = option(0.0, metavar="P", help="chat models: probability of a refusal")
    garbage: Probability = option(0.0, metavar="P", help="chat models: probability of a reply naming no class")
    retry_after: NonNegativeFloat = option(0.0, metavar="S", help="the Retry-After of a 429, where one is sent")

"""Readers for the per-image logs of the reference implementations.

Cohen et al.'s `certify.py`/`predict.py` and the Denoised Smoothing authors' code write one
tab-separated row per image (header `idx label predict radius correct time`, or without
`radius` for PREDICT), the `time` column either seconds or H:MM:SS.ffffff; the authors'
vision-API code writes a header-less `log.txt` (idx, correct True/False, radius, label,
predict). Reading them lets published numbers sit in the same table as new runs.

Real collections hold runs that never finished: a file that is empty, holds only its
header, or stops mid-row raises UnusableInput so the caller can skip it by name.

A log records neither its n, alpha, data set nor model; `describe_path` reads them from the
path where it follows a documented layout (../shared/data/README.md), so a plot of published
logs can still say what it shows and where n caps the radius.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.runs.fs import Location, StorageError
from pipeline.reduce.certificates import Certificates, ReduceWarning, UnusableInput, make_certificates
from pipeline.stats.smoothing import max_certifiable_radius

API_COLUMNS = ["idx", "correct", "radius", "label", "predict"]
REQUIRED_TSV = {"idx", "label", "predict", "correct"}

_SIGMA = re.compile(r"sigma_(\d+(?:\.\d+)?)")
_NOISE = re.compile(r"noise_(\d+(?:\.\d+)?)")
_BARE = re.compile(r"^(\d*\.\d+)(?:_\w+)?$")  # vision_api/<api>/<denoiser>/0.25/ or 0.25_1k/
_N = re.compile(r"(?:^|_)N_?(\d+)$")  # test_N10000 (Salman et al.), N_1000 (Cohen et al.'s predict)
_SPLIT = re.compile(r"^(test|train|val)(?:_|$)")
LOG_DATASETS = ("cifar10", "imagenet")  # the data-set folder names of the documented layouts
VISION_API = "vision_api"  # vision_api/<api>/<denoiser>/<sigma>/log.txt: the paper's 100 ImageNet images
VISION_API_N = 100  # documented n of that layout; a "<sigma>_<k>k" folder drew k thousand
_THOUSANDS = re.compile(r"^\d*\.\d+_(\d+)k$")
# The reference implementations' default --alpha, used by every documented collection. A log
# does not record it, so it is assumed only where the path also gives n (a documented layout).
LOG_ALPHA = 0.001
RADIUS_DIGITS = 3  # the reference writers print radii to 3 significant digits ("{:.3}")


def sigma_from_path(path: str | Path) -> float | None:
    """The smoothing sigma a log's path names: `sigma_X` (the certify sigma) first, then a
    bare `X` component (vision_api layout), then `noise_X` (the training sigma, which PREDICT
    logs were also smoothed at); None when the path says nothing."""
    text = Path(path).as_posix()
    found = _SIGMA.findall(text)
    if found:
        return float(found[-1])
    for part in reversed(Path(path).parts):
        match = _BARE.match(part)
        if match:
            return float(match.group(1))
    found = _NOISE.findall(text)
    return float(found[-1]) if found else None


def describe_path(path: str | Path) -> dict[str, str | int | None]:
    """The `dataset` ("cifar10/test"), `model` ("denoiser → classifier") and estimation `n`
    a log's path names in the documented layouts; None for what the path does not say.

        cohen2019/certify/<dataset>/<model>/noise_S/<split>/sigma_S     (n not in the path)
        cohen2019/predict/<dataset>/<model>/noise_S/<split>/N_<n>
        salman2020/<dataset>/.../MODEL_<classifier>[_DENOISER_<denoiser>]/.../test_N<n>/sigma_S
        salman2020/vision_api/<api>/<denoiser>/<sigma>[_<k>k]/log.txt   (ImageNet; n = 100, or k thousand)

    `read_log` keeps n only if no radius in the file exceeds the bound it implies.
    """
    parts = Path(path).parts
    lowered = [part.lower() for part in parts]
    dataset = next((part for part in lowered if part in LOG_DATASETS), None)
    model = None
    numbers_in_layout: list[int] = []
    if VISION_API in lowered:
        dataset = "imagenet-val-100"
        api = lowered.index(VISION_API)
        if len(parts) > api + 2:
            denoiser = parts[api + 2]
            model = f"{parts[api + 1]} API" if denoiser == "no_denoiser" else f"{denoiser} → {parts[api + 1]} API"
        thousands = [int(m.group(1)) * 1000 for m in map(_THOUSANDS.match, parts[api:]) if m]
        numbers_in_layout = thousands or [VISION_API_N]
    for part in parts:
        if part.startswith("MODEL_"):
            classifier, _, denoiser = part[len("MODEL_"):].partition("_DENOISER_")
            model = f"{denoiser} → {classifier}" if denoiser else classifier
    if model is None and dataset is not None:
        after = lowered.index(dataset) + 1
        if after < len(parts) and not re.match(r"(noise|sigma)_|MODEL_", parts[after]) and not _SPLIT.match(parts[after]):
            model = parts[after]
    split = next((m.group(1) for m in map(_SPLIT.match, lowered) if m), None)
    if dataset is not None and split is not None:
        dataset = f"{dataset}/{split}"
    numbers = numbers_in_layout + [int(m.group(1)) for m in map(_N.search, parts) if m]
    return {"dataset": dataset, "model": model, "n": numbers[-1] if numbers else None}


def read_log(path: str | Path | Location, name: str | None = None, sigma: float | None = None) -> Certificates:
    """Certificates from one reference log (local or object storage); sigma from the path
    unless given, and the data set, model and n (with the reference alpha) where the path
    says (`describe_path`)."""
    location = Location.of(path)
    frame, certify = _parse(location)
    duplicated = int(frame["image_id"].duplicated().sum())
    if duplicated:
        warnings.warn(
            f"{path}: {duplicated} image(s) appear more than once (a resumed run?); every row is counted, "
            "as the reference analysis did",
            ReduceWarning,
            stacklevel=2,
        )
    sigma = sigma_from_path(location.path) if sigma is None else sigma
    described = describe_path(location.path)
    n = described["n"] if certify else None  # PREDICT logs (no radius column) certify no radius
    if n is not None and not _within_bound(frame["radius"].to_numpy(), int(n), sigma):
        n = None  # radii past the bound: the layout's n or alpha does not hold for this file
    return make_certificates(
        frame,
        name=str(path) if name is None else name,
        sigma=sigma,
        source=str(path),
        alpha=LOG_ALPHA if n is not None else None,
        n=n,
        dataset=described["dataset"],
        model=described["model"],
    )


def _within_bound(radii: np.ndarray, n: int, sigma: float | None) -> bool:
    """Every radius is at most sigma * Phi^-1(LOG_ALPHA^(1/n)), up to the log's rounding."""
    if sigma is None or len(radii) == 0:
        return sigma is not None
    bound = max_certifiable_radius(n, LOG_ALPHA, sigma)
    rounding = 0.5 * 10.0 ** (math.floor(math.log10(bound)) - RADIUS_DIGITS + 1) if bound > 0 else 0.0
    return bool(radii.max() <= bound + rounding)


def _parse(path: Location) -> tuple[pd.DataFrame, bool]:
    """(certificates, whether the log is CERTIFY's: it has a radius column)."""
    try:
        raw = path.read_bytes()
    except (OSError, StorageError) as error:
        raise UnusableInput(f"{path}: unreadable ({getattr(error, 'strerror', None) or error})") from None
    if not raw.strip():
        raise UnusableInput(f"{path}: empty file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UnusableInput(f"{path}: not a text log") from None
    if not text.endswith("\n"):
        # The writers end every row with a newline: without one the last row may hold a clipped
        # number that still parses, so no row of the file can be trusted to be complete.
        raise UnusableInput(f"{path}: truncated (the last row has no line end; the writer stopped mid-row)")
    lines = [line for line in text.splitlines() if line.strip()]
    first = [field.strip() for field in lines[0].split("\t")]
    api = first[0] != "idx"
    if not api:
        header, body = first, lines[1:]
        if not REQUIRED_TSV <= set(header):
            raise UnusableInput(f"{path}: unknown log header {lines[0]!r}")
        if not body:
            raise UnusableInput(f"{path}: header only, no rows (a run that never finished)")
    elif len(first) == len(API_COLUMNS):
        header, body = API_COLUMNS, lines
    else:
        raise UnusableInput(f"{path}: not a certification log (first line {lines[0][:60]!r})")
    fields = [[field.strip() for field in line.split("\t")] for line in body]
    for number, row in enumerate(fields, start=1):
        if len(row) != len(header):
            raise UnusableInput(
                f"{path}: truncated or malformed (row {number} has {len(row)} fields, expected {len(header)})"
            )
    columns = dict(zip(header, (list(column) for column in zip(*fields))))
    try:
        return _convert(columns, api=api), "radius" in columns
    except ValueError as error:
        raise UnusableInput(f"{path}: malformed value ({error})") from None


def _convert(columns: dict[str, list[str]], api: bool) -> pd.DataFrame:
    """Typed columns from the raw strings (plain numpy: hundreds of logs must read in seconds)."""
    if api:
        truth = {"True": True, "False": False, "1": True, "0": False}
        if not set(columns["correct"]) <= set(truth):
            raise ValueError("correct must be True/False")
        correct = np.array([truth[value] for value in columns["correct"]], dtype=bool)
        label = np.array(columns["label"], dtype=object)
        predict = np.array(columns["predict"], dtype=object)
        abstained = predict == "-1"
    else:
        flags = _integers(columns["correct"], "correct")
        if not np.isin(flags, (0, 1)).all():
            raise ValueError("correct must be 0 or 1")
        correct = flags == 1
        label = _integers(columns["label"], "label")
        predict = _integers(columns["predict"], "predict")
        abstained = predict == -1
    count = len(correct)
    radius = np.array(columns["radius"], dtype=np.float64) if "radius" in columns else np.zeros(count)
    if np.isnan(radius).any():
        raise ValueError("radius is not a number")
    time_s = np.array([_seconds(value) for value in columns["time"]]) if "time" in columns else np.full(count, np.nan)
    return pd.DataFrame(
        {
            "image_id": _integers(columns["idx"], "idx"),
            "label": label,
            "predict": predict,
            "p_a_lower": np.nan,
            "radius": radius,
            "correct": correct,
            "abstained": abstained,
            "time_s": time_s,
        }
    )


def _integers(values: list[str], what: str) -> np.ndarray:
    try:
        return np.array([int(value) for value in values], dtype=np.int64)
    except ValueError:
        raise ValueError(f"{what} must be an integer") from None


def _seconds(value: str) -> float:
    """`time` as seconds: Cohen's CIFAR-10 logs write a float, the others str(timedelta)
    ("H:MM:SS.ffffff", or "D day(s), H:MM:SS.ffffff" past a day); NaN if neither."""
    try:
        if ":" not in value:
            return float(value)
        days = 0.0
        if "day" in value:
            head, value = value.split(",", 1)
            days = float(head.split()[0])
        hours, minutes, seconds = value.strip().split(":")
        return days * 86400.0 + float(hours) * 3600.0 + float(minutes) * 60.0 + float(seconds)
    except ValueError:
        return float("nan")

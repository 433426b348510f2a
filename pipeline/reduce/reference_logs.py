"""Readers for the per-image logs of the reference implementations.

Cohen et al.'s `certify.py`/`predict.py` and the Denoised Smoothing authors' code write one
tab-separated row per image (header `idx label predict radius correct time`, or without
`radius` for PREDICT), the `time` column either seconds or H:MM:SS.ffffff; the authors'
vision-API code writes a header-less `log.txt` (idx, correct True/False, radius, label,
predict). Reading them lets published numbers sit in the same table as new runs.

Real collections hold runs that never finished: a file that is empty, holds only its
header, or stops mid-row raises UnusableInput so the caller can skip it by name.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.fs import Location, StorageError
from pipeline.reduce.certificates import Certificates, ReduceWarning, UnusableInput, make_certificates

API_COLUMNS = ["idx", "correct", "radius", "label", "predict"]
REQUIRED_TSV = {"idx", "label", "predict", "correct"}

_SIGMA = re.compile(r"sigma_(\d+(?:\.\d+)?)")
_NOISE = re.compile(r"noise_(\d+(?:\.\d+)?)")
_BARE = re.compile(r"^(\d*\.\d+)(?:_\w+)?$")  # vision_api/<api>/<denoiser>/0.25/ or 0.25_1k/


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


def read_log(path: str | Path | Location, name: str | None = None, sigma: float | None = None) -> Certificates:
    """Certificates from one reference log (local or object storage); sigma from the path
    unless given."""
    location = Location.of(path)
    frame = _parse(location)
    duplicated = int(frame["image_id"].duplicated().sum())
    if duplicated:
        warnings.warn(
            f"{path}: {duplicated} image(s) appear more than once (a resumed run?); every row is counted, "
            "as the reference analysis did",
            ReduceWarning,
            stacklevel=2,
        )
    return make_certificates(
        frame,
        name=str(path) if name is None else name,
        sigma=sigma_from_path(location.path) if sigma is None else sigma,
        source=str(path),
    )


def _parse(path: Location) -> pd.DataFrame:
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
        return _convert(columns, api=api)
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

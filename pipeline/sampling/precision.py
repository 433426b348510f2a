"""The arithmetic a model's forward passes run in (`--precision`), and whether a device has
native bf16.

Why a setting of its own, in the run identity: the votes are f(D(x + delta)) *as computed*;
another precision rounds differently, so a sample on a near-tie may be classified differently.
A certificate is exactly as valid under bf16 as under fp32 (it certifies the model as
computed), but two runs at different precisions are different models and must not share a
run directory. fp32 is the default so that runs recorded before the setting existed keep
their identity and resume as what they were.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

PRECISIONS = ("fp32", "bf16", "fp16", "auto")
DEFAULT_PRECISION = "fp32"
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True when this CPU computes bf16 natively (AVX512-BF16 or AMX), where bf16 pays."""
    capability = ""
    try:
        capability = str(torch.backends.cpu.get_cpu_capability()).lower()
    except (AttributeError, RuntimeError):
        pass
    if "amx" in capability:
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def native_bf16(device: torch.device | str) -> bool:
    """bf16 is native on a CUDA device that supports it, or a CPU with AVX512-BF16/AMX."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_bf16()


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """`auto` -> bf16 where native (`native_bf16`), else fp32; the others as given."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def resolve_here(precision: str) -> str:
    """`auto` resolved where the run is set up (CUDA when this machine has a GPU, else its
    CPU), as settings record it: a run's identity names the arithmetic its votes were computed
    in, so a resume elsewhere that would compute another one is refused, never mixed in."""
    return resolve_precision(precision, "cuda" if torch.cuda.is_available() else "cpu")


def compute_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of `precision` on `device` (None = plain fp32)."""
    return _DTYPES[resolve_precision(precision, device)]


def amp_as_precision(amp: bool | str, precision: str, device: torch.device | str) -> str:
    """The deprecated `amp` switch (fp16 autocast on CUDA, which ran beside --precision fp32 and
    was recorded as fp32) read as the one setting: `--precision fp16` (or bf16 for amp="bf16")
    on CUDA under fp32, with a one-line deprecation; on a CPU, or under another precision, it
    changes nothing (as before). --precision alone decides the arithmetic."""
    import logging

    if not amp:
        return precision
    device = torch.device(device)
    meant = "bf16" if amp == "bf16" else "fp16"
    chosen = meant if precision == "fp32" and device.type == "cuda" else precision
    logging.getLogger("dsmooth").warning(
        "--amp is deprecated and will go: read as --precision %s%s; use --precision", chosen,
        "" if chosen == meant else f" (it had no effect here: {device.type}, precision {precision})")
    return chosen

"""A classifier's own preprocessing, as an nn.Module that runs inside f, on the device.

Denoised smoothing adds the noise to the data set's pixels in [0, 1] and denoises them at
that resolution; only then may the classifier see its own view of the image (its input
size, its mean and std). Putting the preprocessing *inside* f keeps the certificate in the
data set's input space whatever the classifier expects, and keeps it in the batch on the
device (no host round-trip). The order noise -> D -> preprocessing -> network is the whole
point: a preprocessing applied before the noise would certify another space.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
# PIL resample codes used by Hugging Face image processors.
_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


@dataclass(frozen=True)
class Preprocessing:
    """What happens to [0, 1] pixels before the network: resize, centre crop, mean/std.

    `resize`: the shorter side is resized to it (aspect kept); `resize_exact` resizes to
    (height, width) instead (Hugging Face processors with size {height, width}). `crop`:
    a centre crop to crop x crop. None means "as they come". `mean`/`std` None: none.
    """

    resize: int | None = None
    resize_exact: tuple[int, int] | None = None
    crop: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        for name in ("resize", "crop"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ValueError(f"classifier {name} must be a positive number of pixels, got {value}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("give the classifier's mean and std together")
        if self.mean is not None and self.std is not None:
            if len(self.mean) != len(self.std) or len(self.mean) not in (1, 3):
                raise ValueError(f"classifier mean and std need 1 or 3 values each, got {self.mean}, {self.std}")
            if any(s <= 0 for s in self.std):
                raise ValueError(f"classifier std must be positive, got {self.std}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (lists), for the bundle manifest, run.json and the run identity."""
        out = asdict(self)
        for key in ("resize_exact", "mean", "std"):
            if out[key] is not None:
                out[key] = [float(v) if key != "resize_exact" else int(v) for v in out[key]]
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Preprocessing:
        def tup(value: Any, kind: type) -> tuple | None:
            return None if value is None else tuple(kind(v) for v in value)

        return cls(
            resize=None if d.get("resize") is None else int(d["resize"]),
            resize_exact=tup(d.get("resize_exact"), int),  # type: ignore[arg-type]
            crop=None if d.get("crop") is None else int(d["crop"]),
            mean=tup(d.get("mean"), float),
            std=tup(d.get("std"), float),
            interpolation=str(d.get("interpolation", "bilinear")),
        )

    def override(self, *, input_size: int | None = None, resize: int | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 interpolation: str | None = None) -> Preprocessing:
        """The user's flags over the model's own config: `input_size` is the crop (and the
        resize too unless `resize` is given)."""
        changes: dict[str, Any] = {}
        if input_size is not None:
            changes.update(crop=int(input_size), resize=int(input_size), resize_exact=None)
        if resize is not None:
            changes.update(resize=int(resize), resize_exact=None)
        if mean is not None:
            changes["mean"] = tuple(float(v) for v in mean)
        if std is not None:
            changes["std"] = tuple(float(v) for v in std)
        if interpolation is not None:
            changes["interpolation"] = interpolation
        return Preprocessing(**{**asdict(self), **changes})

    def module(self) -> Preprocess:
        return Preprocess(self)

    def __str__(self) -> str:
        parts = []
        if self.resize_exact is not None:
            parts.append(f"resize to {self.resize_exact[0]}x{self.resize_exact[1]} ({self.interpolation})")
        elif self.resize is not None:
            parts.append(f"resize shorter side to {self.resize} ({self.interpolation})")
        if self.crop is not None:
            parts.append(f"centre crop {self.crop}")
        if self.mean is not None:
            parts.append(f"mean {list(self.mean)} std {list(self.std or ())}")
        return ", ".join(parts) or "none"


class Preprocess(nn.Module):
    """[0, 1] pixels [B, C, H, W] at the data set's size -> the network's input, batched.

    A resize to the size the images already have, or a crop to it, is skipped, so a model
    given at the data's resolution sees exactly the same tensor in every form."""

    mean: torch.Tensor
    std: torch.Tensor
    fx_leaf = True  # shape-dependent: kept as one call when f∘D is traced for BN folding

    def __init__(self, preprocessing: Preprocessing) -> None:
        super().__init__()
        self.preprocessing = preprocessing
        p = preprocessing
        self.normalize = p.mean is not None
        mean = torch.tensor(p.mean if p.mean is not None else (0.0,), dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(p.std if p.std is not None else (1.0,), dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def _resize(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(x.shape[-2:]) == size:
            return x
        mode = self.preprocessing.interpolation
        if mode == "nearest":
            return F.interpolate(x, size=size, mode="nearest")
        return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.preprocessing
        height, width = int(x.shape[-2]), int(x.shape[-1])
        if p.resize_exact is not None:
            x = self._resize(x, (int(p.resize_exact[0]), int(p.resize_exact[1])))
        elif p.resize is not None:
            short = min(height, width)
            size = (round(height * p.resize / short), round(width * p.resize / short))
            x = self._resize(x, size)
        if p.crop is not None:
            height, width = int(x.shape[-2]), int(x.shape[-1])
            if (height, width) != (p.crop, p.crop):
                if height < p.crop or width < p.crop:
                    x = self._resize(x, (max(height, p.crop), max(width, p.crop)))
                    height, width = int(x.shape[-2]), int(x.shape[-1])
                top, left = (height - p.crop) // 2, (width - p.crop) // 2
                x = x[..., top:top + p.crop, left:left + p.crop]
        if self.normalize:
            x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return x

    def extra_repr(self) -> str:
        return str(self.preprocessing)


def timm_preprocessing(data_config: Mapping[str, Any]) -> Preprocessing:
    """From timm's resolved data config (`resolve_data_config`): its input size, mean, std
    and interpolation. timm's crop_pct belongs to loading full-size photos; here the data
    set's loader has already cropped (--image-size), so the images are resized (shorter
    side) to the input size and centre-cropped."""
    size = int(data_config["input_size"][-1])
    interpolation = str(data_config.get("interpolation", "bilinear"))
    return Preprocessing(
        resize=size, crop=size,
        mean=tuple(float(v) for v in data_config["mean"]),
        std=tuple(float(v) for v in data_config["std"]),
        interpolation=interpolation if interpolation in INTERPOLATIONS else "bilinear",
    )


def hf_preprocessing(config: Mapping[str, Any]) -> Preprocessing:
    """From a Hugging Face `preprocessor_config.json`: size ({height, width} or
    {shortest_edge}), crop_size when do_center_crop, image_mean/std when do_normalize. The
    1/255 rescale is already done: the pipeline's pixels are in [0, 1]."""
    resize = resize_exact = crop = None
    size = config.get("size")
    if config.get("do_resize", True) and size is not None:
        if isinstance(size, Mapping) and "height" in size and "width" in size:
            resize_exact = (int(size["height"]), int(size["width"]))
        elif isinstance(size, Mapping) and "shortest_edge" in size:
            resize = int(size["shortest_edge"])
        elif isinstance(size, (int, float)):
            resize = int(size)
        else:
            raise ValueError(f"preprocessor_config.json: unsupported size {size!r}")
    if config.get("do_center_crop", False):
        crop_size = config.get("crop_size")
        if isinstance(crop_size, Mapping):
            crop = int(crop_size.get("height", crop_size.get("width", 0))) or None
        elif crop_size is not None:
            crop = int(crop_size)
    mean = std = None
    if config.get("do_normalize", True) and config.get("image_mean") is not None:
        mean = tuple(float(v) for v in config["image_mean"])
        std = tuple(float(v) for v in config["image_std"])
    resample = config.get("resample", 2)
    return Preprocessing(resize=resize, resize_exact=resize_exact, crop=crop, mean=mean, std=std,
                         interpolation=_PIL_RESAMPLE.get(int(resample) if resample is not None else 2, "bilinear"))

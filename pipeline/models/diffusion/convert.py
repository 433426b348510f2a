"""Turn a diffusion model as the ecosystem ships it into dsmooth checkpoint bytes, in memory.

Two sources, both local files only:

* a Hugging Face `diffusers` folder: a UNet2DModel (config.json + weights) and its scheduler
  config, either side by side or as a pipeline's unet/ and scheduler/ subfolders;
* an improved-/guided-diffusion state dict (`cifar10_uncond_50M_500K.pt`,
  `256x256_diffusion_uncond.pt`): recognised by its keys and shapes among the published
  configs, or described by the training flags in a sidecar `NAME.yaml`/`NAME.json`.

Why bytes: the certify job ships checkpoint bytes to its actors and names a model by their
SHA-256, so a converted model must be an ordinary dsmooth checkpoint (arch + kwargs + state
dict, weights_only-loadable). The conversion records nothing about where the files were, so
the same source files give the same bytes, hence the same run identity, anywhere.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from pipeline.data.specs import dataset_spec

from ..checkpoint import CheckpointError, ModelMeta, _check_fits, checkpoint_bytes
from .guided_unet import GuidedUNet
from .schedule import named_alphas_cumprod, reverse_timesteps

log = logging.getLogger(__name__)

# Flags of improved/guided-diffusion's scripts that shape the model or its schedule, with
# guided-diffusion's defaults (improved-diffusion checkpoints must state rescale_timesteps).
GUIDED_DEFAULTS: dict[str, Any] = {
    "image_size": 64, "num_channels": 128, "num_res_blocks": 2, "num_heads": 4, "num_heads_upsample": -1,
    "num_head_channels": -1, "attention_resolutions": "16,8", "channel_mult": "", "learn_sigma": False,
    "class_cond": False, "use_scale_shift_norm": True, "resblock_updown": False,
    "use_new_attention_order": False, "diffusion_steps": 1000, "noise_schedule": "linear",
    "rescale_timesteps": False, "predict_xstart": False, "dataset": None,
}
_DEFAULT_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4),
                 64: (1, 2, 3, 4), 32: (1, 2, 2, 2)}


@dataclass(frozen=True)
class Preset:
    """A published checkpoint: the flags it was trained with and the data it was trained on."""

    name: str
    flags: Mapping[str, Any]


# The configurations Carlini et al. (2023) used, from the improved/guided-diffusion READMEs.
PRESETS = (
    Preset("cifar10_uncond_50M_500K", {  # improved-diffusion, CIFAR-10, 52.5M parameters
        "image_size": 32, "num_channels": 128, "num_res_blocks": 3, "num_heads": 4,
        "attention_resolutions": "16,8", "learn_sigma": True, "use_scale_shift_norm": True,
        "diffusion_steps": 4000, "noise_schedule": "cosine", "rescale_timesteps": True, "dataset": "cifar10"}),
    Preset("256x256_diffusion_uncond", {  # guided-diffusion, ImageNet 256x256, 552.8M parameters
        "image_size": 256, "num_channels": 256, "num_res_blocks": 2, "num_head_channels": 64,
        "attention_resolutions": "32,16,8", "learn_sigma": True, "use_scale_shift_norm": True,
        "resblock_updown": True, "diffusion_steps": 1000, "noise_schedule": "linear",
        "rescale_timesteps": False, "dataset": "imagenet"}),
)

_GUIDED_MARKERS = ("input_blocks.0.0.weight", "time_embed.0.weight", "out.2.weight")


def guided_unet_kwargs(flags: Mapping[str, Any]) -> dict[str, Any]:
    """GuidedUNet kwargs from the scripts' flags (attention given as resolutions, as they are)."""
    f = {**GUIDED_DEFAULTS, **flags}
    if f["class_cond"]:
        raise ValueError("class-conditional diffusion models are not supported as denoisers")
    size = int(f["image_size"])
    mult = f["channel_mult"]
    if mult in ("", None):
        if size not in _DEFAULT_MULT:
            raise ValueError(f"no default channel_mult for image_size={size}; give channel_mult")
        mult = _DEFAULT_MULT[size]
    elif isinstance(mult, str):
        mult = tuple(float(m) if "." in m else int(m) for m in mult.split(","))
    return {
        "image_size": size, "in_channels": 3, "model_channels": int(f["num_channels"]),
        "out_channels": 6 if f["learn_sigma"] else 3, "num_res_blocks": int(f["num_res_blocks"]),
        "attention_resolutions": [size // int(r) for r in str(f["attention_resolutions"]).split(",") if r],
        "channel_mult": list(mult), "num_heads": int(f["num_heads"]),
        "num_head_channels": int(f["num_head_channels"]), "num_heads_upsample": int(f["num_heads_upsample"]),
        "use_scale_shift_norm": bool(f["use_scale_shift_norm"]), "resblock_updown": bool(f["resblock_updown"]),
        "use_new_attention_order": bool(f["use_new_attention_order"]),
    }


def guided_arch_kwargs(flags: Mapping[str, Any], steps: int = 1) -> dict[str, Any]:
    """`guided_unet` registry kwargs: the UNet, its noise schedule's ᾱ and timestep scaling."""
    f = {**GUIDED_DEFAULTS, **flags}
    total = int(f["diffusion_steps"])
    return {
        "unet": guided_unet_kwargs(f),
        "alphas_cumprod": named_alphas_cumprod(str(f["noise_schedule"]), total),
        "prediction_type": "sample" if f["predict_xstart"] else "epsilon",
        "timestep_scale": 1000.0 / total if f["rescale_timesteps"] else 1.0,
        "steps": steps,
    }


def _shapes_on_meta(unet_kwargs: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = GuidedUNet(**unet_kwargs)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def match_preset(state: Mapping[str, torch.Tensor]) -> Preset | None:
    """The published config whose parameter names and shapes are exactly those of `state`."""
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    return next((p for p in PRESETS if _shapes_on_meta(guided_unet_kwargs(p.flags)) == shapes), None)


def looks_guided(state: Any) -> bool:
    """A plain state dict with improved/guided-diffusion's UNet names (not a dsmooth checkpoint)."""
    return isinstance(state, Mapping) and "format" not in state and all(k in state for k in _GUIDED_MARKERS)


def _sidecar_flags(path: Path) -> dict[str, Any] | None:
    for suffix in (".yaml", ".yml", ".json"):
        sidecar = path.with_suffix(suffix)
        if sidecar.is_file():
            flags = yaml.safe_load(sidecar.read_text())  # JSON is YAML
            if not isinstance(flags, dict):
                raise CheckpointError(f"{sidecar}: expected a mapping of guided-diffusion flags")
            return flags
    return None


def _load_state(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - not a zip checkpoint (legacy format or junk): try plainly
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - the caller reports it as "not a checkpoint"
            return None


def _meta(arch: str, kwargs: dict[str, Any], dataset: str | None, size: Any, extra: dict[str, Any]) -> ModelMeta:
    known = dataset if dataset_spec(dataset) is not None else None
    return ModelMeta(arch=arch, kind="denoiser", dataset=known, input_size=size if isinstance(size, int) else None,
                     sigma_independent=True, arch_kwargs=kwargs, extra=extra)


def convert_guided(path: Path, state: Mapping[str, torch.Tensor], steps: int = 1) -> tuple[ModelMeta, dict]:
    """(meta, state dict) of a guided_unet checkpoint from an improved/guided-diffusion file."""
    flags, preset = _sidecar_flags(path), None
    if flags is None:
        preset = match_preset(state)
        if preset is None:
            names = ", ".join(p.name for p in PRESETS)
            raise CheckpointError(
                f"{path}: an improved/guided-diffusion UNet that matches none of the published configs ({names}); "
                f"write its training flags (image_size, num_channels, num_res_blocks, attention_resolutions, "
                f"learn_sigma, diffusion_steps, noise_schedule, rescale_timesteps, ...) to {path.with_suffix('.yaml')}"
            )
        flags = dict(preset.flags)
        log.info("%s: recognised as %s", path, preset.name)
    try:
        kwargs = guided_arch_kwargs(flags, steps)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: {error}") from None
    with torch.device("meta"):
        expected = GuidedUNet(**kwargs["unet"])
    _check_fits(expected, state, path, "guided_unet")
    ordered = {f"model.{k}": state[k].float() for k in expected.state_dict()}
    extra = {"source": "guided-diffusion", "preset": preset.name if preset else None}
    return _meta("guided_unet", kwargs, flags.get("dataset"), kwargs["unet"]["image_size"], extra), ordered


def _first_file(*candidates: Path) -> Path | None:
    return next((c for c in candidates if c.is_file()), None)


def card_dataset(folder: Path) -> str | None:
    """The dsmooth data set named by a model card's `datasets:` (README.md front matter)."""
    card = folder / "README.md"
    if not card.is_file():
        return None
    text = card.read_text(errors="replace")
    if not text.startswith("---"):
        return None
    try:
        front = yaml.safe_load(text.split("---", 2)[1]) or {}
    except yaml.YAMLError:
        return None
    names = front.get("datasets") if isinstance(front, dict) else None
    for name in [names] if isinstance(names, str) else names or []:
        key = str(name).lower().rsplit("/", 1)[-1].replace("-", "").replace("_", "")
        key = {"imagenet1k": "imagenet", "ilsvrc2012": "imagenet"}.get(key, key)
        if dataset_spec(key) is not None:
            return key
    return None


def convert_diffusers(folder: Path, steps: int = 1) -> tuple[ModelMeta, dict]:
    """(meta, state dict) of a diffusers_unet checkpoint from a local diffusers folder."""
    from diffusers import DDPMScheduler, UNet2DModel

    unet_dir = folder / "unet" if (folder / "unet" / "config.json").is_file() else folder
    config_path = unet_dir / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder}: not a diffusers model folder (no config.json, no unet/config.json)")
    config = json.loads(config_path.read_text())
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise CheckpointError(f"{folder}: holds a {config['_class_name']}; only unconditional UNet2DModels denoise")
    scheduler_path = _first_file(folder / "scheduler" / "scheduler_config.json", folder / "scheduler_config.json",
                                 unet_dir / "scheduler_config.json")
    if scheduler_path is None:
        raise CheckpointError(f"{folder}: no scheduler_config.json beside the UNet (the noise schedule is needed)")
    scheduler_config = json.loads(scheduler_path.read_text())
    alphas = DDPMScheduler.from_config(scheduler_config).alphas_cumprod.double().tolist()
    plain = [unet_dir / f"diffusion_pytorch_model.{e}" for e in ("safetensors", "bin", "safetensors.index.json")]
    variant = None if _first_file(*plain) else "fp16"  # a folder with only fp16 weights
    try:
        unet = UNet2DModel.from_pretrained(unet_dir, local_files_only=True, variant=variant, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{folder}: cannot load its UNet2DModel: {error}") from None
    kwargs = {"unet": config, "alphas_cumprod": alphas,
              "prediction_type": scheduler_config.get("prediction_type", "epsilon"), "steps": steps}
    reverse_timesteps(0, steps)
    state = {f"model.{k}": v.float() for k, v in unet.state_dict().items()}
    dataset = card_dataset(folder) or card_dataset(unet_dir)
    extra = {"source": "diffusers", "scheduler": scheduler_config.get("_class_name")}
    return _meta("diffusers_unet", kwargs, dataset, config.get("sample_size"), extra), state


def read_diffusion_source(path: str | Path, steps: int = 1) -> bytes | None:
    """dsmooth checkpoint bytes for a diffusers folder or an improved/guided-diffusion file;
    None when `path` is neither (e.g. already a dsmooth checkpoint)."""
    path = Path(path)
    if path.is_dir():
        meta, state = convert_diffusers(path, steps)
    elif path.is_file():
        state = _load_state(path)
        if not looks_guided(state):
            return None
        meta, state = convert_guided(path, state, steps)
    else:
        raise FileNotFoundError(f"denoiser not found: {path}")
    return checkpoint_bytes(meta, state)

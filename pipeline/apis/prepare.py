"""Everything `certify-api` checks and loads before it may spend: config, images, denoiser,
and the run identity that decides whether a run directory can be resumed."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from torch import nn

from pipeline.apis.config import CertifyApiConfig
from pipeline.apis.secrets import scrub
from pipeline.config import ConfigError, parse_config, read_yaml_mapping, to_dict
from pipeline.data import ImageDataset, open_dataset

ENCODING = "png-uint8"


def load_job_config(source: str | Path | dict, overrides: dict[str, Any] | None = None) -> CertifyApiConfig:
    """Parse the YAML (or a mapping) with dotted overrides on top, e.g. {"budget.max_queries": 30}."""
    data = copy.deepcopy(source) if isinstance(source, dict) else read_yaml_mapping(source)
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        *parents, leaf = dotted.split(".")
        node = data
        for i, name in enumerate(parents):
            child = node.setdefault(name, {})
            if not isinstance(child, dict):
                raise ConfigError(".".join(parents[: i + 1]), "must be a mapping")
            node = child
        node[leaf] = value
    return parse_config(CertifyApiConfig, data)


def select_images(config: CertifyApiConfig) -> ImageDataset:
    data = config.data
    dataset = open_dataset(data.kind, data.root, data.split, image_size=data.image_size, labels=False)
    if data.ids is not None:
        return dataset.by_ids(data.ids)
    return dataset.subset(skip=data.skip, max=data.max)


def load_denoiser(path: Path, sigma: float) -> tuple[nn.Module, str, str]:
    """(frozen denoiser, architecture, sha256); refuses a classifier or another sigma's denoiser."""
    from pipeline.models import file_sha256, freeze, load_checkpoint

    model, meta = load_checkpoint(path)
    if meta.kind != "denoiser":
        raise ConfigError("denoiser", f"{path} holds a {meta.kind} ({meta.arch}), not a denoiser")
    if meta.sigma is not None and abs(float(meta.sigma) - sigma) > 1e-9:
        raise ConfigError(
            "denoiser", f"{path} was trained for sigma={meta.sigma} but the run uses sigma={sigma} (denoisers are sigma-specific)"
        )
    return freeze(model), meta.arch, file_sha256(path)


def run_identity(
    config: CertifyApiConfig, dataset: ImageDataset, denoiser_arch: str | None, denoiser_sha: str | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(identity, extra) for storage.open_run.

    The identity holds what changes the answers (provider and model, data, noise, n0/n,
    denoiser, encoding); the endpoint, limits and image selection only change how or how
    much, so a rerun may raise the budget, certify more images or move the endpoint.
    """
    identity = {
        "job": "certify-api",
        **config.api.answer_identity(),
        "dataset": dataset.name,
        "dataset_kind": config.data.kind,
        "dataset_root": str(Path(config.data.root).expanduser().resolve()),
        "image_size": config.data.image_size,
        "sigma": config.sigma,
        "n0": config.n0,
        "n": config.n,
        "seed": config.seed,
        "chunk_size": config.chunk_size,
        "denoiser": denoiser_arch,
        "denoiser_sha256": denoiser_sha,
        "encoding": ENCODING,
    }
    plain = to_dict(config)
    extra = {
        "endpoint": scrub(config.api.endpoint) if config.api.endpoint else None,
        "images": {k: plain["data"][k] for k in ("skip", "max", "ids")},
        "alpha": config.alpha,
        "rate": plain["rate"],
        "retry": plain["retry"],
        "budget": plain["budget"],
    }
    return identity, extra

"""Everything `certify-api` checks and loads before it may spend: config, images, denoiser,
and the run identity that decides whether a run directory can be resumed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.apis.config import CertifyApiConfig
from pipeline.apis.secrets import scrub
from pipeline.config import ConfigError, load_config, to_dict
from pipeline.data import ImageDataset
from pipeline.runs.identity import precision_identity, run_identity

ENCODING = "png-uint8"


def load_job_config(source: str | Path | dict, overrides: dict[str, Any] | None = None) -> CertifyApiConfig:
    """Parse the YAML (or a mapping) with dotted overrides on top, e.g. {"budget.max_queries": 30}."""
    return load_config(CertifyApiConfig, source, overrides)


def select_images(config: CertifyApiConfig) -> tuple[ImageDataset, ImageDataset]:
    """(the whole split, the selected images); labels are the API's answers, so none are read."""
    split = config.open_split(labels=False)
    return split, config.select(split)


def read_api_denoiser(where: str, sigma: float, selected: ImageDataset, noise: str = "gaussian",
                      allow_foreign: bool = False) -> tuple[Any, str, str]:
    """(checkpoint bytes, architecture, sha256) of the denoiser, checked as the certify job
    checks it (kind, data set, noise and sigma); the API actors load it from the bytes. A diffusers
    folder or guided-diffusion file is converted as `dsmooth certify` converts it, so its
    identity is the SHA-256 of the converted checkpoint."""
    from pipeline.certify.pair import ModelBytes, load_denoiser_bytes
    from pipeline.models import CheckpointError

    try:
        checkpoint = ModelBytes.read_denoiser(where)
        _, meta = load_denoiser_bytes(checkpoint, selected.describe(), sigma, noise, allow_foreign)
    except CheckpointError as error:
        raise ConfigError("denoiser", str(error)) from None
    return checkpoint, meta.arch, checkpoint.sha256


def api_identity(
    config: CertifyApiConfig, split: ImageDataset, denoiser_arch: str | None, denoiser_sha: str | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(identity, extra) for storage.open_run.

    The identity (`pipeline.runs.identity`) holds what changes the answers: provider and model,
    data set, noise, n0/n, denoiser, encoding. The endpoint, limits and image selection only
    change how or how much, so a rerun may raise the budget, certify more images or move the
    endpoint.
    """
    chat = {}
    if config.api.provider == "openai":  # the class list is fixed here, for the identity and the actors
        spec_classes = getattr(split.spec, "classes", None) if split.spec is not None else None
        classes = config.api.chat.resolve_classes(split.classes or (list(spec_classes) if spec_classes else None))
        config.api.chat.__dict__["classes"] = classes  # not setattr: that would validate again
        chat = config.api.chat.identity(classes)
    identity = run_identity(
        "certify-api", config, config, split,
        **config.api.answer_identity(),
        **chat,
        denoiser=denoiser_arch,
        denoiser_sha256=denoiser_sha,
        encoding=ENCODING,
        **precision_identity(config.precision),
    )
    plain = to_dict(config)
    extra = {
        "endpoint": scrub(config.api.endpoint) if config.api.endpoint else None,
        "images": {k: plain[k] for k in ("skip", "max", "ids")},
        "alpha": config.alpha,
        "rate": plain["rate"],
        "retry": plain["retry"],
        "budget": plain["budget"],
    }
    return identity, extra

"""Shared pieces of the chat-API tests: a certify-api config for the `openai` provider on the
shipped CIFAR-10 sample, and small PNGs made on the spot."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.apis.emulator.classifier import PROTOTYPES

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "pipeline" / "assets" / "cifar10-sample" / "test"  # shipped with the repository
CLASSES = list(PROTOTYPES)  # what the emulator's colour classifier can name
PRICES = {"input_per_million": 2.5, "output_per_million": 10.0}


def png(rgb: tuple[int, int, int] = (140, 180, 230), size: int = 32) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), rgb, dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def chat_config(endpoint: str, output: Path, ids: list[int], **overrides: Any) -> dict:
    """A small openai certify-api config (`api_support.job_config`'s, on the shipped sample, with
    a chat model and a token price; dotted overrides: "budget.max_cost")."""
    from api_support import job_config

    chat = {"api": {"provider": "openai", "endpoint": endpoint + "/v1",
                    "chat": {"model": "emu-vlm", "classes": CLASSES}},
            "data_root": str(SAMPLE), "budget": {"max_cost": 5.0, "tokens": dict(PRICES)}}
    return job_config("openai", endpoint, output, ids, **chat, **overrides)


def token_cost(prompt: int, completion: int) -> float:
    return (prompt * PRICES["input_per_million"] + completion * PRICES["output_per_million"]) / 1e6

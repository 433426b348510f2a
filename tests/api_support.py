"""Shared pieces of the API tests: fake credentials, the images used, a config builder, and
an oracle that predicts every answer of the emulator without Ray, HTTP or a client."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "pipeline" / "assets" / "cifar10-sample"
# Positions 0 and 3 are RGB; 11 and 74 are grayscale PNGs (colour type 0).
RGB_IDS = [0, 3]
GRAY_IDS = [11, 74]


def make_api_images(folder: Path, count: int = 100, size: int = 224) -> Path:
    """A folder laid out like the paper's API benchmark (`ILSVRC2012_val_*.png`, 224 px, some
    grayscale), made from the shipped CIFAR-10 sample so that every clone has it: every 5th
    sample image, upscaled; positions `GRAY_IDS` saved as 8-bit grayscale."""
    from PIL import Image

    if folder.is_dir() and len(list(folder.glob("*.png"))) == count:
        return folder
    sources = sorted(SAMPLE.glob("test/*/*.jpg"))[::5][:count]
    staging = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
    staging.mkdir(parents=True, exist_ok=True)
    for position, source in enumerate(sources):
        image = Image.open(source).convert("RGB").resize((size, size), Image.BICUBIC)
        if position in GRAY_IDS:
            image = image.convert("L")
        image.save(staging / f"ILSVRC2012_val_{position + 1:08d}.png")
    try:
        staging.rename(folder)  # atomic: a concurrent test run sees all images or none
    except OSError:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)  # another process made it first
    return folder


IMAGES = make_api_images(Path(tempfile.gettempdir()) / "dsmooth-test-api-images-v1")

# Recognisable fake secrets: no output file or log may ever contain them.
FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "AKIAFAKEDSMOOTH7TEST",
    "AWS_SECRET_ACCESS_KEY": "fake/Secret+Access+Key/dsmooth-do-not-log-1234",
    "GOOGLE_API_KEY": "AIzaFakeGoogleKey-dsmooth-do-not-log-5678",
    "VISION_KEY": "fakeazurekeydsmoothdonotlog9012",
    "CLARIFAI_PAT": "fakeclarifaipatdsmoothdonotlog3456",
    "OPENAI_API_KEY": "sk-fakeopenaikeydsmoothdonotlog7890",
}


def install_fake_credentials() -> None:
    """Set before ray.init, so Ray's worker processes inherit them as on a real machine."""
    os.environ.update(FAKE_CREDENTIALS)
    os.environ.pop("AWS_PROFILE", None)
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


def job_config(provider: str, endpoint: str, output: Path, ids: list[int], **overrides: Any) -> dict:
    """A small certify-api config as a mapping (overrides may be dotted: "budget.max_queries")."""
    config: dict[str, Any] = {
        "api": {"provider": provider, "endpoint": endpoint},
        "dataset": "folder",
        "data_root": str(IMAGES),
        "ids": list(ids),
        "output": str(output),
        "sigma": 0.25,
        "n0": 5,
        "n": 20,
        "alpha": 0.01,
        "seed": 0,
        "chunk_size": 8,
        "budget": {"max_queries": 10_000},
        "rate": {"qps": 200, "concurrency": 4, "actors": 1, "actor_cpus": 0.5},
        "retry": {"max_attempts": 8, "base_delay_s": 0.01, "max_delay_s": 0.05, "timeout_s": 10},
    }
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = config
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return config


def oracle_labels(ids: list[int], sigma: float, n0: int, n: int, chunk_size: int, seed: int = 0,
                  denoiser: Any = None, precision: str = "fp32",
                  image_size: int | None = None, noise: str = "gaussian") -> dict[tuple[int, str, int], str]:
    """(image id, phase, sample) -> the top label the emulator's built-in classifier must
    give, computed locally from the same noise addressing, denoiser and PNG rounding."""
    from pipeline.apis.emulator import ColourClassifier
    from pipeline.apis.query import encode_png
    from pipeline.apis.query import CLEAN
    from pipeline.apis.run.state import plan_image
    from pipeline.apis.query import noisy_images
    from pipeline.data import open_dataset

    classifier = ColourClassifier()
    dataset = open_dataset("folder", IMAGES, image_size=image_size).by_ids(ids)
    answers = {}
    for position, record in enumerate(dataset.records):
        image = dataset.load(position)
        for unit in plan_image(record.image_id, n0, n, chunk_size, seed):
            if unit.phase == CLEAN:
                batch = [image]
            else:
                batch = noisy_images(image, unit.chunk, unit.rows, sigma, denoiser, precision=precision, noise=noise)
            for sample, x in zip(unit.samples, batch):
                labels = classifier.labels(decode_png(encode_png(x)))
                answers[(record.image_id, unit.phase, sample)] = labels[0][0]
    return answers


def files_containing(root: Path, needles: list[str]) -> list[str]:
    """Every file under `root` whose bytes -- or, for Parquet, whose decoded (possibly
    compressed) values -- contain one of `needles`."""
    import pyarrow.parquet as pq

    hits = []
    for path in Path(root).rglob("*"):
        if not path.is_file():
            continue
        data = path.read_bytes()
        if path.suffix == ".parquet":
            data += repr(pq.read_table(path).to_pylist()).encode()
        hits.extend(f"{path}: {n}" for n in needles if n.encode() in data)
    return hits


def normalise(label: Any) -> Any:
    """Azure and Clarifai answer in lower case; AWS and Google capitalised."""
    return label.lower() if isinstance(label, str) else label


def top_labels_in_log(run_dir: Path) -> dict[tuple[int, str, int], Any]:
    from pipeline.apis.books.querylog import read_query_log

    frame = read_query_log(run_dir)
    return {
        (int(i), str(p), int(s)): (None if t is None or (isinstance(t, float) and np.isnan(t)) else t)
        for i, p, s, t in zip(frame.image_id, frame.phase, frame["sample"], frame.top_label)
    }


def decode_png(data: bytes) -> np.ndarray:
    """uint8 [H, W, 3]: what the emulator reads off the wire (`pipeline.apis.query` writes it)."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))

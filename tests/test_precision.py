"""`--precision`: the forward passes' arithmetic, in the run identity only when not fp32.

fp32 must be bitwise what it was (tests/test_golden_counts.py pins the counts); bf16 on a CPU
really runs in bf16 (not silently fp32) and agrees closely with fp32 on the shipped pair.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.certify.pair import ModelBytes, ModelIdentity, PairInfo, load_pair
from pipeline.certify.plan import CertifyConfig, certify_identity
from pipeline.config import ConfigError, parse_config
from pipeline.data import ImageDataset, open_dataset
from pipeline.sampling.engine import VoteCounter
from pipeline.sampling.engine import optimize_for_inference
from pipeline.sampling.noise import SampleRequest
from pipeline.sampling.precision import cpu_has_bf16, resolve_precision

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "pipeline" / "assets" / "models" / "cifar10"
SAMPLE = REPO / "pipeline" / "assets" / "cifar10-sample"
BASE = {"dataset": "cifar10", "classifier": "c", "sigma": 0.25, "output": "o", "data_root": "/x/cifar.tgz"}


def _identity(**values):
    split = ImageDataset.from_array(np.zeros((2, 32, 32, 3), dtype=np.uint8), [0, 1], name="cifar10/test")
    info = PairInfo(ModelIdentity("cifar_resnet20", "aa"), None, 10)
    return certify_identity(parse_config(CertifyConfig, {**BASE, **values}), split, info)


def test_precision_is_in_the_identity_only_when_not_fp32():
    old = _identity()
    assert "precision" not in old  # runs recorded before --precision keep their identity
    assert _identity(precision="fp32") == old
    assert _identity(precision="bf16") == {**old, "precision": "bf16"}
    with pytest.raises(ConfigError) as caught:
        parse_config(CertifyConfig, {**BASE, "precision": "int8"})
    assert caught.value.field == "precision"


def test_auto_is_recorded_as_the_arithmetic_it_resolves_to():
    """A run asked for `auto` records fp32 or bf16, as computed here: its identity is that of the
    same run asked for the resolved precision, so `auto` never names two arithmetics at once."""
    here = resolve_precision("auto", "cuda" if torch.cuda.is_available() else "cpu")
    assert parse_config(CertifyConfig, {**BASE, "precision": "auto"}).precision == here
    assert _identity(precision="auto") == _identity(precision=here)
    assert "auto" not in str(_identity(precision="auto"))


def test_auto_is_bf16_exactly_where_native():
    assert resolve_precision("auto", "cpu") == ("bf16" if cpu_has_bf16() else "fp32")
    assert resolve_precision("fp16", "cpu") == "fp16"
    with pytest.raises(ValueError):
        resolve_precision("fp64", "cpu")


def _pair_counts(precision: str, images, requests) -> np.ndarray:
    pair, info = load_pair(ModelBytes.read(MODELS / "classifier.pt"),
                           ModelBytes.read_denoiser(MODELS / "denoiser_stab_mse_s0.25.pt"),
                           open_dataset("cifar10", SAMPLE, "test").describe(), sigma=0.25)
    counter = VoteCounter(optimize_for_inference(pair, "cpu"), info.num_classes, 0.25, batch_size=100,
                          device="cpu", precision=precision)
    return counter, counter.count(images, requests)


def test_bf16_on_cpu_runs_in_bf16_and_agrees_with_fp32():
    sample = open_dataset("cifar10", SAMPLE, "test")
    images = {i: sample[i][1] for i in (0, 150)}
    requests = [SampleRequest(3, i, "estimation", 200, 64) for i in images]
    fp32_counter, fp32 = _pair_counts("fp32", images, requests)
    bf16_counter, bf16 = _pair_counts("bf16", images, requests)
    assert fp32_counter.amp_dtype is None and fp32_counter._inputs.dtype == torch.float32
    assert bf16_counter.amp_dtype == torch.bfloat16 and bf16_counter._inputs.dtype == torch.bfloat16
    assert (bf16.sum(axis=1) == 200).all()
    assert not np.array_equal(bf16, fp32)  # another arithmetic indeed: some near-tie votes move
    assert (bf16.argmax(axis=1) == fp32.argmax(axis=1)).all()
    changed = np.abs(bf16 - fp32).sum(axis=1) / 2  # votes that moved, per image
    assert changed.max() <= 12, changed


def test_smooth_keeps_its_precision_across_batch_sizes():
    from dsmooth import Smooth

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))
    smooth = Smooth(model, num_classes=3, sigma=0.25, device="cpu", precision="bf16")
    assert smooth.counter.amp_dtype == torch.bfloat16
    smooth.predict(torch.rand(3, 4, 4), n=20, alpha=0.01, batch_size=7)  # a new batch size: a new counter
    assert smooth.counter.batch_size == 7 and smooth.counter.amp_dtype == torch.bfloat16
    assert Smooth(model, num_classes=3, sigma=0.25, device="cpu").counter.amp_dtype is None


def _dtypes_seen(model: torch.nn.Module) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    for layer in model.modules():
        if isinstance(layer, torch.nn.Conv2d):
            layer.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    return seen


def test_api_denoiser_runs_in_its_precision_and_returns_fp32():
    """certify-api's denoiser (`noisy_images`, what each API actor's worker calls): bf16 runs
    its convolutions in bf16 and hands fp32 images to the encoder; fp32 is bitwise the default."""
    from pipeline.apis.query import noisy_images
    from pipeline.models import build_model

    torch.manual_seed(0)
    denoiser = build_model("dncnn_small").eval()
    seen = _dtypes_seen(denoiser)
    image, chunk = torch.rand(3, 16, 16), SampleRequest(0, 7, "estimation", 8, 8).chunks()[0]
    plain = noisy_images(image, chunk, range(8), 0.25, denoiser)
    assert set(seen) == {torch.float32}
    assert torch.equal(noisy_images(image, chunk, range(8), 0.25, denoiser, precision="fp32"), plain)
    seen.clear()
    bf16 = noisy_images(image, chunk, range(8), 0.25, denoiser, precision="bf16")
    assert set(seen) == {torch.bfloat16} and bf16.dtype == torch.float32
    assert not torch.equal(bf16, plain) and torch.allclose(bf16, plain, atol=0.05)


def test_api_precision_is_in_the_identity_only_when_not_fp32_and_needs_a_denoiser(tmp_path):
    from pipeline.apis.run.prepare import api_identity, load_job_config

    def config(**values):
        return load_job_config({"api": {"provider": "aws", "endpoint": "http://127.0.0.1:9"}, "data_root": "x",
                                "output": str(tmp_path), "budget": {"max_queries": 10}, "sigma": 0.25, **values})

    split = ImageDataset.from_array(np.zeros((2, 8, 8, 3), dtype=np.uint8), [0, 1], name="folder")
    old, _ = api_identity(config(denoiser="d.pt"), split, "dncnn", "aa")
    assert "precision" not in old  # runs recorded before --precision keep their identity
    bf16, _ = api_identity(config(denoiser="d.pt", precision="bf16"), split, "dncnn", "aa")
    assert bf16 == {**old, "precision": "bf16"}
    with pytest.raises(ConfigError) as caught:
        config(precision="bf16")  # no denoiser: nothing would run in bf16
    assert caught.value.field == "precision"

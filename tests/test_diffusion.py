"""Diffusion denoised smoothing (Carlini et al. 2023): σ -> t* maths, the one-shot and
multi-step x̂₀, diffusers folders and improved/guided-diffusion checkpoints converted into
ordinary dsmooth checkpoints, and the shipped small CIFAR-10 DDPM lifting accuracy under noise."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from pipeline.data import open_dataset
from pipeline.certify.pair import ModelBytes, load_denoiser_bytes, load_pair
from pipeline.models import (
    CheckpointError,
    DataMismatchError,
    ModelMeta,
    build_model,
    load_checkpoint,
    save_checkpoint,
)
from pipeline.models.diffusion import DiffusionDenoiser
from pipeline.models.diffusion.convert import PRESETS, guided_unet_kwargs, match_preset
from pipeline.models.diffusion.guided_unet import GuidedUNet
from pipeline.models.diffusion.schedule import (
    cosine_alphas_cumprod,
    linear_alphas_cumprod,
    reverse_timesteps,
    target_alpha_bar,
    timestep_for_sigma,
)

diffusers = pytest.importorskip("diffusers")

REPO = Path(__file__).resolve().parents[1]
CIFAR = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
ASSETS = REPO / "pipeline" / "assets" / "models" / "cifar10"
SMALL_DDPM = ASSETS / "ddpm_small"
SIGMAS = (0.12, 0.25, 0.5, 1.0)


def cifar_description():
    from pipeline.data import DataDescription

    return DataDescription("cifar10", 10, (32, 32))


# --------------------------------------------------------------------------- the maths


@pytest.mark.parametrize("sigma", SIGMAS)
def test_timestep_is_where_the_schedule_reaches_twice_sigma(sigma):
    assert target_alpha_bar(sigma) == pytest.approx(1 / (1 + 4 * sigma**2), rel=1e-15)
    for name, bars in (("linear-1000", linear_alphas_cumprod(1000)), ("cosine-4000", cosine_alphas_cumprod(4000))):
        t = timestep_for_sigma(bars, sigma)
        # First timestep whose noise-to-signal ratio sqrt(1-a)/sqrt(a) reaches 2 sigma.
        assert math.sqrt(1 - bars[t]) / math.sqrt(bars[t]) >= 2 * sigma, name
        assert math.sqrt(1 - bars[t - 1]) / math.sqrt(bars[t - 1]) < 2 * sigma, name
        # ...so on a fine schedule alpha_bar(t*) is the closed form to within one step.
        assert bars[t] == pytest.approx(1 / (1 + 4 * sigma**2), abs=bars[t - 1] - bars[t] + 1e-12), name


def test_schedules_match_their_closed_forms():
    betas = np.linspace(1e-4, 0.02, 1000)
    assert np.allclose(linear_alphas_cumprod(1000), np.cumprod(1 - betas), rtol=0, atol=1e-15)
    # Cosine: alpha_bar(t) = f(t/T)/f(0), f(u) = cos²((u + s)/(1 + s)·π/2), s = 0.008, while no
    # beta is clipped (all but the last few steps).
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    bars = cosine_alphas_cumprod(4000)
    for t in (0, 100, 1158, 2000, 3500):
        assert bars[t] == pytest.approx(f((t + 1) / 4000) / f(0), rel=1e-9)
    with pytest.raises(ValueError, match="too much noise"):
        timestep_for_sigma([0.99, 0.9, 0.6], 0.5)  # never as noisy as alpha_bar = 0.5


class OracleEpsilon(nn.Module):
    """The exact ε network for one known noise draw: what a perfect model would predict. It
    records what it was called with, so the scaling into the model is checked too."""

    def __init__(self, clean: torch.Tensor, bars: list[float], extra_channels: int = 0) -> None:
        super().__init__()
        self.clean, self.bars, self.extra = clean * 2 - 1, bars, extra_channels
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls.append((x_t.clone(), t.clone()))
        a = self.bars[int(round(float(t[0]) / self.scale))]
        eps = (x_t - math.sqrt(a) * self.clean) / math.sqrt(1 - a)
        return torch.cat([eps, torch.randn(eps.shape[0], self.extra, *eps.shape[2:])], 1) if self.extra else eps

    scale = 1.0


@pytest.mark.parametrize("sigma", (0.25, 0.5))
def test_one_shot_scales_the_noisy_input_and_inverts_an_exact_epsilon(sigma):
    torch.manual_seed(0)
    clean = torch.rand(4, 3, 8, 8)
    noise = sigma * torch.randn_like(clean)
    target = 1 / (1 + 4 * sigma**2)
    bars = [0.999, 0.99, 0.95, target, target * 0.9, 0.1]  # alpha_bar(t*) is exactly the closed form
    oracle = OracleEpsilon(clean, bars, extra_channels=3)
    oracle.scale = 0.25
    denoiser = DiffusionDenoiser(oracle, bars, learned_sigma=True, timestep_scale=0.25).set_sigma(sigma)
    out = denoiser(clean + noise)
    assert denoiser.timesteps == [3]
    (x_t, t), = oracle.calls
    assert torch.allclose(x_t, math.sqrt(target) * (2 * (clean + noise) - 1), atol=1e-6)
    assert torch.equal(t, torch.full((4,), 3 * 0.25))
    # x_t* carries noise of std sqrt(1 - alpha_bar(t*)), as the model was trained for.
    assert math.sqrt(target) * 2 * sigma == pytest.approx(math.sqrt(1 - target), rel=1e-12)
    assert torch.allclose(out, clean, atol=1e-5)


def test_multi_step_walks_down_to_zero_and_stays_exact():
    torch.manual_seed(1)
    clean = torch.rand(2, 3, 8, 8)
    bars = linear_alphas_cumprod(1000)
    oracle = OracleEpsilon(clean, bars)
    denoiser = DiffusionDenoiser(oracle, bars, steps=4).set_sigma(0.25)
    out = denoiser(clean + 0.25 * torch.randn_like(clean))
    start = timestep_for_sigma(bars, 0.25)
    called = [int(t[0]) for _, t in oracle.calls]
    assert called == reverse_timesteps(start, 4) and called[0] == start and called[-1] == 0 and len(called) == 4
    assert called == sorted(called, reverse=True)
    assert torch.allclose(out, clean, atol=1e-4)


def test_v_and_sample_predictions_and_missing_sigma():
    bars = [0.9, 0.8, 0.5, 0.1]
    x = torch.rand(1, 3, 4, 4)

    class Constant(nn.Module):
        def forward(self, x_t, t):
            return torch.zeros_like(x_t)

    # sample prediction: x̂₀ = output = 0 (i.e. grey 0.5); v prediction with v = 0: x̂₀ = √ᾱ x_t.
    assert torch.allclose(DiffusionDenoiser(Constant(), bars, prediction_type="sample").set_sigma(1)(x), torch.full_like(x, 0.5))
    v = DiffusionDenoiser(Constant(), bars, prediction_type="v_prediction").set_sigma(0.25)
    a = bars[v.timesteps[0]]
    assert torch.allclose(v(x), (a * (2 * x - 1) + 1) / 2, atol=1e-6)
    with pytest.raises(RuntimeError, match="set_sigma"):
        DiffusionDenoiser(Constant(), bars)(x)


# --------------------------------------------------------------------------- diffusers folders


def save_tiny_diffusers(folder: Path, layout: str = "flat", card: bool = True, seed: int = 0):
    """A tiny UNet2DModel + DDPM scheduler saved the ecosystem's way (save_pretrained)."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=32, block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    unet.save_pretrained(folder / "unet" if layout == "pipeline" else folder)
    scheduler.save_pretrained(folder / "scheduler" if layout == "pipeline" else folder)
    if card:
        (folder / "README.md").write_text("---\nlibrary_name: diffusers\ndatasets:\n- uoft-cs/cifar10\n---\n# tiny\n")
    return unet.eval(), scheduler


def test_diffusers_folder_round_trips_into_a_dsmooth_checkpoint(tmp_path):
    unet, scheduler = save_tiny_diffusers(tmp_path / "a")
    converted = ModelBytes.read_denoiser(tmp_path / "a")
    path = tmp_path / "converted.pt"
    path.write_bytes(converted.data)
    model, meta = load_checkpoint(path)  # weights_only=True, like any checkpoint
    assert meta.arch == "diffusers_unet" and meta.kind == "denoiser" and meta.sigma_independent
    assert meta.sigma is None and meta.dataset == "cifar10" and meta.input_size == 32
    original = unet.state_dict()
    assert {f"model.{k}" for k in original} == set(model.state_dict())
    assert all(torch.equal(model.state_dict()[f"model.{k}"], v) for k, v in original.items())

    # Same x̂₀ as computed directly with the diffusers UNet and its scheduler's ᾱ.
    torch.manual_seed(3)
    noisy = torch.rand(2, 3, 32, 32) + 0.25 * torch.randn(2, 3, 32, 32)
    model.set_sigma(0.25)
    bars = scheduler.alphas_cumprod.double()
    t = int(torch.nonzero(bars <= 1 / (1 + 4 * 0.25**2))[0])
    a = float(bars[t])
    x_t = math.sqrt(a) * (2 * noisy - 1)
    with torch.no_grad():
        eps = unet(x_t, t).sample
        expected = (((x_t - math.sqrt(1 - a) * eps) / math.sqrt(a)).clamp(-1, 1) + 1) / 2
        assert torch.allclose(model(noisy), expected, atol=1e-5)


def test_conversion_is_deterministic_wherever_the_files_are(tmp_path):
    save_tiny_diffusers(tmp_path / "flat")
    shutil.copytree(tmp_path / "flat", tmp_path / "elsewhere" / "copy")
    save_tiny_diffusers(tmp_path / "pipe", layout="pipeline")
    shutil.copy(tmp_path / "flat" / "README.md", tmp_path / "pipe" / "README.md")
    shas = {ModelBytes.read_denoiser(p).sha256 for p in
            (tmp_path / "flat", tmp_path / "flat", tmp_path / "elsewhere" / "copy")}
    assert len(shas) == 1
    # Other weights, another identity.
    save_tiny_diffusers(tmp_path / "other", seed=1)
    assert ModelBytes.read_denoiser(tmp_path / "other").sha256 not in shas
    # A pipeline layout (unet/ + scheduler/) loads too.
    _, meta = load_denoiser_bytes(ModelBytes.read_denoiser(tmp_path / "pipe"), cifar_description(), 0.5)
    assert meta.arch == "diffusers_unet"


def test_convert_command_writes_the_same_bytes_as_naming_the_folder(tmp_path, capsys):
    from jobs.cli import main

    save_tiny_diffusers(tmp_path / "m")
    assert main(["convert-diffusion", str(tmp_path / "m"), str(tmp_path / "m.pt")]) == 0
    written = hashlib.sha256((tmp_path / "m.pt").read_bytes()).hexdigest()
    assert written == ModelBytes.read_denoiser(tmp_path / "m").sha256
    assert written in capsys.readouterr().out
    assert main(["convert-diffusion", str(tmp_path / "m"), str(tmp_path / "m3.pt"), "--steps", "3"]) == 0
    model, meta = load_checkpoint(tmp_path / "m3.pt")
    assert meta.arch_kwargs["steps"] == 3 and len(model.set_sigma(0.5).timesteps) == 3
    assert main(["convert-diffusion", str(tmp_path / "nothing"), str(tmp_path / "x.pt")]) == 2


def test_sigma_independent_denoiser_takes_the_runs_sigma_and_trained_ones_still_refuse(tmp_path):
    save_tiny_diffusers(tmp_path / "m")
    classifier = ModelBytes.read(ASSETS / "classifier.pt")
    denoiser = ModelBytes.read_denoiser(tmp_path / "m")
    timesteps = {}
    for sigma in (0.25, 0.5):
        pair, info = load_pair(classifier, denoiser, cifar_description(), sigma=sigma)
        timesteps[sigma] = pair.denoiser.timesteps[0]
        assert info.denoiser.name == "diffusers_unet" and info.denoiser.sha256 == denoiser.sha256
    assert timesteps[0.25] < timesteps[0.5]
    trained = tmp_path / "trained.pt"
    save_checkpoint(trained, build_model("dncnn_small"), ModelMeta("dncnn_small", sigma=0.25))
    with pytest.raises(DataMismatchError, match="sigma"):
        load_pair(classifier, ModelBytes.read_denoiser(trained), cifar_description(), sigma=0.5)
    from pipeline.data import DataDescription

    with pytest.raises(DataMismatchError, match="cifar10"):  # the model card says CIFAR-10
        load_denoiser_bytes(denoiser, DataDescription("imagenet", 1000, (32, 32)), 0.25)


def test_not_a_diffusers_folder_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a diffusers model folder"):
        ModelBytes.read_denoiser(tmp_path / "empty")
    save_tiny_diffusers(tmp_path / "nosched")
    (tmp_path / "nosched" / "scheduler_config.json").unlink()
    with pytest.raises(CheckpointError, match="scheduler_config"):
        ModelBytes.read_denoiser(tmp_path / "nosched")


def test_batchnorm_folding_traces_around_the_diffusion_denoiser(tmp_path):
    from pipeline.sampling.engine import optimize_for_inference

    save_tiny_diffusers(tmp_path / "m")
    pair, _ = load_pair(ModelBytes.read(ASSETS / "classifier.pt"), ModelBytes.read_denoiser(tmp_path / "m"),
                        cifar_description(), sigma=0.25)
    fast = optimize_for_inference(pair)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules()), "classifier BN left unfolded"
    x = torch.rand(3, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(fast(x), pair(x), atol=1e-3)


def test_mixed_precision_keeps_a_float32_image():
    bars = linear_alphas_cumprod(1000)
    torch.manual_seed(0)
    unet = GuidedUNet(**guided_unet_kwargs(dict(image_size=32, num_channels=32, channel_mult="1,2",
                                                 attention_resolutions="16", learn_sigma=True))).eval()
    denoiser = DiffusionDenoiser(unet, bars, learned_sigma=True).set_sigma(0.25)
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        full = denoiser(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # what VoteCounter(amp=...) does on a GPU
            half = denoiser(x)
    assert half.dtype == torch.float32 and (half - full).abs().max() < 0.1


# --------------------------------------------------------------------------- guided-diffusion


def test_published_guided_configs_have_their_checkpoints_keys_and_sizes():
    """Key names, shapes and parameter counts of the two checkpoints Carlini et al. used.

    The counts are those of the published files: cifar10_uncond_50M_500K.pt (210 MB of
    float32, "50M" in its name) holds 52,546,438 parameters and 256x256_diffusion_uncond.pt
    (2.2 GB) 552,814,086."""
    expected = {
        "cifar10_uncond_50M_500K": (52_546_438, 446, {
            "input_blocks.0.0.weight": (128, 3, 3, 3), "time_embed.0.weight": (512, 128),
            "input_blocks.1.0.emb_layers.1.weight": (256, 512),  # scale-shift norm: 2 x 128
            "input_blocks.5.1.qkv.weight": (768, 256, 1), "input_blocks.4.0.op.weight": (128, 128, 3, 3),
            "middle_block.1.proj_out.weight": (256, 256, 1), "output_blocks.3.1.conv.weight": (256, 256, 3, 3),
            "out.2.weight": (6, 128, 3, 3)}),
        "256x256_diffusion_uncond": (552_814_086, 566, {
            "input_blocks.0.0.weight": (256, 3, 3, 3), "time_embed.2.weight": (1024, 1024),
            "input_blocks.3.0.in_layers.2.weight": (256, 256, 3, 3),  # resblock_updown: a ResBlock downsamples
            "output_blocks.2.2.in_layers.2.weight": (1024, 1024, 3, 3),  # ... and one upsamples
            "input_blocks.10.1.qkv.weight": (1536, 512, 1), "middle_block.1.norm.weight": (1024,),
            "output_blocks.17.0.skip_connection.weight": (256, 512, 1, 1), "out.2.weight": (6, 256, 3, 3)}),
    }
    for preset in PRESETS:
        with torch.device("meta"):
            model = GuidedUNet(**guided_unet_kwargs(preset.flags))
        params, keys, shapes = expected[preset.name]
        state = model.state_dict()
        assert sum(p.numel() for p in model.parameters()) == params, preset.name
        assert len(state) == keys, preset.name
        for key, shape in shapes.items():
            assert tuple(state[key].shape) == shape, (preset.name, key)
        assert match_preset(state) == preset
        assert any(".op." in k for k in state) != preset.flags.get("resblock_updown", False)


@pytest.mark.parametrize("flags, expected", [
    (dict(num_heads=2, learn_sigma=True), (-474.9674, 1381.1233, 0.02537, 0.04264)),
    (dict(num_head_channels=16, resblock_updown=True, use_new_attention_order=True), (8.9373, 869.1788, -0.05686, -0.15806)),
])
def test_guided_unet_computes_what_it_computed_when_checked_against_the_original(flags, expected):
    """Regression values of the port on seeded weights: when the port was written its outputs
    equalled improved/guided-diffusion's UNetModel on the same weights (their code is not part
    of dsmooth), in both attention orders, with and without ResBlock resampling."""
    flags = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="16", **flags)
    model = GuidedUNet(**guided_unet_kwargs(flags)).eval()
    g = torch.Generator().manual_seed(0)
    model.load_state_dict({k: 0.1 * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()})
    x = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        y = model(x, torch.tensor([3.0, 700.0]))
    got = (y.sum().item(), y.abs().sum().item(), y[0, 0, 0, 0].item(), y[1, -1, -1, -1].item())
    assert got == pytest.approx(expected, rel=1e-3, abs=1e-4)


def guided_small_flags() -> dict:
    return {"image_size": 32, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2",
            "attention_resolutions": "16", "num_heads": 2, "learn_sigma": True, "diffusion_steps": 4000,
            "noise_schedule": "cosine", "rescale_timesteps": True, "dataset": "cifar10"}


def test_guided_state_dict_in_their_key_format_round_trips(tmp_path):
    torch.manual_seed(0)
    flags = guided_small_flags()
    unet = GuidedUNet(**guided_unet_kwargs(flags)).eval()
    state = {k: torch.randn_like(v) * 0.05 for k, v in unet.state_dict().items()}  # their layout: no prefix
    unet.load_state_dict(state)
    torch.save(state, tmp_path / "small_guided.pt")
    with pytest.raises(CheckpointError, match="small_guided.yaml"):  # not a published config: flags needed
        ModelBytes.read_denoiser(tmp_path / "small_guided.pt")
    (tmp_path / "small_guided.yaml").write_text(yaml.safe_dump(flags))
    converted = ModelBytes.read_denoiser(tmp_path / "small_guided.pt")
    assert converted.sha256 == ModelBytes.read_denoiser(tmp_path / "small_guided.pt").sha256
    model, meta = load_denoiser_bytes(converted, cifar_description(), 0.25)
    assert meta.arch == "guided_unet" and meta.sigma_independent and meta.dataset == "cifar10"
    assert all(torch.equal(model.state_dict()[f"model.{k}"], v) for k, v in state.items())
    # improved-diffusion's rescale_timesteps: the network sees t·1000/T; cosine 4000-step ᾱ.
    bars = cosine_alphas_cumprod(4000)
    t = timestep_for_sigma(bars, 0.25)
    noisy = torch.rand(2, 3, 32, 32)
    x_t = math.sqrt(bars[t]) * (2 * noisy - 1)
    with torch.no_grad():
        eps = unet(x_t, torch.full((2,), t * 1000 / 4000))[:, :3]
        expected = (((x_t - math.sqrt(1 - bars[t]) * eps) / math.sqrt(bars[t])).clamp(-1, 1) + 1) / 2
        assert torch.allclose(model(noisy), expected, atol=1e-5)
    # A file whose weights do not fit its flags is refused by name.
    (tmp_path / "small_guided.yaml").write_text(yaml.safe_dump({**flags, "num_channels": 64}))
    with pytest.raises(CheckpointError, match="shape mismatches"):
        ModelBytes.read_denoiser(tmp_path / "small_guided.pt")


# --------------------------------------------------------------------------- the shipped small DDPM


@pytest.mark.skipif(not CIFAR.is_file(), reason="needs ../shared/data/cifar10-jpeg.tar.gz")
def test_shipped_small_ddpm_lifts_accuracy_under_noise():
    """One-shot denoising at σ = 0.25 with the small DDPM trained here on CIFAR-10 makes the
    standard-trained demo classifier more accurate under noise than it is without it."""
    sigma = 0.25
    data = open_dataset("cifar10", CIFAR, "test").subset(skip=25)  # 400 test images, all classes
    images = torch.stack([data.load(i) for i in range(len(data))])
    labels = torch.as_tensor(data.labels())
    classifier_bytes = ModelBytes.read(ASSETS / "classifier.pt")
    pair, info = load_pair(classifier_bytes, ModelBytes.read_denoiser(SMALL_DDPM), data.describe(), sigma=sigma)
    assert info.denoiser.name == "diffusers_unet"
    noisy = images + sigma * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        denoised = torch.cat([pair.denoiser(b) for b in noisy.split(100)])
        without = torch.cat([pair.classifier(b) for b in noisy.split(100)]).argmax(1) == labels
        with_d = torch.cat([pair.classifier(b) for b in denoised.split(100)]).argmax(1) == labels
    # It denoises: pixels in [0, 1] much closer to the clean image (13 dB noisy; 23.5 dB measured).
    mse = lambda a: float(((a - images) ** 2).mean())  # noqa: E731
    assert 0 <= float(denoised.min()) and float(denoised.max()) <= 1
    assert 10 * math.log10(mse(noisy) / mse(denoised)) > 6
    gained, lost = int((with_d & ~without).sum()), int((~with_d & without).sum())
    # McNemar's exact test on the images where the two disagree: more gains than chance allows.
    from scipy.stats import binomtest

    assert binomtest(gained, gained + lost, 0.5, alternative="greater").pvalue < 1e-3, (gained, lost)
    assert with_d.float().mean() > without.float().mean() + 0.05
    card = json.loads((SMALL_DDPM / "training.json").read_text())
    assert card["parameters"] < 2_000_000

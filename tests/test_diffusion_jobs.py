"""A diffusion denoiser named by its path in the jobs: `dsmooth certify` (local Ray, real
CIFAR-10, the shipped small DDPM folder), `certify-api` (emulator), and the benchmark."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from api_support import GRAY_IDS, install_fake_credentials, job_config, normalise, oracle_labels, top_labels_in_log
from jobs.cli import main as cli_main
from pipeline.certify.pair import ModelBytes, load_denoiser_bytes
from pipeline.runs.storage import read_votes

pytest.importorskip("diffusers")

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "pipeline" / "assets" / "cifar10-sample"
ASSETS = REPO / "pipeline" / "assets" / "models" / "cifar10"
SMALL_DDPM = ASSETS / "ddpm_small"


def test_certify_names_a_diffusers_folder_and_resumes(tmp_path, capsys, ray_local):
    out = tmp_path / "run"
    argv = ["certify", "--dataset", "cifar10", "--data-root", str(SAMPLE), "--max", "4",
            "--classifier", str(ASSETS / "classifier.pt"), "--denoiser", str(SMALL_DDPM),
            "--sigma", "0.25", "--n0", "10", "--n", "50",
            "--actors", "1", "--cpus-per-actor", "1", "--output", str(out)]
    assert cli_main(argv) == 0, capsys.readouterr().err
    votes = read_votes(out)
    assert sorted(set(votes.image_id)) == [0, 1, 2, 3]
    assert set(votes.denoiser) == {"diffusers_unet"}
    assert set(votes.denoiser_sha256) == {ModelBytes.read_denoiser(SMALL_DDPM).sha256}
    capsys.readouterr()
    # The same command again: the converted bytes, hence the run identity, are the same.
    assert cli_main(argv) == 0
    assert "0 to do" in capsys.readouterr().err


def save_tiny_unet(folder: Path) -> None:
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    # No attention anywhere (not even diffusers' default mid-block one): at 224x224 it would cost minutes.
    unet = UNet2DModel(sample_size=32, block_out_channels=(16, 16), layers_per_block=1, norm_num_groups=8,
                       add_attention=False, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    with torch.no_grad():  # ε ≈ -2: x̂₀ is the input brightened by 4σ, so the API's answers change
        unet.conv_out.bias.fill_(-2.0)
    unet.save_pretrained(folder)
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(folder)


def test_certify_api_denoises_with_a_diffusers_folder_before_each_query(tmp_path, ray_local):
    from jobs.certify_api import certify_api
    from pipeline.apis.emulator import EmulatorServer
    from pipeline.apis.run.prepare import load_job_config
    from pipeline.data import DataDescription

    install_fake_credentials()
    save_tiny_unet(tmp_path / "unet")
    ids = [GRAY_IDS[1]]
    with EmulatorServer() as emulator:
        for sigma in (0.25, 0.5):  # one model serves every sigma: no sigma mismatch to refuse
            run = tmp_path / f"run-{sigma}"
            config = job_config("clarifai", emulator.url, run, ids, denoiser=str(tmp_path / "unet"), sigma=sigma)
            assert certify_api(load_job_config(config)).status == "complete"
    converted = ModelBytes.read_denoiser(tmp_path / "unet")
    votes = read_votes(tmp_path / "run-0.25")
    assert set(votes.denoiser) == {"diffusers_unet"} and set(votes.denoiser_sha256) == {converted.sha256}
    denoiser, _ = load_denoiser_bytes(converted, DataDescription(None, None, (224, 224)), 0.25)
    expected = oracle_labels(ids, 0.25, 5, 20, 8, denoiser=denoiser.eval())
    logged = {k: normalise(v) for k, v in top_labels_in_log(tmp_path / "run-0.25").items()}
    assert logged == {k: normalise(v) for k, v in expected.items()}
    assert expected != oracle_labels(ids, 0.25, 5, 20, 8), "the denoiser should change some answers"


@pytest.mark.slow
def test_benchmark_prices_a_diffusion_denoiser_against_dncnn(tmp_path):
    """Benchmark smoke run: certify_throughput.py prices a diffusers denoiser against DnCNN and prints its
    figures."""
    save_tiny_unet(tmp_path / "unet")
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "certify_throughput.py"), "--device", "cpu",
         "--model", f"{tmp_path / 'unet'}+cifar_resnet20", "--vs-denoiser", "dncnn_small", "--n", "24",
         "--n0", "4", "--images", "1", "--batch", "28", "--reps", "1", "--threads", "1"],
        env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "median wall-clock: baseline" in result.stdout
    assert re.search(r"cost per sample of \S+ relative to dncnn_small: [\d.]+x", result.stdout), result.stdout

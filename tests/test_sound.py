"""`--sound`: floating-point-sound Gaussian sampling (`pipeline.sampling.sound`).

What it guarantees and how each guarantee is checked here:
- the model's input is the exact grid point (i + r) / 255, correctly rounded once, whatever
  i and r are (so a function of the grid point alone; the naive float sum is not);
- the noise steps r follow the rounded Gaussian P(r) = Phi((r + 1/2) / 255s) - Phi((r - 1/2) / 255s)
  that the certificate assumes, on the fast path and on the lazy many-bits path (chi-square
  against scipy's cdf, which the sampler never uses: it reads mpmath thresholds);
- only the noise draw changes: the identity gains {"sound": true}, counts are a pure function
  of the noise address (batch size, chunk split, a resumed run: the same votes).
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import chisquare, norm

from pipeline.certify.plan import CertifyConfig, certify_identity
from pipeline.certify.pair import ModelIdentity, PairInfo
from pipeline.config import ConfigError, parse_config
from pipeline.data import ImageDataset
from pipeline.sampling.engine import VoteCounter
from pipeline.sampling.noise import Chunk, SampleRequest
from pipeline.sampling.sound import half_width, noisy_levels, reach, sound_inputs, sound_steps

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "pipeline" / "assets" / "models" / "cifar10"
SAMPLE = REPO / "pipeline" / "assets" / "cifar10-sample"
BASE = {"dataset": "cifar10", "classifier": "c", "sigma": 0.25, "output": "o", "data_root": "/x/cifar.tgz"}


def _rounded_gaussian(sigma: float) -> np.ndarray:
    """P(r) for r in [-R, R], tails merged into the ends, from scipy (independent of the sampler)."""
    edges = (np.arange(-half_width(sigma), half_width(sigma)) + 0.5) / (255 * sigma)
    return np.diff(np.concatenate([[0.0], norm.cdf(edges), [1.0]]))


def _chi_square_pvalue(steps: torch.Tensor, sigma: float) -> float:
    """Goodness of fit of the steps to `_rounded_gaussian`, bins with fewer than 20 expected
    draws merged into the two tails."""
    expected = _rounded_gaussian(sigma) * steps.numel()
    observed = np.bincount((steps + half_width(sigma)).numpy(), minlength=len(expected)).astype(np.float64)
    keep = np.flatnonzero(expected >= 20)
    low, high = keep[0], keep[-1]
    exp = np.concatenate([[expected[:low].sum()], expected[low:high + 1], [expected[high + 1:].sum()]])
    obs = np.concatenate([[observed[:low].sum()], observed[low:high + 1], [observed[high + 1:].sum()]])
    return float(chisquare(obs, exp).pvalue)


def test_inputs_are_the_exact_grid_points_rounded_once():
    """Every input is the float nearest (i + r) / 255 with integer i + r: x + delta is exact."""
    levels = torch.randint(0, 256, (3, 8, 8), generator=torch.Generator().manual_seed(1))
    chunk = Chunk(seed=5, image_id=2, phase="estimation", index=1, size=16)
    inputs = sound_inputs(levels, chunk, sigma=0.5)
    assert inputs.shape == (16, 3, 8, 8) and inputs.dtype == torch.float32
    grid = (inputs.double() * 255).round()
    assert (inputs.double() * 255 - grid).abs().max() < 1e-3  # on the grid: q / 255 with integer q ...
    assert (grid - levels).abs().max() > 100  # ... (and the noise is there: sigma 0.5 = 127 levels)
    k = reach(0.5)
    assert grid.min() >= -255 * k and grid.max() <= 255 * (k + 1)
    for value, q in zip(inputs.flatten().tolist()[:3000], grid.flatten().long().tolist()[:3000]):
        exact = Fraction(q, 255)
        below = float(np.nextafter(np.float32(value), np.float32(-np.inf)))
        above = float(np.nextafter(np.float32(value), np.float32(np.inf)))
        error = abs(Fraction(value) - exact)  # the nearest float32: no neighbour is closer
        assert error <= abs(Fraction(below) - exact) and error <= abs(Fraction(above) - exact)


def test_naive_float_addition_is_not_a_function_of_the_grid_point():
    """Why the construction is needed: float32(i/255) + float32(r/255) depends on (i, r), not only
    on i + r, so what the model sees is not a function of the point being certified."""
    i = np.arange(256)
    r = np.arange(-300, 300)
    sums = (i[:, None] / np.float32(255)).astype(np.float32) + (r[None, :] / np.float32(255)).astype(np.float32)
    grid = i[:, None] + r[None, :]
    differing = sum(len(np.unique(sums[grid == q])) > 1 for q in range(-300, 555))
    assert differing > 50, differing


def test_clamp_makes_the_input_one_map_of_the_grid_point():
    """clamp(i + clamp(r, -R, R)) = clamp(i + r) for every 8-bit level i and any step r: the
    clamped draw is h(x + eps) for one fixed map h, whatever the image."""
    sigma = 0.25
    levels = torch.arange(256)[:, None]
    raw = torch.arange(-3 * half_width(sigma), 3 * half_width(sigma))[None, :]
    clamped = raw.clamp(-half_width(sigma), half_width(sigma))
    k = reach(sigma)
    assert torch.equal(noisy_levels(levels, clamped, sigma), (levels + raw).clamp(-255 * k, 255 * (k + 1)))


@pytest.mark.parametrize("sigma", [0.02, 0.25])
def test_steps_follow_the_rounded_gaussian(sigma):
    """300,000 draws fit P(r): chi-square p > 1e-4, and mean and variance within 4 standard
    errors of P's, at this fixed seed (thresholds a tenth of a level off, Phi((r + 0.4) / 255s),
    or sigma 1% off, fail: 10 and 8 standard errors)."""
    steps = sound_steps(seed=11, count=300_000, sigma=sigma)
    assert _chi_square_pvalue(steps, sigma) > 1e-4
    values = np.arange(-half_width(sigma), half_width(sigma) + 1)
    probabilities = _rounded_gaussian(sigma)
    variance = float(probabilities @ values**2)  # mean 0 by symmetry
    draws = steps.double().numpy()
    assert abs(draws.mean()) < 4 * np.sqrt(variance / draws.size)
    assert abs(draws.var() - variance) < 4 * variance * np.sqrt(2 / draws.size)
    assert torch.equal(steps, sound_steps(seed=11, count=300_000, sigma=sigma))  # a pure function of the seed
    assert not torch.equal(steps, sound_steps(seed=12, count=300_000, sigma=sigma))


def test_lazy_bits_decide_exactly_when_the_first_word_does_not():
    """With 8-bit words most draws need more bits: the lazy comparison must still give P(r)
    exactly (ignoring the undecided ones, i.e. taking the lower step, fails this)."""
    steps = sound_steps(seed=3, count=40_000, sigma=0.1, bits=8)
    assert _chi_square_pvalue(steps, 0.1) > 1e-4


class _Centred(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) - 0.5


def _linear_model() -> torch.nn.Module:
    """A linear classifier of the grey level's deviation: grey images sit near a 4-way tie."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(_Centred(), torch.nn.Linear(3 * 6 * 6, 4))
    torch.nn.init.zeros_(model[1].bias)
    return model.eval()


def _images() -> dict[int, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    return {i: torch.randint(118, 138, (3, 6, 6), generator=generator).float() / 255 for i in (4, 9)}


def test_sound_counts_are_a_pure_function_of_the_noise_address():
    """Same requests, other batch sizes, or the chunks split across calls (a resume): the same
    votes; plain sampling of the same addresses gives other votes (another draw)."""
    model, images = _linear_model(), _images()
    requests = [SampleRequest(7, i, "estimation", 300, 64) for i in images]
    sound = VoteCounter(model, 4, 0.25, batch_size=50, device="cpu", sound=True).count(images, requests)
    again = VoteCounter(model, 4, 0.25, batch_size=128, device="cpu", sound=True).count(images, requests)
    assert np.array_equal(sound, again) and (sound.sum(axis=1) == 300).all()
    counter = VoteCounter(model, 4, 0.25, batch_size=33, device="cpu", sound=True)
    head = counter.count(images, [SampleRequest(7, i, "estimation", 300, 64, stop_chunk=2) for i in images])
    tail = counter.count(images, [SampleRequest(7, i, "estimation", 300, 64, first_chunk=2) for i in images])
    assert np.array_equal(head + tail, sound)
    plain = VoteCounter(model, 4, 0.25, batch_size=50, device="cpu").count(images, requests)
    assert (plain.sum(axis=1) == 300).all() and not np.array_equal(plain, sound)
    assert (np.count_nonzero(sound, axis=1) > 1).all()  # the votes split: the comparison means something


def test_sound_refuses_an_image_off_the_8_bit_grid():
    with pytest.raises(ValueError, match="8-bit"):
        VoteCounter(_linear_model(), 4, 0.25, device="cpu", sound=True).count(
            {0: torch.full((3, 6, 6), 0.5)}, [SampleRequest(0, 0, "estimation", 10, 10)])


def _identity(**values):
    split = ImageDataset.from_array(np.zeros((2, 32, 32, 3), dtype=np.uint8), [0, 1], name="cifar10/test")
    info = PairInfo(ModelIdentity("cifar_resnet20", "aa"), None, 10)
    return certify_identity(parse_config(CertifyConfig, {**BASE, **values}), split, info)


def test_sound_is_in_the_identity_only_when_set():
    old = _identity()
    assert "sound" not in old  # runs recorded before --sound keep their identity
    assert _identity(sound=False) == old
    assert _identity(sound=True) == {**old, "sound": True}
    assert parse_config(CertifyConfig, {**BASE, "sound": True}).pair_settings().sound


@pytest.mark.slow
def test_a_sound_run_resumes_to_the_votes_of_one_run(tmp_path, ray_local):
    """`dsmooth certify --sound` on the shipped pair: run.json says sound; a run stopped after
    image 0 and resumed with image 1 holds exactly the votes of one run over both (~60 s: Ray)."""

    from jobs.cli import main as dsmooth
    from pipeline.runs.storage import read_votes

    def certify(output: Path, ids: list[str]) -> int:
        return dsmooth(["certify", "--dataset", "cifar10", "--data-root", str(SAMPLE), "--classifier",
                        str(MODELS / "classifier.pt"), "--denoiser", str(MODELS / "denoiser_stab_mse_s0.25.pt"),
                        "--sigma", "0.25", "--n0", "8", "--n", "48", "--chunk-size", "16", "--actors", "1",
                        "--sound", "--output", str(output), "--ids", *ids])

    assert certify(tmp_path / "resumed", ["0"]) == 0
    assert certify(tmp_path / "resumed", ["0", "150"]) == 0
    assert certify(tmp_path / "once", ["0", "150"]) == 0
    record = json.loads((tmp_path / "resumed" / "run.json").read_text())
    assert record["identity"]["sound"] is True

    def votes(output: Path) -> dict:
        table = read_votes(output)
        return {(row.image_id, row.phase): list(row.counts) for row in table.itertuples()}

    resumed, once = votes(tmp_path / "resumed"), votes(tmp_path / "once")
    assert set(resumed) == {(i, p) for i in (0, 150) for p in ("selection", "estimation")}
    assert resumed == once


def test_sound_with_another_noise_is_refused_by_the_config_and_by_smooth():
    """Gaussian votes certified with a uniform (l1) radius would be wrong: the one rule
    (`pipeline.config.sound_noise_problem`) holds for configs and for `dsmooth.Smooth`, which
    reaches the engine without one."""
    from dsmooth import Smooth

    with pytest.raises(ConfigError, match="Gaussian noise only, not uniform"):
        parse_config(CertifyConfig, {**BASE, "sound": True, "noise": "uniform"})
    with pytest.raises(ValueError, match="Gaussian noise only, not laplace"):
        Smooth(_linear_model(), num_classes=4, sigma=0.25, device="cpu", sound=True, noise="laplace")


def test_smooth_keeps_sound_across_batch_sizes():
    from dsmooth import Smooth

    image = _images()[4]
    smooth = Smooth(_linear_model(), num_classes=4, sigma=0.25, device="cpu", sound=True)
    first = smooth.predict(image, n=40, alpha=0.5, batch_size=7, image_id=3)  # a new batch size: a new counter
    assert smooth.counter.sound and smooth.counter.batch_size == 7
    assert smooth.predict(image, n=40, alpha=0.5, batch_size=40, image_id=3) == first

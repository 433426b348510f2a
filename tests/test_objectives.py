"""Training objectives (pipeline.training.objectives): values against hand computation, gradients
reach the denoiser and never the frozen classifiers, black-box losses average surrogates."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from pipeline.models import build_model, freeze
from pipeline.training.objectives import (
    add_noise,
    classifier_loss,
    clf_loss,
    denoiser_loss,
    mse_loss,
    stab_loss,
)


class Linear(nn.Module):
    """A tiny classifier with known weights: logits = W @ flatten(x)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight.t()


class Scale(nn.Module):
    """A tiny 'denoiser': D(x) = a * x."""

    def __init__(self, a: float) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a * x


def _ce(logits: list[float], target: int) -> float:
    return -logits[target] + math.log(sum(math.exp(v) for v in logits))


@pytest.fixture
def setup():
    torch.manual_seed(0)
    clean = torch.rand(4, 1, 1, 2)  # 4 "images" of 2 pixels
    noisy = clean + 0.5 * torch.randn(4, 1, 1, 2)
    f1 = freeze(Linear(torch.tensor([[1.0, -1.0], [-2.0, 3.0], [0.5, 0.5]])))
    f2 = freeze(Linear(torch.tensor([[-1.0, 2.0], [1.0, 1.0], [3.0, -1.0]])))
    labels = torch.tensor([0, 2, 1, 1])
    return clean, noisy, f1, f2, labels


def test_mse_is_mean_squared_error_over_all_pixels(setup):
    clean, noisy, *_ = setup
    denoised = 0.7 * noisy
    expected = sum((float(d) - float(c)) ** 2 for d, c in zip(denoised.flatten(), clean.flatten())) / clean.numel()
    assert mse_loss(denoised, clean).item() == pytest.approx(expected, rel=1e-6)
    assert denoiser_loss("mse", Scale(0.7), clean, noisy).item() == pytest.approx(expected, rel=1e-6)


def test_stab_targets_are_the_classifiers_own_clean_predictions(setup):
    clean, noisy, f1, _, labels = setup
    a = 0.8
    expected = 0.0
    for i in range(len(clean)):
        x = clean[i].flatten().tolist()
        z = [a * v for v in noisy[i].flatten().tolist()]
        w = f1.weight.tolist()
        clean_logits = [sum(wk * xk for wk, xk in zip(row, x)) for row in w]
        target = max(range(3), key=lambda k: clean_logits[k])  # f(x), not the true label
        expected += _ce([sum(wk * zk for wk, zk in zip(row, z)) for row in w], target) / len(clean)
    got = denoiser_loss("stab", Scale(a), clean, noisy, labels, [f1]).item()
    assert got == pytest.approx(expected, rel=1e-5)
    # STAB+MSE is the same loss (it differs only in where the denoiser starts).
    assert denoiser_loss("stab_mse", Scale(a), clean, noisy, labels, [f1]).item() == pytest.approx(expected, rel=1e-5)


def test_clf_uses_true_labels(setup):
    clean, noisy, f1, _, labels = setup
    a = 1.3
    w = f1.weight.tolist()
    expected = sum(
        _ce([sum(wk * a * zk for wk, zk in zip(row, noisy[i].flatten().tolist())) for row in w], int(labels[i]))
        for i in range(len(clean))
    ) / len(clean)
    assert denoiser_loss("clf", Scale(a), clean, noisy, labels, [f1]).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("objective", ["stab", "clf"])
def test_black_box_loss_is_the_mean_over_surrogates(setup, objective):
    clean, noisy, f1, f2, labels = setup
    d = Scale(0.9)
    one = denoiser_loss(objective, d, clean, noisy, labels, [f1]).item()
    two = denoiser_loss(objective, d, clean, noisy, labels, [f2]).item()
    both = denoiser_loss(objective, d, clean, noisy, labels, [f1, f2]).item()
    assert one != pytest.approx(two)  # otherwise the mean would prove nothing
    assert both == pytest.approx((one + two) / 2, rel=1e-6)


@pytest.mark.parametrize("objective", ["stab", "stab_mse", "clf"])
def test_gradients_reach_the_denoiser_and_never_the_classifiers(objective):
    torch.manual_seed(1)
    denoiser = build_model("dncnn_small")
    classifiers = [freeze(build_model("cifar_resnet20")) for _ in range(2)]
    before = [{k: v.clone() for k, v in f.state_dict().items()} for f in classifiers]
    clean = torch.rand(4, 3, 32, 32)
    noisy = add_noise(clean, 0.25, torch.Generator().manual_seed(0))
    loss = denoiser_loss(objective, denoiser, clean, noisy, torch.tensor([0, 1, 2, 3]), classifiers)
    loss.backward()
    grads = [p.grad for p in denoiser.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    for f, saved in zip(classifiers, before):
        assert all(p.grad is None and not p.requires_grad for p in f.parameters())
        assert not f.training  # BatchNorm statistics are not updated by the forward passes
        for key, value in f.state_dict().items():
            assert torch.equal(value, saved[key]), key


def test_classifier_loss_and_noise():
    torch.manual_seed(2)
    f = Linear(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    x = torch.tensor([[[[0.2, 0.9]]], [[[0.8, 0.1]]]])
    y = torch.tensor([1, 1])
    expected = (_ce([0.2, 0.9], 1) + _ce([0.8, 0.1], 1)) / 2
    assert classifier_loss(f, x, y).item() == pytest.approx(expected, rel=1e-6)
    assert add_noise(x, 0.0) is x  # sigma 0 = standard training
    g = torch.Generator().manual_seed(5)
    noisy = add_noise(torch.zeros(20000), 0.5, g)
    assert float(noisy.std()) == pytest.approx(0.5, rel=0.03) and abs(float(noisy.mean())) < 0.02
    assert torch.equal(add_noise(torch.zeros(8), 0.5, torch.Generator().manual_seed(5)),
                       add_noise(torch.zeros(8), 0.5, torch.Generator().manual_seed(5)))


def test_objectives_refuse_missing_inputs(setup):
    clean, noisy, *_ = setup
    with pytest.raises(ValueError, match="classifier"):
        denoiser_loss("stab", Scale(1.0), clean, noisy, None, [])
    with pytest.raises(ValueError, match="labels"):
        denoiser_loss("clf", Scale(1.0), clean, noisy, None, [Linear(torch.ones(3, 2))])
    with pytest.raises(ValueError, match="unknown"):
        denoiser_loss("ssim", Scale(1.0), clean, noisy)
    with pytest.raises(ValueError):
        stab_loss(noisy, clean, [])
    with pytest.raises(ValueError):
        clf_loss(noisy, torch.tensor([0]), [])

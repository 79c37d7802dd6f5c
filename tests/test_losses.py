"""The RaGAN losses against the spec's formulas, computed by hand for fixed logits."""
import math

import pytest
import torch

from gafh_fast.losses import perceptual_loss, pixel_loss, ragan_d_loss, ragan_g_loss

C_REAL = [1.0, -0.5, 2.0]
C_FAKE = [0.3, 0.1, -1.0]


def _softplus(x):  # BCE(x, 1) = log(1 + e^-x) = softplus(-x);  BCE(x, 0) = softplus(x)
    return math.log1p(math.exp(x))


def _hand(target_real: int):
    mean_r, mean_f = sum(C_REAL) / 3, sum(C_FAKE) / 3
    rel_r = [c - mean_f for c in C_REAL]
    rel_f = [c - mean_r for c in C_FAKE]
    bce = lambda x, t: _softplus(-x) if t == 1 else _softplus(x)
    return (sum(bce(x, target_real) for x in rel_r) / 3
            + sum(bce(x, 1 - target_real) for x in rel_f) / 3)


def test_ragan_d_loss_by_hand():
    got = ragan_d_loss(torch.tensor(C_REAL), torch.tensor(C_FAKE)).item()
    assert got == pytest.approx(_hand(target_real=1), rel=1e-6)


def test_ragan_g_loss_by_hand():
    got = ragan_g_loss(torch.tensor(C_REAL), torch.tensor(C_FAKE)).item()
    assert got == pytest.approx(_hand(target_real=0), rel=1e-6)


def test_ragan_losses_are_symmetric_under_swapping_real_and_fake():
    r, f = torch.tensor(C_REAL), torch.tensor(C_FAKE)
    assert ragan_g_loss(r, f).item() == pytest.approx(ragan_d_loss(f, r).item(), rel=1e-6)


def test_global_mean_without_process_group_is_the_local_mean():
    r, f = torch.tensor(C_REAL), torch.tensor(C_FAKE)
    assert ragan_d_loss(r, f, global_mean=True).item() == pytest.approx(ragan_d_loss(r, f).item())


def test_perceptual_and_pixel_losses():
    assert perceptual_loss(torch.tensor(2.0), torch.tensor(3.0), alpha=1.0, beta=1e-3).item() == pytest.approx(2.003)
    a = torch.tensor([[0.0, 1.0], [-1.0, 0.5]])
    b = torch.tensor([[0.5, 1.0], [1.0, 0.0]])
    assert pixel_loss(a, b).item() == pytest.approx((0.5 + 0 + 2 + 0.5) / 4)

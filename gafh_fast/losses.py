"""Losses of the spec (paper Eqs. 9-11 and the perceptual loss), as pure functions on logits/images."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _batch_mean(c: torch.Tensor, global_mean: bool) -> torch.Tensor:
    """Mean of C over the batch; with global_mean, over the batch of every rank.

    The gather is autograd-aware: its backward sends each rank the gradient of its own samples, so
    with data-parallel gradient averaging the loss equals the single-process loss on the whole batch.
    """
    if global_mean and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(c.contiguous()), dim=0).mean()
    return c.mean()


def ragan_d_loss(c_real: torch.Tensor, c_fake: torch.Tensor, *, global_mean: bool = False) -> torch.Tensor:
    """L_D = BCE(C(x_r) - mean C(x_f), 1) + BCE(C(x_f) - mean C(x_r), 0); c_fake from detached fakes."""
    real_rel = c_real - _batch_mean(c_fake, global_mean)
    fake_rel = c_fake - _batch_mean(c_real, global_mean)
    return (F.binary_cross_entropy_with_logits(real_rel, torch.ones_like(real_rel))
            + F.binary_cross_entropy_with_logits(fake_rel, torch.zeros_like(fake_rel)))


def ragan_g_loss(c_real: torch.Tensor, c_fake: torch.Tensor, *, global_mean: bool = False) -> torch.Tensor:
    """L_G = BCE(C(x_r) - mean C(x_f), 0) + BCE(C(x_f) - mean C(x_r), 1)."""
    real_rel = c_real - _batch_mean(c_fake, global_mean)
    fake_rel = c_fake - _batch_mean(c_real, global_mean)
    return (F.binary_cross_entropy_with_logits(real_rel, torch.zeros_like(real_rel))
            + F.binary_cross_entropy_with_logits(fake_rel, torch.ones_like(fake_rel)))


def content_loss(vgg: torch.nn.Module, hf: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of VGG features; the HR features carry no gradient."""
    with torch.no_grad():
        target = vgg(hr)
    return F.mse_loss(vgg(hf).float(), target.float())


def pixel_loss(hf: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """Optional L1 pixel loss (train.pixel_weight) and the loss of the PSNR pre-training stage."""
    return F.l1_loss(hf.float(), hr.float())


def perceptual_loss(content: torch.Tensor, adversarial: torch.Tensor, alpha: float = 1.0,
                    beta: float = 1e-3) -> torch.Tensor:
    """L_perceptual = alpha * L_content + beta * L_G."""
    return alpha * content + beta * adversarial

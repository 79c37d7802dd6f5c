"""One training iteration: a D step, then a G step (or one L1 step in the PSNR pre-training stage).

One backward per engine per step: DeepSpeed's ZeRO-2 breaks when one engine's loss backprops into
the other's parameters (DeepSpeed issue 4923) and resets its gradient accumulator on every backward
when gradient_accumulation_steps is 1. So D's loss sees detached fakes, and D is frozen while G's
loss backprops through it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist

from gafh_fast.config import Config
from gafh_fast.losses import content_loss, pixel_loss, ragan_d_loss, ragan_g_loss


def all_ranks_finite(*losses: torch.Tensor) -> bool:
    """True when every loss is finite on every rank. A device sync point (the flag's .item()), and
    all ranks get the same answer, so they all skip or all step."""
    bad = (~torch.stack([l.detach().float() for l in losses]).isfinite()).any().float().reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0.0


@dataclass
class StepOutput:
    losses: dict[str, float] = field(default_factory=dict)
    skipped: Optional[str] = None            # which loss was non-finite, if the step was skipped
    seconds: dict[str, float] = field(default_factory=dict)


def train_step(cfg: Config, g_engine, d_engine, vgg, hr: torch.Tensor, lr: torch.Tensor, *,
               gan: bool, sync: Callable[[], None] = lambda: None) -> StepOutput:
    """hr (N, 3, H, W), lr (N, 3, H/8, W/8) in [-1, 1], already on the device in the engines' dtype."""
    out, t = StepOutput(), cfg.train
    t0 = time.perf_counter()
    hf = g_engine(lr)  # (N, 3, H, W); one G forward feeds both steps, G is unchanged by D's step
    if not gan:  # PSNR pre-training: L1 only, D not trained
        loss_g = pixel_loss(hf, hr)
        if not all_ranks_finite(loss_g):
            out.skipped = "pixel"
            return out
        g_engine.backward(loss_g)
        g_engine.step()
        sync()
        out.losses, out.seconds["g_step"] = {"pixel": loss_g.item()}, time.perf_counter() - t0
        return out

    # --- D step: fakes detached, so L_D's backward stays inside D
    c_real = d_engine(hr).float()           # (N,)
    c_fake = d_engine(hf.detach()).float()  # (N,)
    loss_d = ragan_d_loss(c_real, c_fake, global_mean=t.gan.global_mean)
    if not all_ranks_finite(loss_d):  # a bad batch: neither engine steps
        out.skipped = "d"
        return out
    d_engine.backward(loss_d)
    d_engine.step()
    sync()
    t1 = time.perf_counter()

    # --- G step: D frozen so G's backward leaves D's grads alone (and ZeRO's D hooks never fire)
    discriminator = d_engine.module
    discriminator.requires_grad_(False)
    try:
        with torch.no_grad():
            c_real = discriminator(hr).float()  # RaGAN's L_G needs C(x_r) from the updated D
        c_fake = discriminator(hf).float()
        l_content = content_loss(vgg, hf, hr)
        l_adv = ragan_g_loss(c_real, c_fake, global_mean=t.gan.global_mean)
        loss_g = t.content.weight * l_content + t.gan.weight * l_adv
        l_pixel = pixel_loss(hf, hr) if t.pixel_weight else None
        if l_pixel is not None:
            loss_g = loss_g + t.pixel_weight * l_pixel
        if all_ranks_finite(loss_g):
            g_engine.backward(loss_g)
            g_engine.step()
        else:  # D already stepped on a finite L_D; only G's update is dropped
            out.skipped = "g"
    finally:
        discriminator.requires_grad_(True)
    sync()
    out.seconds = {"d_step": t1 - t0, "g_step": time.perf_counter() - t1}
    out.losses = {"d": loss_d.item(), "g": loss_g.item(), "content": l_content.item(), "adv": l_adv.item()}
    if l_pixel is not None:
        out.losses["pixel"] = l_pixel.item()
    return out

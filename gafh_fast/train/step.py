"""One training iteration: a D step, then a G step (or one L1 step in the PSNR pre-training stage).

One backward per engine per step: DeepSpeed's ZeRO-2 breaks when one engine's loss backprops into
the other's parameters (DeepSpeed issue 4923) and resets its gradient accumulator on every backward
when gradient_accumulation_steps is 1. So D's loss sees detached fakes, and D is frozen while G's
loss backprops through it.

No host sync inside a step
--------------------------
Nothing here reads a device value on the host (no .item(), no bool() of a tensor, no synchronize),
so the host keeps queueing work while the GPU runs. A non-finite loss is handled on the device:
- `any_rank_nonfinite` turns losses into a float32 flag, 1 when a loss is non-finite on any rank
  (all_reduce MAX: every rank gets the same flag, so all ranks skip or all step);
- the flag vetoes the engine's update inside its optimizer's own step (GatedAdam, train/optim.py).
  D's update is dropped when L_D is bad; G's when L_D or L_G is bad. So a bad batch moves neither
  engine, and a bad L_G alone drops only G's update, as when the host decided;
- each engine's buffers (BatchNorm running statistics) are put back when its update is dropped
  (D's statistics from G's step, which runs D in train mode, with G's), and the trainer gates its
  EMA update with the same flag (`StepOutput.applied`);
- backward and step still run on a bad batch (the host does not know it is bad); their result is
  dropped on the device.
A dropped update leaves the weights, the fp32 master weights, Adam's moments, the BatchNorm
statistics and the EMA bit for bit as they were, and with the fused Adam (the default) Adam's step
counter too. What still ticks: the LR schedule (DeepSpeed steps it after every optimizer step, as a
loop with torch AMP's GradScaler does; the LR is a function of the iteration, like max_steps and the
cosine's end), and with train.adam_impl foreach/for_loop, Adam's step counter (a host tensor).
With gradient accumulation, a bad micro-batch drops the whole accumulated update (its gradient is
summed in); `applied` and the buffer and EMA gates are per micro-batch, so a finite micro-batch of
that window keeps its BatchNorm statistics and EMA update.

The host learns what happened at the trainer's next read-back (`StepWindow.read`), at logging and
checkpoint steps and the last step: one `.tolist()` brings that step's losses, the skip code of
every step since the previous read and the ranks' stop flag to the host at once. So a skip's log
record and the train.max_nan_skips abort come up to log_every - 1 steps late; they name the steps
they are about.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from gafh_fast.config import Config
from gafh_fast.losses import content_loss, pixel_loss, ragan_d_loss, ragan_g_loss
from gafh_fast.train.engine import gated_optimizer

SKIP_REASONS = (None, "d", "g", "pixel")  # skip code -> the loss that was non-finite (None: nothing skipped)


def any_rank_nonfinite(*losses: torch.Tensor) -> torch.Tensor:
    """float32 (1,) on the losses' device: 1.0 when some loss is non-finite on some rank, else 0.0.
    No host read; a collective, so every rank gets the same flag."""
    bad = (~torch.stack([l.detach().float() for l in losses]).isfinite()).any().float().reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad


@dataclass
class StepOutput:
    """What one step leaves on the device, unread."""
    losses: dict[str, torch.Tensor]      # fp32 0-dim each; a skipped step's bad loss is non-finite
    applied: dict[str, torch.Tensor]     # engine ("g", "d") -> bool 0-dim: its update went in
    skip_code: torch.Tensor              # int64 0-dim: index into SKIP_REASONS
    seconds: dict[str, float] = field(default_factory=dict)  # host time spent queueing (no device sync)

    def read(self) -> tuple[dict[str, float], Optional[str]]:
        """(losses, skip reason) on the host. A device sync: for tests and benches; the trainer
        reads many steps at once through StepWindow."""
        values = torch.cat([torch.stack(list(self.losses.values())), self.skip_code.float().reshape(1)]).tolist()
        return dict(zip(self.losses, values[:-1])), SKIP_REASONS[int(values[-1])]


def _gated_step(engine, bad: torch.Tensor) -> None:
    """engine.step(), its optimizer update dropped on the device when bad is 1."""
    optimizer = gated_optimizer(engine)
    boundary = engine.is_gradient_accumulation_boundary()  # host state: whether this call steps
    optimizer.drop_if(bad)
    engine.step()
    if boundary:  # cleared here, not in the optimizer: DeepSpeed may skip the optimizer's step
        optimizer.end_window()


def _restore_buffers_unless(applied: torch.Tensor, module: torch.nn.Module, saved: list[torch.Tensor]) -> None:
    for buf, old in zip(module.buffers(), saved):
        torch.where(applied, buf, old, out=buf)


def train_step(cfg: Config, g_engine, d_engine, vgg, hr: torch.Tensor, lr: torch.Tensor, *,
               gan: bool) -> StepOutput:
    """hr (N, 3, H, W), lr (N, 3, H/8, W/8) in [-1, 1], already on the device in the engines' dtype."""
    t = cfg.train
    t0 = time.perf_counter()
    g_buffers = [b.clone() for b in g_engine.module.buffers()]  # BN statistics, put back if G's update is dropped
    hf = g_engine(lr)  # (N, 3, H, W); one G forward feeds both steps, G is unchanged by D's step
    if not gan:  # PSNR pre-training: L1 only, D not trained
        loss_g = pixel_loss(hf, hr)
        bad_g = any_rank_nonfinite(loss_g)
        g_engine.backward(loss_g)
        _gated_step(g_engine, bad_g)
        ok_g = (bad_g == 0).reshape(())
        _restore_buffers_unless(ok_g, g_engine.module, g_buffers)
        return StepOutput({"pixel": loss_g.detach().float()}, {"g": ok_g}, (~ok_g).long() * 3,
                          {"host_g": time.perf_counter() - t0})

    # --- D step: fakes detached, so L_D's backward stays inside D
    d_buffers = [b.clone() for b in d_engine.module.buffers()]
    c_real = d_engine(hr).float()           # (N,)
    c_fake = d_engine(hf.detach()).float()  # (N,)
    loss_d = ragan_d_loss(c_real, c_fake, global_mean=t.gan.global_mean)
    bad_d = any_rank_nonfinite(loss_d)  # a bad batch: neither engine's update goes in
    d_engine.backward(loss_d)
    _gated_step(d_engine, bad_d)
    ok_d = (bad_d == 0).reshape(())
    _restore_buffers_unless(ok_d, d_engine.module, d_buffers)
    d_buffers = [b.clone() for b in d_engine.module.buffers()]  # G's step runs D in train mode too
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
        bad_g = torch.maximum(bad_d, any_rank_nonfinite(loss_g))  # D stepped on a finite L_D: only G's is dropped
        g_engine.backward(loss_g)
        _gated_step(g_engine, bad_g)
    finally:
        discriminator.requires_grad_(True)
    ok_g = (bad_g == 0).reshape(())
    _restore_buffers_unless(ok_g, g_engine.module, g_buffers)
    _restore_buffers_unless(ok_g, d_engine.module, d_buffers)  # D's statistics from a dropped G step
    losses = {"d": loss_d, "g": loss_g, "content": l_content, "adv": l_adv}
    if l_pixel is not None:
        losses["pixel"] = l_pixel
    skip_code = torch.where(ok_d, torch.where(ok_g, 0, 2), 1)  # SKIP_REASONS: None, "d", "g"
    return StepOutput({k: v.detach().float() for k, v in losses.items()}, {"d": ok_d, "g": ok_g}, skip_code,
                      {"host_d": t1 - t0, "host_g": time.perf_counter() - t1})


class StepWindow:
    """The steps since the host last read the device: their outputs stay there until `read`, the
    one documented device-to-host read of the training loop (module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.first_step = None
        self.codes: list[torch.Tensor] = []

    def add(self, step: int, out: StepOutput) -> None:
        if self.first_step is None:
            self.first_step = step
        self.codes.append(out.skip_code.reshape(1))

    def read(self, out: StepOutput, stop_requested: bool) -> tuple[dict[str, float], list[tuple[int, Optional[str]]], bool]:
        """One read: `out`'s losses, (step, skip reason) for every step since the last read, and
        whether any rank asked to stop (a collective: every rank must call read at the same steps)."""
        many = dist.is_initialized() and dist.get_world_size() > 1
        on = self.device if not many or dist.get_backend() == "nccl" else torch.device("cpu")  # gloo: host tensors
        stop = torch.full((1,), float(stop_requested), device=on)  # a fill, not a copy from the host
        if many:
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        values = torch.cat([torch.stack(list(out.losses.values())), torch.cat(self.codes).float(),
                            stop.to(self.device)]).tolist()  # the device sync
        n = len(out.losses)
        losses = dict(zip(out.losses, values[:n]))
        steps = [(self.first_step + i, SKIP_REASONS[int(code)]) for i, code in enumerate(values[n:-1])]
        self.first_step, self.codes = None, []
        return losses, steps, values[-1] > 0

"""The client optimizer of both DeepSpeed engines: torch Adam whose update the device can veto.

Why: deciding on the host whether a step may update the weights (a NaN/inf loss) means reading a
flag back from the device, which stalls the host until the GPU has caught up and empties the
launch queue. Here the decision stays on the device. train_step hands the optimizer a float32
flag (`drop_if`); the optimizer applies it in hooks around torch Adam's own step(), which DeepSpeed
calls before it copies the fp32 master weights into the bf16 parameters, so a dropped step leaves
both unchanged.

How each implementation (`train.adam_impl`) drops an update:
- fused (default): torch's fused Adam kernel takes the flag as `found_inf` (what torch AMP's
  GradScaler passes it) and returns early when it is 1; torch then takes the step counter back
  on the device. Parameters, moments and the step counter stay bit for bit what they were.
- foreach / for_loop: torch Adam runs, then every parameter and moment is put back with
  torch.where(flag, old, new) from a copy taken before (a copy and a select of the parameters and
  both moments every step: more memory traffic than the update itself). Their step counter is a
  host tensor that torch reads for the bias correction, so it ticks on a dropped step (the moments
  do not).

Gradient clipping (train.grad_clip) also happens here, on the device: DeepSpeed's own clipping
reads the norm back to the host (`.item()`), so engine.py sets DeepSpeed's to 0.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

ADAM_IMPLS = ("fused", "foreach", "for_loop")


def adam_impl_flags(impl: str) -> dict:
    """torch.optim.Adam's keyword arguments that select `impl`."""
    return {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}[impl]


class GatedAdam(torch.optim.Adam):
    """torch.optim.Adam(params, **adam_kwargs) with a device-side veto and device-side clipping.

    `drop_if(bad)` ORs a float32 flag (1.0 = drop) into the veto of the next step();
    `end_window()` clears it. train_step clears it after each engine step at an accumulation
    boundary, so with gradient accumulation a bad micro-batch drops the whole accumulated update
    (its non-finite gradient is already summed in and cannot be taken out).
    """

    def __init__(self, params, *, impl: str = "fused", max_grad_norm: float = 0.0, **adam_kwargs):
        if impl not in ADAM_IMPLS:
            raise ValueError(f"adam impl {impl!r} is not one of {ADAM_IMPLS}")
        super().__init__(params, **adam_kwargs, **adam_impl_flags(impl))
        self.impl, self.max_grad_norm = impl, max_grad_norm
        # ZeRO 1/2 hand this optimizer one rank's partition of the flat fp32 weights: the
        # gradient norm is then a sum over ranks (set by engine.build_engine)
        self.partitioned = False
        self._bad: Optional[torch.Tensor] = None  # float32 0-dim on the parameters' device
        self._undo = None  # foreach/for_loop: what _after_step puts back
        # first in line: hooks registered later (tests) see the clipped gradient Adam steps with
        self.register_step_pre_hook(GatedAdam._before_step)
        self.register_step_post_hook(GatedAdam._after_step)

    # --- the veto ---------------------------------------------------------------------------------
    def drop_if(self, bad: torch.Tensor) -> None:
        """Drop the next update when `bad` (float32, one element, 0 or 1) is 1. No host read."""
        bad = bad.reshape(())
        if self._bad is None:
            self._bad = torch.zeros((), dtype=torch.float32, device=bad.device)
        torch.maximum(self._bad, bad, out=self._bad)

    def end_window(self) -> None:
        if self._bad is not None:
            self._bad.zero_()

    # --- the step: torch Adam's own, between two hooks ------------------------------------------------
    # Hooks rather than an override of step(): torch wraps step() of each optimizer class with its
    # hook runner, so an override calling super().step() would run every step hook twice.
    @torch.no_grad()
    def _before_step(self, args, kwargs) -> None:
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return
        bad = self._bad if self._bad is not None else torch.zeros((), dtype=torch.float32, device=params[0].device)
        if self.max_grad_norm > 0:
            self._clip_(params)
        if self.impl == "fused":
            self.found_inf = bad  # torch Adam.step hands it to the fused kernel, as for GradScaler
        else:
            self._undo = (bad, params, self._copy_state(params))

    @torch.no_grad()
    def _after_step(self, args, kwargs) -> None:
        self.__dict__.pop("found_inf", None)
        undo, self._undo = self._undo, None
        if undo is None:
            return
        bad, params, before = undo
        keep_new = bad == 0  # 0-dim bool: broadcasts to every tensor
        for p, old in zip(params, before):
            for key, new in (("param", p), *((k, v) for k, v in self.state[p].items() if k != "step")):
                # a moment created by this very step did not exist before: it was zeros
                torch.where(keep_new, new, old[key] if key in old else new.new_zeros(()), out=new)

    def _copy_state(self, params: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """A copy of each parameter and its moments as they are before the step."""
        return [{"param": p.detach().clone(),
                 **{k: v.clone() for k, v in self.state[p].items() if k != "step" and torch.is_tensor(v)}}
                for p in params]

    def _clip_(self, params: list[torch.Tensor]) -> None:
        """Scale the gradients by min(1, max_norm / (norm + 1e-6)), norm over this engine's whole
        gradient (DeepSpeed's and clip_grad_norm_'s formula), without reading the norm."""
        grads = [p.grad for p in params]
        sq = torch.stack(torch._foreach_norm(grads)).float().square().sum()
        if self.partitioned and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sq)  # this rank's partition is one piece of the gradient
        coef = (self.max_grad_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, coef)

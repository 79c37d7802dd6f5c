"""An exponential moving average of G's weights (train.ema_decay), used for validation and export."""
from __future__ import annotations

import copy
from typing import Optional

import torch


class EMA:
    """fp32 shadow copy of a module: shadow = decay * shadow + (1 - decay) * current, after each G step.

    Buffers (BatchNorm running statistics) are copied, not averaged, as BasicSR does.
    """

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(module).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: torch.nn.Module, applied: Optional[torch.Tensor] = None) -> None:
        """applied: a bool 0-dim device tensor, False when G's update was dropped (train/step.py);
        the shadow then stays bit for bit as it was, decided on the device, without a host read."""
        for shadow, current in zip(self.module.parameters(), module.parameters()):
            if applied is None:
                shadow.lerp_(current.detach().float(), 1.0 - self.decay)
            else:  # where, not a 0/1 weight: x + 0 * (y - x) turns -0.0 into +0.0
                torch.where(applied, shadow.lerp(current.detach().float(), 1.0 - self.decay), shadow, out=shadow)
        for shadow, current in zip(self.module.buffers(), module.buffers()):
            if applied is None:
                shadow.copy_(current)
            else:
                torch.where(applied, current.to(shadow.dtype), shadow, out=shadow)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)

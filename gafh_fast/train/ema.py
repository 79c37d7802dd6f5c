"""An exponential moving average of G's weights (train.ema_decay), used for validation and export."""
from __future__ import annotations

import copy

import torch


class EMA:
    """fp32 shadow copy of a module: shadow = decay * shadow + (1 - decay) * current, after each G step.

    Buffers (BatchNorm running statistics) are copied, not averaged, as BasicSR does.
    """

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(module).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for shadow, current in zip(self.module.parameters(), module.parameters()):
            shadow.lerp_(current.detach().float(), 1.0 - self.decay)
        for shadow, current in zip(self.module.buffers(), module.buffers()):
            shadow.copy_(current)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)

"""Relativistic average Discriminator (RaD): the spec's nine 3x3 convs + two dense layers -> a logit."""
from __future__ import annotations

import torch
import torch.nn as nn

from gafh_fast.config import DiscriminatorConfig

# (channel multiple of nf, stride) for convs 1..9; conv 1 has no normalisation
_LAYOUT = ((1, 1), (1, 2), (2, 1), (2, 2), (4, 1), (4, 2), (8, 1), (8, 2), (8, 2))


class Discriminator(nn.Module):
    """(N, 3, S, S) in [-1, 1] -> (N,) logits C(x); the sigmoid lives in the loss."""

    def __init__(self, cfg: DiscriminatorConfig, input_size: int = 256):
        super().__init__()
        if input_size % 32 != 0:
            raise ValueError(f"discriminator input size must be a multiple of 32, got {input_size}")
        layers: list[nn.Module] = []
        c_in = 3
        for i, (mult, stride) in enumerate(_LAYOUT):
            c_out = cfg.nf * mult
            layers.append(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1))
            if i > 0 and cfg.norm == "batchnorm":
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        side = input_size // 32  # five stride-2 convs
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c_in * side * side, cfg.dense),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(cfg.dense, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x)).squeeze(1)  # (N,)

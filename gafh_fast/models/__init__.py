"""Model builders: the generator, the relativistic discriminator and the VGG-19 content features."""
from __future__ import annotations

from gafh_fast.config import Config
from gafh_fast.models.discriminator import Discriminator
from gafh_fast.models.generator import Generator
from gafh_fast.models.vgg import VGG19_LAYERS, VGG19Features


def build_generator(cfg: Config) -> Generator:
    return Generator(cfg.model.generator, kernels=cfg.kernels)


def build_discriminator(cfg: Config) -> Discriminator:
    return Discriminator(cfg.model.discriminator, input_size=cfg.data.hr_size)


def build_vgg(cfg: Config) -> VGG19Features:
    c = cfg.train.content
    return VGG19Features(layer=c.layer, weights=c.weights, pretrained=c.pretrained)


def count_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = [
    "Generator", "Discriminator", "VGG19Features", "VGG19_LAYERS",
    "build_generator", "build_discriminator", "build_vgg", "count_parameters",
]

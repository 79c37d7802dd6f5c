"""Analytical FLOP counts of one training step, and the MFU they give against a card's bf16 peak.

A convolution costs 2 * Cin * Cout * k^2 * Hout * Wout FLOPs per image forward, a linear layer
2 * in * out; biases, activations, resizes and norms are ignored (they are not matmul work). A
backward that computes both input and weight gradients costs 2x the forward, so a trained network
costs 3x its forward per step. tests/test_flops.py checks these counts against
torch.utils.flop_counter.FlopCounterMode.
"""
from __future__ import annotations

from typing import Optional

from gafh_fast.config import Config, DiscriminatorConfig, GeneratorConfig
from gafh_fast.models.discriminator import _LAYOUT
from gafh_fast.models.vgg import VGG19_LAYERS


def conv_flops(c_in: int, c_out: int, k: int, h_out: int, w_out: int) -> int:
    return 2 * c_in * c_out * k * k * h_out * w_out


def generator_flops(g: GeneratorConfig, lr_size: int) -> int:
    """Forward FLOPs of G for one (3, lr_size, lr_size) image."""
    s, nf, gc = lr_size, g.nf, g.gc
    total = conv_flops(3, nf, g.sfm_kernel, s, s)
    idb = conv_flops(nf, gc, 3, s, s) + conv_flops(nf + gc, nf, 3, s, s)
    ridb = g.idb_per_ridb * idb + conv_flops(nf, nf, 3, s, s)
    total += g.num_dnb * g.ridb_per_dnb * ridb
    total += conv_flops(nf, nf, 3, s, s)  # fusion
    for stage in range(3):
        if g.upsample == "nearest_conv":  # upsample, then conv at the new size
            side = s * 2 ** (stage + 1)
            total += conv_flops(nf, nf, 3, side, side)
        else:  # conv to 4 nf at the old size, then pixel shuffle
            side = s * 2**stage
            total += conv_flops(nf, 4 * nf, 3, side, side)
    total += conv_flops(nf, 3, g.out_kernel, 8 * s, 8 * s)
    return total


def discriminator_flops(d: DiscriminatorConfig, hr_size: int) -> int:
    """Forward FLOPs of D for one (3, hr_size, hr_size) image."""
    total, c_in, side = 0, 3, hr_size
    for mult, stride in _LAYOUT:
        side = (side - 1) // stride + 1  # 3x3, padding 1
        total += conv_flops(c_in, d.nf * mult, 3, side, side)
        c_in = d.nf * mult
    total += 2 * c_in * side * side * d.dense + 2 * d.dense
    return total


def vgg_flops(layer: str, hr_size: int) -> int:
    """Forward FLOPs of the VGG-19 cut at `layer` for one (3, hr_size, hr_size) image."""
    last = VGG19_LAYERS[layer][0]
    total, side = 0, hr_size
    for index, kind, c_in, c_out in sorted(VGG19_LAYERS.values()):
        if index > last:
            break
        if kind == "conv":
            total += conv_flops(c_in, c_out, 3, side, side)
        elif kind == "pool":
            side //= 2
    return total


def step_flops_per_image(cfg: Config, gan: bool = True) -> dict[str, int]:
    """FLOPs of one training step per image, by part (x3 = forward + a backward with both gradients).

    GAN step: G forward once (its output feeds both steps) + backward = 3 G. D's step: D on real and
    on detached fake images, each trained = 2 x 3 D. G's step, D frozen: D forward on real images
    (no grad, 1 D) and on fakes with an input-gradient-only backward (1 D + 1 D) = 3 D. VGG, frozen:
    forward on HR (1 V) and on HF with an input-gradient-only backward (1 V + 1 V) = 3 V. So
    3 G + 9 D + 3 V; the only work it counts that does not happen is the input gradient of the
    first conv where the input needs none (G's SFM, D's first conv in D's step): under 1 %.
    PSNR pre-training step: 3 G only.
    """
    g = generator_flops(cfg.model.generator, cfg.lr_size)
    if not gan:
        return {"generator": 3 * g, "discriminator": 0, "vgg": 0, "total": 3 * g}
    d = discriminator_flops(cfg.model.discriminator, cfg.data.hr_size)
    v = vgg_flops(cfg.train.content.layer, cfg.data.hr_size)
    parts = {"generator": 3 * g, "discriminator": 2 * 3 * d + 3 * d, "vgg": 3 * v}
    parts["total"] = sum(parts.values())
    return parts


# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, from the vendors' data sheets.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("A100", 312.0))


def peak_bf16_tflops(device_name: Optional[str]) -> Optional[float]:
    """The card's dense bf16 peak from its name (first match wins: 'H100 PCIe' before 'H100'); None if unknown."""
    if not device_name:
        return None
    name = device_name.upper()
    for key, peak in PEAK_BF16_TFLOPS:
        if all(part.upper() in name for part in key.split()):
            return peak
    return None


def mfu(flops_per_image: int, images_per_second_per_gpu: float, peak_tflops: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation in [0, 1], or None when the card's peak is unknown."""
    if peak_tflops is None or images_per_second_per_gpu <= 0:
        return None
    return flops_per_image * images_per_second_per_gpu / (peak_tflops * 1e12)

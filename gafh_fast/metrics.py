"""PSNR and SSIM as the spec defines them, batched torch code that runs on the GPU.

Inputs are (N, 3, H, W) float tensors in [0, 1]. Both metrics first quantise to 8-bit levels (what a
saved PNG holds) and return one value per image. `channel="y"` scores ITU-R BT.601 luma in [16, 235].
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

Channel = Literal["rgb", "y"]
_BT601 = (65.481, 128.553, 24.966)  # R, G, B weights for Y in [16, 235] from [0, 1] inputs


def to_uint8_levels(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] float -> float64 in {0, ..., 255}, rounded like a uint8 PNG."""
    return (x.double().clamp(0.0, 1.0) * 255.0).round()


def rgb_to_y(x255: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [0, 255] -> (N, 1, H, W) BT.601 Y in [16, 235] (BasicSR's y_only ycbcr)."""
    w = torch.tensor(_BT601, dtype=x255.dtype, device=x255.device).view(1, 3, 1, 1)
    return (x255 / 255.0 * w).sum(dim=1, keepdim=True) + 16.0


def _prepare(x: torch.Tensor, y: torch.Tensor, channel: Channel, crop_border: int):
    if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected two (N, 3, H, W) tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    a, b = to_uint8_levels(x), to_uint8_levels(y)
    if channel == "y":
        a, b = rgb_to_y(a), rgb_to_y(b)
    elif channel != "rgb":
        raise ValueError(f"channel must be 'rgb' or 'y', got {channel!r}")
    if crop_border:
        a = a[..., crop_border:-crop_border, crop_border:-crop_border]
        b = b[..., crop_border:-crop_border, crop_border:-crop_border]
    return a, b


def psnr(x: torch.Tensor, y: torch.Tensor, *, channel: Channel = "rgb", crop_border: int = 0) -> torch.Tensor:
    """Per-image PSNR in dB over 8-bit levels; identical images give +inf. Returns (N,) float64."""
    a, b = _prepare(x, y, channel, crop_border)
    mse = (a - b).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(255.0**2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5, dtype=torch.float64, device=None) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2.0
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return g


def ssim(x: torch.Tensor, y: torch.Tensor, *, channel: Channel = "rgb", crop_border: int = 0,
         window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, L 255), mean over channels.

    The window is applied 'valid' (no padding), which is what scikit-image's structural_similarity
    averages after cropping (win-1)/2 pixels, and what BasicSR's calculate_ssim does.
    """
    a, b = _prepare(x, y, channel, crop_border)
    n, c, h, w = a.shape
    if min(h, w) < window:
        raise ValueError(f"SSIM needs images of at least {window}x{window}, got {h}x{w}")
    g = _gaussian_window(window, sigma, a.dtype, a.device)
    gx = g.view(1, 1, 1, window).expand(c, 1, 1, window)
    gy = g.view(1, 1, window, 1).expand(c, 1, window, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable 'valid' Gaussian, per channel
        return F.conv2d(F.conv2d(t, gx, groups=c), gy, groups=c)

    c1, c2 = (0.01 * 255.0) ** 2, (0.03 * 255.0) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(dim=1)


SCORE_KEYS = ("psnr_rgb", "ssim_rgb", "psnr_y", "ssim_y")


def score_images(x: torch.Tensor, ref: torch.Tensor, crop_border: int) -> dict[str, torch.Tensor]:
    """The metrics the project reports, per image: PSNR/SSIM on RGB (full image) and on Y (border cropped)."""
    return {
        "psnr_rgb": psnr(x, ref, channel="rgb"),
        "ssim_rgb": ssim(x, ref, channel="rgb"),
        "psnr_y": psnr(x, ref, channel="y", crop_border=crop_border),
        "ssim_y": ssim(x, ref, channel="y", crop_border=crop_border),
    }


def bicubic_upsample(lr: torch.Tensor, scale: int = 8) -> torch.Tensor:
    """The baseline to beat: the spec's bicubic (Keys a=-0.5, PIL-exact) upsampling of LR images."""
    from gafh_fast.resize import bicubic_resize

    h, w = lr.shape[-2:]
    return bicubic_resize(lr, (h * scale, w * scale))


PAPER_TABLE1 = {  # CelebA x8, PSNR dB / SSIM (spec, "Paper Table 1")
    "Bicubic": (22.90, 0.65), "VDSR": (19.58, 0.57), "CBN": (18.77, 0.54), "SRGAN": (20.64, 0.62),
    "FSRFCH": (23.14, 0.68), "TDN": (22.66, 0.66), "ESRGAN": (20.32, 0.57), "GAFH-RIDN": (24.28, 0.71),
}


def finite_mean(values: torch.Tensor) -> float:
    """Mean that reports identical-image PSNR (+inf) honestly rather than hiding it."""
    v = values.double()
    return float(v.mean()) if torch.isfinite(v).all() else math.inf

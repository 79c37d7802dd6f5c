"""The spec's bicubic (Keys a = -0.5, antialiased when shrinking) as separable resampling matrices.

It reproduces PIL's `Image.resize(..., BICUBIC)` coefficient by coefficient (including how PIL
renormalises the kernel at the borders), but on float tensors and on any device, so the bicubic
baseline can be computed on the GPU next to the model. torch's interpolate(mode="bicubic") uses
a = -0.75 and clamps borders; it is not the spec's bicubic.
"""
from __future__ import annotations

import functools

import torch


def _keys_cubic(x: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    x = x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


@functools.lru_cache(maxsize=64)
def resize_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """(out_size, in_size) float64 matrix M with out = M @ in, as PIL's precompute_coeffs builds it."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    m = torch.zeros(out_size, in_size, dtype=torch.float64)
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        taps = torch.arange(lo, hi, dtype=torch.float64)
        w = _keys_cubic((taps - center + 0.5) / filterscale)
        total = w.sum()
        if total != 0:
            w = w / total
        m[i, lo:hi] = w
    return m


def bicubic_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, C, H, W) float -> (N, C, size[0], size[1]); computed in float32 (float64 for float64 input)."""
    h, w = x.shape[-2:]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    mh = resize_matrix(h, size[0]).to(device=x.device, dtype=dtype)
    mw = resize_matrix(w, size[1]).to(device=x.device, dtype=dtype)
    y = torch.einsum("oh,nchw,pw->ncop", mh, x.to(dtype), mw)
    return y.to(x.dtype)

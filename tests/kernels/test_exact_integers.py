"""Integer data make every fp32 sum in the kernels exact, so here the kernels must equal the float64
reference exactly: fp32 results bit for bit, bf16 results as the exact value rounded once to nearest
even (what torch's cast does). That pins down what the |terms|-scaled bounds of test_conv3x3.py leave
open by design:
  * LeakyReLU at z == 0 exactly: its derivative there is the slope (torch's convention), which the
    forward's saved mask bit (z > 0) must reproduce in dX, dW and db;
  * bf16 ties (round half to even) in the interpreter's rounding (cast_rne), forward and backward;
  * dW/db split over pixel chunks: each chunk's partial stays fp32 and is rounded once at the end;
  * several output-channel tiles (a forced BLOCK_N / BLOCK_CO of 16 on 40 channels, the last tile
    half empty) and the activation-mask bytes each of them writes.
Slopes and scales are powers of two (0.25, 0.5), so they keep the sums exact.
"""
from __future__ import annotations

import pytest
import torch
import triton

from gafh_fast.kernels import configs
from gafh_fast.kernels.conv3x3 import conv_backward, conv_forward, kernel_weight

from .test_conv3x3 import DEVICE, reference_and_scale

SLOPE, S1 = 0.25, 0.5


def integer_case(c1: int, c2: int, c_out: int, n: int, h: int, w: int, seed: int):
    """float64 integer tensors; a zero corner in x and zero biases on even channels give z == 0 exactly."""
    gen = torch.Generator().manual_seed(seed)

    def ints(lo, hi, *shape):
        return torch.randint(lo, hi + 1, shape, generator=gen).double()

    x1, x2 = ints(-8, 8, n, c1, h, w), ints(-8, 8, n, c2, h, w)
    x1[0, :, :3, :4] = 0  # pixels (0, <=1, <=2) see only zeros: there z = bias
    x2[0, :, :3, :4] = 0
    bias = ints(-8, 8, c_out)
    bias[::2] = 0
    tensors = {"x1": x1, "x2": x2, "weight": ints(-8, 8, c_out, c1 + c2, 3, 3), "bias": bias,
               "residual": ints(-8, 8, n, c_out, h, w), "residual2": None}
    grad = ints(-100, 100, n, c_out, h, w)  # db partials over a chunk exceed bf16's 8 significant bits
    return tensors, grad


def forced(cfg: triton.Config, **blocks) -> triton.Config:
    return triton.Config({**cfg.kwargs, **blocks}, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def assert_exact(name: str, got: torch.Tensor, ref: torch.Tensor, dtype) -> None:
    """got == ref rounded once to dtype (round to nearest even), every element."""
    assert got.dtype == dtype, f"{name}: {got.dtype}, expected {dtype}"
    want = ref.to(dtype).double()
    got = got.detach().double().cpu()
    bad = got != want
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        detail = "; ".join(f"at {tuple(i)}: kernel {got[tuple(i)].item()!r} expected {want[tuple(i)].item()!r} "
                           f"(exact {ref[tuple(i)].item()!r})" for i in idx)
        pytest.fail(f"{name}: {int(bad.sum())} of {bad.numel()} elements differ: {detail}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_integer_conv_is_exact(dtype):
    c1, c2, c_out, n, h, w = 12, 5, 40, 2, 5, 7  # 70 pixels: not a multiple of any BLOCK_M
    m = n * h * w
    tensors, grad = integer_case(c1, c2, c_out, n, h, w, seed=11)
    (y_ref, g_ref), _ = reference_and_scale(tensors, grad, SLOPE, S1, 1.0)
    z = torch.nn.functional.conv2d(torch.cat([tensors["x1"], tensors["x2"]], 1), tensors["weight"], tensors["bias"],
                                   padding=1)
    assert int((z == 0).sum()) >= 12 and int((z > 0).sum()) > 0  # the case really has z == 0 elements

    t = {k: v.to(dtype).to(DEVICE) for k, v in tensors.items() if v is not None}
    for k in ("x1", "x2", "residual"):
        t[k] = t[k].contiguous(memory_format=torch.channels_last)
    fwd_cfg = forced(configs.fwd_candidates(c1, c2, c_out, w, m)[0], BLOCK_N=16)  # 3 channel tiles: 16, 16, 8
    dx_cfg = forced(configs.dx_candidates(c_out, 0, c1 + c2, w, m)[0], BLOCK_N=16)  # dX channel tiles 16 + 1
    dw_cfg = forced(configs.dw_candidates(c1, c2, c_out, w, m)[0], BLOCK_C=16, BLOCK_CO=16)
    y, mask = conv_forward([t["x1"], t["x2"]], t["weight"], t["bias"], SLOPE, t["residual"], S1, None, 1.0,
                           save_mask=True, config=fwd_cfg)
    assert_exact("y", y, y_ref, dtype)
    (dx1, dx2), dw, db = conv_backward(grad.to(dtype).to(DEVICE), [t["x1"], t["x2"]], t["weight"],
                                       kernel_weight(t["weight"]), mask, SLOPE, S1, True,
                                       dx_config=dx_cfg, dw_config=dw_cfg, dw_split=3)
    for name, got in (("x1", dx1), ("x2", dx2), ("weight", dw), ("bias", db)):
        assert_exact(f"d{name}", got, g_ref[name], dtype)

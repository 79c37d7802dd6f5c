"""The generator's last upsampling step and its output layer as one op:
y = tanh(convKxK(x3, W_out) + b_out), x3 = LeakyReLU(conv3x3(nearest_x2(x), W_up) + b_up).
Host code, autograd Function and torch custom ops; the kernels are upconv.py's and outconv.py's.

Why one op. Apart, the output layer's backward writes dL/dx3 (full resolution, nf channels: the largest
gradient of G's backward, 512 MiB at batch 64 in bf16), and the upsampling step's backward reads it back
to make gz = dL/dx3 * LeakyReLU'(z), either on its dX GEMM's operand at each of its 16 taps (about 4x the
instructions per wgmma of a ready operand: bench/RESULTS.md, Round 7) or in a pass of its own that reads
and writes it once more (the tuner's GZ_PASS way). As one op the output layer's dX epilogue applies
LeakyReLU' from the step's bit mask and writes gz itself; the step's backward then runs as one without
an activation: dW, then dX with the fold in extra programs.

Launches: forward 2 (upconv.py) and the output layer's forward (outconv.out_forward: cuDNN's conv, or a
GEMM + outconv_fold_kernel per chunk of images, as the tuner picked); backward 3 (outconv.py: prep, dW,
dX -> gz) + 2 (upconv.py: dW, dX + fold) = 5, against 6 apart. The full-resolution gradient is written
once and read twice (apart: twice and twice, or with the gz pass twice and three times).
"""
from __future__ import annotations

from typing import Optional

import torch

from .conv3x3 import _cl, _empty_cl, _grad_like, require_mask
from .conv3x3_fwd import mask_shape
from .op import _needs_grad
from .outconv import check_out_args, out_backward, out_forward
from .upconv import PHASE_TAPS, check_up_args, up_backward, up_forward


def check_up_out_args(x, up_weight, up_bias, out_weight, out_bias) -> None:
    """Clear errors for what the kernels do not take: each layer's own checks, the output layer's on a
    stand-in for x3 (the step's output: up_weight's channels, x's dtype and device)."""
    check_up_args(x, up_weight, up_bias)
    check_out_args(x.new_empty((0, up_weight.shape[0], 1, 1)), out_weight, out_bias)


def up_out_backward(grad, x, up_weight, wc, mask, x3, out_weight, y, slope: Optional[float], up_has_bias: bool,
                    out_has_bias: bool):
    """(dx, dW_up, db_up or None, dW_out, db_out or None), each dW laid out as its weight says."""
    act = (mask, slope) if slope is not None else None
    if act is not None:
        n, c_mid, h, w = x3.shape
        require_mask(mask, n * h * w, c_mid, "fused_up_out_conv", flag="save")
    gz, dw_out, db_out = out_backward(grad, x3, y, out_weight, out_has_bias, act=act)
    dx, dw_up, db_up = up_backward(gz, x, up_weight, wc, mask, None, up_has_bias)  # gz ready: no activation left
    return dx, dw_up, db_up, dw_out, db_out


# ------------------------------------------------------------------------------------------------
# Custom ops (torch.compile) and the eager Function
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("gafh_fast::fused_up_out_conv_fwd", mutates_args=())
def fused_up_out_conv_fwd(x: torch.Tensor, up_weight: torch.Tensor, up_bias: Optional[torch.Tensor],
                          out_weight: torch.Tensor, out_bias: Optional[torch.Tensor],
                          negative_slope: Optional[float], save: bool
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, x3, mask, wc): the output, the step's output (the output layer's dW reads it), the step's bit
    mask (empty unless save and an activation) and its combined weights."""
    check_up_out_args(x, up_weight, up_bias, out_weight, out_bias)
    x3, mask, wc = up_forward(x, up_weight, up_bias, negative_slope, save)
    return out_forward(x3, out_weight, out_bias), x3, mask, wc


@fused_up_out_conv_fwd.register_fake
def _(x, up_weight, up_bias, out_weight, out_bias, negative_slope, save):
    check_up_out_args(x, up_weight, up_bias, out_weight, out_bias)
    n, _, h, w = x.shape
    c_mid, c_out = up_weight.shape[0], out_weight.shape[0]
    keep = save and negative_slope is not None
    mask = torch.empty(mask_shape(n, 2 * h, 2 * w, c_mid) if keep else (0,), dtype=torch.uint8, device=x.device)
    return (_empty_cl(n, c_out, 2 * h, 2 * w, x), _empty_cl(n, c_mid, 2 * h, 2 * w, x), mask,
            x.new_empty((c_mid, PHASE_TAPS, up_weight.shape[1])))


@torch.library.custom_op("gafh_fast::fused_up_out_conv_bwd", mutates_args=())
def fused_up_out_conv_bwd(grad: torch.Tensor, x: torch.Tensor, up_weight: torch.Tensor, wc: torch.Tensor,
                          mask: torch.Tensor, x3: torch.Tensor, out_weight: torch.Tensor, y: torch.Tensor,
                          negative_slope: Optional[float], up_has_bias: bool, out_has_bias: bool) -> list[torch.Tensor]:
    """[dx, dW_up, db_up, dW_out, db_out]; a db is empty when its layer has no bias; each dW has
    conv3x3.dw_strides of its weight."""
    dx, dw_up, db_up, dw_out, db_out = up_out_backward(grad, x, up_weight, wc, mask, x3, out_weight, y,
                                                       negative_slope, up_has_bias, out_has_bias)
    # an absent db is an empty tensor of its own (two returns may not be one tensor: opcheck)
    return [dx, dw_up, db_up if db_up is not None else up_weight.new_empty(0), dw_out,
            db_out if db_out is not None else out_weight.new_empty(0)]


@fused_up_out_conv_bwd.register_fake
def _(grad, x, up_weight, wc, mask, x3, out_weight, y, negative_slope, up_has_bias, out_has_bias):
    return [_empty_cl(*x.shape, x), _grad_like(up_weight, up_weight),
            up_weight.new_empty(up_weight.shape[0] if up_has_bias else 0), _grad_like(out_weight, out_weight),
            out_weight.new_empty(out_weight.shape[0] if out_has_bias else 0)]


def _setup_context(ctx, inputs, output):
    x, up_weight, up_bias, out_weight, out_bias, slope, _save = inputs
    y, x3, mask, wc = output
    ctx.save_for_backward(x, up_weight, wc, mask, x3, out_weight, y)
    ctx.meta = (slope, up_bias is not None, out_bias is not None)


def _backward(ctx, grad_y, _g_x3, _g_mask, _g_wc):
    slope, up_has_bias, out_has_bias = ctx.meta
    dx, dw_up, db_up, dw_out, db_out = fused_up_out_conv_bwd(grad_y, *ctx.saved_tensors, slope, up_has_bias,
                                                             out_has_bias)
    return (dx, dw_up, db_up if up_has_bias else None, dw_out, db_out if out_has_bias else None, None, None)


fused_up_out_conv_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerFusedUpOutConv(torch.autograd.Function):
    """The same host code without the custom-op dispatch (see op.py)."""

    @staticmethod
    def forward(ctx, x, up_weight, up_bias, out_weight, out_bias, slope):
        x3, mask, wc = up_forward(x, up_weight, up_bias, slope, True)
        y = out_forward(x3, out_weight, out_bias)
        ctx.save_for_backward(x, up_weight, wc, mask, x3, out_weight, y)
        ctx.meta = (slope, up_bias is not None, out_bias is not None)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        slope, up_has_bias, out_has_bias = ctx.meta
        return (*up_out_backward(grad_y, *ctx.saved_tensors, slope, up_has_bias, out_has_bias), None)


_CHECKED: set = set()  # argument signatures check_up_out_args passed: validation once per shape (issue 11)


def fused_up_out_conv_triton(x: torch.Tensor, up_weight: torch.Tensor, up_bias: Optional[torch.Tensor],
                             out_weight: torch.Tensor, out_bias: Optional[torch.Tensor],
                             negative_slope: Optional[float] = 0.2) -> torch.Tensor:
    """Same semantics as gafh_fast.ops.fused_up_out_conv_reference; y comes back channels_last."""
    slope = None if negative_slope is None else float(negative_slope)
    tensors = (x, up_weight, up_bias, out_weight, out_bias)
    needs_grad = _needs_grad(*tensors)
    if not torch.compiler.is_compiling():
        sig = tuple(None if t is None else (t.shape, t.dtype, t.device) for t in tensors)
        if sig not in _CHECKED:
            check_up_out_args(*tensors)
            _CHECKED.add(sig)
        if needs_grad:
            return _EagerFusedUpOutConv.apply(*tensors, slope)
        return out_forward(_cl(up_forward(x, up_weight, up_bias, slope, False)[0]), out_weight, out_bias)
    return fused_up_out_conv_fwd(*tensors, slope, bool(needs_grad))[0]

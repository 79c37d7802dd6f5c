"""The fused 3x3 conv as a torch custom op with autograd, so torch.compile sees one opaque node per
conv (no graph break), plus a lean eager path over the same launchers.

Two ops: `gafh_fast::fused_conv3x3_fwd` -> (y, mask) and `gafh_fast::fused_conv3x3_bwd` -> grads.
Both are `torch.library.custom_op` with `register_fake`; the forward has `register_autograd`.
(`triton_op` + `wrap_triton` is not used: under TRITON_INTERPRET=1 the interpreter touches the data
pointers of fake tensors, which fails opcheck and torch.compile.)
Eager calls (not under torch.compile) go through `_EagerFusedConv3x3`, a plain autograd.Function
sharing the save/grad code below: the custom-op dispatch costs ~3x more host time per call.
"""
from __future__ import annotations

from typing import Optional

import torch

from .conv3x3_bwd import conv3x3_bwd
from .conv3x3_fwd import conv3x3_fwd, mask_shape, weight_taps


def _check_args(inputs, weight, bias, residual, residual2) -> None:
    """Clear errors for shapes/dtypes the kernels do not handle (the reference would also refuse)."""
    if len(inputs) not in (1, 2):
        raise ValueError(f"fused_conv3x3 (triton) takes one or two inputs, got {len(inputs)}")
    x0 = inputs[0]
    if x0.dim() != 4:
        raise ValueError(f"fused_conv3x3 inputs must be (N, C, H, W), got {tuple(x0.shape)}")
    if x0.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"fused_conv3x3 (triton) supports float32 and bfloat16, got {x0.dtype}")
    n, _, h, w = x0.shape
    for i, x in enumerate(inputs):
        if x.dim() != 4 or (x.shape[0], x.shape[2], x.shape[3]) != (n, h, w):
            raise ValueError(f"fused_conv3x3 input {i} has shape {tuple(x.shape)}; expected (N={n}, C, {h}, {w})")
        if x.dtype != x0.dtype or x.device != x0.device:
            raise ValueError(f"fused_conv3x3 input {i} is {x.dtype} on {x.device}; input 0 is {x0.dtype} on {x0.device}")
    c_in = sum(x.shape[1] for x in inputs)
    if weight.dim() != 4 or weight.shape[1:] != (c_in, 3, 3):
        raise ValueError(f"fused_conv3x3 weight {tuple(weight.shape)} does not fit (C_out, {c_in}, 3, 3)")
    c_out = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (c_out,):
        raise ValueError(f"fused_conv3x3 bias {tuple(bias.shape)} does not fit ({c_out},)")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x0.dtype:
            raise ValueError(f"fused_conv3x3 {name} is {t.dtype} but the inputs are {x0.dtype}")
    for name, r in (("residual", residual), ("residual2", residual2)):
        if r is not None and (tuple(r.shape) != (n, c_out, h, w) or r.dtype != x0.dtype):
            raise ValueError(f"fused_conv3x3 {name} is {tuple(r.shape)} {r.dtype}; expected {(n, c_out, h, w)} {x0.dtype}")


# ------------------------------------------------------------------------------------------------
# Forward op
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("gafh_fast::fused_conv3x3_fwd", mutates_args=())
def fused_conv3x3_fwd(
    inputs: list[torch.Tensor], weight: torch.Tensor, bias: Optional[torch.Tensor],
    negative_slope: Optional[float], residual: Optional[torch.Tensor], res_scale: float,
    residual2: Optional[torch.Tensor], res2_scale: float, save_mask: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, mask): y (N, C_out, H, W) channels_last; mask (N, H, W, ceil(C_out/8)) bit-packed uint8 or empty."""
    _check_args(inputs, weight, bias, residual, residual2)
    return conv3x3_fwd(inputs, weight, bias, negative_slope, residual, res_scale, residual2, res2_scale, save_mask)


@fused_conv3x3_fwd.register_fake
def _(inputs, weight, bias, negative_slope, residual, res_scale, residual2, res2_scale, save_mask):
    _check_args(inputs, weight, bias, residual, residual2)
    n, _, h, w = inputs[0].shape
    c_out = weight.shape[0]
    y = torch.empty((n, c_out, h, w), dtype=inputs[0].dtype, device=inputs[0].device,
                    memory_format=torch.channels_last)
    save = save_mask and negative_slope is not None
    mask = torch.empty(mask_shape(n, h, w, c_out) if save else (0,), dtype=torch.uint8, device=inputs[0].device)
    return y, mask


# ------------------------------------------------------------------------------------------------
# Backward op
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("gafh_fast::fused_conv3x3_bwd", mutates_args=())
def fused_conv3x3_bwd(
    grad: torch.Tensor, inputs: list[torch.Tensor], weight: torch.Tensor, mask: torch.Tensor,
    negative_slope: Optional[float], scale: float, has_bias: bool,
) -> list[torch.Tensor]:
    """[dx_1, (dx_2), dW, db]; db is an empty tensor when has_bias is False."""
    dxs, dw, db = conv3x3_bwd(grad, inputs, weight_taps(weight), mask, negative_slope, scale, has_bias)
    return [*dxs, dw, db if db is not None else weight.new_empty(0)]


@fused_conv3x3_bwd.register_fake
def _(grad, inputs, weight, mask, negative_slope, scale, has_bias):
    dxs = [torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last) for x in inputs]
    dw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    db = weight.new_empty(weight.shape[0] if has_bias else 0)
    return [*dxs, dw, db]


# ------------------------------------------------------------------------------------------------
# Autograd
# ------------------------------------------------------------------------------------------------
def _save_for_backward(ctx, xs, weight, bias, negative_slope, residual, res_scale, residual2, res2_scale, mask):
    # Saved: the inputs (dW), W (dX; the eager path saves its (3, 3, C_in, C_out) copy instead) and
    # the 1-bit z > 0 mask (exact LeakyReLU derivative; see conv3x3_bwd.py). Not saved: y, the
    # residuals, the pre-activation.
    ctx.save_for_backward(*xs, weight, mask)
    ctx.num_inputs = len(xs)
    ctx.has_bias = bias is not None
    ctx.negative_slope = negative_slope
    ctx.has_r1 = residual is not None
    ctx.has_r2 = residual2 is not None
    ctx.res_scale = res_scale
    ctx.res2_scale = res2_scale


def _grads(ctx, grad_y, bwd):
    """(dxs, dW, db, d_r1, d_r2) from what _save_for_backward kept; bwd: the op or the launcher."""
    *xs, w_saved, mask = ctx.saved_tensors  # w_saved: W (custom op) or weight_taps(W) (eager Function)
    s1 = ctx.res_scale if ctx.has_r1 else 1.0
    s2 = ctx.res2_scale if ctx.has_r2 else 1.0
    dxs, dw, db = bwd(grad_y, xs, w_saved, mask, ctx.negative_slope, s1 * s2, ctx.has_bias)
    d_r1 = (grad_y * s2 if ctx.has_r2 else grad_y) if ctx.has_r1 else None  # y = r2 + s2*(r1 + ...)
    d_r2 = grad_y if ctx.has_r2 else None
    return list(dxs), dw, db if ctx.has_bias else None, d_r1, d_r2


def _bwd_via_op(grad, xs, weight, mask, negative_slope, scale, has_bias):
    grads = fused_conv3x3_bwd(grad, xs, weight, mask, negative_slope, scale, has_bias)
    return grads[:len(xs)], grads[len(xs)], grads[len(xs) + 1]


def _setup_context(ctx, inputs, output):
    xs, weight, bias, negative_slope, residual, res_scale, residual2, res2_scale, _save_mask = inputs
    _save_for_backward(ctx, xs, weight, bias, negative_slope, residual, res_scale, residual2, res2_scale, output[1])


def _backward(ctx, grad_y, _grad_mask):
    dxs, dw, db, d_r1, d_r2 = _grads(ctx, grad_y, _bwd_via_op)
    return dxs, dw, db, None, d_r1, None, d_r2, None, None


fused_conv3x3_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerFusedConv3x3(torch.autograd.Function):
    """The same kernels and autograd maths without the custom-op dispatch, for eager calls only.

    Why: measured on this project's CPU host (launches stubbed), a custom_op call with
    register_autograd costs ~80 us of Python per forward (pytree flattening, redispatch), this
    Function ~19 us; the trunk
    makes ~110 such calls per generator step, forward and backward, so in eager mode that overhead
    would rival the GPU time at batch 64. Under torch.compile the custom op is used (opaque node).
    """

    @staticmethod
    def forward(ctx, weight, bias, negative_slope, residual, res_scale, residual2, res2_scale, *xs):
        _check_args(xs, weight, bias, residual, residual2)
        w_taps = weight_taps(weight)  # permuted once, used by the forward and by dX in the backward
        y, mask = conv3x3_fwd(xs, weight, bias, negative_slope, residual, res_scale, residual2, res2_scale,
                              save_mask=True, w_taps=w_taps)
        _save_for_backward(ctx, xs, w_taps, bias, negative_slope, residual, res_scale, residual2, res2_scale, mask)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        dxs, dw, db, d_r1, d_r2 = _grads(ctx, grad_y, conv3x3_bwd)
        return dw, db, None, d_r1, None, d_r2, None, *dxs


# ------------------------------------------------------------------------------------------------
# Public entry point (gafh_fast.ops.fused_conv3x3 calls this for backend "triton")
# ------------------------------------------------------------------------------------------------
def fused_conv3x3_triton(
    inputs: list[torch.Tensor], weight: torch.Tensor, bias: Optional[torch.Tensor],
    negative_slope: Optional[float], residual: Optional[torch.Tensor], res_scale: float,
    residual2: Optional[torch.Tensor], res2_scale: float,
) -> torch.Tensor:
    """Same semantics as gafh_fast.ops.fused_conv3x3_reference; y comes back channels_last."""
    # The mask is only worth its memory when a backward can follow.
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (*inputs, weight, bias)
    )
    slope = None if negative_slope is None else float(negative_slope)
    if not torch.compiler.is_compiling():  # eager: the same launchers, minus the custom-op dispatch
        if needs_grad:
            return _EagerFusedConv3x3.apply(weight, bias, slope, residual, float(res_scale), residual2,
                                            float(res2_scale), *inputs)
        _check_args(inputs, weight, bias, residual, residual2)
        return conv3x3_fwd(inputs, weight, bias, slope, residual, res_scale, residual2, res2_scale, save_mask=False)[0]
    y, _ = fused_conv3x3_fwd(
        list(inputs), weight, bias, slope, residual, float(res_scale), residual2, float(res2_scale),
        bool(needs_grad),
    )
    return y

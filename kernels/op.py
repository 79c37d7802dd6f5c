"""The fused conv3x3 and the fused IDB as autograd Functions (eager) and torch custom ops
(torch.compile sees one opaque node per conv / per IDB, no graph break).

Ops: `gafh_fast::fused_conv3x3_fwd` -> (y, mask), `gafh_fast::fused_conv3x3_bwd` -> grads,
`gafh_fast::fused_idb_fwd` -> (y, h1, mask1, mask2), `gafh_fast::fused_idb_bwd` -> grads; each a
`torch.library.custom_op` with `register_fake`, the forwards with `register_autograd`.
(`triton_op` + `wrap_triton` is not used: under TRITON_INTERPRET=1 the interpreter touches the data
pointers of fake tensors, which fails opcheck and torch.compile.)
Eager calls go through plain autograd.Functions over the same host code (conv3x3.py): the custom-op
dispatch costs ~3x more host time per call. One Function per IDB, not one per conv.
"""
from __future__ import annotations

from typing import Optional

import torch

from .conv3x3 import _cl, check_args, conv_backward, conv_forward, dw_strides, kept_buffers, kernel_weight
from .conv3x3_fwd import mask_shape
from .idb import idb_backward, idb_forward
from .tape import Taped


# ------------------------------------------------------------------------------------------------
# One conv: custom ops (torch.compile)
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("gafh_fast::fused_conv3x3_fwd", mutates_args=())
def fused_conv3x3_fwd(
    inputs: list[torch.Tensor], weight: torch.Tensor, bias: Optional[torch.Tensor],
    negative_slope: Optional[float], residual: Optional[torch.Tensor], res_scale: float,
    residual2: Optional[torch.Tensor], res2_scale: float, save_mask: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, mask): y (N, C_out, H, W) channels_last; mask (N, H, W, ceil(C_out/8)) bit-packed uint8 or empty."""
    check_args(inputs, weight, bias, residual, residual2)
    return conv_forward(inputs, weight, bias, negative_slope, residual, res_scale, residual2, res2_scale, save_mask)


def _empty_cl_like(x, c):
    return torch.empty((x.shape[0], c, x.shape[2], x.shape[3]), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)


@fused_conv3x3_fwd.register_fake
def _(inputs, weight, bias, negative_slope, residual, res_scale, residual2, res2_scale, save_mask):
    check_args(inputs, weight, bias, residual, residual2)
    n, _, h, w = inputs[0].shape
    c_out = weight.shape[0]
    save = save_mask and negative_slope is not None
    mask = torch.empty(mask_shape(n, h, w, c_out) if save else (0,), dtype=torch.uint8, device=inputs[0].device)
    return _empty_cl_like(inputs[0], c_out), mask


@torch.library.custom_op("gafh_fast::fused_conv3x3_bwd", mutates_args=())
def fused_conv3x3_bwd(
    grad: torch.Tensor, inputs: list[torch.Tensor], weight: torch.Tensor, mask: torch.Tensor,
    negative_slope: Optional[float], scale: float, has_bias: bool,
) -> list[torch.Tensor]:
    """[dx_1, (dx_2), dW, db]; db is an empty tensor when has_bias is False."""
    dxs, dw, db = conv_backward(grad, inputs, weight, kernel_weight(weight), mask, negative_slope, scale, has_bias)
    return [*dxs, dw.contiguous(), db if db is not None else weight.new_empty(0)]


@fused_conv3x3_bwd.register_fake
def _(grad, inputs, weight, mask, negative_slope, scale, has_bias):
    dxs = [_empty_cl_like(x, x.shape[1]) for x in inputs]
    return [*dxs, torch.empty(weight.shape, dtype=weight.dtype, device=weight.device),
            weight.new_empty(weight.shape[0] if has_bias else 0)]


def _residual_grads(grad_y, has_r1, has_r2, res2_scale):
    d_r1 = (grad_y * res2_scale if has_r2 else grad_y) if has_r1 else None  # y = r2 + s2*(r1 + ...)
    return d_r1, (grad_y if has_r2 else None)


def _conv_scale(has_r1, res_scale, has_r2, res2_scale) -> float:
    return (res_scale if has_r1 else 1.0) * (res2_scale if has_r2 else 1.0)


def _conv_setup_context(ctx, inputs, output):
    xs, weight, bias, slope, residual, res_scale, residual2, res2_scale, _save = inputs
    ctx.save_for_backward(*xs, weight, output[1])
    ctx.meta = (len(xs), bias is not None, slope, residual is not None, res_scale, residual2 is not None, res2_scale)


def _conv_backward(ctx, grad_y, _grad_mask):
    n_in, has_bias, slope, has_r1, s1, has_r2, s2 = ctx.meta
    *xs, weight, mask = ctx.saved_tensors
    grads = fused_conv3x3_bwd(grad_y, xs, weight, mask, slope, _conv_scale(has_r1, s1, has_r2, s2), has_bias)
    d_r1, d_r2 = _residual_grads(grad_y, has_r1, has_r2, s2)
    return grads[:n_in], grads[n_in], grads[n_in + 1] if has_bias else None, None, d_r1, None, d_r2, None, None


fused_conv3x3_fwd.register_autograd(_conv_backward, setup_context=_conv_setup_context)


# ------------------------------------------------------------------------------------------------
# One conv: eager Function
# ------------------------------------------------------------------------------------------------
class _EagerFusedConv3x3(torch.autograd.Function):
    """The same host code without the custom-op dispatch (measured on this project's CPU host with
    launches stubbed: a custom_op call with register_autograd costs ~80 us of Python per forward)."""

    @staticmethod
    def forward(ctx, weight, bias, slope, residual, res_scale, residual2, res2_scale, *xs):
        w_k = kernel_weight(weight)  # read in place, or copied once and reused by the backward
        y, mask = conv_forward(xs, weight, bias, slope, residual, res_scale, residual2, res2_scale, True, w_k=w_k)
        ctx.save_for_backward(*xs, weight, w_k, mask)
        ctx.meta = (bias is not None, slope, residual is not None, res_scale, residual2 is not None, res2_scale)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        has_bias, slope, has_r1, s1, has_r2, s2 = ctx.meta
        *xs, weight, w_k, mask = ctx.saved_tensors
        dxs, dw, db = conv_backward(grad_y, xs, weight, w_k, mask, slope, _conv_scale(has_r1, s1, has_r2, s2),
                                    has_bias)
        d_r1, d_r2 = _residual_grads(grad_y, has_r1, has_r2, s2)
        return dw, db, None, d_r1, None, d_r2, None, *dxs


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def fused_conv3x3_triton(
    inputs: list[torch.Tensor], weight: torch.Tensor, bias: Optional[torch.Tensor],
    negative_slope: Optional[float], residual: Optional[torch.Tensor], res_scale: float,
    residual2: Optional[torch.Tensor], res2_scale: float,
) -> torch.Tensor:
    """Same semantics as gafh_fast.ops.fused_conv3x3_reference; y comes back channels_last."""
    needs_grad = _needs_grad(*inputs, weight, bias)  # the mask is only worth its memory then
    slope = None if negative_slope is None else float(negative_slope)
    if not torch.compiler.is_compiling():
        if needs_grad:
            return _EagerFusedConv3x3.apply(weight, bias, slope, residual, float(res_scale), residual2,
                                            float(res2_scale), *inputs)
        return conv_forward(inputs, weight, bias, slope, residual, res_scale, residual2, res2_scale, False)[0]
    y, _ = fused_conv3x3_fwd(list(inputs), weight, bias, slope, residual, float(res_scale), residual2,
                             float(res2_scale), bool(needs_grad))
    return y


# ------------------------------------------------------------------------------------------------
# The IDB: y = x0 + act(conv2([x, act(conv1(x))]))
# ------------------------------------------------------------------------------------------------
def check_idb_args(x, x0, w1, b1, w2, b2) -> None:
    check_args([x], w1, b1, None, None)
    gc = w1.shape[0]
    h1 = x.new_empty((x.shape[0], gc, x.shape[2], x.shape[3]))  # shape-only stand-in for the check
    check_args([x, h1], w2, b2, x0, None)
    if b1 is None or b2 is None:
        raise ValueError("fused_idb takes both conv biases (the IDB's nn.Conv2d modules have them)")


# The IDB's host code through tapes (tape.py), as the RIDB's: recorded on a signature's second call,
# replayed after. The channels_last copies of the inputs, the gradient and the weights are made outside
# (a taped function only allocates and launches).
def _idb_forward_launches(inputs: list, slope: float, save_mask: bool) -> tuple:
    x, x0, w1_k, b1, w2_k, b2 = inputs
    return idb_forward(x, x0, w1_k, b1, w2_k, b2, slope, save_mask, w1_k=w1_k, w2_k=w2_k)


def _idb_backward_launches(inputs: list, w1: torch.Tensor, w2: torch.Tensor, slope: float, x_is_x0: bool) -> tuple:
    g, x, h1, w1_k, w2_k, mask1, mask2 = inputs
    return idb_backward(g, x, h1, w1, w1_k, w2, w2_k, mask1, mask2, slope, x_is_x0)


_IDB_FORWARD = Taped(_idb_forward_launches, "fused_idb forward", kept_buffers)
_IDB_BACKWARD = Taped(_idb_backward_launches, "fused_idb backward", kept_buffers)


def taped_idb_forward(x, x0, w1_k, b1, w2_k, b2, slope: float, save_mask: bool):
    """idb_forward(x, x0, w1_k, b1, w2_k, b2, ...) with the kernel weights w*_k: (y, h1, mask1, mask2)."""
    x, x0 = _cl(x), _cl(x0)
    key = (x.shape, x.dtype, x.device, w1_k.shape, w1_k.stride(), w2_k.shape, w2_k.stride(), float(slope),
           bool(save_mask))
    return _IDB_FORWARD(key, [x, x0, w1_k, b1, w2_k, b2], slope, save_mask)


def taped_idb_backward(grad, x, h1, w1, w1_k, w2, w2_k, mask1, mask2, slope: float, x_is_x0: bool = False):
    """idb_backward(...): (dx, dW1, db1, dW2, db2)."""
    g, x = _cl(grad), _cl(x)
    if g.numel() == 0:  # zero gradients: fills, which a tape does not keep
        return idb_backward(g, x, h1, w1, w1_k, w2, w2_k, mask1, mask2, slope, x_is_x0)
    key = (g.shape, g.dtype, g.device, h1.shape, mask1.shape, mask2.shape, w1_k.shape, w1_k.stride(), w2_k.shape,
           w2_k.stride(), dw_strides(w1), dw_strides(w2), float(slope), bool(x_is_x0))
    return _IDB_BACKWARD(key, [g, x, h1, w1_k, w2_k, mask1, mask2], w1, w2, slope, x_is_x0)


@torch.library.custom_op("gafh_fast::fused_idb_fwd", mutates_args=())
def fused_idb_fwd(x: torch.Tensor, x0: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                  b2: torch.Tensor, negative_slope: float, save_mask: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h1, mask1, mask2), all channels_last / bit-packed as for fused_conv3x3_fwd."""
    check_idb_args(x, x0, w1, b1, w2, b2)
    return taped_idb_forward(x, x0, kernel_weight(w1), b1, kernel_weight(w2), b2, negative_slope, save_mask)


@fused_idb_fwd.register_fake
def _(x, x0, w1, b1, w2, b2, negative_slope, save_mask):
    check_idb_args(x, x0, w1, b1, w2, b2)
    n, nf, h, w = x.shape
    gc = w1.shape[0]

    def mask(c):
        return torch.empty(mask_shape(n, h, w, c) if save_mask else (0,), dtype=torch.uint8, device=x.device)

    return _empty_cl_like(x, nf), _empty_cl_like(x, gc), mask(gc), mask(nf)


@torch.library.custom_op("gafh_fast::fused_idb_bwd", mutates_args=())
def fused_idb_bwd(grad: torch.Tensor, x: torch.Tensor, h1: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                  mask1: torch.Tensor, mask2: torch.Tensor, negative_slope: float) -> list[torch.Tensor]:
    """[dx, dW1, db1, dW2, db2]."""
    dx, dw1, db1, dw2, db2 = taped_idb_backward(grad, x, h1, w1, kernel_weight(w1), w2, kernel_weight(w2), mask1,
                                                mask2, negative_slope)
    return [dx, dw1.contiguous(), db1, dw2.contiguous(), db2]


@fused_idb_bwd.register_fake
def _(grad, x, h1, w1, w2, mask1, mask2, negative_slope):
    return [_empty_cl_like(x, x.shape[1]), torch.empty_like(w1, memory_format=torch.contiguous_format),
            w1.new_empty(w1.shape[0]), torch.empty_like(w2, memory_format=torch.contiguous_format),
            w2.new_empty(w2.shape[0])]


def _idb_setup_context(ctx, inputs, output):
    x, _x0, w1, _b1, w2, _b2, slope, _save = inputs
    _y, h1, mask1, mask2 = output
    ctx.save_for_backward(x, h1, w1, w2, mask1, mask2)
    ctx.slope = slope


def _idb_backward(ctx, grad_y, _g_h1, _g_m1, _g_m2):
    x, h1, w1, w2, mask1, mask2 = ctx.saved_tensors
    dx, dw1, db1, dw2, db2 = fused_idb_bwd(grad_y, x, h1, w1, w2, mask1, mask2, ctx.slope)
    return dx, grad_y, dw1, db1, dw2, db2, None, None


fused_idb_fwd.register_autograd(_idb_backward, setup_context=_idb_setup_context)


class _EagerFusedIDB(torch.autograd.Function):
    """One Function per IDB: 2 launches forward, 4 backward, or 3 when gz1's launch makes gz2 itself
    (idb.py)."""

    @staticmethod
    def forward(ctx, x, x0, w1, b1, w2, b2, slope):
        w1_k, w2_k = kernel_weight(w1), kernel_weight(w2)
        y, h1, mask1, mask2 = taped_idb_forward(x, x0, w1_k, b1, w2_k, b2, slope, True)
        ctx.save_for_backward(x, h1, w1, w1_k, w2, w2_k, mask1, mask2)
        ctx.slope = slope
        # one tensor as both inputs (a RIDB's first IDB, the kernels suite's IDB): dx0 = g is added in the dx
        # launch's epilogue, and x0's slot gets None, instead of autograd adding the two in a launch of its own
        ctx.x_is_x0 = x is x0
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, h1, w1, w1_k, w2, w2_k, mask1, mask2 = ctx.saved_tensors
        dx, dw1, db1, dw2, db2 = taped_idb_backward(grad_y, x, h1, w1, w1_k, w2, w2_k, mask1, mask2, ctx.slope,
                                                    ctx.x_is_x0)
        return dx, None if ctx.x_is_x0 else grad_y, dw1, db1, dw2, db2, None


_IDB_CHECKED: set = set()


def fused_idb_triton(x, x0, w1, b1, w2, b2, negative_slope: float = 0.2) -> torch.Tensor:
    """y = x0 + LReLU(conv2([x, LReLU(conv1(x))])); the same as two gafh_fast.ops.fused_conv3x3 calls."""
    slope = float(negative_slope)
    needs_grad = _needs_grad(x, x0, w1, b1, w2, b2)
    if not torch.compiler.is_compiling():
        key = (x.shape, x0.shape, w1.shape, w2.shape, x.dtype, x.device, b1 is None, b2 is None)
        if key not in _IDB_CHECKED:  # once per shape; the convs' own plans check the rest
            check_idb_args(x, x0, w1, b1, w2, b2)
            _IDB_CHECKED.add(key)
        if needs_grad:
            return _EagerFusedIDB.apply(x, x0, w1, b1, w2, b2, slope)
        return idb_forward(x, x0, w1, b1, w2, b2, slope, False)[0]
    return fused_idb_fwd(x, x0, w1, b1, w2, b2, slope, bool(needs_grad))[0]

"""The generator's output layer, y = tanh(convKxK(x, W) + b) with few output channels: host code,
autograd Function and torch custom ops (kernels and the maths: outconv_kernels.py).

Forward: not an implicit GEMM. With C_out = 3 an implicit-GEMM forward has N = 3 (a 16-wide MMA tile
for 3 live columns, 5x the MMA work) and re-reads each input pixel for each of the 81 taps; flattening
the taps into N, as the backward does, needs a shifted sum of the GEMM's columns across pixels, which
Triton cannot express in registers. So two ways, timed once per shape by the tuner: cuDNN's conv, or
one GEMM onto every tap's columns (outconv_taps_kernel) and a fold through memory (outconv_fold_kernel:
the col2im sum, bias, tanh and channels_last store in one pass; _out_forward_fold). cuDNN's took 5.2 ms of
the paper G's 20.4 ms of device time at batch 64 on the H200 (RESULTS, calls D1-D4), ~32x the conv's
floor: an implicit GEMM with 128x32 tiles for 3 output channels. The GEMM + fold writes and reads its
k*k*C_out columns once: 2 x 2.0 GB at batch 64 in bf16, ~1 ms at the H200's bandwidth.
The backward is where the flattening works in Triton (outconv_kernels.py), so the backward is what
this op's kernels do: 3 launches (gz with a zero border and the weight as dX's operand, dW partials,
then dX with the fold of the partials in extra programs), against torch's tanh backward and cuDNN's
dgrad and wgrad with 3 output channels.
Plans, tile choice and kept dW partials work as in conv3x3.py (same plan table and tuner).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton

from . import configs, conv3x3
from .configs import cdiv
from .conv3x3 import _FIN_CONFIG, _PLAN_IDS, _PLANS, _choose, _cl, _dtype_flags, _empty_cl, _grad_like, cfg_key
from .launch import KernelLauncher, aligned
from .op import _needs_grad
from .outconv_kernels import (outconv_bwd_dw_kernel, outconv_bwd_dx_kernel, outconv_fold_kernel,
                              outconv_prep_kernel, outconv_taps_kernel)

OUT_PREP = KernelLauncher(outconv_prep_kernel, "out_prep")
OUT_DW = KernelLauncher(outconv_bwd_dw_kernel, "out_dw")
OUT_DX = KernelLauncher(outconv_bwd_dx_kernel, "out_dx")
OUT_TAPS = KernelLauncher(outconv_taps_kernel, "out_taps")
OUT_FOLD = KernelLauncher(outconv_fold_kernel, "out_fold")

MAX_ROWS = 1024  # KS*KS*C_out padded to a power of two: dX's gathered K (6 steps of 64 for the paper's 9x9x4: 324)
_GZ_BLOCK_P = 256  # the prep kernel: padded pixels per program (and BLOCK_P * CP weight elements)
_FOLD_BLOCK_P = 256  # the forward's fold: output pixels per program (CP * 256 fp32 sums, 8 per thread)
# the forward's taps GEMM: 128 of the k*k*C_out rows x 64 pixels of one image per program (2 row tiles for
# the paper's 243), K = C_in in unrolled steps of up to 64; one warpgroup: 64 fp32 accumulators per thread.
# One config: the GEMM writes 2 bytes per column element it computes from K = 64 inputs: store-bound.
_TAPS_BLOCK_R, _TAPS_BLOCK_P = 128, 64
_TAPS_CONFIG = triton.Config({}, num_warps=4, num_stages=1)


def check_out_args(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    """Clear errors for what the kernels do not take."""
    if x.dim() != 4:
        raise ValueError(f"fused_out_conv input must be (N, C, H, W), got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"fused_out_conv (triton) supports float32 and bfloat16, got {x.dtype}")
    k = weight.shape[-1] if weight.dim() == 4 else 0
    if weight.dim() != 4 or weight.shape[1] != x.shape[1] or weight.shape[2] != k or k % 2 == 0:
        raise ValueError(f"fused_out_conv weight {tuple(weight.shape)} does not fit (C_out, {x.shape[1]}, k, k), k odd")
    if k * k * padded_channels(weight.shape[0]) > MAX_ROWS:
        raise ValueError(f"fused_out_conv (triton) takes k*k*C_out <= {MAX_ROWS}, C_out padded to a power of two "
                         f"(a few output channels), got {k}*{k}*{weight.shape[0]}; use kernels: torch for this layer")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"fused_out_conv bias {tuple(bias.shape)} does not fit ({weight.shape[0]},)")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"fused_out_conv {name} is {t.dtype} on {t.device}; the input is {x.dtype} on {x.device}")


# ------------------------------------------------------------------------------------------------
# Forward: cuDNN, or one GEMM onto every tap and a fold (the tuner times both once per shape)
# ------------------------------------------------------------------------------------------------
FOLD_CHUNK_BYTES = 256 * 2**20  # the per-tap partial sums (k*k*C_out per pixel) held at once
_FWD_CANDIDATES = (triton.Config({"FOLD": False}, num_warps=4, num_stages=1),  # cuDNN: the choice off the GPU
                   triton.Config({"FOLD": True}, num_warps=4, num_stages=1))


def _out_forward_cudnn(x, weight, bias) -> torch.Tensor:
    return _cl(torch.tanh(F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2)))


def _out_forward_fold(x, weight, bias) -> torch.Tensor:
    """tanh(conv(x, W) + b) as Z = W' x, one GEMM from C_in to k*k*C_out columns per pixel, W'[(c, ky, kx)]
    = W[c, :, ky, kx], the weight's channels_last layout (outconv_taps_kernel), then a fold
    (outconv_fold_kernel): the conv reads x[p + (ky, kx) - k//2] through W[:, :, ky, kx], so output pixel
    p adds column (c, ky, kx) of the pixel p + (ky, kx) - k//2; the bias, the tanh and the channels_last
    store are in the fold's epilogue.
    Images go in chunks whose Z fits FOLD_CHUNK_BYTES: two launches per chunk. (Both Triton: torch's
    matmul would be the first cuBLAS call of a generator step, whose initialisation lands in the tuner's
    timing of a cold process; F.fold launched col2im per image and left three more passes.)"""
    n, c_in, h, w = x.shape
    c_out, k = weight.shape[0], weight.shape[-1]
    rows = c_out * k * k
    x = _cl(x)
    w_k = conv3x3.kernel_weight(weight)  # channels_last: W'[r, ci] at r*C_in + ci (itself when it is already)
    per_image = rows * h * w * x.element_size()
    step = max(1, FOLD_CHUNK_BYTES // max(1, per_image))
    y = _empty_cl(n, c_out, h, w, x)
    tiles = cdiv(h * w, _FOLD_BLOCK_P)
    dtype_flags = _dtype_flags(x.dtype)
    fold_flags = dict(C_OUT=c_out, CP=padded_channels(c_out), KS=k, HAS_BIAS=bias is not None,
                      INTERP_BF16=dtype_flags["INTERP_BF16"], BLOCK_P=_FOLD_BLOCK_P)
    block_k = min(64, max(16, configs.next_pow2(c_in)))
    taps_flags = dict(C_OUT=c_out, KS=k, BLOCK_R=_TAPS_BLOCK_R, BLOCK_P=_TAPS_BLOCK_P, BLOCK_K=block_k,
                      K_STEPS=cdiv(c_in, block_k), **dtype_flags)
    taps_tiles = cdiv(h * w, _TAPS_BLOCK_P)
    # int64 offsets when the largest chunk's columns, y or x reach 2**31 elements
    idx64 = max(min(step, n) * rows * h * w, y.numel(), x.numel()) >= 2**31
    for i in range(0, n, step):
        x_chunk, y_chunk = x[i:i + step], y[i:i + step]
        cols = torch.empty((x_chunk.shape[0], rows, h * w), dtype=x.dtype, device=x.device)
        # the keys: the chunks' alignment (they start at image boundaries, which need not be 16-byte
        # aligned), and what the JIT specialises the taps kernel on (HW == 1, HW % 16, C_in)
        OUT_TAPS.launch((("out_taps", c_in, c_out, k, h * w == 1, h * w % 16 == 0, x.dtype, x.device, idx64),
                         aligned(x_chunk, w_k)),
                        (cols.shape[0] * taps_tiles, cdiv(rows, _TAPS_BLOCK_R), 1),
                        (x_chunk, w_k, cols, h * w, taps_tiles, c_in), dict(taps_flags, IDX64=idx64), _TAPS_CONFIG)
        OUT_FOLD.launch((("out_fold", c_out, k, bias is not None, x.dtype, x.device, idx64),
                         aligned(y_chunk, *(() if bias is None else (bias,)))),
                        (cols.shape[0] * tiles, 1, 1), (cols, bias if bias is not None else cols, y_chunk, h * w, h, w,
                                                        tiles), dict(fold_flags, IDX64=idx64), _FIN_CONFIG)
    return y


def _forward_of(cfg: triton.Config):
    return _out_forward_fold if cfg.kwargs["FOLD"] else _out_forward_cudnn


def out_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """tanh(conv(x, W) + b), channels_last: cuDNN's conv or the GEMM + fold, whichever the tuner timed
    faster for this shape (cuDNN without a GPU or under the interpreter)."""
    if x.shape[0] == 0:
        return _out_forward_cudnn(x, weight, bias)
    tune_key = (x.shape[1], weight.shape[0], weight.shape[-1], x.shape[2], x.shape[3],
                configs.m_bucket(x.shape[0] * x.shape[2] * x.shape[3]), str(x.dtype), bias is not None)
    key = ("out_fwd", *tune_key, x.device)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = (_choose("out_fwd", tune_key, _FWD_CANDIDATES,
                                      lambda cfg: _forward_of(cfg)(x, weight, bias), None),)
    return _forward_of(plan[0])(x, weight, bias)


# ------------------------------------------------------------------------------------------------
# Backward (3 launches)
# ------------------------------------------------------------------------------------------------
def padded_channels(c_out: int) -> int:
    """The padded gz's channels: a power of two, so that a gathered window row loads that many at once."""
    return configs.next_pow2(c_out)


def _prepare(g, y, weight, r_pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(gz padded, wr), one launch: gz = g * (1 - y^2) in g's dtype, (N, H + k-1, W + k-1, CP) with a zero
    border of k//2 pixels and zero channels up to CP = padded_channels(C_out); wr the weight as dX's B
    operand, (r_pad, C_in) contiguous (outconv_kernels.outconv_prep_kernel)."""
    n, c_out, h, w = g.shape
    c_in, ks = weight.shape[1], weight.shape[-1]
    cp = padded_channels(c_out)
    gzp = torch.empty((n, h + ks - 1, w + ks - 1, cp), dtype=g.dtype, device=g.device)
    wr = torch.empty((r_pad, c_in), dtype=weight.dtype, device=weight.device)
    idx64 = gzp.numel() >= 2**31
    flags = dict(C_OUT=c_out, CP=cp, KS=ks, INTERP_BF16=_dtype_flags(g.dtype)["INTERP_BF16"], IDX64=idx64,
                 BLOCK_P=_GZ_BLOCK_P)
    gz_progs = cdiv(n * (h + ks - 1) * (w + ks - 1), _GZ_BLOCK_P)
    # g, y and the weight are the caller's (y: the forward's output); C_in and the weight's strides are
    # specialised on, N, H, W and the program split not
    OUT_PREP.launch((("out_prep", c_out, c_in, ks, weight.stride(), r_pad, g.dtype, g.device, idx64),
                     aligned(g, y, weight)),
                    (gz_progs + cdiv(r_pad * c_in, _GZ_BLOCK_P * cp), 1, 1),
                    (g, y, gzp, weight, wr, n, h, w, c_in, *weight.stride(), r_pad, gz_progs), flags, _FIN_CONFIG)
    return gzp, wr


def _dw_partials(gzp, x, ks: int, has_bias: bool, split: Optional[int], config):
    """(dW partials (split, R, C_in), db partials or None, split), R = ks*ks*padded channels, kept with
    the plan as in conv3x3._dw_partials (the fold rewrites every element it reads before the next launch).
    The split is the chosen config's (_dw_chunks): the partials are sized for the larger of the two."""
    n, c_in, h, w = x.shape
    cp = gzp.shape[-1]
    rows = ks * ks * cp
    m = n * h * w
    key = ("out_dw", x.shape, ks, cp, x.dtype, x.device, has_bias, split, cfg_key(config))
    plan = _PLANS.get(key)
    if plan is None:
        base = split or configs.dw_split(m, c_in, rows, conv3x3._sms(x.device), taps=1)  # via the module: compile_check patches it
        candidates = [config] if config is not None else configs.out_dw_candidates(c_in, rows, w, m)
        s_max = max(_dw_chunks(m, rows, base, c, split is not None)[0] for c in candidates)
        flags = dict(CP=cp, KS=ks, DO_BIAS=has_bias, IDX64=max(m * c_in, gzp.numel()) >= 2**31,
                     **_dtype_flags(x.dtype))
        dwp = torch.empty((s_max, rows, c_in), dtype=torch.float32, device=x.device)
        dbp = torch.empty((s_max, cp), dtype=torch.float32, device=x.device) if has_bias else None
        ptrs = (gzp, x, dwp, dbp if has_bias else dwp)

        def run(c):
            s, chunk = _dw_chunks(m, rows, base, c, split is not None)
            _launch_dw(key + (cfg_key(c),), c, flags, ptrs, (m, h, w, c_in, chunk), s, rows)

        cfg = _choose("out_dw", (c_in, rows, w, configs.m_bucket(m), str(x.dtype), tuple(flags.items())),
                      configs.out_dw_candidates(c_in, rows, w, m), run, config)
        plan = _PLANS[key] = (cfg, flags, *_dw_chunks(m, rows, base, cfg, split is not None), dwp, dbp,
                              next(_PLAN_IDS))
    cfg, flags, s, chunk, dwp, dbp, plan_id = plan
    _launch_dw(plan_id, cfg, flags, (gzp, x, dwp, dbp if has_bias else dwp), (m, h, w, c_in, chunk), s, rows)
    return dwp, dbp, s


def _dw_chunks(m: int, rows: int, base: int, cfg, exact: bool) -> tuple[int, int]:
    """(split, chunk pixels) of a dW config. base: the split of one row tile per program (configs.dw_split,
    or the caller's: exact). A config whose programs each take GROUPS row tiles has that many fewer row
    programs; its split grows by the same factor (configs.split_chunks), so both candidates launch about
    as many programs."""
    groups = cfg.kwargs["GROUPS"]
    ratio = (cdiv(rows, cfg.kwargs["BLOCK_R"]) + 1) // (cdiv(rows, cfg.kwargs["BLOCK_R"] * groups) + 1)
    return configs.split_chunks(m, base, 1 if exact else ratio)


def _launch_dw(key, cfg, flags, ptrs, scalars, split, rows):
    tiles = cdiv(rows, cfg.kwargs["BLOCK_R"] * cfg.kwargs["GROUPS"]) * cdiv(scalars[3], cfg.kwargs["BLOCK_C"])
    # x is the caller's; gz and the partials are ours
    OUT_DW.launch((key, aligned(ptrs[1])), (tiles + int(flags["DO_BIAS"]), split, 1), ptrs + scalars, flags, cfg)


def _dx(gzp, wr, weight, dx, has_bias: bool, fin: tuple, config, act: Optional[tuple] = None):
    """dX, and the fold of fin = (dW partials, db partials, dW, db, split) in extra programs (dW always
    runs first here: gz is ready before either). act = (mask, slope): dX times LeakyReLU'(z) of the layer
    before, from its bit mask (N, H, W, ceil(C_in/8)) (kernels/upout.py)."""
    n, c_in, h, w = dx.shape
    c_out, ks, cp = weight.shape[0], weight.shape[-1], gzp.shape[-1]
    rows = ks * ks * cp
    m = n * h * w
    key = ("out_dx", dx.shape, weight.shape, dx.dtype, dx.device, has_bias, act is not None, cfg_key(config))
    plan = _PLANS.get(key)
    dwp, dbp, dw, db, split = fin
    # the fold's pointers (an absent db or mask: any valid pointer) and scalars (split, dW's co / ci / kh / kw
    # strides, the slope)
    ptrs = (gzp, wr, dx, act[0] if act else dx, dwp, dbp if dbp is not None else dwp, dw, db if db is not None else dw)
    scalars = (m, h, w, c_in, split, *dw.stride(), float(act[1]) if act else 0.0)
    if plan is None:
        flags = dict(C_OUT=c_out, CP=cp, KS=ks, FIN_BIAS=has_bias, ACT=act is not None,
                     IDX64=max(m * c_in, gzp.numel()) >= 2**31, FIN_BLOCK=configs.FIN_BLOCK, **_dtype_flags(dx.dtype))

        def run(cfg):  # a timing run: dX without the fold programs (the partials are the real launch's)
            _launch_dx(key + (cfg_key(cfg),), cfg, flags, ptrs, scalars, 0)

        cfg = _choose("out_dx", (c_in, rows, w, configs.m_bucket(m), str(dx.dtype), tuple(flags.items())),
                      configs.out_dx_candidates(c_in, rows, w, m), run, config)
        if cfg.kwargs["BLOCK_R"] * cfg.kwargs["R_STEPS"] != wr.shape[0]:
            raise ValueError(f"out_dx config {cfg} reads {cfg.kwargs['BLOCK_R'] * cfg.kwargs['R_STEPS']} weight rows; "
                             f"the re-laid weight has {wr.shape[0]} (configs.out_rows_block)")
        plan = _PLANS[key] = (cfg, flags, next(_PLAN_IDS))
    cfg, flags, plan_id = plan
    _launch_dx(plan_id, cfg, flags, ptrs, scalars, cdiv(c_out * c_in * ks * ks, configs.FIN_BLOCK))


def _launch_dx(key, cfg, flags, ptrs, scalars, fold_programs: int):
    m, c_in = scalars[0], scalars[3]
    grid = (cdiv(m, cfg.kwargs["BLOCK_M"]) + fold_programs, cdiv(c_in, cfg.kwargs["BLOCK_N"]), 1)
    OUT_DX.launch((key, True), grid, ptrs + scalars, flags, cfg)  # every pointer is ours (the mask: upout.py's): aligned


def out_backward(grad, x, y, weight, has_bias: bool, dx_config=None, dw_config=None, dw_split: Optional[int] = None,
                 act: Optional[tuple] = None):
    """(dx, dW, db or None) of y = tanh(conv(x, W) + b), given the forward's y; dW laid out as
    conv3x3.dw_strides(weight) says. act = (mask, slope): x = LeakyReLU(z) with z > 0 in the bit mask
    (N, H, W, ceil(C_in/8)); the first result is then dL/dz, not dL/dx (kernels/upout.py)."""
    g, x, y = _cl(grad), _cl(x), _cl(y)
    n, c_in, h, w = x.shape
    c_out = weight.shape[0]
    dw = _grad_like(weight, weight)
    db = weight.new_empty((c_out,)) if has_bias else None
    dx = _empty_cl(n, c_in, h, w, x)
    if n * h * w == 0:
        return dx, dw.zero_(), db.zero_() if has_bias else None
    ks = weight.shape[-1]
    rows = ks * ks * padded_channels(c_out)
    block = configs.out_rows_block(rows)
    gzp, wr = _prepare(g, y, weight, cdiv(rows, block) * block)
    dwp, dbp, split = _dw_partials(gzp, x, ks, has_bias, dw_split, dw_config)
    _dx(gzp, wr, weight, dx, has_bias, (dwp, dbp, dw, db, split), dx_config, act)
    return dx, dw, db


# ------------------------------------------------------------------------------------------------
# Custom ops (torch.compile) and the eager Function
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("gafh_fast::fused_out_conv_fwd", mutates_args=())
def fused_out_conv_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    check_out_args(x, weight, bias)
    return out_forward(x, weight, bias)


@fused_out_conv_fwd.register_fake
def _(x, weight, bias):
    check_out_args(x, weight, bias)
    n, _, h, w = x.shape
    c_out = weight.shape[0]
    return _empty_cl(n, c_out, h, w, x)


@torch.library.custom_op("gafh_fast::fused_out_conv_bwd", mutates_args=())
def fused_out_conv_bwd(grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                       has_bias: bool) -> list[torch.Tensor]:
    """[dx, dW, db]; db is empty when has_bias is False; dW has conv3x3.dw_strides(weight)."""
    dx, dw, db = out_backward(grad, x, y, weight, has_bias)
    return [dx, dw, db if db is not None else weight.new_empty(0)]


@fused_out_conv_bwd.register_fake
def _(grad, x, y, weight, has_bias):
    n, c_in, h, w = x.shape
    return [_empty_cl(n, c_in, h, w, x), _grad_like(weight, weight), weight.new_empty(weight.shape[0] if has_bias else 0)]


def _out_setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight, output)
    ctx.has_bias = bias is not None


def _out_backward(ctx, grad_y):
    x, weight, y = ctx.saved_tensors
    dx, dw, db = fused_out_conv_bwd(grad_y, x, y, weight, ctx.has_bias)
    return dx, dw, db if ctx.has_bias else None


fused_out_conv_fwd.register_autograd(_out_backward, setup_context=_out_setup_context)


class _EagerFusedOutConv(torch.autograd.Function):
    """The same host code without the custom-op dispatch (see op.py)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        y = out_forward(x, weight, bias)
        ctx.save_for_backward(x, weight, y)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, y = ctx.saved_tensors
        dx, dw, db = out_backward(grad_y, x, y, weight, ctx.has_bias)
        return dx, dw, db


_CHECKED: set = set()  # argument signatures check_out_args passed: validation once per shape (issue 11)


def fused_out_conv_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Same semantics as gafh_fast.ops.fused_out_conv_reference; y comes back channels_last."""
    needs_grad = _needs_grad(x, weight, bias)
    if not torch.compiler.is_compiling():
        sig = (x.shape, x.dtype, x.device, weight.shape, weight.dtype, weight.device,
               None if bias is None else (bias.shape, bias.dtype, bias.device))
        if sig not in _CHECKED:
            check_out_args(x, weight, bias)
            _CHECKED.add(sig)
        if needs_grad:
            return _EagerFusedOutConv.apply(x, weight, bias)
        return out_forward(x, weight, bias)
    return fused_out_conv_fwd(x, weight, bias)

"""Backward of the fused 3x3 convolution (forward: conv3x3_fwd.py).

Maths. With z = conv3x3(x, W) + b the pre-activation, a = act(z), and
    y = r2 + s2*(r1 + s1*a)            (r1/s1 and r2/s2 optional; absent means r = 0, s = 1)
the upstream gradient g = dL/dy gives
    dL/dr2 = g,   dL/dr1 = s2*g,   dL/da = scale*g  with scale = s1*s2 (only the present ones),
    dL/dz  = scale * gz,  gz = g * (1 if z > 0 else slope)      (gz = g without activation)
    db[co]            = scale * sum_{n,h,w} gz[n,h,w,co]
    dW[co,ci,kh,kw]   = scale * sum_{n,h,w} gz[n,h,w,co] * x[n, h+kh-1, w+kw-1, ci]
    dX[n,h,w,ci]      = scale * sum_{co,kh,kw} gz[n, h-kh+1, w-kw+1, co] * W[co,ci,kh,kw]
i.e. dX is a 3x3 conv of gz with the spatially flipped, transposed weights: another implicit GEMM
(M = pixels, N = C_i, K = 9*C_out), one launch per input, each grad written directly.
dW is a GEMM whose reduction runs over the pixels: split-K over pixel chunks (one launch, both inputs'
channel tiles in one grid) into an fp32 workspace (SPLIT, 9, C_in, C_out), then one small kernel sums the partials in a fixed order (deterministic,
no atomics), reorders dW to (C_out, C_in, 3, 3) and casts dW and db.

What the forward saved: the inputs and W (dW and dX need them) and, when there is an activation, a
bit-packed mask z > 0 (1 bit per output element, 1/16 of a bf16 pre-activation). It makes the
LeakyReLU derivative exact; recovering sign(z) from y would need (y - r2)/s2 - r1, which rounding can
flip near 0, and recomputing z would cost a second forward GEMM.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .conv3x3_fwd import INTERPRETING, cast_rne, dot_precision


@triton.jit
def _load_gz(
    g_ptr,      # upstream grad, (N, C_OUT, H, W) channels_last: element at m*C_OUT + co
    mask_ptr,   # (N, H, W, ceil(C_OUT/8)) uint8 forward mask, bit co%8 of byte co//8 = z > 0; if HAS_ACT
    pix,        # (BLOCK_P,) int64 pixel indices m
    pix_ok, co, co_ok, C_OUT, slope, HAS_ACT: tl.constexpr,
):
    """gz tile (BLOCK_P, BLOCK_CO) in fp32: g times the LeakyReLU derivative, zero where masked."""
    off = pix[:, None] * C_OUT + co[None, :]
    ok = pix_ok[:, None] & co_ok[None, :]
    g = tl.load(g_ptr + off, mask=ok, other=0.0).to(tl.float32)
    if HAS_ACT:
        c_bytes = tl.cdiv(C_OUT, 8)
        byte = tl.load(mask_ptr + pix[:, None] * c_bytes + (co // 8)[None, :], mask=ok, other=0)
        positive = ((byte.to(tl.int32) >> (co % 8)[None, :]) & 1) != 0
        g = tl.where(positive, g, g * slope)
    return g


@triton.jit
def conv3x3_bwd_dx_kernel(
    g_ptr,      # upstream grad, (N, C_OUT, H, W) channels_last
    mask_ptr,   # (N, H, W, ceil(C_OUT/8)) uint8 bit-packed forward mask; unused unless HAS_ACT
    wt_ptr,     # weight as the forward's (3, 3, C_IN_TOTAL, C_OUT) contiguous: ((tap*C_IN_TOTAL + ci)*C_OUT + co)
    dx_ptr,     # this input's grad, (N, C_I, H, W) channels_last: element at m*C_I + ci
    M, H, W, C_OUT, C_IN_TOTAL, C_I, c_base,
    slope, scale,
    HAS_ACT: tl.constexpr, INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # One program owns a BLOCK_M (pixels) x BLOCK_N (this input's channels) tile of dX, over K = 9*C_OUT.
    # (One launch per input: a two-input variant with both tiles in one grid made ptxas serialize the
    # wgmma of every config, see compile_check.py; the dW kernel below does merge its two inputs.)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < C_I
    w_idx = offs_m % W
    h_idx = (offs_m // W) % H

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_steps = tl.cdiv(C_OUT, BLOCK_K)
    for step in range(0, 9 * k_steps):
        tap = step // k_steps
        c0 = (step - tap * k_steps) * BLOCK_K
        dh = tap // 3 - 1
        dw = tap % 3 - 1
        hh = h_idx - dh  # dX at (h, w) collects gz at (h - dh, w - dw) through tap (dh, dw)
        ww = w_idx - dw
        pix_ok = m_ok & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
        src = (offs_m - dh * W - dw).to(tl.int64)
        co = c0 + offs_k
        co_ok = co < C_OUT
        a = _load_gz(g_ptr, mask_ptr, src, pix_ok, co, co_ok, C_OUT, slope, HAS_ACT)
        a = cast_rne(a, wt_ptr.dtype.element_ty, INTERP_BF16)  # dot in the I/O dtype, as on the GPU
        # B[k = co, n = ci] = W[co, ci, tap]: the forward's weight copy read transposed (K-major)
        w_rows = (tap * C_IN_TOTAL + c_base + offs_n).to(tl.int64)
        b = tl.load(wt_ptr + w_rows[None, :] * C_OUT + co[:, None], mask=co_ok[:, None] & n_ok[None, :], other=0.0)
        if INTERP_BF16:  # the interpreter's bf16 tl.dot returns garbage: dot in fp32 there
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    out_off = offs_m.to(tl.int64)[:, None] * C_I + offs_n[None, :]
    tl.store(dx_ptr + out_off, cast_rne(acc * scale, dx_ptr.dtype.element_ty, INTERP_BF16),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _dw_tile(
    x_ptr,      # one input, (N, C_I, H, W) channels_last: element at m*C_I + ci
    g_ptr,      # upstream grad, (N, C_OUT, H, W) channels_last
    mask_ptr,   # (N, H, W, ceil(C_OUT/8)) uint8 bit-packed forward mask; unused unless HAS_ACT
    dw_ptr,     # fp32 partials, (SPLIT, 9, C_IN_TOTAL, C_OUT) contiguous; this input owns rows c_base..+C_I
    db_ptr,     # fp32 partials, (SPLIT, C_OUT) contiguous; written only if DO_BIAS
    pid_tile, tap, split, M, H, W, C_I, C_IN_TOTAL, C_OUT, c_base, CHUNK,
    slope, scale,
    HAS_ACT: tl.constexpr, DO_BIAS: tl.constexpr, INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """The BLOCK_C (channels of one input) x BLOCK_CO tile pid_tile of one tap of dW, over one pixel chunk."""
    n_co_tiles = tl.cdiv(C_OUT, BLOCK_CO)
    pid_c = pid_tile // n_co_tiles
    pid_co = pid_tile % n_co_tiles
    ci = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    ci_ok = ci < C_I
    co_ok = co < C_OUT
    dh = tap // 3 - 1
    dw = tap % 3 - 1
    # db is the same sum for every program; only (tap 0, first C tile) stores it (branch-free below).
    bias_prog = (tl.zeros((BLOCK_CO,), dtype=tl.int32) + tap + pid_c) == 0

    acc = tl.zeros((BLOCK_C, BLOCK_CO), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_CO,), dtype=tl.float32)
    p_start = split * CHUNK
    p_end = tl.minimum(p_start + CHUNK, M)
    for p0 in range(p_start, p_end, BLOCK_P):
        pix = p0 + tl.arange(0, BLOCK_P)
        p_ok = pix < p_end
        gz = _load_gz(g_ptr, mask_ptr, pix.to(tl.int64), p_ok, co, co_ok, C_OUT, slope, HAS_ACT)
        if DO_BIAS:
            db_acc += tl.sum(gz, axis=0)
        w_idx = pix % W
        h_idx = (pix // W) % H
        hh = h_idx + dh
        ww = w_idx + dw
        src_ok = p_ok & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
        src = (pix + dh * W + dw).to(tl.int64)
        xs = tl.load(x_ptr + src[:, None] * C_I + ci[None, :], mask=src_ok[:, None] & ci_ok[None, :], other=0.0)
        gz_op = cast_rne(gz, x_ptr.dtype.element_ty, INTERP_BF16)  # dot in the I/O dtype, as on the GPU
        if INTERP_BF16:  # the interpreter's bf16 tl.dot returns garbage: dot in fp32 there
            xs = xs.to(tl.float32)
            gz_op = gz_op.to(tl.float32)
        acc = tl.dot(tl.trans(xs), gz_op, acc, input_precision=PRECISION)

    rows = (split * 9 + tap) * C_IN_TOTAL + c_base + ci
    tl.store(dw_ptr + rows.to(tl.int64)[:, None] * C_OUT + co[None, :], acc * scale,
             mask=ci_ok[:, None] & co_ok[None, :])
    if DO_BIAS:
        tl.store(db_ptr + split * C_OUT + co, db_acc * scale, mask=co_ok & bias_prog)


@triton.jit
def conv3x3_bwd_dw_kernel(
    x1_ptr,     # first input, (N, C1, H, W) channels_last
    x2_ptr,     # second input, (N, C2, H, W) channels_last; any valid pointer when C2 == 0
    g_ptr,      # upstream grad, (N, C_OUT, H, W) channels_last
    mask_ptr,   # (N, H, W, ceil(C_OUT/8)) uint8 bit-packed forward mask; unused unless HAS_ACT
    dw_ptr,     # fp32 partials, (SPLIT, 9, C1 + C2, C_OUT) contiguous
    db_ptr,     # fp32 partials, (SPLIT, C_OUT) contiguous; written only if DO_BIAS
    M, H, W, C1, C2, C_OUT, CHUNK,
    slope, scale,
    HAS_ACT: tl.constexpr, DO_BIAS: tl.constexpr, INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # One program owns a BLOCK_C (input channels) x BLOCK_CO (output channels) tile of one tap of dW,
    # reduced over one chunk of CHUNK pixels (its split); grid = (C1 tiles then C2 tiles, each times
    # the C_OUT tiles; 9 taps; SPLIT). One launch for both inputs.
    pid_tile = tl.program_id(0)
    tap = tl.program_id(1)
    split = tl.program_id(2)
    tiles1 = tl.cdiv(C1, BLOCK_C) * tl.cdiv(C_OUT, BLOCK_CO)
    if pid_tile < tiles1:
        _dw_tile(x1_ptr, g_ptr, mask_ptr, dw_ptr, db_ptr, pid_tile, tap, split, M, H, W, C1, C1 + C2, C_OUT, 0,
                 CHUNK, slope, scale, HAS_ACT, DO_BIAS, INTERP_BF16, PRECISION, BLOCK_C, BLOCK_CO, BLOCK_P)
    else:
        _dw_tile(x2_ptr, g_ptr, mask_ptr, dw_ptr, db_ptr, pid_tile - tiles1, tap, split, M, H, W, C2, C1 + C2,
                 C_OUT, C1, CHUNK, slope, scale, HAS_ACT, False, INTERP_BF16, PRECISION, BLOCK_C, BLOCK_CO, BLOCK_P)



@triton.jit
def conv3x3_bwd_finalize_kernel(
    dw_parts_ptr,   # fp32 partials, (SPLIT, 9, C_IN, C_OUT) contiguous (tap-major, as the dW kernel writes)
    db_parts_ptr,   # fp32 partials, (SPLIT, C_OUT) contiguous; read only if HAS_BIAS
    dw_ptr,         # dW, (C_OUT, C_IN, 3, 3) contiguous, weight dtype: element at (co*C_IN + ci)*9 + tap
    db_ptr,         # db, (C_OUT,), weight dtype; written only if HAS_BIAS
    SPLIT, C_IN, C_OUT,
    HAS_BIAS: tl.constexpr, INTERP_BF16: tl.constexpr, BLOCK: tl.constexpr,
):
    # One program owns BLOCK consecutive elements of dW (in its (C_out, C_in, 3, 3) order) and, for the
    # first C_OUT offsets, of db: it sums the split-K partials in a fixed order (deterministic), then casts.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < C_OUT * C_IN * 9
    tap = offs % 9
    ci = (offs // 9) % C_IN
    co = offs // (9 * C_IN)
    src = (tap * C_IN + ci) * C_OUT + co
    b_ok = (offs < C_OUT) & HAS_BIAS
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    b_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, SPLIT):
        acc += tl.load(dw_parts_ptr + s * 9 * C_IN * C_OUT + src, mask=ok, other=0.0)
        if HAS_BIAS:
            b_acc += tl.load(db_parts_ptr + s * C_OUT + offs, mask=b_ok, other=0.0)
    tl.store(dw_ptr + offs, cast_rne(acc, dw_ptr.dtype.element_ty, INTERP_BF16), mask=ok)
    if HAS_BIAS:
        tl.store(db_ptr + offs, cast_rne(b_acc, db_ptr.dtype.element_ty, INTERP_BF16), mask=b_ok)


# Every config is run by the tests; BLOCK_K-like dims (BLOCK_K, BLOCK_P) >= 16; no num_warps=8.
DX_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
]
DW_CONFIGS = [
    triton.Config({"BLOCK_C": 64, "BLOCK_CO": 64, "BLOCK_P": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_C": 64, "BLOCK_CO": 64, "BLOCK_P": 128}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_C": 64, "BLOCK_CO": 32, "BLOCK_P": 128}, num_warps=4, num_stages=3),
]
DX_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=1)
DW_INTERPRETER_CONFIG = triton.Config({"BLOCK_C": 64, "BLOCK_CO": 64, "BLOCK_P": 128}, num_warps=4, num_stages=1)
FINALIZE_BLOCK = 1024
# The dW split chunk is a multiple of every BLOCK_P above, so a chunk never straddles two tiles.
DW_CHUNK_MULTIPLE = 128

conv3x3_bwd_dx_autotuned = triton.autotune(configs=DX_CONFIGS, key=["M", "H", "W", "C_OUT", "C_I"])(
    conv3x3_bwd_dx_kernel
)
conv3x3_bwd_dw_autotuned = triton.autotune(configs=DW_CONFIGS, key=["M", "H", "W", "C1", "C2", "C_OUT", "CHUNK"])(
    conv3x3_bwd_dw_kernel
)


# ------------------------------------------------------------------------------------------------
# Host launcher
# ------------------------------------------------------------------------------------------------
def _launch_kwargs(config: triton.Config) -> dict:
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def _dw_split(m: int, c_in: int, c_out: int, device) -> int:
    """Pixel chunks of the dW reduction: ~4 programs per SM (a 64x64 dW tile has little work per tap,
    so occupancy comes from the split), chunks >= 1024 px; the fp32 workspace stays a few MB."""
    import torch

    if INTERPRETING or device.type != "cuda":
        return 1  # the interpreter runs programs one after another: splitting buys nothing
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    tiles = 9 * triton.cdiv(c_in, 64) * triton.cdiv(c_out, 64)
    return max(1, min(triton.cdiv(4 * sms, tiles), m // 1024))


def conv3x3_bwd(grad, inputs, w_taps, mask, negative_slope, scale: float, has_bias: bool,
                dx_config: triton.Config | None = None, dw_config: triton.Config | None = None,
                dw_split: int | None = None):
    """Launch the backward. Returns ([dx_i per input], dW, db or None).

    grad: dL/dy (any layout; converted once to channels_last). w_taps: the forward's weight copy,
    weight_taps(W) = (3, 3, C_in, C_out) contiguous. mask: the forward's uint8 z > 0 mask
    (bit-packed, used only when negative_slope is not None). scale: s1*s2 of the residuals present.
    dx_config / dw_config / dw_split force a config or split (tests); None autotunes on a GPU.
    """
    import torch

    g = grad.contiguous(memory_format=torch.channels_last)
    xs = [x.contiguous(memory_format=torch.channels_last) for x in inputs]
    n, c_out, h, w = g.shape
    m = n * h * w
    c_in_total = w_taps.shape[2]
    if m == 0:  # an empty batch: zero parameter grads, empty input grads
        dw = w_taps.new_zeros((c_out, c_in_total, 3, 3))
        return ([torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last) for x in xs],
                dw, w_taps.new_zeros((c_out,)) if has_bias else None)
    has_act = negative_slope is not None
    if has_act and mask.numel() != m * triton.cdiv(c_out, 8):
        raise RuntimeError("fused_conv3x3 backward: the forward saved no activation mask "
                           "(it ran with save_mask=False); cannot differentiate the LeakyReLU")
    mask_arg = mask if has_act else g
    slope = float(negative_slope) if has_act else 0.0
    interp_bf16 = INTERPRETING and g.dtype != torch.float32
    if dx_config is None and INTERPRETING:
        dx_config = DX_INTERPRETER_CONFIG
    if dw_config is None and INTERPRETING:
        dw_config = DW_INTERPRETER_CONFIG
    split = dw_split or _dw_split(m, c_in_total, c_out, g.device)
    chunk = triton.cdiv(triton.cdiv(m, split), DW_CHUNK_MULTIPLE) * DW_CHUNK_MULTIPLE
    split = triton.cdiv(m, chunk)
    dw_parts = torch.empty((split, 9, c_in_total, c_out), dtype=torch.float32, device=g.device)
    db_parts = torch.empty((split, c_out), dtype=torch.float32, device=g.device) if has_bias else dw_parts

    c1 = xs[0].shape[1]
    c2 = xs[1].shape[1] if len(xs) == 2 else 0
    dxs = []
    c_base = 0
    for x in xs:  # dX: one launch per input, each grad written directly in its own tensor
        c_i = x.shape[1]
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
        dx_args = (g, mask_arg, w_taps, dx, m, h, w, c_out, c_in_total, c_i, c_base, slope, float(scale))
        dx_flags = dict(HAS_ACT=has_act, INTERP_BF16=interp_bf16, PRECISION=dot_precision(g.dtype))

        def dx_grid(meta, c_i=c_i):
            return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(c_i, meta["BLOCK_N"]))

        if dx_config is not None:
            conv3x3_bwd_dx_kernel[dx_grid(dx_config.kwargs)](*dx_args, **dx_flags, **_launch_kwargs(dx_config))
        else:
            conv3x3_bwd_dx_autotuned[dx_grid](*dx_args, **dx_flags)
        dxs.append(dx)
        c_base += c_i

    x2 = xs[1] if len(xs) == 2 else xs[0]
    dw_args = (xs[0], x2, g, mask_arg, dw_parts, db_parts, m, h, w, c1, c2, c_out, chunk, slope, float(scale))
    dw_flags = dict(HAS_ACT=has_act, DO_BIAS=has_bias, INTERP_BF16=interp_bf16, PRECISION=dot_precision(g.dtype))

    def dw_grid(meta):
        co_tiles = triton.cdiv(c_out, meta["BLOCK_CO"])
        return ((triton.cdiv(c1, meta["BLOCK_C"]) + triton.cdiv(c2, meta["BLOCK_C"])) * co_tiles, 9, split)

    if dw_config is not None:
        conv3x3_bwd_dw_kernel[dw_grid(dw_config.kwargs)](*dw_args, **dw_flags, **_launch_kwargs(dw_config))
    else:
        conv3x3_bwd_dw_autotuned[dw_grid](*dw_args, **dw_flags)

    # One launch sums the partials, puts dW back in (C_out, C_in, 3, 3) order, casts, and does db.
    dw = torch.empty((c_out, c_in_total, 3, 3), dtype=w_taps.dtype, device=w_taps.device)
    db = torch.empty((c_out,), dtype=w_taps.dtype, device=w_taps.device) if has_bias else None
    wt_interp = INTERPRETING and w_taps.dtype != torch.float32
    grid = (triton.cdiv(dw.numel(), FINALIZE_BLOCK),)
    conv3x3_bwd_finalize_kernel[grid](dw_parts, db_parts, dw, db if has_bias else dw, split, c_in_total, c_out,
                                      HAS_BIAS=has_bias, INTERP_BF16=wt_interp, BLOCK=FINALIZE_BLOCK)
    return dxs, dw, db

"""Kernels of the output conv's backward: y = tanh(convKxK(x, W) + b) with few output channels (the
generator's last layer: 64 -> 3 channels, 9x9, at 256x256).

Why. With C_OUT = 3 the usual implicit GEMM of the backward is starved: per tap, dX has K = C_OUT = 3
(a 16-deep MMA step for 3 live values) and dW an N of 3. Flattening the tap and the output channel into
one index r = (kh*KS + kw)*C_OUT + co fixes both, because only the small tensor (gz, 3 channels) needs
the tap's shift:
  * dX[p, ci] = sum_r gz[p + d(r), co(r)] * W[co(r), ci, kh(r), kw(r)],   d(r) = (PAD - kh, PAD - kw):
    a GEMM with K = KS*KS*C_OUT (243 -> 256 for the paper's layer: 5 % padding) and N = C_IN, whose A
    operand is gathered from gz (6 bytes a pixel, cache-resident);
  * dW[co, ci, kh, kw] = sum_p gz[p + d(r), co] * x[p, ci]: the transposed GEMM, M = C_IN, N = r
    (gathered from gz), K = pixels, with x read once per row tile (not once per tap).
gz = g * (1 - y^2) is written once, rounded to the I/O dtype, into a buffer with a zero border of PAD =
KS//2 pixels: every gathered read then lands inside it, so the gathers need no bounds masks and no
arithmetic beyond one add (a first version that made gz on the gathered operand, masked per element,
compiled for sm_90 to 255 registers with spills and a serialised wgmma in dW's loop).
The forward stays cuDNN's (outconv.py says why).

Kernels (host code: outconv.py):
  * `outconv_gz_pad_kernel`: gz with its zero border.
  * `outconv_bwd_dw_kernel`: fp32 partials of dW per row tile of r and chunk of pixels (split-K, no
    atomics), plus db partials from an extra program.
  * `outconv_bwd_dx_kernel`: dX; extra programs fold the dW partials in a fixed order (deterministic)
    into dW in the weight's layout, and db.
Launches: backward 3 (gz, dW, then dX + fold).
Layouts: activations channels_last (element (n, c, h, w) at pixel*C + c).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .conv3x3_fwd import SHAPE_ARGS, cast_rne, pixel_rows


@triton.jit(do_not_specialize=["N", "H", "W"])
def outconv_gz_pad_kernel(
    g_ptr,      # dL/dy, (N, C_OUT, H, W) channels_last
    y_ptr,      # the forward's output tanh(z), (N, C_OUT, H, W) channels_last
    gzp_ptr,    # out: fp32 gz = g * (1 - y^2) rounded to y's dtype, with a border of KS//2 zeros on every
                # side, (N, H + KS-1, W + KS-1, C_OUT) contiguous
    N, H, W,
    C_OUT: tl.constexpr, KS: tl.constexpr, INTERP_BF16: tl.constexpr, IDX64: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr,
):
    # 1-D grid over the padded pixels, BLOCK_P each (every element written: the border's zeros too).
    # The border makes every gathered read of the GEMMs below land inside the buffer: no masks there.
    hp_n = H + (KS - 1)
    wp_n = W + (KS - 1)
    pp = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    pp_ok = pp < N * hp_n * wp_n
    co = tl.arange(0, BLOCK_CO)
    co_ok = co < C_OUT
    wp = pp % wp_n
    hp = (pp // wp_n) % hp_n
    n = pp // (wp_n * hp_n)
    h = hp - KS // 2
    w = wp - KS // 2
    inside = pp_ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)
    at = pixel_rows((n * H + h) * W + w, C_OUT, IDX64)[:, None] + co[None, :]
    ok = inside[:, None] & co_ok[None, :]
    g = tl.load(g_ptr + at, mask=ok, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + at, mask=ok, other=0.0).to(tl.float32)
    # rounded to the I/O dtype (as torch's tanh backward rounds), kept in fp32 (exact): see the dW loop
    gz = cast_rne(g * (1.0 - y * y), y_ptr.dtype.element_ty, INTERP_BF16).to(tl.float32)
    tl.store(gzp_ptr + pixel_rows(pp, C_OUT, IDX64)[:, None] + co[None, :], gz, mask=pp_ok[:, None] & co_ok[None, :])


@triton.jit
def _padded_base(pix, H, W, C_OUT: tl.constexpr, KS: tl.constexpr, IDX64: tl.constexpr):
    """Offset in the padded gz of pixel (n, h, w)'s window corner, padded pixel (h, w) of image n (its
    gathered row r sits at + _tap_offsets(r))."""
    w = pix % W
    t = pix // W
    h = t % H
    n = t // H
    return pixel_rows((n * (H + (KS - 1)) + h) * (W + (KS - 1)) + w, C_OUT, IDX64)


@triton.jit
def _tap_offsets(r, W, C_OUT: tl.constexpr, KS: tl.constexpr):
    """Offset of row r = (kh*KS + kw)*C_OUT + co from its pixel's window corner: padded pixel
    (h + KS-1 - kh, w + KS-1 - kw), i.e. unpadded (h + KS//2 - kh, w + KS//2 - kw), channel co. Rows past
    KS*KS*C_OUT get offset 0 (a real element; their weight rows are zero, their dW rows not stored)."""
    t = r // C_OUT
    off = ((KS - 1 - t // KS) * (W + (KS - 1)) + (KS - 1 - t % KS)) * C_OUT + r % C_OUT
    return tl.where(r < KS * KS * C_OUT, off, 0)


@triton.jit(do_not_specialize=SHAPE_ARGS)
def outconv_bwd_dw_kernel(
    gzp_ptr,    # padded gz (outconv_gz_pad_kernel)
    x_ptr,      # the conv's input, (N, C_IN, H, W) channels_last
    dwp_ptr,    # out: fp32 dW partials (SPLIT, R, C_IN) contiguous, element (s, r, ci)
    dbp_ptr,    # out: fp32 db partials (SPLIT, C_OUT) contiguous; if DO_BIAS
    M, H, W, C_IN, CHUNK,
    C_OUT: tl.constexpr, KS: tl.constexpr, DO_BIAS: tl.constexpr,
    INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr, IDX64: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # grid = (row tiles of R x C_IN tiles (+ 1 db program with DO_BIAS), SPLIT chunks of CHUNK pixels).
    # acc[ci, r] += x[p, ci]^T gz[p + d(r), co(r)]: x (from memory) is the MMA's A side, the gathered
    # gz its B side (through shared memory).
    R = KS * KS * C_OUT
    n_c_tiles = tl.cdiv(C_IN, BLOCK_C)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    p_start = split * CHUNK
    p_end = tl.minimum(p_start + CHUNK, M)
    if pid == tl.cdiv(R, BLOCK_R) * n_c_tiles:
        if DO_BIAS:  # db[co] = sum_p gz[p, co]: the centre tap, undisplaced
            co = tl.arange(0, BLOCK_R)
            co_ok = co < C_OUT
            centre = ((KS // 2) * (W + (KS - 1)) + KS // 2) * C_OUT + co
            db_acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
            for p0 in range(p_start, p_end, BLOCK_P):
                pix = p0 + tl.arange(0, BLOCK_P)
                ok = (pix < p_end)[:, None] & co_ok[None, :]
                at = _padded_base(pix, H, W, C_OUT, KS, IDX64)[:, None] + centre[None, :]
                db_acc += tl.sum(tl.load(gzp_ptr + at, mask=ok, other=0.0).to(tl.float32), axis=0)
            tl.store(dbp_ptr + split * C_OUT + co, db_acc, mask=co_ok)
    else:
        r = (pid // n_c_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
        ci = (pid % n_c_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
        ci_ok = ci < C_IN
        r_off = _tap_offsets(r, W, C_OUT, KS)
        acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        for p0 in range(p_start, p_end, BLOCK_P):
            pix = p0 + tl.arange(0, BLOCK_P)
            p_ok = pix < p_end
            gz = tl.load(gzp_ptr + _padded_base(pix, H, W, C_OUT, KS, IDX64)[None, :] + r_off[:, None],
                         mask=p_ok[None, :], other=0.0)
            # the fp32 gz rounded on the operand: wgmma then takes it from registers (a plain load would
            # go through one shared-memory buffer, each iteration waiting for the previous wgmma)
            gz = cast_rne(gz, x_ptr.dtype.element_ty, INTERP_BF16)
            xs = tl.load(x_ptr + pixel_rows(pix, C_IN, IDX64)[:, None] + ci[None, :],
                         mask=p_ok[:, None] & ci_ok[None, :], other=0.0)
            if INTERP_BF16:  # the interpreter's bf16 tl.dot returns garbage: dot in fp32 there
                gz = gz.to(tl.float32)
                xs = xs.to(tl.float32)
            acc = tl.dot(gz, xs, acc, input_precision=PRECISION)
        tl.store(dwp_ptr + (split * R + r)[:, None] * C_IN + ci[None, :], acc,
                 mask=(r < R)[:, None] & ci_ok[None, :])


@triton.jit
def _fold_out_dw(
    dwp_ptr,    # fp32 partials (SPLIT, R, C_IN), R = KS*KS*C_OUT
    dbp_ptr,    # fp32 db partials (SPLIT, C_OUT); if HAS_BIAS
    dw_ptr,     # out: dW (C_OUT, C_IN, KS, KS), element (co, ci, kh, kw) at co*d_co + ci*d_ci + kh*d_kh + kw*d_kw
    db_ptr,     # out: db (C_OUT,); if HAS_BIAS
    pid, SPLIT, C_IN, d_co, d_ci, d_kh, d_kw,
    C_OUT: tl.constexpr, KS: tl.constexpr, HAS_BIAS: tl.constexpr, INTERP_BF16: tl.constexpr, BLOCK: tl.constexpr,
):
    """BLOCK consecutive partial elements (r, ci) summed over the chunks in order 0..SPLIT-1; program 0
    also sums db."""
    per_split = KS * KS * C_OUT * C_IN
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < per_split
    ci = offs % C_IN
    r = offs // C_IN
    co = r % C_OUT
    t = r // C_OUT
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, SPLIT):
        acc += tl.load(dwp_ptr + s * per_split + offs, mask=ok, other=0.0)
    tl.store(dw_ptr + co * d_co + ci * d_ci + (t // KS) * d_kh + (t % KS) * d_kw,
             cast_rne(acc, dw_ptr.dtype.element_ty, INTERP_BF16), mask=ok)
    if HAS_BIAS:
        b_ok = offs < C_OUT
        b_acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in range(0, SPLIT):
            b_acc += tl.load(dbp_ptr + s * C_OUT + offs, mask=b_ok, other=0.0)
        tl.store(db_ptr + offs, cast_rne(b_acc, db_ptr.dtype.element_ty, INTERP_BF16), mask=b_ok)


# the fold's scalars are not specialised on: they follow the dW plan (its split) and dW's layout, which
# the dX plan's launch key does not hold
@triton.jit(do_not_specialize=SHAPE_ARGS + ["FIN_SPLIT", "d_co", "d_ci", "d_kh", "d_kw"])
def outconv_bwd_dx_kernel(
    gzp_ptr,    # padded gz (outconv_gz_pad_kernel)
    w_ptr,      # weight (C_OUT, C_IN, KS, KS), element (co, ci, kh, kw) at co*s_co + ci*s_ci + kh*s_kh + kw*s_kw
    dx_ptr,     # out: dL/dx, (N, C_IN, H, W) channels_last
    fin_dwp, fin_dbp, fin_dw, fin_db,   # the fold (see _fold_out_dw)
    M, H, W, C_IN, s_co, s_ci, s_kh, s_kw,
    FIN_SPLIT, d_co, d_ci, d_kh, d_kw,
    C_OUT: tl.constexpr, KS: tl.constexpr, FIN_BIAS: tl.constexpr,
    INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr, IDX64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, R_STEPS: tl.constexpr,
    FIN_BLOCK: tl.constexpr,
):
    # grid = (BLOCK_M tiles of the M pixels + fold programs (channel tile 0 only), BLOCK_N tiles of C_IN);
    # K = R = KS*KS*C_OUT, R_STEPS blocks of BLOCK_R.
    R = KS * KS * C_OUT
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m >= tl.cdiv(M, BLOCK_M):
        if pid_n == 0:
            _fold_out_dw(fin_dwp, fin_dbp, fin_dw, fin_db, pid_m - tl.cdiv(M, BLOCK_M), FIN_SPLIT, C_IN, d_co, d_ci,
                         d_kh, d_kw, C_OUT, KS, FIN_BIAS, INTERP_BF16, FIN_BLOCK)
    else:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = offs_m < M
        n_ok = offs_n < C_IN
        base = _padded_base(offs_m, H, W, C_OUT, KS, IDX64)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for step in tl.static_range(R_STEPS):
            r = step * BLOCK_R + tl.arange(0, BLOCK_R)
            # A[p, r] = gz[p + d(r), co(r)] (rows past R: any finite element, their B rows are zero);
            # B[r, ci] = W[co(r), ci, kh(r), kw(r)]
            a = cast_rne(tl.load(gzp_ptr + base[:, None] + _tap_offsets(r, W, C_OUT, KS)[None, :], mask=m_ok[:, None],
                                 other=0.0), w_ptr.dtype.element_ty, INTERP_BF16)
            t = r // C_OUT
            w_rows = (r % C_OUT) * s_co + (t // KS) * s_kh + (t % KS) * s_kw
            b = tl.load(w_ptr + w_rows[:, None] + offs_n[None, :] * s_ci, mask=(r < R)[:, None] & n_ok[None, :],
                        other=0.0)
            if INTERP_BF16:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        tl.store(dx_ptr + pixel_rows(offs_m, C_IN, IDX64)[:, None] + offs_n[None, :],
                 cast_rne(acc, dx_ptr.dtype.element_ty, INTERP_BF16), mask=m_ok[:, None] & n_ok[None, :])

"""Kernels of the fused upsampling conv: y = act(conv3x3(nearest_x2(x), W) + b), by sub-pixel phases.

Why. Output pixel (2i + a, 2j + b) of a 3x3 conv over the nearest-x2 upsampled x reads upsampled rows
2i + a - 1 .. 2i + a + 1, which are low-resolution rows i - 1, i, i (phase a = 0) or i, i, i + 1
(a = 1): only two distinct rows, and likewise two columns. So each of the four output phases
p = (a, b) is a 2x2 conv of the low-resolution x with combined weights
    Wc[p, (ty, tx)] = sum of W[kh, kw] over kh in R(a, ty), kw in R(b, tx),
    R(0, 0) = {0}, R(0, 1) = {1, 2}, R(1, 0) = {0, 1}, R(1, 1) = {2},
tap (ty, tx) reading low-resolution pixel (i + ty + a - 1, j + tx + b - 1); zero padding stays zero
padding. That is 4 x 4 = 16 taps per low-resolution pixel instead of 9 per each of its 4 output
pixels (4/9 of the FLOPs), and the upsampled tensor (4x the input) is never written or read.
The phases' taps (q = 4*(2a + b) + 2*ty + tx, 16 of them) are the kernels' tap index.

Kernels (host code: upconv.py):
  * `upconv_combine_kernel`: Wc from W, summed in fp32 and rounded once to the I/O dtype.
  * `upconv_fwd_kernel`: the four phase GEMMs (grid axis 2 = phase), epilogue bias -> act, the
    bit mask z > 0 at full resolution (as the conv kernels' mask), stored at (2i + a, 2j + b).
  * `upconv_bwd_dx_kernel`: dX[i, j] = sum over the 16 taps q of gz[pixel that read (i, j) through q]
    @ Wc[q]^T; with A_ACT, gz = g * act'(z) is made on the operand in registers and the first channel
    tile's programs write it out (all four phases of their pixels) for the dW kernel. Without A_ACT
    (gz was ready, so dW ran first) extra programs fold dW's partials (FIN), as the finalize does.
  * (conv3x3_bwd.py's `conv3x3_bwd_gz_kernel`: the other way to make gz, a pass of its own before dW
    and a dX without A_ACT; the tuner times both ways: GZ_PASS in configs.up_dx_candidates.)
  * `upconv_bwd_dw_kernel`: fp32 partials of dWc per tap q over chunks of low-resolution pixels
    (split-K, no atomics), plus a row of db partials.
  * `upconv_bwd_finalize_kernel`: sums the partials over the chunks in a fixed order and folds the 16
    combined taps back onto the 9 of W (the transpose of the combination: each (kh, kw) receives one
    tap of each phase, ty = kh >= 1 + a, tx = kw >= 1 + b), written in the weight's layout.
Launches: forward 2 (combine, conv); backward 3: dX + gz, dW, finalize; or gz pass, dW, dX + fold;
without an activation 2: dW, dX + fold.
Layouts: activations channels_last (element (n, c, h, w) at pixel*C + c); Wc (C_OUT, 16, C_IN) contiguous.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .conv3x3_bwd import dw_channels, dw_dot, dw_store, dw_zeros, fold_db, next_pixel_block
from .conv3x3_fwd import SHAPE_ARGS, act_grad, bias_act, cast_rne, pixel_rows, tap_edge


@triton.jit
def upconv_combine_kernel(
    w_ptr,      # weight (C_OUT, C_IN, 3, 3): element (co, ci, kh, kw) at co*s_co + ci*s_ci + kh*s_kh + kw*s_kw
    wc_ptr,     # out: combined weight (C_OUT, 16, C_IN) contiguous, element (co, q, ci) at (co*16 + q)*C_IN + ci
    C_IN, C_OUT, s_co, s_ci, s_kh, s_kw,
    INTERP_BF16: tl.constexpr, BLOCK: tl.constexpr,
):
    # 1-D grid: ceil(16*C_IN*C_OUT / BLOCK) programs, BLOCK consecutive elements of Wc each.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < C_OUT * 16 * C_IN
    ci = offs % C_IN
    q = (offs // C_IN) % 16
    co = offs // (16 * C_IN)
    pa = q // 8           # phase row a, phase column b, tap (ty, tx)
    pb = (q // 4) % 2
    ty = (q // 2) % 2
    tx = q % 2
    # R(a, ty) = [kh_lo, kh_hi]: {0}, {1, 2}, {0, 1}, {2} for (a, ty) = (0, 0), (0, 1), (1, 0), (1, 1)
    kh_lo = ty * (1 + pa)
    kh_hi = pa + ty * (2 - pa)
    kw_lo = tx * (1 + pb)
    kw_hi = pb + tx * (2 - pb)
    two_h = ok & (kh_hi > kh_lo)
    two_w = ok & (kw_hi > kw_lo)
    base = w_ptr + co * s_co + ci * s_ci
    acc = tl.load(base + kh_lo * s_kh + kw_lo * s_kw, mask=ok, other=0.0).to(tl.float32)
    acc += tl.load(base + kh_lo * s_kh + kw_hi * s_kw, mask=two_w, other=0.0).to(tl.float32)
    acc += tl.load(base + kh_hi * s_kh + kw_lo * s_kw, mask=two_h, other=0.0).to(tl.float32)
    acc += tl.load(base + kh_hi * s_kh + kw_hi * s_kw, mask=two_h & two_w, other=0.0).to(tl.float32)
    tl.store(wc_ptr + offs, cast_rne(acc, wc_ptr.dtype.element_ty, INTERP_BF16), mask=ok)


@triton.jit(do_not_specialize=SHAPE_ARGS)
def upconv_fwd_kernel(
    x_ptr,      # low-resolution input (N, C_IN, H, W) channels_last: element at m*C_IN + ci
    wc_ptr,     # combined weight (C_OUT, 16, C_IN) contiguous (upconv_combine_kernel)
    b_ptr,      # bias (C_OUT,); unused unless HAS_BIAS
    y_ptr,      # out: (N, C_OUT, 2H, 2W) channels_last: element at hi*C_OUT + co, hi the output pixel
    mask_ptr,   # out: (N, 2H, 2W, ceil(C_OUT/8)) uint8, bit co%8 of byte co//8 = (z > 0); if SAVE_MASK
    M, H, W, C_IN, C_OUT, slope,
    HAS_BIAS: tl.constexpr, HAS_ACT: tl.constexpr, SAVE_MASK: tl.constexpr,
    INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr, IDX64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_STEPS: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    # grid = (BLOCK_M tiles of the M low-resolution pixels, BLOCK_N tiles of C_OUT, 4 phases): one program
    # makes the outputs (2i + a, 2j + b) of its pixels (i, j) for one phase (a, b), over the full K.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    phase = tl.program_id(2)
    pa = phase // 2
    pb = phase % 2
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < C_OUT
    w_idx = offs_m % W
    row = offs_m // W            # n*H + h
    h_idx = row % H
    x_rows = x_ptr + pixel_rows(offs_m, C_IN, IDX64)
    # B[k = ci, n = co] = Wc[co, 4*phase + t, ci]
    w_cols = wc_ptr + (offs_n * 16 + 4 * phase) * C_IN
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(0, 4 * K_STEPS):
        t = step // K_STEPS                          # K_STEPS is constexpr: no runtime divide
        c0 = (step - t * K_STEPS) * BLOCK_K
        dh = t // 2 + pa - 1                         # the tap's low-resolution offset, in {-1, 0, +1}
        dw = t % 2 + pb - 1
        pix_ok = m_ok & (h_idx != tap_edge(dh, H)) & (w_idx != tap_edge(dw, W))
        ck = c0 + offs_k
        shift = (dh * W + dw) * C_IN                 # same image: never crosses n when pix_ok
        if EVEN_K:
            a = tl.load(x_rows[:, None] + (shift + ck)[None, :], mask=pix_ok[:, None], other=0.0)
            b = tl.load(w_cols[None, :] + (t * C_IN + ck)[:, None], mask=n_ok[None, :], other=0.0)
        else:
            k_ok = ck < C_IN
            a = tl.load(x_rows[:, None] + (shift + ck)[None, :], mask=pix_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_cols[None, :] + (t * C_IN + ck)[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if INTERP_BF16:  # the interpreter's bf16 tl.dot returns garbage: dot in fp32 there
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    # Epilogue in fp32, the reference's order: bias -> act -> cast; stored at output pixel (2h + a, 2w + b).
    hi = (2 * row + pa) * (2 * W) + 2 * w_idx + pb
    out_ok = m_ok[:, None] & n_ok[None, :]
    acc = bias_act(acc, b_ptr, mask_ptr, hi, m_ok, offs_n, n_ok, pid_n, C_OUT, slope, HAS_BIAS, HAS_ACT, SAVE_MASK,
                   IDX64, BLOCK_M, BLOCK_N)
    tl.store(y_ptr + pixel_rows(hi, C_OUT, IDX64)[:, None] + offs_n[None, :],
             cast_rne(acc, y_ptr.dtype.element_ty, INTERP_BF16), mask=out_ok)


@triton.jit
def _up_dx_tile(
    g_ptr, mask_ptr, gz_ptr, wc_ptr, dx_ptr, pid_m, pid_n, M, H, W, C_IN, C_OUT, slope,
    A_ACT: tl.constexpr, INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr, IDX64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_STEPS: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """One BLOCK_M x BLOCK_N tile of dX (arguments as upconv_bwd_dx_kernel's)."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < C_IN
    w_idx = offs_m % W
    row = offs_m // W
    h_idx = row % H
    hi0 = 4 * row * W + 2 * w_idx                    # output pixel (2h, 2w): phase (0, 0) of this pixel
    g_rows = g_ptr + pixel_rows(hi0, C_OUT, IDX64)
    w_cols = wc_ptr + offs_n                         # B[k = co, n = ci] = Wc[co, q, ci]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(0, 16 * K_STEPS):
        q = step // K_STEPS
        c0 = (step - q * K_STEPS) * BLOCK_K
        pa = q // 8
        pb = (q // 4) % 2
        dh = (q // 2) % 2 + pa - 1
        dw = q % 2 + pb - 1
        # pixel (h, w) was read through tap q by low-resolution pixel (h - dh, w - dw), phase (pa, pb):
        # output pixel (2(h - dh) + pa, 2(w - dw) + pb) = hi0 + rel
        pix_ok = m_ok & (h_idx != tap_edge(-dh, H)) & (w_idx != tap_edge(-dw, W))
        rel = (pa - 2 * dh) * (2 * W) + pb - 2 * dw
        ck = c0 + offs_k
        k_ok = ck < C_OUT
        if EVEN_K:
            a = tl.load(g_rows[:, None] + (rel * C_OUT + ck)[None, :], mask=pix_ok[:, None], other=0.0)
            b = tl.load(w_cols[None, :] + (ck * 16 + q)[:, None] * C_IN, mask=n_ok[None, :], other=0.0)
        else:
            a = tl.load(g_rows[:, None] + (rel * C_OUT + ck)[None, :], mask=pix_ok[:, None] & k_ok[None, :],
                        other=0.0)
            b = tl.load(w_cols[None, :] + (ck * 16 + q)[:, None] * C_IN, mask=k_ok[:, None] & n_ok[None, :],
                        other=0.0)
        if A_ACT:  # gz in registers (wgmma reads A from registers: no serialised pipeline), rounded as written
            a = cast_rne(act_grad(a.to(tl.float32), mask_ptr, hi0 + rel, pix_ok, ck, k_ok, C_OUT, slope, IDX64),
                         g_ptr.dtype.element_ty, INTERP_BF16)
        if INTERP_BF16:  # the interpreter's bf16 tl.dot returns garbage: dot in fp32 there
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if A_ACT:  # gz of this tile's four output pixels per low-resolution pixel, once (first channel tile)
        if pid_n == 0:
            for p in tl.static_range(4):
                hi = hi0 + (p // 2) * (2 * W) + p % 2
                rows = pixel_rows(hi, C_OUT, IDX64)
                for kk in tl.static_range(K_STEPS):
                    ck = kk * BLOCK_K + tl.arange(0, BLOCK_K)
                    ok = m_ok[:, None] & (ck < C_OUT)[None, :]
                    gz = tl.load(g_ptr + rows[:, None] + ck[None, :], mask=ok, other=0.0).to(tl.float32)
                    gz = act_grad(gz, mask_ptr, hi, m_ok, ck, ck < C_OUT, C_OUT, slope, IDX64)
                    tl.store(gz_ptr + rows[:, None] + ck[None, :], cast_rne(gz, gz_ptr.dtype.element_ty, INTERP_BF16),
                             mask=ok)
    tl.store(dx_ptr + pixel_rows(offs_m, C_IN, IDX64)[:, None] + offs_n[None, :],
             cast_rne(acc, dx_ptr.dtype.element_ty, INTERP_BF16), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _fold_dw(
    dwp_ptr,    # fp32 dWc partials (SPLIT, 16, C_IN, C_OUT) contiguous
    dbp_ptr,    # fp32 db partials (SPLIT, C_OUT); if HAS_BIAS
    dw_ptr,     # out: dW (C_OUT, C_IN, 3, 3), element (co, ci, tap = 3*kh + kw) at co*d_co + ci*d_ci + tap*d_tap
    db_ptr,     # out: db (C_OUT,); if HAS_BIAS
    pid, SPLIT, C_IN, C_OUT, d_co, d_ci, d_tap,
    HAS_BIAS: tl.constexpr, INTERP_BF16: tl.constexpr, BLOCK: tl.constexpr,
):
    """BLOCK of dW's elements (tap, ci, co): the partials summed over the chunks in a fixed order and
    folded from the 16 phase taps onto the 9; program 0 also sums db."""
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    per_q = C_IN * C_OUT
    ok = offs < 9 * per_q
    co = offs % C_OUT
    ci = (offs // C_OUT) % C_IN
    tap = offs // per_q
    kh = tap // 3
    kw = tap % 3
    inner = ci * C_OUT + co
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, SPLIT):   # fixed order: chunks, then phases (a, b): deterministic
        for pa in tl.static_range(2):
            ty = (kh >= 1 + pa).to(tl.int32)
            for pb in tl.static_range(2):
                tx = (kw >= 1 + pb).to(tl.int32)
                q = 4 * (2 * pa + pb) + 2 * ty + tx
                acc += tl.load(dwp_ptr + (s * 16 + q) * per_q + inner, mask=ok, other=0.0)
    tl.store(dw_ptr + co * d_co + ci * d_ci + tap * d_tap, cast_rne(acc, dw_ptr.dtype.element_ty, INTERP_BF16),
             mask=ok)
    if HAS_BIAS:
        fold_db(dbp_ptr, db_ptr, offs, SPLIT, C_OUT, C_OUT, 1.0, INTERP_BF16, BLOCK)


# the fold's scalars too: a tuner's timing run passes zeros there (no fold programs) and must compile the
# variant the real launch runs
@triton.jit(do_not_specialize=SHAPE_ARGS + ["FIN_SPLIT", "d_co", "d_ci", "d_tap"])
def upconv_bwd_dx_kernel(
    g_ptr,      # upstream gradient (N, C_OUT, 2H, 2W) channels_last: raw g with A_ACT, else gz itself
    mask_ptr,   # the forward's (N, 2H, 2W, ceil(C_OUT/8)) bit mask; if A_ACT
    gz_ptr,     # out: gz = g * act'(z), (N, C_OUT, 2H, 2W) channels_last; if A_ACT
    wc_ptr,     # combined weight (C_OUT, 16, C_IN) contiguous
    dx_ptr,     # out: dL/dx, (N, C_IN, H, W) channels_last
    fin_dwp, fin_dbp, fin_dw, fin_db,   # the fold of this conv's dW partials (see _fold_dw); if FIN
    M, H, W, C_IN, C_OUT, slope,
    FIN_SPLIT, d_co, d_ci, d_tap,       # the fold's chunks and dW's strides; if FIN
    A_ACT: tl.constexpr, INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr, IDX64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_STEPS: tl.constexpr,
    EVEN_K: tl.constexpr,
    FIN: tl.constexpr,        # gz was ready before dX (no activation, or the gz pass), so dW ran first:
    FIN_BIAS: tl.constexpr,   # extra programs fold its partials here (one launch less)
    FIN_BLOCK: tl.constexpr,
):
    # grid = (BLOCK_M tiles of the M low-resolution pixels (+ with FIN: fold programs, channel tile 0 only),
    # BLOCK_N tiles of C_IN); K = 16 taps x C_OUT.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m >= tl.cdiv(M, BLOCK_M):
        if FIN:
            if pid_n == 0:
                _fold_dw(fin_dwp, fin_dbp, fin_dw, fin_db, pid_m - tl.cdiv(M, BLOCK_M), FIN_SPLIT, C_IN, C_OUT, d_co,
                         d_ci, d_tap, FIN_BIAS, INTERP_BF16, FIN_BLOCK)
    else:
        _up_dx_tile(g_ptr, mask_ptr, gz_ptr, wc_ptr, dx_ptr, pid_m, pid_n, M, H, W, C_IN, C_OUT, slope, A_ACT,
                    INTERP_BF16, PRECISION, IDX64, BLOCK_M, BLOCK_N, BLOCK_K, K_STEPS, EVEN_K)


@triton.jit
def _up_tap_dot(acc, x_ptr, pix, src_rows_ok, gz, h_idx, w_idx, dh, dw, H, W, C_IN, ci, ci_ld,
                INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr, IDX64: tl.constexpr, BLOCK_CO: tl.constexpr):
    """acc += x[m + (dh, dw)]^T gz over one pixel block (zero where the shift leaves the image)."""
    src_ok = src_rows_ok & (h_idx != tap_edge(dh, H)) & (w_idx != tap_edge(dw, W))
    xs = tl.load(x_ptr + pixel_rows(pix, C_IN, IDX64)[:, None] + ((dh * W + dw) * C_IN + ci)[None, :],
                 mask=src_ok[:, None] & ci_ld[None, :], other=0.0)
    return dw_dot(acc, xs, gz, INTERP_BF16, PRECISION, BLOCK_CO)


@triton.jit
def _phase_walk(p_start, pa, pb, H, W, BLOCK_P: tl.constexpr):
    """The dW pixel walk over low-resolution pixels from p_start, for output phase (pa, pb): (offs_p, w, h,
    hi, step_cols, step_h, step_hi), hi the output pixel (2h + a, 2w + b), n included. Per block w and h
    move by adds (next_pixel_block) and hi = 4W*row + 2w + const by 4W*step_rows + 2*step_cols, 2W more
    where w carries."""
    offs_p = tl.arange(0, BLOCK_P)
    w_idx = (p_start + offs_p) % W
    row = (p_start + offs_p) // W
    h_idx = row % H
    hi = (2 * row + pa) * (2 * W) + 2 * w_idx + pb
    step_cols = BLOCK_P % W
    step_rows = BLOCK_P // W
    return offs_p, w_idx, h_idx, hi, step_cols, step_rows % H, 4 * W * step_rows + 2 * step_cols


@triton.jit
def _up_dw_tile(
    x_ptr, g_ptr, dw_ptr, pid_tile, q, split, M, H, W, C_IN, C_OUT, CHUNK,
    INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr, IDX64: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_P: tl.constexpr,
    EVEN_C: tl.constexpr, EVEN_CO: tl.constexpr, FULL_P: tl.constexpr,
):
    """dWc tile of tap q over one chunk of low-resolution pixels m: sum_m x[m + shift(q)]^T gz[output
    pixel of m in q's phase]. As conv3x3_bwd._dw_tile: the wider of the two channel tiles is the MMA's
    M side, and (h, w) and the output pixel of the pixel block are advanced with adds, not divides."""
    ci, co = dw_channels(pid_tile, C_IN, C_OUT, BLOCK_C, BLOCK_CO)
    ci_ok = ci < C_IN
    co_ok = co < C_OUT
    ci_ld = ci_ok | EVEN_C
    co_ld = co_ok | EVEN_CO
    pa = q // 8
    pb = (q // 4) % 2
    dh = (q // 2) % 2 + pa - 1
    dw = q % 2 + pb - 1
    shift = (dh * W + dw) * C_IN
    h_edge = tap_edge(dh, H)
    w_edge = tap_edge(dw, W)
    acc = dw_zeros(BLOCK_C, BLOCK_CO)
    p_start = split * CHUNK
    p_end = tl.minimum(p_start + CHUNK, M)
    offs_p, w_idx, h_idx, hi, step_cols, step_h, step_hi = _phase_walk(p_start, pa, pb, H, W, BLOCK_P)
    for p0 in range(p_start, p_end, BLOCK_P):
        pix = p0 + offs_p
        p_ok = (pix < p_end) | FULL_P
        gz = tl.load(g_ptr + pixel_rows(hi, C_OUT, IDX64)[:, None] + co[None, :], mask=p_ok[:, None] & co_ld[None, :],
                     other=0.0)
        src_ok = p_ok & (h_idx != h_edge) & (w_idx != w_edge)
        xs = tl.load(x_ptr + pixel_rows(pix, C_IN, IDX64)[:, None] + (shift + ci)[None, :],
                     mask=src_ok[:, None] & ci_ld[None, :], other=0.0)
        acc = dw_dot(acc, xs, gz, INTERP_BF16, PRECISION, BLOCK_CO)
        w_idx, h_idx, carry = next_pixel_block(w_idx, h_idx, step_cols, step_h, H, W)
        hi += tl.where(carry, step_hi + 2 * W, step_hi)
    # partials (SPLIT, 16, C_IN, C_OUT): element (ci, co) at ci*C_OUT + co
    dw_store(dw_ptr, (split * 16 + q) * C_IN + ci, ci_ok, co, co_ok, acc, C_OUT, BLOCK_CO)


@triton.jit
def _up_dw_phase(
    x_ptr, g_ptr, dw_ptr, pid_tile, ph, split, M, H, W, C_IN, C_OUT, CHUNK,
    INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr, IDX64: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_P: tl.constexpr,
    EVEN_C: tl.constexpr, EVEN_CO: tl.constexpr, FULL_P: tl.constexpr,
):
    """The dWc tiles of the four taps of output phase ph = (a, b) over one chunk, as _up_dw_tile makes
    each: tap q = 4ph + 2i + j reads x shifted by (a - 1 + i, b - 1 + j), and all four use the one gz
    tile of the phase's output pixels per block (gz is read once per phase instead of once per tap)."""
    ci, co = dw_channels(pid_tile, C_IN, C_OUT, BLOCK_C, BLOCK_CO)
    ci_ok = ci < C_IN
    co_ok = co < C_OUT
    ci_ld = ci_ok | EVEN_C
    co_ld = co_ok | EVEN_CO
    pa = ph // 2
    pb = ph % 2
    acc0 = dw_zeros(BLOCK_C, BLOCK_CO)
    acc1 = dw_zeros(BLOCK_C, BLOCK_CO)
    acc2 = dw_zeros(BLOCK_C, BLOCK_CO)
    acc3 = dw_zeros(BLOCK_C, BLOCK_CO)
    p_start = split * CHUNK
    p_end = tl.minimum(p_start + CHUNK, M)
    offs_p, w_idx, h_idx, hi, step_cols, step_h, step_hi = _phase_walk(p_start, pa, pb, H, W, BLOCK_P)
    for p0 in range(p_start, p_end, BLOCK_P):
        pix = p0 + offs_p
        p_ok = (pix < p_end) | FULL_P
        gz = tl.load(g_ptr + pixel_rows(hi, C_OUT, IDX64)[:, None] + co[None, :], mask=p_ok[:, None] & co_ld[None, :],
                     other=0.0)
        acc0 = _up_tap_dot(acc0, x_ptr, pix, p_ok, gz, h_idx, w_idx, pa - 1, pb - 1, H, W, C_IN, ci, ci_ld,
                           INTERP_BF16, PRECISION, IDX64, BLOCK_CO)
        acc1 = _up_tap_dot(acc1, x_ptr, pix, p_ok, gz, h_idx, w_idx, pa - 1, pb, H, W, C_IN, ci, ci_ld,
                           INTERP_BF16, PRECISION, IDX64, BLOCK_CO)
        acc2 = _up_tap_dot(acc2, x_ptr, pix, p_ok, gz, h_idx, w_idx, pa, pb - 1, H, W, C_IN, ci, ci_ld,
                           INTERP_BF16, PRECISION, IDX64, BLOCK_CO)
        acc3 = _up_tap_dot(acc3, x_ptr, pix, p_ok, gz, h_idx, w_idx, pa, pb, H, W, C_IN, ci, ci_ld,
                           INTERP_BF16, PRECISION, IDX64, BLOCK_CO)
        w_idx, h_idx, carry = next_pixel_block(w_idx, h_idx, step_cols, step_h, H, W)
        hi += tl.where(carry, step_hi + 2 * W, step_hi)
    q0 = (split * 16 + 4 * ph) * C_IN + ci  # partials (SPLIT, 16, C_IN, C_OUT): tap q's rows at q*C_IN
    dw_store(dw_ptr, q0, ci_ok, co, co_ok, acc0, C_OUT, BLOCK_CO)
    dw_store(dw_ptr, q0 + C_IN, ci_ok, co, co_ok, acc1, C_OUT, BLOCK_CO)
    dw_store(dw_ptr, q0 + 2 * C_IN, ci_ok, co, co_ok, acc2, C_OUT, BLOCK_CO)
    dw_store(dw_ptr, q0 + 3 * C_IN, ci_ok, co, co_ok, acc3, C_OUT, BLOCK_CO)


@triton.jit(do_not_specialize=SHAPE_ARGS)
def upconv_bwd_dw_kernel(
    x_ptr,      # low-resolution input (N, C_IN, H, W) channels_last
    g_ptr,      # gz = dL/dz, (N, C_OUT, 2H, 2W) channels_last
    dw_ptr,     # out: fp32 dWc partials, (SPLIT, 16, C_IN, C_OUT) contiguous
    db_ptr,     # out: fp32 db partials, (SPLIT, C_OUT) contiguous; if DO_BIAS
    M, H, W, C_IN, C_OUT, CHUNK,
    DO_BIAS: tl.constexpr,
    FULL_P: tl.constexpr,   # M is a multiple of 128 (so of BLOCK_P and of every chunk): no pixel-row mask
    INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr, IDX64: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_P: tl.constexpr,
    EVEN_C: tl.constexpr, EVEN_CO: tl.constexpr,
    PHASES: tl.constexpr,   # one program per output phase and its 4 taps (_up_dw_phase), not per tap
):
    # grid = (C_IN tiles x C_OUT tiles, 16 taps or with PHASES 4 phases (+ 1 with DO_BIAS), SPLIT chunks of
    # low-resolution pixels). Programs with the last axis-1 index make the db partials of C_OUT tile
    # axis-0 (all four phases).
    pid_tile = tl.program_id(0)
    q = tl.program_id(1)
    split = tl.program_id(2)
    if q == (4 if PHASES else 16):
        if DO_BIAS:
            if pid_tile < tl.cdiv(C_OUT, BLOCK_CO):
                co = pid_tile * BLOCK_CO + tl.arange(0, BLOCK_CO)
                co_ok = co < C_OUT
                db_acc = tl.zeros((BLOCK_CO,), dtype=tl.float32)
                p_start = split * CHUNK
                p_end = tl.minimum(p_start + CHUNK, M)
                for p0 in range(p_start, p_end, BLOCK_P):
                    pix = p0 + tl.arange(0, BLOCK_P)
                    ok = (pix < p_end)[:, None] & co_ok[None, :]
                    hi0 = 4 * (pix // W) * W + 2 * (pix % W)
                    for p in tl.static_range(4):
                        hi = hi0 + (p // 2) * (2 * W) + p % 2
                        db_acc += tl.sum(tl.load(g_ptr + pixel_rows(hi, C_OUT, IDX64)[:, None] + co[None, :], mask=ok,
                                                 other=0.0).to(tl.float32), axis=0)
                tl.store(db_ptr + split * C_OUT + co, db_acc, mask=co_ok)
    elif PHASES:
        _up_dw_phase(x_ptr, g_ptr, dw_ptr, pid_tile, q, split, M, H, W, C_IN, C_OUT, CHUNK, INTERP_BF16, PRECISION,
                     IDX64, BLOCK_C, BLOCK_CO, BLOCK_P, EVEN_C, EVEN_CO, FULL_P)
    else:
        _up_dw_tile(x_ptr, g_ptr, dw_ptr, pid_tile, q, split, M, H, W, C_IN, C_OUT, CHUNK, INTERP_BF16, PRECISION,
                    IDX64, BLOCK_C, BLOCK_CO, BLOCK_P, EVEN_C, EVEN_CO, FULL_P)


@triton.jit
def upconv_bwd_finalize_kernel(
    dwp_ptr, dbp_ptr, dw_ptr, db_ptr,   # as _fold_dw's
    SPLIT, C_IN, C_OUT, d_co, d_ci, d_tap,
    HAS_BIAS: tl.constexpr, INTERP_BF16: tl.constexpr, BLOCK: tl.constexpr,
):
    # 1-D grid: ceil(9*C_IN*C_OUT / BLOCK) programs over dW's elements (tap, ci, co); the first also sums db.
    # The fold on its own: when dX made gz (A_ACT), dW ran after dX and its partials are summed here.
    _fold_dw(dwp_ptr, dbp_ptr, dw_ptr, db_ptr, tl.program_id(0), SPLIT, C_IN, C_OUT, d_co, d_ci, d_tap, HAS_BIAS,
             INTERP_BF16, BLOCK)

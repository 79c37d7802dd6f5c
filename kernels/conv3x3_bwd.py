"""Backward kernels of the fused 3x3 convolution (forward: conv3x3_fwd.py; host code: conv3x3.py).

Maths. With z = conv3x3(x, W) + b the pre-activation, a = act(z), and
    y = r2 + s2*(r1 + s1*a)            (r1/s1 and r2/s2 optional; absent means r = 0, s = 1)
the upstream gradient g = dL/dy gives
    dL/dr2 = g,   dL/dr1 = s2*g,   dL/da = scale*g  with scale = s1*s2 (only the present ones),
    dL/dz  = scale * gz,  gz = g * (1 if z > 0 else slope)      (gz = g without activation)
    db[co]            = scale * sum_{n,h,w} gz[n,h,w,co]
    dW[co,ci,kh,kw]   = scale * sum_{n,h,w} gz[n,h,w,co] * x[n, h+kh-1, w+kw-1, ci]
    dX[n,h,w,ci]      = scale * sum_{co,kh,kw} gz[n, h-kh+1, w-kw+1, co] * W[co,ci,kh,kw]

Three kernels. Only dX touches the forward's mask; the dW loop reads gz ready-made (a mask applied
to a dW operand in registers makes ptxas serialise every wgmma: C7515, a 0-pending wait per wgmma).
  * `conv3x3_bwd_dx_kernel`: dX as a 3x3 conv of gz with the flipped, transposed weights (an implicit
    GEMM over one or two gradient sources, so an IDB's x gets conv2's and conv1's share in one pass),
    written to one or two outputs split on channels, optionally times the LeakyReLU derivative of an
    earlier conv (OUT_ACT: the IDB's gz1). With A_ACT source A is the raw upstream gradient g and the
    activation derivative is applied to the operand on the fly (A in registers keeps wgmma
    asynchronous); with WRITE_GZA the programs of the first channel tile also write gz = g*act'(z) of
    their pixels, for the dW kernel. For a fused RIDB (ridb.py) the epilogue can also add the result
    into a running sum of the RIDB input's gradient (ADD_SUM) and skip the output (STORE_OUT=False):
    the result there is dL/dx of an IDB's input, which also reaches x0. Its grid has extra programs
    that sum the dW/db partials of up to two convs in a fixed order (deterministic, no atomics) into
    the weight's own layout and dtype.
  * `conv3x3_bwd_dw_kernel`: dW partials over pixel chunks (split-K, fp32 workspace) from gz and the
    conv's inputs; grid axis 1 is the 9 taps plus, with a bias, one more row of programs that make the
    db partials. Optionally a second conv's dW on the same pixel chunks in the same launch (job B: the
    IDB's dW1 beside its dW2).
  * `conv3x3_bwd_finalize_kernel`: the dW/db reduction alone (a single conv with an activation, whose
    dX launch comes first).
  * `conv3x3_bwd_gz_kernel`: gz = g * act'(z) in a pass of its own (one read of g, one write of gz), so
    that the dX after it reads gz ready instead of masking its operand at every tap.
Launch order (host code: conv3x3.py): a conv without activation: dW -> dX + finalize (2); with one:
dX + gz -> dW -> finalize (3); the IDB: [gz2 pass ->] gz1 (+ gz2 when no pass) -> dW2 and dW1 -> dx +
finalize both (4, or 3 when the first dX makes gz2: the tuner times both ways per shape); in a fused
RIDB each IDB's gz2 comes from the launch before (OUT_ACT), so its gz1 launch is a plain dX (3).

What the forward saved: the inputs and W and, when there is an activation, a bit-packed mask z > 0
(1 bit per output element). It makes the LeakyReLU derivative exact; recovering sign(z) from y would
need (y - r2)/s2 - r1, which rounding can flip near 0.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .conv3x3_fwd import SHAPE_ARGS, accumulate_taps, act_grad, cast_rne, pixel_rows, tap_edge


@triton.jit
def dw_channels(pid_tile, C_I, C_OUT, BLOCK_C: tl.constexpr, BLOCK_CO: tl.constexpr):
    """(ci, co): the input- and output-channel blocks of dW tile pid_tile (C_OUT tiles fastest)."""
    n_co_tiles = tl.cdiv(C_OUT, BLOCK_CO)
    pid_c = pid_tile // n_co_tiles
    pid_co = pid_tile - pid_c * n_co_tiles
    return pid_c * BLOCK_C + tl.arange(0, BLOCK_C), pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)


@triton.jit
def dw_zeros(BLOCK_C: tl.constexpr, BLOCK_CO: tl.constexpr):
    """The dW tile's fp32 accumulator. The wider of the two channel blocks is the MMA's M side (wgmma
    needs M >= 64): (BLOCK_CO, BLOCK_C) for dW^T = gz^T @ x when BLOCK_CO >= 64, else (BLOCK_C, BLOCK_CO)."""
    if BLOCK_CO >= 64:
        acc = tl.zeros((BLOCK_CO, BLOCK_C), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_C, BLOCK_CO), dtype=tl.float32)
    return acc


@triton.jit
def dw_dot(acc, xs, gz, INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr, BLOCK_CO: tl.constexpr):
    """acc += one pixel block's x^T gz (BLOCK_P pixels: xs (BLOCK_P, BLOCK_C), gz (BLOCK_P, BLOCK_CO)),
    in dw_zeros' orientation."""
    if INTERP_BF16:  # the interpreter's bf16 tl.dot returns garbage: dot in fp32 there
        xs = xs.to(tl.float32)
        gz = gz.to(tl.float32)
    if BLOCK_CO >= 64:
        acc = tl.dot(tl.trans(gz), xs, acc, input_precision=PRECISION)
    else:
        acc = tl.dot(tl.trans(xs), gz, acc, input_precision=PRECISION)
    return acc


@triton.jit
def dw_store(dw_ptr, rows, ci_ok, co, co_ok, acc, C_OUT, BLOCK_CO: tl.constexpr):
    """Store the tile into fp32 partials whose row `rows` (one per input channel) holds C_OUT elements."""
    if BLOCK_CO >= 64:
        tl.store(dw_ptr + rows.to(tl.int64)[None, :] * C_OUT + co[:, None], acc, mask=co_ok[:, None] & ci_ok[None, :])
    else:
        tl.store(dw_ptr + rows.to(tl.int64)[:, None] * C_OUT + co[None, :], acc, mask=ci_ok[:, None] & co_ok[None, :])


@triton.jit
def next_pixel_block(w_idx, h_idx, step_cols, step_h, H, W):
    """(w, h, carry) of the pixels one block further on, by adds instead of divides: w moves by
    step_cols < W (one carry at most, then w < 2W), h by step_h < H plus the carry (one wrap at most)."""
    w_idx += step_cols
    carry = w_idx >= W
    w_idx = tl.where(carry, w_idx - W, w_idx)
    h_idx += step_h + carry.to(tl.int32)
    h_idx = tl.where(h_idx >= H, h_idx - H, h_idx)
    return w_idx, h_idx, carry


@triton.jit
def _dw_tile(
    x_ptr, C_I, c_base, g_ptr, dw_ptr,
    pid_tile, tap, split, M, H, W, C_IN_TOTAL, C_OUT, CHUNK,
    INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr, IDX64: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_P: tl.constexpr,
    EVEN_C: tl.constexpr, EVEN_CO: tl.constexpr, FULL_P: tl.constexpr,
):
    """dW tile of one tap over one pixel chunk (g_ptr holds gz: both operands come straight from
    memory, so Triton pipelines them through shared memory). The wider of C_OUT/C_I tiles is the
    MMA's M side (wgmma needs M >= 64): dW^T = gz^T @ x when BLOCK_CO >= 64, else dW = x^T @ gz."""
    ci, co = dw_channels(pid_tile, C_I, C_OUT, BLOCK_C, BLOCK_CO)
    ci_ok = ci < C_I
    co_ok = co < C_OUT
    # with EVEN_* the channel masks are all true: left out of the loop's loads (per-row masks only)
    ci_ld = ci_ok | EVEN_C
    co_ld = co_ok | EVEN_CO
    dh = tap // 3 - 1
    dw = tap % 3 - 1
    shift = (dh * W + dw) * C_I
    h_edge = tap_edge(dh, H)  # the tap reads pixel (h + dh, w + dw): outside the image iff h or w is its edge
    w_edge = tap_edge(dw, W)
    acc = dw_zeros(BLOCK_C, BLOCK_CO)
    p_start = split * CHUNK
    p_end = tl.minimum(p_start + CHUNK, M)
    # (h, w) of the block's pixels, divided out once here and then advanced by BLOCK_P = rows*W + cols
    # pixels per step with adds and compares: a divide by the runtime W and H in the loop was most
    # of its instructions (integer index work outnumbered the wgmma 60:1).
    offs_p = tl.arange(0, BLOCK_P)
    w_idx = (p_start + offs_p) % W
    h_idx = ((p_start + offs_p) // W) % H
    step_cols = BLOCK_P % W
    step_rows = (BLOCK_P // W) % H
    for p0 in range(p_start, p_end, BLOCK_P):
        pix = p0 + offs_p
        p_ok = (pix < p_end) | FULL_P  # FULL_P: M is a multiple of BLOCK_P, so is every chunk
        gz = tl.load(g_ptr + pixel_rows(pix, C_OUT, IDX64)[:, None] + co[None, :], mask=p_ok[:, None] & co_ld[None, :],
                     other=0.0)
        src_ok = p_ok & (h_idx != h_edge) & (w_idx != w_edge)
        xs = tl.load(x_ptr + pixel_rows(pix, C_I, IDX64)[:, None] + (shift + ci)[None, :],
                     mask=src_ok[:, None] & ci_ld[None, :], other=0.0)
        acc = dw_dot(acc, xs, gz, INTERP_BF16, PRECISION, BLOCK_CO)
        w_idx, h_idx, carry = next_pixel_block(w_idx, h_idx, step_cols, step_rows, H, W)
    # partials (SPLIT, 9, C_IN_TOTAL, C_OUT): element (ci, co) at ci*C_OUT + co
    dw_store(dw_ptr, (split * 9 + tap) * C_IN_TOTAL + c_base + ci, ci_ok, co, co_ok, acc, C_OUT, BLOCK_CO)


@triton.jit
def _db_program(g_ptr, db_ptr, pid_co, split, M, C_OUT, CHUNK, IDX64: tl.constexpr, BLOCK_CO: tl.constexpr,
                BLOCK_P: tl.constexpr):
    """db partial: the sum of gz over one chunk of pixels, for one C_OUT tile."""
    co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_ok = co < C_OUT
    db_acc = tl.zeros((BLOCK_CO,), dtype=tl.float32)
    p_start = split * CHUNK
    p_end = tl.minimum(p_start + CHUNK, M)
    for p0 in range(p_start, p_end, BLOCK_P):
        pix = p0 + tl.arange(0, BLOCK_P)
        ok = (pix < p_end)[:, None] & co_ok[None, :]
        db_acc += tl.sum(tl.load(g_ptr + pixel_rows(pix, C_OUT, IDX64)[:, None] + co[None, :], mask=ok,
                                 other=0.0).to(tl.float32), axis=0)
    tl.store(db_ptr + split * C_OUT + co, db_acc, mask=co_ok)


@triton.jit(do_not_specialize=SHAPE_ARGS)
def conv3x3_bwd_dw_kernel(
    x1_ptr,     # first input, (N, C1, H, W) channels_last
    x2_ptr,     # second input, (N, C2, H, W) channels_last; any valid pointer when C2 == 0
    g_ptr,      # gz = dL/dz / scale (activation derivative already applied), (N, C_OUT, H, W) channels_last
    dw_ptr,     # out: fp32 dW partials, (SPLIT, 9, C1 + C2, C_OUT) contiguous, unscaled
    db_ptr,     # out: fp32 db partials, (SPLIT, C_OUT) contiguous, unscaled; if DO_BIAS
    xb_ptr,     # job B (HAS_B), a second conv of the same pixels: its one input, (N, CB, H, W) channels_last
    gb_ptr,     # job B's gz, (N, CB_OUT, H, W) channels_last
    dwb_ptr,    # out: job B's fp32 dW partials, (SPLIT, 9, CB, CB_OUT) contiguous, unscaled
    dbb_ptr,    # out: job B's fp32 db partials, (SPLIT, CB_OUT) contiguous, unscaled; if DO_BIAS
    M, H, W, C1, C2, C_OUT, CB, CB_OUT, CHUNK,
    DO_BIAS: tl.constexpr,
    FULL_P: tl.constexpr,   # M is a multiple of 128 (so of BLOCK_P and of every chunk): no pixel-row mask
    INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr, IDX64: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_P: tl.constexpr,
    EVEN_C1: tl.constexpr, EVEN_C2: tl.constexpr, EVEN_CO: tl.constexpr,   # C1, C2, C_OUT tiled exactly
    HAS_B: tl.constexpr, BLOCK_CO_B: tl.constexpr,
    EVEN_CB: tl.constexpr, EVEN_COB: tl.constexpr,                          # CB, CB_OUT tiled exactly
):
    # grid = (job A's programs: max(C tiles of x1 and x2 times C_OUT tiles, C_OUT tiles), then job B's:
    # max(CB tiles times CB_OUT tiles, CB_OUT tiles); 9 taps (+ 1 with DO_BIAS); SPLIT pixel chunks, the
    # same chunks for both jobs). Programs with axis-1 index 9 make the db partials of a C_OUT tile.
    # Job B is the IDB's dW1 next to its dW2 (both wait on the same launch before them), one launch for both.
    pid_tile = tl.program_id(0)
    tap = tl.program_id(1)
    split = tl.program_id(2)
    n_co_tiles = tl.cdiv(C_OUT, BLOCK_CO)
    tiles1 = tl.cdiv(C1, BLOCK_C) * n_co_tiles
    tiles2 = tl.cdiv(C2, BLOCK_C) * n_co_tiles
    progs_a = tl.maximum(tiles1 + tiles2, n_co_tiles)
    if pid_tile < progs_a:
        if tap == 9:
            if DO_BIAS:
                if pid_tile < n_co_tiles:
                    _db_program(g_ptr, db_ptr, pid_tile, split, M, C_OUT, CHUNK, IDX64, BLOCK_CO, BLOCK_P)
        elif pid_tile < tiles1:
            _dw_tile(x1_ptr, C1, 0, g_ptr, dw_ptr, pid_tile, tap, split, M, H, W, C1 + C2, C_OUT, CHUNK,
                     INTERP_BF16, PRECISION, IDX64, BLOCK_C, BLOCK_CO, BLOCK_P, EVEN_C1, EVEN_CO, FULL_P)
        elif pid_tile < tiles1 + tiles2:
            _dw_tile(x2_ptr, C2, C1, g_ptr, dw_ptr, pid_tile - tiles1, tap, split, M, H, W, C1 + C2, C_OUT, CHUNK,
                     INTERP_BF16, PRECISION, IDX64, BLOCK_C, BLOCK_CO, BLOCK_P, EVEN_C2, EVEN_CO, FULL_P)
    elif HAS_B:
        pid_b = pid_tile - progs_a
        nb_co_tiles = tl.cdiv(CB_OUT, BLOCK_CO_B)
        if tap == 9:
            if DO_BIAS:
                if pid_b < nb_co_tiles:
                    _db_program(gb_ptr, dbb_ptr, pid_b, split, M, CB_OUT, CHUNK, IDX64, BLOCK_CO_B, BLOCK_P)
        elif pid_b < tl.cdiv(CB, BLOCK_C) * nb_co_tiles:
            _dw_tile(xb_ptr, CB, 0, gb_ptr, dwb_ptr, pid_b, tap, split, M, H, W, CB, CB_OUT, CHUNK,
                     INTERP_BF16, PRECISION, IDX64, BLOCK_C, BLOCK_CO_B, BLOCK_P, EVEN_CB, EVEN_COB, FULL_P)


@triton.jit
def fold_db(dbp_ptr, db_ptr, offs, SPLIT, C_OUT, row, scale, INTERP_BF16: tl.constexpr, BLOCK: tl.constexpr):
    """db[co] = scale * the sum over the chunks, in order 0..SPLIT-1, of the fp32 partials dbp[s*row + co],
    for the lanes co of offs below C_OUT (the first program of a finalize or fold)."""
    b_ok = offs < C_OUT
    b_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, SPLIT):
        b_acc += tl.load(dbp_ptr + s * row + offs, mask=b_ok, other=0.0)
    tl.store(db_ptr + offs, cast_rne(b_acc * scale, db_ptr.dtype.element_ty, INTERP_BF16), mask=b_ok)


@triton.jit
def _finalize_dw(
    dwp_ptr,    # fp32 partials (SPLIT, 9, C_IN, C_OUT) contiguous, unscaled
    dbp_ptr,    # fp32 partials (SPLIT, C_OUT), unscaled; if HAS_BIAS
    dw_ptr,     # dW (C_OUT, C_IN, 3, 3) with strides d_co, d_ci, d_tap (the weight's own layout)
    db_ptr,     # db (C_OUT,); if HAS_BIAS
    pid, SPLIT, C_IN, C_OUT, d_co, d_ci, d_tap, scale,
    HAS_BIAS: tl.constexpr, INTERP_BF16: tl.constexpr, BLOCK: tl.constexpr,
):
    """BLOCK consecutive partial elements (tap, ci, co) summed over the splits in order 0..SPLIT-1."""
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    per_split = 9 * C_IN * C_OUT
    ok = offs < per_split
    co = offs % C_OUT
    ci = (offs // C_OUT) % C_IN
    tap = offs // (C_OUT * C_IN)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, SPLIT):
        acc += tl.load(dwp_ptr + s * per_split + offs, mask=ok, other=0.0)
    tl.store(dw_ptr + co * d_co + ci * d_ci + tap * d_tap, cast_rne(acc * scale, dw_ptr.dtype.element_ty, INTERP_BF16),
             mask=ok)
    if HAS_BIAS:
        fold_db(dbp_ptr, db_ptr, offs, SPLIT, C_OUT, C_OUT, scale, INTERP_BF16, BLOCK)


@triton.jit
def conv3x3_bwd_finalize_kernel(
    dwp_ptr, dbp_ptr, dw_ptr, db_ptr,   # as for _finalize_dw
    SPLIT, C_IN, C_OUT, d_co, d_ci, d_tap, scale,
    HAS_BIAS: tl.constexpr, INTERP_BF16: tl.constexpr, BLOCK: tl.constexpr,
):
    # 1-D grid: ceil(9*C_IN*C_OUT / BLOCK) programs (the first also sums db).
    _finalize_dw(dwp_ptr, dbp_ptr, dw_ptr, db_ptr, tl.program_id(0), SPLIT, C_IN, C_OUT, d_co, d_ci, d_tap, scale,
                 HAS_BIAS, INTERP_BF16, BLOCK)


@triton.jit(do_not_specialize=SHAPE_ARGS)
def conv3x3_bwd_dx_kernel(
    ga_ptr,     # gradient source A: gz of a conv, (N, CA, H, W) channels_last; with A_ACT its raw g
    amask_ptr,  # (N, H, W, ceil(CA/8)) uint8 mask of source A's conv; if A_ACT
    gza_ptr,    # out: source A's gz = g * act'(z), (N, CA, H, W) channels_last; if WRITE_GZA
    wa_ptr,     # that conv's weight, element (co, ci, tap) at co*sa_co + ci*sa_ci + tap*sa_tap
    gb_ptr,     # optional source B (CB > 0): gz of a second conv whose input is the same tensor
    wb_ptr,     # its weight
    out1_ptr,   # out: channels [0, N1) of the result, (N, N1, H, W) channels_last
    out2_ptr,   # out: channels [N1, N_TOT), (N, N_TOT - N1, H, W) channels_last; if N_TOT > N1
    omask_ptr,  # (N, H, W, ceil(N_TOT/8)) uint8 mask of the conv that produced this tensor; if OUT_ACT
    dsum_in,    # (N, N_TOT, H, W) channels_last: a running gradient sum (or its first term); if ADD_SUM
    dsum_out,   # out: dsum_in * sum_scale + the result before OUT_ACT, (N, N_TOT, H, W) channels_last
                # (may be dsum_in itself: each program reads and writes only its own tile); if ADD_SUM
    fa_dwp, fa_dbp, fa_dw, fa_db,   # finalize job A: partials -> dW, db (see _finalize_dw); if FIN_A
    fb_dwp, fb_dbp, fb_dw, fb_db,   # finalize job B; if FIN_B
    M, H, W,
    CA, sa_co, sa_ci, sa_tap, wa_base,     # result channel n reads weight A's input channel wa_base + n
    CB, sb_co, sb_ci, sb_tap, wb_base,
    N1, N_TOT,
    FA_SPLIT, FA_CIN, FA_COUT, fa_co, fa_ci, fa_tap,
    FB_SPLIT, FB_CIN, FB_COUT, fb_co, fb_ci, fb_tap,
    N_DX_PROGS, N_FA_PROGS,
    slope, scale, fa_scale, fb_scale, sum_scale,
    A_ACT: tl.constexpr, WRITE_GZA: tl.constexpr, OUT_ACT: tl.constexpr,
    ADD_SUM: tl.constexpr,      # also write dsum_out = sum_scale*dsum_in + result (a fused group's residual sum)
    STORE_OUT: tl.constexpr,    # write out1/out2 (False: the result only enters dsum_out)
    FIN_A: tl.constexpr, FA_BIAS: tl.constexpr, FIN_B: tl.constexpr, FB_BIAS: tl.constexpr,
    INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr, IDX64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_KA: tl.constexpr, KA_STEPS: tl.constexpr, EVEN_KA: tl.constexpr,
    BLOCK_KB: tl.constexpr, KB_STEPS: tl.constexpr, EVEN_KB: tl.constexpr,
    FIN_BLOCK: tl.constexpr,
):
    # 1-D grid: N_DX_PROGS tiles of the result (BLOCK_M pixels x BLOCK_N channels, pixel tiles fastest),
    # then N_FA_PROGS finalize programs of job A, then those of job B.
    pid = tl.program_id(0)
    if pid < N_DX_PROGS:
        n_m_tiles = tl.cdiv(M, BLOCK_M)
        pid_n = pid // n_m_tiles
        pid_m = pid - pid_n * n_m_tiles
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = offs_m < M
        n_ok = offs_n < N_TOT
        w_idx = offs_m % W
        h_idx = (offs_m // W) % H
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # B[k = co, n = ci] = W[co, ci, tap]
        acc = accumulate_taps(acc, ga_ptr, wa_ptr, CA, sa_co, sa_ci, sa_tap, wa_base, H, W, offs_m, m_ok, h_idx,
                              w_idx, offs_n, n_ok, amask_ptr, slope, -1, A_ACT, KA_STEPS, BLOCK_KA, EVEN_KA,
                              INTERP_BF16, PRECISION, IDX64)
        if KB_STEPS > 0:
            acc = accumulate_taps(acc, gb_ptr, wb_ptr, CB, sb_co, sb_ci, sb_tap, wb_base, H, W, offs_m, m_ok,
                                  h_idx, w_idx, offs_n, n_ok, gb_ptr, slope, -1, False, KB_STEPS, BLOCK_KB, EVEN_KB,
                                  INTERP_BF16, PRECISION, IDX64)
        if WRITE_GZA:  # source A's gz at this tile's own pixels, once (by the first channel tile), for dW
            if pid_n == 0:
                a_rows = pixel_rows(offs_m, CA, IDX64)
                for kk in tl.static_range(KA_STEPS):
                    ck = kk * BLOCK_KA + tl.arange(0, BLOCK_KA)
                    ok = m_ok[:, None] & (ck < CA)[None, :]
                    gz = tl.load(ga_ptr + a_rows[:, None] + ck[None, :], mask=ok, other=0.0).to(tl.float32)
                    if A_ACT:  # the same fp32 product and rounding as the GEMM operand above
                        gz = act_grad(gz, amask_ptr, offs_m, m_ok, ck, ck < CA, CA, slope, IDX64)
                    tl.store(gza_ptr + a_rows[:, None] + ck[None, :], cast_rne(gz, gza_ptr.dtype.element_ty,
                                                                               INTERP_BF16), mask=ok)
        acc = acc * scale
        if ADD_SUM:  # the gradient of a tensor that also reaches a shared residual input: add it there too
            s_off = pixel_rows(offs_m, N_TOT, IDX64)[:, None] + offs_n[None, :]
            s_ok = m_ok[:, None] & n_ok[None, :]
            total = acc + sum_scale * tl.load(dsum_in + s_off, mask=s_ok, other=0.0).to(tl.float32)
            tl.store(dsum_out + s_off, cast_rne(total, dsum_out.dtype.element_ty, INTERP_BF16), mask=s_ok)
        if OUT_ACT:
            acc = act_grad(acc, omask_ptr, offs_m, m_ok, offs_n, n_ok, N_TOT, slope, IDX64)
        if STORE_OUT:
            ok1 = m_ok[:, None] & (offs_n < N1)[None, :]
            tl.store(out1_ptr + pixel_rows(offs_m, N1, IDX64)[:, None] + offs_n[None, :],
                     cast_rne(acc, out1_ptr.dtype.element_ty, INTERP_BF16), mask=ok1)
            if N_TOT > N1:  # a two-input conv: channels from N1 on belong to the second input's grad
                ok2 = m_ok[:, None] & ((offs_n >= N1) & n_ok)[None, :]
                tl.store(out2_ptr + pixel_rows(offs_m, N_TOT - N1, IDX64)[:, None] + (offs_n - N1)[None, :],
                         cast_rne(acc, out2_ptr.dtype.element_ty, INTERP_BF16), mask=ok2)
    elif pid < N_DX_PROGS + N_FA_PROGS:
        if FIN_A:
            _finalize_dw(fa_dwp, fa_dbp, fa_dw, fa_db, pid - N_DX_PROGS, FA_SPLIT, FA_CIN, FA_COUT, fa_co, fa_ci,
                         fa_tap, fa_scale, FA_BIAS, INTERP_BF16, FIN_BLOCK)
    else:
        if FIN_B:
            _finalize_dw(fb_dwp, fb_dbp, fb_dw, fb_db, pid - N_DX_PROGS - N_FA_PROGS, FB_SPLIT, FB_CIN, FB_COUT,
                         fb_co, fb_ci, fb_tap, fb_scale, FB_BIAS, INTERP_BF16, FIN_BLOCK)


@triton.jit(do_not_specialize=["M"])
def conv3x3_bwd_gz_kernel(
    g_ptr,      # upstream gradient (N, C_OUT, H, W) channels_last: element at m*C_OUT + co
    mask_ptr,   # the forward's (N, H, W, ceil(C_OUT/8)) bit mask
    gz_ptr,     # out: gz = g * act'(z), (N, C_OUT, H, W) channels_last
    M, C_OUT, slope,   # M: pixels N*H*W (the upsampling conv's: at full resolution)
    INTERP_BF16: tl.constexpr, IDX64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # grid = (BLOCK_P tiles of the M pixels, BLOCK_C tiles of C_OUT). The gz pass the tuner may choose
    # over making gz in dX's operand (GZ_PASS; the IDB's gz2 and the upsampling convs' gz): dX then
    # reads gz ready, with no mask in its loop. Rounded as the A_ACT operand is (conv3x3_bwd_dx_kernel,
    # upconv_bwd_dx_kernel), so both ways give the same bits.
    rows = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    co = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rows_ok = rows < M
    co_ok = co < C_OUT
    ok = rows_ok[:, None] & co_ok[None, :]
    at = pixel_rows(rows, C_OUT, IDX64)[:, None] + co[None, :]
    g = tl.load(g_ptr + at, mask=ok, other=0.0).to(tl.float32)
    gz = act_grad(g, mask_ptr, rows, rows_ok, co, co_ok, C_OUT, slope, IDX64)
    tl.store(gz_ptr + at, cast_rne(gz, gz_ptr.dtype.element_ty, INTERP_BF16), mask=ok)

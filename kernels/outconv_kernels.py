"""Kernels of the output conv's backward: y = tanh(convKxK(x, W) + b) with few output channels (the
generator's last layer: 64 -> 3 channels, 9x9, at 256x256).

Why. With C_OUT = 3 the usual implicit GEMM of the backward is starved: per tap, dX has K = C_OUT = 3
(a 16-deep MMA step for 3 live values) and dW an N of 3. Flattening the tap and the output channel into
one row index r fixes both, because only the small tensor (gz, 3 channels) needs the tap's shift:
  * dX[p, ci] = sum_r gz[p + d(r), c(r)] * W[c(r), ci, kh(r), kw(r)],   d(r) = (PAD - kh, PAD - kw):
    a GEMM with K = the rows and N = C_IN, whose A operand is gathered from gz (cache-resident);
  * dW[c, ci, kh, kw] = sum_p gz[p + d(r), c] * x[p, ci]: the transposed GEMM, M = the rows (gathered
    from gz), N = C_IN, K = pixels, with x read once per row tile (not once per tap).
gz = g * (1 - y^2) is written once, rounded to the I/O dtype, into a buffer with a zero border of
KS//2 pixels and its channels padded with zeros to CP, a power of two (4 for 3). Then every gathered
read lands inside the buffer (no bounds masks), and with r ordered (a, b, c) = (KS-1-kh, KS-1-kw, c) a
window row of the gather is KS*CP contiguous elements, read CP at a time (8-byte loads for bf16): the
rows grow to KS*KS*CP (324 for the paper's layer, 6 dX steps of 64) for a quarter of the load and
address instructions. (The first version gathered 243 rows one element at a time and made gz on the
operand: 255 registers with spills and, in dW, a serialised wgmma; bench/RESULTS.md, Round 8.)
The forward is cuDNN's conv, or two kernels here: a GEMM onto every tap's columns and their fold
(outconv.py says why).

Kernels (host code: outconv.py):
  * `outconv_taps_kernel` and `outconv_fold_kernel` (the forward, when the tuner picks the GEMM way):
    every pixel's k*k*C_out tap columns (one GEMM, K = C_in), then per output pixel the sum of its k*k
    shifted columns, + bias, tanh, stored channels_last.
  * `outconv_prep_kernel`: the padded gz, and the weight re-laid as dX's B operand (row r contiguous).
  * `outconv_bwd_dw_kernel`: fp32 partials of dW per row tile (or group of 2 or 4 row tiles sharing
    one x tile) of r and chunk of pixels (split-K, no atomics), plus db partials from an extra program. 32-row tiles: Triton then emits mma.sync, whose
    register operands need no async pipeline (64-row tiles got wgmma, serialised under Triton 3.6).
  * `outconv_bwd_dx_kernel`: dX; extra programs fold the dW partials in a fixed order (deterministic)
    into dW in the weight's layout, and db. With ACT, dX times the LeakyReLU' of the layer before
    (kernels/upout.py: the generator's last upsampling step and this layer as one op).
Launches: forward 0 (cuDNN's conv), or 2 per chunk of images (taps, fold); backward 3 (prep, dW, then
dX + fold).
Layouts: activations channels_last (element (n, c, h, w) at pixel*C + c).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .conv3x3_bwd import fold_db
from .conv3x3_fwd import SHAPE_ARGS, act_grad, cast_rne, pixel_rows


@triton.jit(do_not_specialize=["N", "H", "W", "N_GZ_PROGS"])
def outconv_prep_kernel(
    g_ptr,      # dL/dy, (N, C_OUT, H, W) channels_last
    y_ptr,      # the forward's output tanh(z), (N, C_OUT, H, W) channels_last
    gzp_ptr,    # out: gz = g * (1 - y^2) in y's dtype, (N, H + KS-1, W + KS-1, CP) contiguous: a border of
                # KS//2 zero pixels on every side, channels padded with zeros to CP
    w_ptr,      # weight (C_OUT, C_IN, KS, KS), element (co, ci, kh, kw) at co*s_co + ci*s_ci + kh*s_kh + kw*s_kw
    wr_ptr,     # out: the weight as dX's B operand, (R_PAD, C_IN) contiguous: row r = (a*KS + b)*CP + c holds
                # W[c, :, KS-1 - a, KS-1 - b]; zero for c >= C_OUT and for r >= KS*KS*CP
    N, H, W, C_IN, s_co, s_ci, s_kh, s_kw, R_PAD, N_GZ_PROGS,
    C_OUT: tl.constexpr, CP: tl.constexpr, KS: tl.constexpr, INTERP_BF16: tl.constexpr, IDX64: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # 1-D grid: N_GZ_PROGS programs over the padded pixels (BLOCK_P each; every element written, the zeros
    # too), then programs over the BLOCK_P*CP elements of wr each.
    pid = tl.program_id(0)
    if pid < N_GZ_PROGS:
        hp_n = H + (KS - 1)
        wp_n = W + (KS - 1)
        pp = pid * BLOCK_P + tl.arange(0, BLOCK_P)
        pp_ok = pp < N * hp_n * wp_n
        co = tl.arange(0, CP)
        wp = pp % wp_n
        hp = (pp // wp_n) % hp_n
        n = pp // (wp_n * hp_n)
        h = hp - KS // 2
        w = wp - KS // 2
        inside = pp_ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)
        at = pixel_rows((n * H + h) * W + w, C_OUT, IDX64)[:, None] + co[None, :]
        ok = inside[:, None] & (co < C_OUT)[None, :]
        g = tl.load(g_ptr + at, mask=ok, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + at, mask=ok, other=0.0).to(tl.float32)
        tl.store(gzp_ptr + pixel_rows(pp, CP, IDX64)[:, None] + co[None, :],
                 cast_rne(g * (1.0 - y * y), gzp_ptr.dtype.element_ty, INTERP_BF16), mask=pp_ok[:, None])
    else:
        offs = (pid - N_GZ_PROGS) * (BLOCK_P * CP) + tl.arange(0, BLOCK_P * CP)
        ci = offs % C_IN
        r = offs // C_IN
        c = r % CP
        tap = r // CP
        live = (offs < R_PAD * C_IN) & (r < KS * KS * CP) & (c < C_OUT)
        wv = tl.load(w_ptr + c * s_co + ci * s_ci + (KS - 1 - tap // KS) * s_kh + (KS - 1 - tap % KS) * s_kw,
                     mask=live, other=0.0)
        tl.store(wr_ptr + offs, wv, mask=offs < R_PAD * C_IN)


@triton.jit
def _tanh(z):
    """tanh in fp32 from one exp of -2|z| (<= 1: no overflow); absolute error ~1e-7 near 0, where 1 - e
    cancels. (tl has no tanh; libdevice's is not in the interpreter.)"""
    e = tl.exp(-2.0 * tl.abs(z))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(z < 0, -t, t)


@triton.jit
def _image_tile(pid, TILES, HW, IDX64: tl.constexpr, BLOCK_P: tl.constexpr):
    """(n, q, q_ok): program pid's image and its BLOCK_P pixels q of that image (TILES programs per image);
    n is int64 with IDX64, so offsets built from it are too."""
    n = pid // TILES
    if IDX64:
        n = n.to(tl.int64)
    q = (pid % TILES) * BLOCK_P + tl.arange(0, BLOCK_P)
    return n, q, q < HW


@triton.jit(do_not_specialize=["TILES"])  # HW is specialised on (% 16: the stores are then 16-byte vectors)
def outconv_taps_kernel(
    x_ptr,      # the conv's input, (N, C_IN, H, W) channels_last: pixel p's channels at p*C_IN
    w_ptr,      # weight (C_OUT, C_IN, KS, KS) channels_last (conv3x3.kernel_weight): element (c, ci, a, b)
                # at r*C_IN + ci, r = (c*KS + a)*KS + b, so W' is (R, C_IN) row-major
    cols_ptr,   # out: the taps' columns, (N, C_OUT*KS*KS, H*W) contiguous: row r of pixel q holds
                # sum_ci x[q, ci] * W[c, ci, a, b]
    HW,         # pixels per image
    TILES,      # programs per image: cdiv(HW, BLOCK_P)
    C_IN,
    C_OUT: tl.constexpr, KS: tl.constexpr, INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr,
    IDX64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
    K_STEPS: tl.constexpr,  # cdiv(C_IN, BLOCK_K), unrolled: no loop around the wgmma, so none waits in one
):
    # grid = (TILES programs per image x the images, BLOCK_R tiles of the R = C_OUT*KS*KS rows). The
    # forward's GEMM (outconv._out_forward_fold) as columns^T = W' x^T: the tile is (rows, pixels) with the
    # pixels of one image fastest, which is how the columns are laid out, so the stores are row segments.
    # A is W' (a few KB, cache-resident), B is x^T: both read along C_IN, which is contiguous in each.
    n, q, q_ok = _image_tile(tl.program_id(0), TILES, HW, IDX64, BLOCK_P)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < C_OUT * KS * KS
    w_rows = r * C_IN
    x_cols = pixel_rows(n * HW + q, C_IN, IDX64)
    acc = tl.zeros((BLOCK_R, BLOCK_P), dtype=tl.float32)
    for ks in tl.static_range(K_STEPS):
        ck = ks * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = ck < C_IN
        a = tl.load(w_ptr + w_rows[:, None] + ck[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(x_ptr + x_cols[None, :] + ck[:, None], mask=k_ok[:, None] & q_ok[None, :], other=0.0)
        if INTERP_BF16:  # the interpreter's bf16 tl.dot returns garbage: dot in fp32 there
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    at = n * (C_OUT * KS * KS) * HW + (r * HW)[:, None] + q[None, :]
    tl.store(cols_ptr + at, cast_rne(acc, cols_ptr.dtype.element_ty, INTERP_BF16), mask=r_ok[:, None] & q_ok[None, :])


@triton.jit(do_not_specialize=["HW", "H", "W", "TILES"])
def outconv_fold_kernel(
    cols_ptr,   # the forward GEMM's tap columns, (N, C_OUT*KS*KS, H*W) contiguous: row (c*KS + a)*KS + b of
                # source pixel q holds sum_ci x[q, ci] * W[c, ci, a, b] (outconv._out_forward_fold)
    b_ptr,      # bias (C_OUT,) if HAS_BIAS, else any valid pointer, never read
    y_ptr,      # out: tanh(conv(x, W) + b), (N, C_OUT, H, W) channels_last
    HW, H, W,
    TILES,      # programs per image: cdiv(H*W, BLOCK_P)
    C_OUT: tl.constexpr, CP: tl.constexpr, KS: tl.constexpr, HAS_BIAS: tl.constexpr,
    INTERP_BF16: tl.constexpr, IDX64: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # 1-D grid: TILES programs per image, BLOCK_P output pixels q of one image each, all C_OUT channels.
    # y[q, c] = sum over taps (a, b) of column (c, a, b) of source pixel q + (a, b) - KS//2 (inside the
    # image): F.fold (col2im) with the bias, tanh and the channels_last store in its epilogue. The tile is
    # (CP, BLOCK_P) with the pixels fastest: for one channel and tap the source pixels of a row segment
    # are consecutive in the columns, so a warp's loads are coalesced.
    n, q, q_ok = _image_tile(tl.program_id(0), TILES, HW, IDX64, BLOCK_P)
    h = q // W
    w = q % W
    co = tl.arange(0, CP)
    co_ok = co < C_OUT
    # column (c, 0, 0) of pixel q: the taps add a*KS + b rows and a source-pixel shift
    base = cols_ptr + (n * (C_OUT * KS * KS) + co * (KS * KS))[:, None] * HW + q[None, :]
    acc = tl.zeros((CP, BLOCK_P), dtype=tl.float32)
    for a in range(KS):
        sh = h + (a - KS // 2)
        row_ok = q_ok & (sh >= 0) & (sh < H)
        for b in range(KS):
            sw = w + (b - KS // 2)
            ok = co_ok[:, None] & (row_ok & (sw >= 0) & (sw < W))[None, :]
            acc += tl.load(base + ((a * KS + b) * HW + (a - KS // 2) * W + (b - KS // 2)), mask=ok,
                           other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + co, mask=co_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + pixel_rows(n * HW + q, C_OUT, IDX64)[None, :] + co[:, None],
             cast_rne(_tanh(acc), y_ptr.dtype.element_ty, INTERP_BF16), mask=co_ok[:, None] & q_ok[None, :])


@triton.jit
def _window_corner(pix, H, W, CP: tl.constexpr, KS: tl.constexpr, IDX64: tl.constexpr):
    """Offset in the padded gz of pixel (n, h, w)'s window corner, padded pixel (h, w) of image n; its
    row r sits at + _row_offsets(r). A multiple of CP (the hint lets the gathers load CP at a time)."""
    w = pix % W
    t = pix // W
    h = t % H
    n = t // H
    return tl.multiple_of(pixel_rows((n * (H + (KS - 1)) + h) * (W + (KS - 1)) + w, CP, IDX64), CP)


@triton.jit
def _row_offsets(r, W, CP: tl.constexpr, KS: tl.constexpr):
    """Offset of row r = (a*KS + b)*CP + c from its pixel's window corner: padded pixel (h + a, w + b),
    channel c, i.e. tap kh = KS-1 - a, kw = KS-1 - b. Along r the offsets run in contiguous stretches of
    KS*CP (one window row), so a gather reads CP consecutive elements at a time (the hints say so: runs of
    CP that start at multiples of CP). Rows past KS*KS*CP read the corner pixel's channels, r % CP, which
    keeps the runs true (real elements: their weight rows are zero and their dW rows are not stored)."""
    off = (r // (KS * CP)) * ((W + (KS - 1)) * CP) + r % (KS * CP)
    return tl.max_contiguous(tl.multiple_of(tl.where(r < KS * KS * CP, off, r % CP), CP), CP)


@triton.jit
def _gathered_gz(gzp_ptr, r_off, corner, p_ok, INTERP_BF16: tl.constexpr):
    """The MMA's A tile: gz at rows r (offsets r_off from a window corner) of pixels with these corners."""
    gz = tl.load(gzp_ptr + r_off[:, None] + corner[None, :], mask=p_ok[None, :], other=0.0)
    if INTERP_BF16:  # the interpreter's bf16 tl.dot returns garbage: dot in fp32 there
        gz = gz.to(tl.float32)
    return gz


@triton.jit(do_not_specialize=SHAPE_ARGS)
def outconv_bwd_dw_kernel(
    gzp_ptr,    # padded gz (outconv_prep_kernel)
    x_ptr,      # the conv's input, (N, C_IN, H, W) channels_last
    dwp_ptr,    # out: fp32 dW partials (SPLIT, R, C_IN) contiguous, element (s, r, ci), R = KS*KS*CP
    dbp_ptr,    # out: fp32 db partials (SPLIT, CP) contiguous; if DO_BIAS
    M, H, W, C_IN, CHUNK,
    CP: tl.constexpr, KS: tl.constexpr, DO_BIAS: tl.constexpr,
    INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr, IDX64: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    GROUPS: tl.constexpr,   # 1, 2 or 4 row tiles per program, each its own MMA, all on one x tile per block
):
    # grid = (groups of GROUPS row tiles of R x C_IN tiles (+ 1 db program with DO_BIAS), SPLIT chunks of
    # CHUNK pixels). acc[r, ci] += gz[p + d(r), c(r)]^T x[p, ci]: the gathered gz is the MMA's A side.
    # Every row tile reads the whole x chunk: with one tile per program (GROUPS = 1) the paper's 324 rows
    # read x 11 times through L2, with 4 per program 3 times (bench/RESULTS.md, round 11).
    R = KS * KS * CP
    n_c_tiles = tl.cdiv(C_IN, BLOCK_C)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    p_start = split * CHUNK
    p_end = tl.minimum(p_start + CHUNK, M)
    if pid == tl.cdiv(R, BLOCK_R * GROUPS) * n_c_tiles:
        if DO_BIAS:  # db[c] = sum_p gz[p, c]: the centre of each window
            co = tl.arange(0, CP)
            centre = ((KS // 2) * (W + (KS - 1)) + KS // 2) * CP + co
            db_acc = tl.zeros((CP,), dtype=tl.float32)
            for p0 in range(p_start, p_end, BLOCK_P):
                pix = p0 + tl.arange(0, BLOCK_P)
                at = _window_corner(pix, H, W, CP, KS, IDX64)[:, None] + centre[None, :]
                db_acc += tl.sum(tl.load(gzp_ptr + at, mask=(pix < p_end)[:, None], other=0.0).to(tl.float32), axis=0)
            tl.store(dbp_ptr + split * CP + co, db_acc)
    else:
        r = (pid // n_c_tiles) * (BLOCK_R * GROUPS) + tl.arange(0, BLOCK_R)
        ci = (pid % n_c_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
        ci_ok = ci < C_IN
        off0 = _row_offsets(r, W, CP, KS)
        acc0 = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        if GROUPS >= 2:
            off1 = _row_offsets(r + BLOCK_R, W, CP, KS)
            acc1 = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        if GROUPS >= 4:
            off2 = _row_offsets(r + 2 * BLOCK_R, W, CP, KS)
            off3 = _row_offsets(r + 3 * BLOCK_R, W, CP, KS)
            acc2 = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
            acc3 = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        for p0 in range(p_start, p_end, BLOCK_P):
            pix = p0 + tl.arange(0, BLOCK_P)
            p_ok = pix < p_end
            corner = _window_corner(pix, H, W, CP, KS, IDX64)
            xs = tl.load(x_ptr + pixel_rows(pix, C_IN, IDX64)[:, None] + ci[None, :],
                         mask=p_ok[:, None] & ci_ok[None, :], other=0.0)
            if INTERP_BF16:
                xs = xs.to(tl.float32)
            acc0 = tl.dot(_gathered_gz(gzp_ptr, off0, corner, p_ok, INTERP_BF16), xs, acc0, input_precision=PRECISION)
            if GROUPS >= 2:
                acc1 = tl.dot(_gathered_gz(gzp_ptr, off1, corner, p_ok, INTERP_BF16), xs, acc1,
                              input_precision=PRECISION)
            if GROUPS >= 4:
                acc2 = tl.dot(_gathered_gz(gzp_ptr, off2, corner, p_ok, INTERP_BF16), xs, acc2,
                              input_precision=PRECISION)
                acc3 = tl.dot(_gathered_gz(gzp_ptr, off3, corner, p_ok, INTERP_BF16), xs, acc3,
                              input_precision=PRECISION)
        at = (split * R + r)[:, None] * C_IN + ci[None, :]
        tl.store(dwp_ptr + at, acc0, mask=(r < R)[:, None] & ci_ok[None, :])
        if GROUPS >= 2:
            tl.store(dwp_ptr + at + BLOCK_R * C_IN, acc1, mask=(r + BLOCK_R < R)[:, None] & ci_ok[None, :])
        if GROUPS >= 4:
            tl.store(dwp_ptr + at + 2 * BLOCK_R * C_IN, acc2, mask=(r + 2 * BLOCK_R < R)[:, None] & ci_ok[None, :])
            tl.store(dwp_ptr + at + 3 * BLOCK_R * C_IN, acc3, mask=(r + 3 * BLOCK_R < R)[:, None] & ci_ok[None, :])


@triton.jit
def _fold_out_dw(
    dwp_ptr,    # fp32 partials (SPLIT, R, C_IN), R = KS*KS*CP (outconv_bwd_dw_kernel)
    dbp_ptr,    # fp32 db partials (SPLIT, CP); if HAS_BIAS
    dw_ptr,     # out: dW (C_OUT, C_IN, KS, KS), element (co, ci, kh, kw) at co*d_co + ci*d_ci + kh*d_kh + kw*d_kw
    db_ptr,     # out: db (C_OUT,); if HAS_BIAS
    pid, SPLIT, C_IN, d_co, d_ci, d_kh, d_kw,
    C_OUT: tl.constexpr, CP: tl.constexpr, KS: tl.constexpr, HAS_BIAS: tl.constexpr, INTERP_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """BLOCK consecutive elements of dW (co, ci, kh, kw) in (co, ci, tap) order, each the sum of its
    partial row r = ((KS-1-kh)*KS + KS-1-kw)*CP + co over the chunks in order 0..SPLIT-1 (deterministic);
    program 0 also sums db."""
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < C_OUT * C_IN * KS * KS
    tap = offs % (KS * KS)
    ci = (offs // (KS * KS)) % C_IN
    co = offs // (KS * KS * C_IN)
    kh = tap // KS
    kw = tap % KS
    at = (((KS - 1 - kh) * KS + KS - 1 - kw) * CP + co) * C_IN + ci
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, SPLIT):
        acc += tl.load(dwp_ptr + s * (KS * KS * CP * C_IN) + at, mask=ok, other=0.0)
    tl.store(dw_ptr + co * d_co + ci * d_ci + kh * d_kh + kw * d_kw, cast_rne(acc, dw_ptr.dtype.element_ty, INTERP_BF16),
             mask=ok)
    if HAS_BIAS:
        fold_db(dbp_ptr, db_ptr, offs, SPLIT, C_OUT, CP, 1.0, INTERP_BF16, BLOCK)


# the fold's scalars are not specialised on: they follow the dW plan (its split) and dW's layout, which
# the dX plan's launch key does not hold
@triton.jit(do_not_specialize=SHAPE_ARGS + ["FIN_SPLIT", "d_co", "d_ci", "d_kh", "d_kw", "slope"])
def outconv_bwd_dx_kernel(
    gzp_ptr,    # padded gz (outconv_prep_kernel)
    wr_ptr,     # the weight as B operand, (R_STEPS*BLOCK_R, C_IN) contiguous (outconv_prep_kernel)
    dx_ptr,     # out: dL/dx, (N, C_IN, H, W) channels_last; with ACT, dL/dz of the layer before (below)
    amask_ptr,  # ACT: the layer before's (N, H, W, ceil(C_IN/8)) bit mask of z > 0 (x = LeakyReLU(z));
                # else any valid pointer, never read
    fin_dwp, fin_dbp, fin_dw, fin_db,   # the fold (see _fold_out_dw)
    M, H, W, C_IN,
    FIN_SPLIT, d_co, d_ci, d_kh, d_kw,
    slope,      # ACT: that LeakyReLU's negative slope
    C_OUT: tl.constexpr, CP: tl.constexpr, KS: tl.constexpr, FIN_BIAS: tl.constexpr, ACT: tl.constexpr,
    INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr, IDX64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, R_STEPS: tl.constexpr,
    FIN_BLOCK: tl.constexpr,
):
    # grid = (BLOCK_M tiles of the M pixels + fold programs (channel tile 0 only), BLOCK_N tiles of C_IN);
    # K = KS*KS*CP rows, in R_STEPS blocks of BLOCK_R (wr's zero rows pad the last). With ACT the epilogue
    # hands the gradient on through the LeakyReLU before this layer (kernels/upout.py: the last upsampling
    # step's gz, written here once instead of dx written, read back and multiplied there).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m >= tl.cdiv(M, BLOCK_M):
        if pid_n == 0:
            _fold_out_dw(fin_dwp, fin_dbp, fin_dw, fin_db, pid_m - tl.cdiv(M, BLOCK_M), FIN_SPLIT, C_IN, d_co, d_ci,
                         d_kh, d_kw, C_OUT, CP, KS, FIN_BIAS, INTERP_BF16, FIN_BLOCK)
    else:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = offs_m < M
        n_ok = offs_n < C_IN
        corner = _window_corner(offs_m, H, W, CP, KS, IDX64)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for step in tl.static_range(R_STEPS):
            r = step * BLOCK_R + tl.arange(0, BLOCK_R)
            # A[p, r] = gz[corner(p) + offset(r)] (rows past R: any finite element, their B rows are zero);
            # B[r, ci] = wr[r, ci]
            a = tl.load(gzp_ptr + corner[:, None] + _row_offsets(r, W, CP, KS)[None, :], mask=m_ok[:, None],
                        other=0.0)
            b = tl.load(wr_ptr + r[:, None] * C_IN + offs_n[None, :], mask=n_ok[None, :], other=0.0)
            if INTERP_BF16:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if ACT:
            acc = act_grad(acc, amask_ptr, offs_m, m_ok, offs_n, n_ok, C_IN, slope, IDX64)
        tl.store(dx_ptr + pixel_rows(offs_m, C_IN, IDX64)[:, None] + offs_n[None, :],
                 cast_rne(acc, dx_ptr.dtype.element_ty, INTERP_BF16), mask=m_ok[:, None] & n_ok[None, :])

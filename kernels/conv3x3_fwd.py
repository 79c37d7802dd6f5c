"""Forward of the fused 3x3 convolution: one implicit GEMM over NHWC activations plus its epilogue.

    y = act(conv3x3(cat(x1, x2), W) + b);  y = r1 + s1*y;  y = r2 + s2*y        (spec: "What the fused
                                                                               kernels cover")
GEMM view: M = N*H*W output pixels, N = C_out, K = 9*(C1 + C2). The K loop walks x1 and then x2, each
as a flat loop over (tap, channel block), so the concatenation is never materialised and the single
loop per input is what Triton software-pipelines (num_stages).

Layout contract (the host code in conv3x3.py guarantees it): every activation is channels_last-
contiguous, so element (n, c, h, w) of a C-channel tensor sits at ((n*H + h)*W + w)*C + c = m*C + c.
The weight is read through its strides (co, ci, tap): a channels_last weight (ci fastest) is used as
it is, with no re-layout copy.
"""
from __future__ import annotations

import triton
import triton.language as tl

# The interpreter decides at decoration time (triton.knobs.runtime.interpret, i.e. TRITON_INTERPRET=1
# set before import); the host code needs to know so it can upcast bf16 dots (interpreter bug).
INTERPRETING = bool(triton.knobs.runtime.interpret)

# Shape arguments that only enter index arithmetic are not specialised on divisibility by 16, so a new
# batch size or image side does not compile a new kernel (the channel counts stay specialised: they
# decide whether loads vectorise).
SHAPE_ARGS = ["M", "H", "W"]


@triton.jit
def cast_rne(x, dtype: tl.constexpr, INTERP_BF16: tl.constexpr):
    """fp32 -> dtype, round to nearest even. On a GPU that is the plain cast; the interpreter's plain
    fp32 -> bf16 cast truncates, so there it is done on the bits (finite values only)."""
    if INTERP_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)  # exactly representable in bf16 now: the cast is exact
    return x.to(dtype)


@triton.jit
def pixel_rows(offs_m, C, IDX64: tl.constexpr):
    """m*C: the offset of pixel m's first channel; int32 unless the tensor has 2**31 elements or more."""
    if IDX64:
        return offs_m.to(tl.int64) * C
    return offs_m * C


@triton.jit
def tap_edge(d, n):
    """The index (row or column) a tap offset d in {-1, 0, +1} points past the image from: 0 for -1,
    n - 1 for +1, -1 (none) for 0. Pixel i + d is outside [0, n) exactly when i == tap_edge(d, n), so a
    padding test is one compare per axis instead of two plus an add."""
    return tl.where(d < 0, 0, tl.where(d > 0, n - 1, -1))


@triton.jit
def act_grad(g, mask_ptr, rows, row_ok, co, co_ok, C_OUT, slope, IDX64: tl.constexpr):
    """g * LeakyReLU'(z) from the forward's bit mask (fp32 in, fp32 out); rows: pixel indices (BLOCK,),
    co: channels. Byte co//8 of pixel row m sits at m*ceil(C_OUT/8) + co//8; bit co%8 is z > 0."""
    c_bytes = tl.cdiv(C_OUT, 8)
    byte = tl.load(mask_ptr + pixel_rows(rows, c_bytes, IDX64)[:, None] + (co // 8)[None, :],
                   mask=row_ok[:, None] & co_ok[None, :], other=0)
    positive = ((byte.to(tl.int32) >> (co % 8)[None, :]) & 1) != 0
    return tl.where(positive, g, g * slope)


@triton.jit
def accumulate_taps(
    acc,                    # (BLOCK_M, BLOCK_N) fp32 accumulator
    a_ptr,                  # activation or gradient, (N, C, H, W) channels_last: element at m*C + c
    w_ptr,                  # weight, read through strides (s_k: along the K channel, s_n: along N, s_tap)
    C, s_k, s_n, s_tap, n_base, H, W,
    offs_m, m_ok, h_idx, w_idx, offs_n, n_ok,
    amask_ptr, slope,       # A_ACT: the bit mask of the conv whose output gradient `a` is, and its slope
    SIGN: tl.constexpr,     # +1: forward (reads pixel m + shift); -1: dX (reads m - shift, the flipped conv)
    A_ACT: tl.constexpr,    # dX only: use gz = a * act'(z) in place of a, made here from a and the mask
    K_STEPS: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr, IDX64: tl.constexpr,
):
    """acc[m, n] += sum_{tap, k} a[m + SIGN*shift(tap), k] * W[k, n_base + n, tap]  (zero padding).

    With A_ACT the operand is masked in registers, not in shared memory: wgmma reads its A operand
    from registers, so the pipeline stays asynchronous (compile_check verifies: no 0-pending wait).
    The masked value is rounded to the I/O dtype exactly as the dX kernel's gz write rounds it."""
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + pixel_rows(offs_m, C, IDX64)      # hoisted: per tap only a scalar shift is added
    w_cols = w_ptr + (n_base + offs_n) * s_n
    for step in range(0, 9 * K_STEPS):
        tap = step // K_STEPS                          # K_STEPS is constexpr: no runtime divide
        c0 = (step - tap * K_STEPS) * BLOCK_K
        dh = SIGN * (tap // 3 - 1)
        dw = SIGN * (tap % 3 - 1)
        pix_ok = m_ok & (h_idx != tap_edge(dh, H)) & (w_idx != tap_edge(dw, W))
        ck = c0 + offs_k
        shift = (dh * W + dw) * C                      # same image: never crosses n when pix_ok
        if EVEN_K:
            a = tl.load(a_rows[:, None] + (shift + ck)[None, :], mask=pix_ok[:, None], other=0.0)
            b = tl.load(w_cols[None, :] + (tap * s_tap + ck * s_k)[:, None], mask=n_ok[None, :], other=0.0)
        else:
            k_ok = ck < C
            a = tl.load(a_rows[:, None] + (shift + ck)[None, :], mask=pix_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_cols[None, :] + (tap * s_tap + ck * s_k)[:, None], mask=k_ok[:, None] & n_ok[None, :],
                        other=0.0)
        if A_ACT:
            a = cast_rne(act_grad(a.to(tl.float32), amask_ptr, offs_m + (dh * W + dw), pix_ok, ck, ck < C, C, slope,
                                  IDX64), a_ptr.dtype.element_ty, INTERP_BF16)
        if INTERP_BF16:  # the interpreter's bf16 tl.dot returns garbage: dot in fp32 there
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def bias_act(
    acc,                    # (BLOCK_M, BLOCK_N) fp32 conv result of output pixels rows (BLOCK_M,), channels offs_n
    b_ptr, mask_ptr, rows, row_ok, offs_n, n_ok, pid_n, C_OUT, slope,
    HAS_BIAS: tl.constexpr, HAS_ACT: tl.constexpr, SAVE_MASK: tl.constexpr, IDX64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """acc + bias, then LeakyReLU, in fp32; with SAVE_MASK the bit mask z > 0 of these pixels is stored
    (byte co//8 of pixel row r at r*ceil(C_OUT/8) + co//8, bit co%8; BLOCK_N is a multiple of 8)."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_ACT:
        positive = acc > 0.0
        if SAVE_MASK:
            bits = positive.to(tl.int32) << (offs_n % 8)[None, :]
            packed = tl.sum(tl.reshape(bits, (BLOCK_M, BLOCK_N // 8, 8)), axis=2)
            c_bytes = tl.cdiv(C_OUT, 8)
            byte_idx = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
            tl.store(mask_ptr + pixel_rows(rows, c_bytes, IDX64)[:, None] + byte_idx[None, :],
                     packed.to(tl.uint8), mask=row_ok[:, None] & (byte_idx < c_bytes)[None, :])
        acc = tl.where(positive, acc, acc * slope)
    return acc


@triton.jit(do_not_specialize=SHAPE_ARGS)
def conv3x3_fwd_kernel(
    x1_ptr,     # first input, (N, C1, H, W) channels_last
    x2_ptr,     # second input, (N, C2, H, W) channels_last; any valid pointer when C2 == 0
    w_ptr,      # weight (C_OUT, C1 + C2, 3, 3), any strides: element (co, ci, tap) at co*s_co + ci*s_ci + tap*s_tap
    b_ptr,      # bias (C_OUT,); unused when HAS_BIAS is False
    r1_ptr,     # first residual, (N, C_OUT, H, W) channels_last; unused unless HAS_R1
    r2_ptr,     # second residual, (N, C_OUT, H, W) channels_last; unused unless HAS_R2
    y_ptr,      # output, (N, C_OUT, H, W) channels_last: element at m*C_OUT + co
    mask_ptr,   # (N, H, W, ceil(C_OUT/8)) uint8, bit co%8 of byte co//8 = (pre-activation > 0); if SAVE_MASK
    M, H, W, C1, C2, C_OUT, s_co, s_ci, s_tap,
    slope, s1, s2,
    HAS_BIAS: tl.constexpr, HAS_ACT: tl.constexpr, HAS_R1: tl.constexpr, HAS_R2: tl.constexpr,
    SAVE_MASK: tl.constexpr, INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr, IDX64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K1: tl.constexpr, K1_STEPS: tl.constexpr, EVEN_K1: tl.constexpr,
    BLOCK_K2: tl.constexpr, K2_STEPS: tl.constexpr, EVEN_K2: tl.constexpr,
):
    # One program owns a BLOCK_M (pixels) x BLOCK_N (output channels) tile of y, over the full K.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < C_OUT
    w_idx = offs_m % W
    h_idx = (offs_m // W) % H

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # B[k = ci, n = co] = W[co, ci, tap]
    acc = accumulate_taps(acc, x1_ptr, w_ptr, C1, s_ci, s_co, s_tap, 0, H, W, offs_m, m_ok, h_idx, w_idx,
                          offs_n, n_ok, x1_ptr, slope, 1, False, K1_STEPS, BLOCK_K1, EVEN_K1, INTERP_BF16, PRECISION,
                          IDX64)
    if K2_STEPS > 0:
        acc = accumulate_taps(acc, x2_ptr, w_ptr + C1 * s_ci, C2, s_ci, s_co, s_tap, 0, H, W, offs_m, m_ok,
                              h_idx, w_idx, offs_n, n_ok, x2_ptr, slope, 1, False, K2_STEPS, BLOCK_K2, EVEN_K2,
                              INTERP_BF16, PRECISION, IDX64)

    # Epilogue, all in fp32, in the reference's order: bias -> act -> r1 + s1*y -> r2 + s2*y -> cast.
    out_off = pixel_rows(offs_m, C_OUT, IDX64)[:, None] + offs_n[None, :]
    out_ok = m_ok[:, None] & n_ok[None, :]
    acc = bias_act(acc, b_ptr, mask_ptr, offs_m, m_ok, offs_n, n_ok, pid_n, C_OUT, slope, HAS_BIAS, HAS_ACT, SAVE_MASK,
                   IDX64, BLOCK_M, BLOCK_N)
    if HAS_R1:
        acc = tl.load(r1_ptr + out_off, mask=out_ok, other=0.0).to(tl.float32) + s1 * acc
    if HAS_R2:
        acc = tl.load(r2_ptr + out_off, mask=out_ok, other=0.0).to(tl.float32) + s2 * acc
    tl.store(y_ptr + out_off, cast_rne(acc, y_ptr.dtype.element_ty, INTERP_BF16), mask=out_ok)


def mask_shape(n: int, h: int, w: int, c_out: int) -> tuple[int, int, int, int]:
    """The forward's bit-packed activation mask: 8 output channels per byte."""
    return (n, h, w, -(-c_out // 8))  # plain ints: triton.cdiv costs ~7 us per host call

"""Forward of the fused 3x3 convolution: one implicit GEMM over NHWC activations plus its epilogue.

    y = act(conv3x3(cat(x1, x2), W) + b);  y = r1 + s1*y;  y = r2 + s2*y        (spec: "What the fused
                                                                               kernels cover")
GEMM view: M = N*H*W output pixels, N = C_out, K = 9*(C1 + C2). The K loop walks x1 and then x2, each
as a flat loop over (tap, channel block), so the concatenation is never materialised and the single
loop per input is what Triton software-pipelines (num_stages).

Layout contract (the launchers in op.py guarantee it): every activation is channels_last-contiguous,
so element (n, c, h, w) of a C-channel tensor sits at ((n*H + h)*W + w)*C + c = m*C + c.
"""
from __future__ import annotations

import triton
import triton.language as tl

# The interpreter decides at decoration time (triton.knobs.runtime.interpret, i.e. TRITON_INTERPRET=1
# set before import); the launchers need to know so they can upcast bf16 dots (interpreter bug) and
# use a single big-tile config (each interpreted loop step costs ~2 ms per program).
INTERPRETING = bool(triton.knobs.runtime.interpret)


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
def _accumulate_input(
    acc,                    # (BLOCK_M, BLOCK_N) fp32 accumulator
    x_ptr,                  # one input, (N, C, H, W) channels_last: element at m*C + c
    w_ptr,                  # weight as (3, 3, C_IN_TOTAL, C_OUT) contiguous: ((tap*C_IN_TOTAL + ci)*C_OUT + co)
    C, c_base, C_IN_TOTAL, C_OUT, H, W,
    offs_m, m_ok, h_idx, w_idx, offs_n, n_ok,
    BLOCK_K: tl.constexpr, INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr,
):
    """acc += im2col(x)[offs_m, :] @ W[c_base : c_base + C rows of every tap, offs_n]."""
    offs_k = tl.arange(0, BLOCK_K)
    k_steps = tl.cdiv(C, BLOCK_K)
    for step in range(0, 9 * k_steps):
        tap = step // k_steps
        c0 = (step - tap * k_steps) * BLOCK_K
        dh = tap // 3 - 1
        dw = tap % 3 - 1
        hh = h_idx + dh
        ww = w_idx + dw
        # zero padding: taps that fall outside the image read nothing
        pix_ok = m_ok & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
        src = (offs_m + dh * W + dw).to(tl.int64)  # same image: the shift never crosses n when pix_ok
        ck = c0 + offs_k
        k_ok = ck < C
        a = tl.load(x_ptr + src[:, None] * C + ck[None, :], mask=pix_ok[:, None] & k_ok[None, :], other=0.0)
        w_rows = (tap * C_IN_TOTAL + c_base + ck).to(tl.int64)
        b = tl.load(w_ptr + w_rows[:, None] * C_OUT + offs_n[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if INTERP_BF16:  # the interpreter's bf16 tl.dot returns garbage: dot in fp32 there
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def conv3x3_fwd_kernel(
    x1_ptr,     # first input, (N, C1, H, W) channels_last
    x2_ptr,     # second input, (N, C2, H, W) channels_last; any valid pointer when C2 == 0
    w_ptr,      # weight permuted to (3, 3, C1 + C2, C_OUT) contiguous (C_out fastest)
    b_ptr,      # bias (C_OUT,); unused when HAS_BIAS is False
    r1_ptr,     # first residual, (N, C_OUT, H, W) channels_last; unused unless HAS_R1
    r2_ptr,     # second residual, (N, C_OUT, H, W) channels_last; unused unless HAS_R2
    y_ptr,      # output, (N, C_OUT, H, W) channels_last: element at m*C_OUT + co
    mask_ptr,   # (N, H, W, ceil(C_OUT/8)) uint8, bit co%8 of byte co//8 = (pre-activation > 0); if SAVE_MASK
    M, H, W, C1, C2, C_OUT,
    slope, s1, s2,
    HAS_BIAS: tl.constexpr, HAS_ACT: tl.constexpr, HAS_R1: tl.constexpr, HAS_R2: tl.constexpr,
    SAVE_MASK: tl.constexpr, INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
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
    c_in_total = C1 + C2

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _accumulate_input(acc, x1_ptr, w_ptr, C1, 0, c_in_total, C_OUT, H, W,
                            offs_m, m_ok, h_idx, w_idx, offs_n, n_ok, BLOCK_K, INTERP_BF16, PRECISION)
    acc = _accumulate_input(acc, x2_ptr, w_ptr, C2, C1, c_in_total, C_OUT, H, W,
                            offs_m, m_ok, h_idx, w_idx, offs_n, n_ok, BLOCK_K, INTERP_BF16, PRECISION)

    # Epilogue, all in fp32, in the reference's order: bias -> act -> r1 + s1*y -> r2 + s2*y -> cast.
    out_off = offs_m.to(tl.int64)[:, None] * C_OUT + offs_n[None, :]
    out_ok = m_ok[:, None] & n_ok[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_ACT:
        positive = acc > 0.0
        if SAVE_MASK:  # 1 bit per element: 8 channels per byte (BLOCK_N is a multiple of 8)
            bits = positive.to(tl.int32) << (offs_n % 8)[None, :]
            packed = tl.sum(tl.reshape(bits, (BLOCK_M, BLOCK_N // 8, 8)), axis=2)
            c_bytes = tl.cdiv(C_OUT, 8)
            byte_idx = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
            tl.store(mask_ptr + offs_m.to(tl.int64)[:, None] * c_bytes + byte_idx[None, :], packed.to(tl.uint8),
                     mask=m_ok[:, None] & (byte_idx < c_bytes)[None, :])
        acc = tl.where(positive, acc, acc * slope)
    if HAS_R1:
        acc = tl.load(r1_ptr + out_off, mask=out_ok, other=0.0).to(tl.float32) + s1 * acc
    if HAS_R2:
        acc = tl.load(r2_ptr + out_off, mask=out_ok, other=0.0).to(tl.float32) + s2 * acc
    tl.store(y_ptr + out_off, cast_rne(acc, y_ptr.dtype.element_ty, INTERP_BF16), mask=out_ok)


# GPU configs: small, H100-minded (C_out is 32 or 64 in the trunk; K per tap is 32..96). Every one
# is run by the tests. No num_warps=8 (pytorch issue 173068: miscompiled 3x3 implicit GEMM).
FWD_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
]
# Under the interpreter: one big tile, so few programs and few loop steps.
FWD_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=1)

conv3x3_fwd_autotuned = triton.autotune(configs=FWD_CONFIGS, key=["M", "H", "W", "C1", "C2", "C_OUT"])(
    conv3x3_fwd_kernel
)


# ------------------------------------------------------------------------------------------------
# Host launcher
# ------------------------------------------------------------------------------------------------
def mask_shape(n: int, h: int, w: int, c_out: int) -> tuple[int, int, int, int]:
    """The forward's bit-packed activation mask: 8 output channels per byte."""
    return (n, h, w, triton.cdiv(c_out, 8))


def dot_precision(dtype) -> str:
    import torch

    return "ieee" if dtype == torch.float32 else "tf32"


def _launch_kwargs(config: triton.Config) -> dict:
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def weight_taps(weight):
    """(C_out, C_in, 3, 3) -> (3, 3, C_in, C_out) contiguous: B of the forward GEMM (C_out fastest),
    read transposed by the dX kernel, so the eager path permutes once per conv and saves this copy."""
    return weight.permute(2, 3, 1, 0).contiguous()


def conv3x3_fwd(inputs, weight, bias, negative_slope, residual, res_scale, residual2, res2_scale,
                save_mask: bool, config: triton.Config | None = None, w_taps=None):
    """Launch the forward. Returns (y, mask): y (N, C_out, H, W) channels_last in the input dtype;
    mask (N, H, W, ceil(C_out/8)) uint8, z > 0 packed 8 channels per byte, when save_mask and there is
    an activation, else an empty tensor.

    Inputs, residuals need not be channels_last: each is converted once here (a no-op when it already
    is). config: force one triton.Config (the tests run every entry of FWD_CONFIGS); None autotunes
    on a GPU and uses FWD_INTERPRETER_CONFIG under the interpreter. w_taps: weight_taps(weight) if the
    caller already has it.
    """
    import torch

    x1 = inputs[0].contiguous(memory_format=torch.channels_last)
    x2 = inputs[1].contiguous(memory_format=torch.channels_last) if len(inputs) == 2 else x1
    n, c1, h, w = x1.shape
    c2 = inputs[1].shape[1] if len(inputs) == 2 else 0
    c_out = weight.shape[0]
    if w_taps is None:
        w_taps = weight_taps(weight)
    r1 = residual.contiguous(memory_format=torch.channels_last) if residual is not None else None
    r2 = residual2.contiguous(memory_format=torch.channels_last) if residual2 is not None else None
    y = torch.empty((n, c_out, h, w), dtype=x1.dtype, device=x1.device, memory_format=torch.channels_last)
    has_act = negative_slope is not None
    save = bool(save_mask and has_act)
    mask = torch.empty(mask_shape(n, h, w, c_out) if save else (0,), dtype=torch.uint8, device=x1.device)
    m = n * h * w
    if m == 0:  # an empty batch: nothing to launch
        return y, mask
    args = (
        x1, x2, w_taps, bias if bias is not None else y, r1 if r1 is not None else y,
        r2 if r2 is not None else y, y, mask if save else y,
        m, h, w, c1, c2, c_out,
        float(negative_slope) if has_act else 0.0, float(res_scale), float(res2_scale),
    )
    flags = dict(
        HAS_BIAS=bias is not None, HAS_ACT=has_act, HAS_R1=r1 is not None, HAS_R2=r2 is not None,
        SAVE_MASK=save, INTERP_BF16=INTERPRETING and x1.dtype != torch.float32,
        # fp32 I/O is the exactness path (tests, fp32 training): no silent TF32 truncation. bf16 dots
        # ignore it; they get the default so no backend ever sees "ieee" with bf16 operands.
        PRECISION=dot_precision(x1.dtype),
    )
    if config is None and INTERPRETING:
        config = FWD_INTERPRETER_CONFIG
    if config is not None:
        grid = (triton.cdiv(m, config.kwargs["BLOCK_M"]), triton.cdiv(c_out, config.kwargs["BLOCK_N"]))
        conv3x3_fwd_kernel[grid](*args, **flags, **_launch_kwargs(config))
    else:
        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(c_out, meta["BLOCK_N"]))
        conv3x3_fwd_autotuned[grid](*args, **flags)
    return y, mask

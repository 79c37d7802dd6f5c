"""A prepared experiment for the next GPU call: the 3x3 conv forward with TMA tensor descriptors.

    python bench/tma_probe.py --interpret        # CPU: the probe against a float64 conv2d (Triton interpreter)
    python bench/tma_probe.py --sm90             # CPU: compiled for sm_90, SASS per wgmma next to the fused kernel's
    python bench/tma_probe.py --cuda [--batch 64] [--json out.json]   # GPU: probe vs fused kernel vs cuDNN, ms

Not a product path: the fused kernels (kernels/conv3x3_fwd.py) compute every tile address and padding
mask per thread, which is most of their loop's instructions (bench/RESULTS.md, round 4: ~24 SASS per
wgmma). Here the A tile of a tap is one TMA box of the NHWC input, [1, R, W, BK] at (n, h0 + dh, dw, c0),
and the descriptor's out-of-bounds zero fill is the padding, so the loop has no per-thread address work.
The weight tile is a box of the channels_last weight seen as [C_out, 9*C_in]. A tile is R whole image
rows (BLOCK_M = R*W): W a power of two, R*W in {64, 128} and dividing H*W. Statically (Triton 3.6 and
3.9, sm_90): R = 1 (W >= 64) feeds both operands from shared memory; R > 1 reshapes the box in
registers (A from registers, still asynchronous).
Descriptors are made on the device (tl.make_tensor_descriptor), which needs triton.set_allocator for
their scratch: a process-wide setting, one reason this is a probe and not the product. What the GPU
call must answer: is the probe faster than the fused forward at the trunk (32x32) and upsampling
(64x64 - 256x256) shapes, batch 8 / 64, and by how much once its extra host work (the allocator call
per launch) is counted.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

if "--interpret" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch
import triton
import triton.language as tl


@triton.jit
def conv3x3_fwd_tma_kernel(
    x_ptr,      # input, (N, C, H, W) channels_last, i.e. NHWC memory
    w_ptr,      # weight (C_OUT, C, 3, 3) channels_last, i.e. [C_OUT, 9*C] with (kh, kw, ci) fastest last
    b_ptr,      # bias (C_OUT,)
    y_ptr,      # out: (N, C_OUT, H, W) channels_last
    N, H, W, C, C_OUT,
    R: tl.constexpr,        # image rows per tile
    WB: tl.constexpr,       # columns per tile: W (whole rows), or a divisor of W when R = 1
    BK: tl.constexpr,       # channels per K step
    BN: tl.constexpr,       # output channels per tile
    K_STEPS: tl.constexpr,  # C // BK
    INTERP_FP32: tl.constexpr,  # the interpreter's bf16 tl.dot returns garbage: dot in fp32 there
):
    # grid = (N * (H / R) * (W / WB) tiles, C_OUT / BN)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    col_blocks = W // WB
    per_image = (H // R) * col_blocks
    n = pid_m // per_image
    rest = pid_m - n * per_image
    h0 = (rest // col_blocks) * R
    w0 = (rest - (rest // col_blocks) * col_blocks) * WB
    co0 = pid_n * BN
    xd = tl.make_tensor_descriptor(x_ptr, shape=[N, H, W, C], strides=[H * W * C, W * C, C, 1],
                                   block_shape=[1, R, WB, BK])
    wd = tl.make_tensor_descriptor(w_ptr, shape=[C_OUT, 9 * C], strides=[9 * C, 1], block_shape=[BN, BK])
    acc = tl.zeros((R * WB, BN), dtype=tl.float32)
    for step in range(0, 9 * K_STEPS):
        tap = step // K_STEPS
        c0 = (step - tap * K_STEPS) * BK
        # rows h0-1 .. h0+R (and columns -1, W) outside the image come back as zeros: the padding
        a = xd.load([n, h0 + tap // 3 - 1, w0 + tap % 3 - 1, c0]).reshape(R * WB, BK)
        b = wd.load([co0, tap * C + c0])
        if INTERP_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc)
    offs_m = tl.arange(0, R * WB)
    offs_n = co0 + tl.arange(0, BN)
    acc += tl.load(b_ptr + offs_n).to(tl.float32)[None, :]
    pix = (n * H + h0 + offs_m // WB) * W + w0 + offs_m % WB
    tl.store(y_ptr + pix[:, None] * C_OUT + offs_n[None, :], acc.to(y_ptr.dtype.element_ty))


def tile(h: int, w: int) -> tuple[int, int]:
    """(R, WB): 128 pixels where the image allows, else 64; whole rows, or a piece of one row."""
    for block_m in (128, 64):
        if w % block_m == 0:
            return 1, block_m
        if block_m % w == 0 and h % (block_m // w) == 0:
            return block_m // w, w
    raise ValueError(f"no TMA tile for {h}x{w}: W must be a power of two (>= 64 / 128, or dividing them)")


def conv_tma(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The probe's y = conv3x3(x, w) + b; x, w channels_last; y channels_last in x's dtype."""
    n, c, h, wd = x.shape
    c_out = w.shape[0]
    r, wb = tile(h, wd)
    bk = next(k for k in (64, 32, 16) if c % k == 0)  # K steps must tile C exactly (96 = 3 x 32)
    bn = min(128, c_out)
    if c % bk or c_out % bn:
        raise ValueError(f"the probe needs C ({c}) a multiple of 16 and C_out ({c_out}) a multiple of {bn}")
    y = torch.empty_strided((n, c_out, h, wd), (h * wd * c_out, 1, wd * c_out, c_out), dtype=x.dtype,
                            device=x.device)
    # the device-side descriptors' global scratch, on the input's device
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=x.device))
    conv3x3_fwd_tma_kernel[(n * (h // r) * (wd // wb), c_out // bn)](
        x, w, b, y, n, h, wd, c, c_out, R=r, WB=wb, BK=bk, BN=bn, K_STEPS=c // bk,
        INTERP_FP32=os.environ.get("TRITON_INTERPRET") == "1" and x.dtype != torch.float32)
    return y


def check_interpreted() -> float:
    """Largest |probe - float64 conv2d| / |terms| over small awkward-enough shapes (CPU, interpreter)."""
    import torch.nn.functional as F

    worst = 0.0
    gen = torch.Generator().manual_seed(0)
    for n, c, c_out, h, w in [(2, 32, 32, 8, 16), (1, 16, 32, 2, 64), (1, 96, 16, 4, 32), (1, 16, 16, 2, 256)]:
        x = torch.randn(n, c, h, w, generator=gen).to(torch.bfloat16)
        wt = torch.randn(c_out, c, 3, 3, generator=gen).to(torch.bfloat16)
        b = torch.randn(c_out, generator=gen).to(torch.bfloat16)
        cl = torch.channels_last
        y = conv_tma(x.contiguous(memory_format=cl), wt.contiguous(memory_format=cl), b).double()
        ref = F.conv2d(x.double(), wt.double(), b.double(), padding=1)
        scale = F.conv2d(x.double().abs(), wt.double().abs(), b.double().abs(), padding=1)
        worst = max(worst, ((y - ref).abs() / scale).max().item())
    return worst


def sm90_rows() -> list[dict]:
    """The probe compiled for sm_90 next to the fused forward at the same shapes (compile_check's analyzer)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from gafh_fast.kernels import compile_check as cc

    rows = []
    for r, wb, bn in [(4, 32, 32), (4, 32, 64), (2, 64, 64), (1, 128, 64)]:  # tile() at W = 32, 32, 64, >= 128
        sig = {name: "*bf16" for name in ("x_ptr", "w_ptr", "b_ptr", "y_ptr")}
        sig.update({name: "i32" for name in ("N", "H", "W", "C", "C_OUT")})
        consts = {"R": r, "WB": wb, "BK": 64, "BN": bn, "K_STEPS": 1, "INTERP_FP32": False}
        sig.update({name: "constexpr" for name in consts})
        aligned = [["tt.divisibility", 16]]
        attrs = {(i,): aligned for i in (0, 1, 2, 3, 7, 8)}  # pointers, C, C_OUT
        compiled = triton.compile(ASTSource(conv3x3_fwd_tma_kernel, sig, consts, attrs),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
        row = cc.analyze(compiled, 90, 1, 4)
        sass = cc._run_tool("nvdisasm", ["-c"], compiled.asm["cubin"], ".cubin").stdout
        rows.append(dict(tile=f"R={r} W={wb} (M={r * wb}) N={bn} K=64", registers=row["registers"],
                         spill_bytes=row["spill_bytes"], sass_per_wgmma=row["sass_per_wgmma"],
                         waits_0_in_loops=row["waits_0_in_loops"], tma_loads=sass.count("UTMALDG"),
                         operand_a_via_registers=(row["main_loop_opcodes"] or {}).get("LDSM", 0) > 0,
                         fail=row["fail"]))
        print(" ".join(f"{k} {v}" for k, v in rows[-1].items()), flush=True)
    return rows


def cuda_rows(batch: int) -> list[dict]:
    """ms per forward (CUDA events, median of 3 rounds of 50): probe, fused Triton forward, cuDNN."""
    import torch.nn.functional as F

    from gafh_fast.kernels.conv3x3 import conv_forward

    def timed(fn) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(50):
                fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 50)
        return sorted(times)[1]

    rows = []
    cl = torch.channels_last
    for c, c_out, side in [(64, 32, 32), (96, 64, 32), (64, 64, 64), (64, 64, 128), (64, 64, 256)]:
        x = torch.randn(batch, c, side, side, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=cl)
        w = (torch.randn(c_out, c, 3, 3, device="cuda", dtype=torch.bfloat16) / 24).contiguous(memory_format=cl)
        b = torch.randn(c_out, device="cuda", dtype=torch.bfloat16)
        ref = F.conv2d(x.float(), w.float(), b.float(), padding=1)
        err = ((conv_tma(x, w, b).float() - ref).abs().max() / ref.abs().max()).item()
        row = dict(shape=f"{batch}x{c}->{c_out} {side}x{side}", max_rel_err=err,
                   probe_ms=timed(lambda: conv_tma(x, w, b)),
                   fused_ms=timed(lambda: conv_forward([x], w, b, None, None, 1.0, None, 1.0, False)),
                   cudnn_ms=timed(lambda: F.conv2d(x, w, b, padding=1)))
        rows.append(row)
        print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--interpret", action="store_true", help="correctness on CPU (Triton interpreter)")
    mode.add_argument("--sm90", action="store_true", help="static report for sm_90 on CPU")
    mode.add_argument("--cuda", action="store_true", help="timings on the GPU")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--json")
    args = parser.parse_args()
    t0 = time.perf_counter()
    if args.interpret:
        worst = check_interpreted()
        result = {"max_err_over_terms": worst}
        print(f"probe vs float64 conv2d: max |err| / |terms| = {worst:.3g} (bf16 output rounding: <= 2**-8)")
        ok = worst <= 2.0 ** -8
    elif args.sm90:
        result = {"rows": sm90_rows()}
        ok = not any(r["fail"] for r in result["rows"])
    else:
        result = {"rows": cuda_rows(args.batch), "device": torch.cuda.get_device_name()}
        ok = all(r["max_rel_err"] < 2e-2 for r in result["rows"])
    result["seconds"] = time.perf_counter() - t0
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

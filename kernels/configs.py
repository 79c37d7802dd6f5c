"""Tile configs: at most two candidates per kernel, picked by a heuristic on the channel counts, the
image width and a bucket of M (pixels), instead of a fixed list autotuned on the exact M.

Why these tiles: the trunk's channel counts are 32, 64 and 96 (nf 64, gc 32), so a tile as wide as
C_out (BLOCK_N = C_out) and a K block as deep as one tap of one input (BLOCK_K = min(64, C)) wastes no
MMA lanes and takes one loop step per tap; 64-wide tiles on 32-channel operands masked half of every
MMA off. BLOCK_M is the only free choice: 128 when the pixel tiles fill the machine (>= 2 waves on
132 SMs), else 64. No num_warps=8 (pytorch issue 173068: miscompiled 3x3 implicit GEMM).
"""
from __future__ import annotations

from typing import Optional

import triton

H100_SMS = 132


def cdiv(a: int, b: int) -> int:
    """Host-side ceil division (triton.cdiv is a JIT function: ~7 us per call from Python)."""
    return -(-a // b)  # the bucket thresholds assume an H100-class part; waves are only a heuristic input


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def pow2_block(c: int, lo: int = 16, hi: int = 64) -> int:
    """The smallest power of two >= c, clamped to [lo, hi] (tl.dot needs K, N >= 16)."""
    return max(lo, min(hi, next_pow2(max(int(c), 1))))


def m_bucket(m: int) -> int:
    """Tuning keys hold M rounded up to a power of two (>= 1024): batch sizes share their decisions."""
    return max(1024, next_pow2(max(int(m), 1)))


def _k_meta(prefix: str, c: int) -> dict:
    """BLOCK_K, its step count per tap and whether it divides C, for one GEMM operand of C channels."""
    if c == 0:
        return {f"BLOCK_{prefix}": 16, f"{prefix}_STEPS": 0, f"EVEN_{prefix}": True}
    block = pow2_block(c)
    return {f"BLOCK_{prefix}": block, f"{prefix}_STEPS": cdiv(c, block), f"EVEN_{prefix}": c % block == 0}


def _block_m_choices(m: int, n_tiles: int) -> list[tuple[int, int]]:
    """(BLOCK_M, num_stages) candidates: 128 first when it gives >= 2 waves, else 64 first."""
    waves_128 = cdiv(m_bucket(m), 128) * n_tiles / H100_SMS
    return [(128, 3), (64, 4)] if waves_128 >= 2 else [(64, 4), (128, 3)]


def fwd_candidates(c1: int, c2: int, c_out: int, w: int, m: int) -> list[triton.Config]:
    block_n = pow2_block(c_out, lo=16, hi=128)
    meta = {"BLOCK_N": block_n, **_k_meta("K1", c1), **_k_meta("K2", c2)}
    n_tiles = cdiv(c_out, block_n)
    return [triton.Config({"BLOCK_M": bm, **meta}, num_warps=4, num_stages=st) for bm, st in _block_m_choices(m, n_tiles)]


def dx_candidates(ca: int, cb: int, n_tot: int, w: int, m: int) -> list[triton.Config]:
    block_n = pow2_block(n_tot)
    meta = {"BLOCK_N": block_n, **_k_meta("KA", ca), **_k_meta("KB", cb)}
    n_tiles = cdiv(n_tot, block_n)
    return [triton.Config({"BLOCK_M": bm, **meta}, num_warps=4, num_stages=st) for bm, st in _block_m_choices(m, n_tiles)]


def idb_gz2_candidates(nf: int, gc: int, w: int, m: int) -> list[triton.Config]:
    """The standalone IDB's first backward step (conv3x3._gz2_way): dX of conv2 onto h1's gc channels, one
    tile (dx_candidates' first), with gz2 = g * act2'(z2) made two ways, GZ_PASS (a host-side key): True,
    a pass of its own (conv3x3_bwd_gz_kernel: one more read and write of g's size) and a plain dX; False,
    on the dX's operand at each of the 9 taps (A_ACT), written out for dW (one launch fewer). The sm_90
    report has the first dX at ~25 SASS per wgmma and the second at ~100; on the H200 the upsampling
    convs' same choice went to the pass, 2.0-2.4x faster (bench/RESULTS.md, D1-D4), so it is first here
    (the interpreter's and an untimed choice)."""
    return gz_pass_ways(dx_candidates(nf, 0, gc, w, m)[0], (True, False))


def dw_candidates(c1: int, c2: int, c_out: int, w: int, m: int, cb: int = 0, cb_out: int = 0) -> list[triton.Config]:
    """dW tiles: C_out x C_in blocks of one tap; the pixel block (the GEMM's K) is the free choice.
    cb, cb_out: a second conv's channels (job B: the IDB's conv1 in its conv2's launch), whose tiles share
    the input-channel block and the pixel block and have an output-channel block of their own."""
    block_c, block_co = pow2_block(max(c1, c2, cb)), pow2_block(c_out)
    block_co_b = pow2_block(cb_out) if cb else 16
    # EVEN_*: the channel blocks tile the counts exactly, so the loop's loads need no channel masks
    meta = {"BLOCK_C": block_c, "BLOCK_CO": block_co, "EVEN_C1": c1 % block_c == 0, "EVEN_C2": c2 % block_c == 0,
            "EVEN_CO": c_out % block_co == 0, "HAS_B": cb > 0, "BLOCK_CO_B": block_co_b,
            "EVEN_CB": cb % block_c == 0, "EVEN_COB": cb_out % block_co_b == 0}
    return _pixel_block_choices(meta)


def _pixel_block_choices(meta: dict) -> list[triton.Config]:
    """The two dW candidates of one channel tiling: pixel blocks of 128 (3 stages) and 64 (4 stages)."""
    return [triton.Config({**meta, "BLOCK_P": 128}, num_warps=4, num_stages=3),
            triton.Config({**meta, "BLOCK_P": 64}, num_warps=4, num_stages=4)]


def _up_gemm_candidates(k_channels: int, n_channels: int, m: int, programs_per_tile: int) -> list[triton.Config]:
    """The upsampling conv's forward (K = C_in, N = C_out, 4 phase programs per tile) and dX (K = C_out,
    N = C_in): one K block per tap as deep as the channels, a tile as wide as N; BLOCK_M as above."""
    block_n = pow2_block(n_channels, lo=16, hi=128)
    block_k = pow2_block(k_channels)
    meta = {"BLOCK_N": block_n, "BLOCK_K": block_k, "K_STEPS": cdiv(k_channels, block_k),
            "EVEN_K": k_channels % block_k == 0}
    n_tiles = cdiv(n_channels, block_n) * programs_per_tile
    return [triton.Config({"BLOCK_M": bm, **meta}, num_warps=4, num_stages=st) for bm, st in _block_m_choices(m, n_tiles)]


def up_fwd_candidates(c_in: int, c_out: int, w: int, m: int) -> list[triton.Config]:
    """m: low-resolution pixels (each program makes one phase of BLOCK_M of them)."""
    return _up_gemm_candidates(c_in, c_out, m, 4)


def up_dx_candidates(c_in: int, c_out: int, w: int, m: int, act: bool = False) -> list[triton.Config]:
    """With an activation the two candidates are one tile (the heuristic's first) made two ways, by
    GZ_PASS (a host-side key, not a kernel argument): False makes gz = g * act'(z) on the GEMM's
    operand at each of the 16 taps and writes it for dW (3 backward launches); True makes gz in a pass
    of its own (conv3x3_bwd_gz_kernel) and runs dX on it without a mask in the loop (4 launches, one more
    full-resolution read and write). The sm_90 report has the first at ~100 SASS per wgmma and the
    second at ~30; which is faster is a device question, so the tuner times it (bench/RESULTS.md,
    Round 8). Without an activation: the two tiles, as the other GEMMs."""
    tiles = _up_gemm_candidates(c_out, c_in, m, 1)
    if not act:
        return tiles
    return gz_pass_ways(tiles[0], (False, True))


def gz_pass_ways(tile: triton.Config, order: tuple) -> list[triton.Config]:
    """One dX tile as two candidates, gz made on its operand (GZ_PASS False) or by a pass of its own
    (True), in the given order: GZ_PASS is a host-side key, which split_gz_pass takes off again."""
    return [triton.Config({**tile.kwargs, "GZ_PASS": gz_pass}, num_warps=tile.num_warps,
                          num_stages=tile.num_stages) for gz_pass in order]


def split_gz_pass(cfg: triton.Config) -> tuple[triton.Config, bool]:
    """(the kernel's config without GZ_PASS, whether the gz pass runs): a gz_pass_ways candidate taken apart;
    a config without the key is a tile with gz made on the operand."""
    tile = triton.Config({k: v for k, v in cfg.kwargs.items() if k != "GZ_PASS"}, num_warps=cfg.num_warps,
                         num_stages=cfg.num_stages)
    return tile, bool(cfg.kwargs.get("GZ_PASS", False))


def up_dw_candidates(c_in: int, c_out: int, w: int, m: int) -> list[triton.Config]:
    """As dw_candidates for one input; the pixel block walks low-resolution pixels. Programs per tap (the
    H200 chose 128-pixel blocks at every shape, D1/D2), or per output phase and its 4 taps (PHASES): gz is
    then read once per phase, not once per tap (2.1 GB less through L2 at batch 64), for 4 accumulators."""
    block_c, block_co = pow2_block(c_in), pow2_block(c_out)
    meta = {"BLOCK_C": block_c, "BLOCK_CO": block_co, "EVEN_C": c_in % block_c == 0, "EVEN_CO": c_out % block_co == 0}
    return [triton.Config({**meta, "BLOCK_P": 128, "PHASES": False}, num_warps=4, num_stages=3),
            triton.Config({**meta, "BLOCK_P": 64, "PHASES": True}, num_warps=4, num_stages=2)]


def out_dx_candidates(c_in: int, rows: int, w: int, m: int) -> list[triton.Config]:
    """The output conv's dX (outconv_kernels.py): K = rows = KS*KS*CP (the flattened tap and padded output
    channel, gathered), N = C_in, 128 pixels a program (32768+ programs at the paper's size: no waves
    question). Two ways to spend the warps (the sm_90 report, bench/RESULTS.md Round 8): 8 warps, two
    warpgroups of 64 pixels (80 registers, ~99 instructions per pixel), or 4 (178 registers, ~87).
    8 warps despite pytorch 173068 / triton 1254 (the flattened tap loop of a conv template): this K loop
    is unrolled (static_range), and the GPU kernel tests compile and check both candidates."""
    block_r = out_rows_block(rows)
    meta = {"BLOCK_M": 128, "BLOCK_N": pow2_block(c_in, lo=16, hi=64), "BLOCK_R": block_r,
            "R_STEPS": cdiv(rows, block_r)}
    return [triton.Config(meta, num_warps=8, num_stages=3), triton.Config(meta, num_warps=4, num_stages=3)]


def out_rows_block(rows: int) -> int:
    """dX's K block over the output conv's rows; the re-laid weight is padded to a multiple of it."""
    return pow2_block(rows)


def out_dw_candidates(c_in: int, rows: int, w: int, m: int) -> list[triton.Config]:
    """The output conv's dW (outconv_kernels.py): 32-row tiles x C_in over 128-pixel blocks, the gathered
    gz as the register A operand of mma.sync (~16 SASS per HMMA; 64-row tiles got wgmma, serialised
    under Triton 3.6 with 4 warps and ~60-70 SASS per wgmma with 8: bench/RESULTS.md rounds 8 and 10,
    where the H200 chose 32 rows at batch 8, 64 and 256):
      * one row tile per program: x read once per 32 rows (11 times for the paper's 324);
      * four row tiles per program, four MMAs on each x tile: x read once per 128 rows (3 times), for
        4 accumulators (168 registers: 2 stages, so 3 CTAs fit an SM) and 384 rows computed instead of
        352; its split grows so that both launch ~1050 programs at batch 64 (outconv._dw_chunks).
    At batch 64 the first moves ~9 GB from L2 into the SMs in its 1.7 ms on the H200 (D1), near L2's
    bandwidth; the second ~5 GB, with 5.5 SASS per HMMA in its loop against 16.9 (round 11)."""
    block_c = pow2_block(c_in)
    return [triton.Config({"BLOCK_R": 32, "BLOCK_C": block_c, "BLOCK_P": 128, "GROUPS": 1}, num_warps=4,
                          num_stages=3),
            triton.Config({"BLOCK_R": 32, "BLOCK_C": block_c, "BLOCK_P": 128, "GROUPS": 4}, num_warps=4,
                          num_stages=2)]


FIN_BLOCK = 1024           # finalize programs: partial elements per program
GZ_BLOCK_P = 64            # the gz pass: pixels per program (x up to 64 channels: 16 elements per thread)
DW_CHUNK_MULTIPLE = 128    # dW pixel chunks are a multiple of every BLOCK_P above
DW_MIN_CHUNK = 1024        # dW pixel chunks this long at least (dw_split, split_chunks): the fp32 workspace stays small


def split_chunks(m: int, base: int, ratio: int = 1) -> tuple[int, int]:
    """(split, chunk pixels) of a dW reduction over m pixels: base chunks (dw_split's, or a caller's), times
    ratio for a config whose programs each do `ratio` times the work of one (fewer programs per chunk, so
    more chunks keep the grid as large; at least DW_MIN_CHUNK pixels per chunk then), the chunk a multiple of
    DW_CHUNK_MULTIPLE."""
    s = max(1, min(base * ratio, m // DW_MIN_CHUNK)) if ratio > 1 else base
    chunk = cdiv(cdiv(m, s), DW_CHUNK_MULTIPLE) * DW_CHUNK_MULTIPLE
    return cdiv(m, chunk), chunk


def dw_split(m: int, c_in: int, c_out: int, sms: int, taps: int = 9, job_b: Optional[tuple] = None) -> int:
    """Pixel chunks of the dW reduction: ~4 programs per SM over the (tap, tile) programs (taps: 9, or 16
    for the upsampling conv's phase taps; job_b = (C_in, C_out) of a second conv in the same launch, whose
    tiles count too), chunks of at least DW_MIN_CHUNK pixels (the fp32 workspace stays a few MB). sms = 0:
    one chunk (the interpreter runs programs one after another, so splitting buys nothing there)."""
    if sms <= 0:
        return 1
    tiles = taps * cdiv(c_in, 64) * cdiv(c_out, 64)
    if job_b is not None:
        tiles += taps * cdiv(job_b[0], 64) * cdiv(job_b[1], 64)
    return max(1, min(cdiv(4 * sms, tiles), m // DW_MIN_CHUNK))

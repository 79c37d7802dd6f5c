"""FLOP and byte floor per kernel launch of one IDB forward + backward (the time no version beats).

    python -m gafh_fast.kernels.cost_model [--batch 64] [--tflops 800] [--tbps 3.0]

Per launch of conv3x3.idb_forward / idb_backward (nf 64, gc 32, 32x32, bf16): the matmul FLOPs, and
the fewest bytes it must move through device memory (each tensor it reads once, each it writes
once; fp32 dW partials at the H100 split; masks 1 bit per element). The floor is the larger of
FLOPs / rate and bytes / bandwidth (issue 11 uses 800 TFLOP/s dense bf16 and 3 TB/s for an H100).
"""
from __future__ import annotations

import argparse

from .configs import dw_split

BF16, FP32 = 2, 4


def idb_launches(batch: int, nf: int = 64, gc: int = 32, side: int = 32, sms: int = 132) -> list[dict]:
    m = batch * side * side
    act = lambda c: m * c * BF16  # noqa: E731  one bf16 activation of c channels
    bits = lambda c: m * c // 8  # noqa: E731  one bit-packed mask
    w1, w2 = 9 * nf * gc, 9 * (nf + gc) * nf
    s2, s1 = dw_split(m, nf + gc, nf, sms), dw_split(m, nf, gc, sms)
    return [
        dict(launch="fwd conv1", flops=2 * m * w1, bytes=act(nf) + act(gc) + bits(gc) + w1 * BF16),
        dict(launch="fwd conv2", flops=2 * m * w2,
             bytes=act(nf) + act(gc) + act(nf) + act(nf) + bits(nf) + w2 * BF16),  # x, h1, x0 in; y out
        dict(launch="bwd gz1 (+ gz2 written)", flops=2 * m * 9 * nf * gc,  # g, mask2, mask1 in; gz1, gz2 out
             bytes=act(nf) + bits(nf) + bits(gc) + act(gc) + act(nf)),
        dict(launch="bwd dW2 + db2", flops=2 * m * w2,  # x, h1, gz2 in; partials out
             bytes=act(nf) + act(gc) + act(nf) + s2 * w2 * FP32),
        dict(launch="bwd dW1 + db1", flops=2 * m * w1, bytes=act(nf) + act(gc) + s1 * w1 * FP32),
        dict(launch="bwd dx + finalize", flops=2 * m * 9 * nf * (nf + gc),
             bytes=act(nf) + act(gc) + act(nf) + (s1 * w1 + s2 * w2) * FP32),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tflops", type=float, default=800.0)
    parser.add_argument("--tbps", type=float, default=3.0)
    args = parser.parse_args()
    total_us = total_f = total_b = 0.0
    print(f"IDB nf 64 gc 32 32x32 batch {args.batch} bf16; floor = max(FLOP/{args.tflops:g}T, bytes/{args.tbps:g}TB/s)")
    for r in idb_launches(args.batch):
        t_f = r["flops"] / (args.tflops * 1e12) * 1e6
        t_b = r["bytes"] / (args.tbps * 1e12) * 1e6
        total_us += max(t_f, t_b)
        total_f += r["flops"]
        total_b += r["bytes"]
        print(f"  {r['launch']:28s} {r['flops'] / 1e9:6.2f} GFLOP {r['bytes'] / 1e6:7.2f} MB  "
              f"compute {t_f:6.2f} us  memory {t_b:6.2f} us  floor {max(t_f, t_b):6.2f} us")
    print(f"  {'total (sum of launch floors)':28s} {total_f / 1e9:6.2f} GFLOP {total_b / 1e6:7.2f} MB  floor {total_us:6.2f} us")


if __name__ == "__main__":
    main()

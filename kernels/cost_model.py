"""FLOP and byte floor per kernel launch of one IDB forward + backward (the time no version beats).

    python -m gafh_fast.kernels.cost_model [--batch 64] [--tflops 800] [--tbps 3.0] [--ridb] [--up] [--out]

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


def ridb_launches(batch: int, fused: bool, n_idb: int = 4, nf: int = 64, gc: int = 32, side: int = 32,
                  sms: int = 132) -> list[dict]:
    """Per launch of one RIDB forward + backward (n_idb IDBs and the closing conv, with the DNB residual).
    fused=False: per-IDB Functions (idb_launches per IDB, the conv's 3 launches, and autograd's adds of
    x0's gradient terms, each reading two tensors and writing one); fused=True: kernels/ridb.py (each
    IDB's gz2 written by the launch before it, x0's gradient summed in the dX epilogues)."""
    m = batch * side * side
    act = lambda c: m * c * BF16  # noqa: E731
    bits = lambda c: m * c // 8  # noqa: E731
    wc = 9 * nf * nf
    sc = dw_split(m, nf, nf, sms)
    rows = [dict(launch=f"IDB {q} {r['launch']}", flops=r["flops"], bytes=r["bytes"])
            for q in range(n_idb) for r in idb_launches(batch, nf, gc, side, sms)]
    rows += [dict(launch="conv fwd", flops=2 * m * wc, bytes=3 * act(nf) + act(nf) + wc * BF16),  # x, x0, r2 in
             dict(launch="conv bwd dW + db", flops=2 * m * wc, bytes=2 * act(nf) + sc * wc * FP32)]
    if not fused:
        rows.append(dict(launch="conv bwd dX + finalize", flops=2 * m * wc, bytes=2 * act(nf) + sc * wc * FP32))
        rows += [dict(launch=f"autograd add {i} (x0's gradient)", flops=0, bytes=3 * act(nf)) for i in range(n_idb + 1)]
        return rows
    # the conv's dX also writes gz2 of the last IDB (its mask read) and starts x0's sum (g read once)
    rows.append(dict(launch="conv bwd dX + finalize (+ gz2, sum)", flops=2 * m * wc,
                     bytes=2 * act(nf) + bits(nf) + act(nf) + sc * wc * FP32))
    for q in range(n_idb):
        i1 = next(i for i, r in enumerate(rows) if r["launch"] == f"IDB {q} bwd gz1 (+ gz2 written)")
        rows[i1] = dict(launch=f"IDB {q} bwd gz1 (gz2 ready)", flops=rows[i1]["flops"],
                        bytes=act(nf) + bits(gc) + act(gc))  # gz2, mask1 in; gz1 out
        i4 = next(i for i, r in enumerate(rows) if r["launch"] == f"IDB {q} bwd dx + finalize")
        prev = bits(nf) + act(nf) if q > 0 else -act(nf)  # the previous IDB's gz2 (mask in) or no output at all
        rows[i4] = dict(launch=f"IDB {q} bwd dx + finalize (+ sum)", flops=rows[i4]["flops"],
                        bytes=rows[i4]["bytes"] + prev + 2 * act(nf))  # x0's running sum in and out
    return rows


def upsample_launches(batch: int, fused: bool, nf: int = 64, side: int = 32, steps: int = 3,
                      sms: int = 132, gz_pass: bool = False) -> list[dict]:
    """Per launch of the generator's upsampling steps (nearest x2 -> conv nf -> nf -> LeakyReLU, from
    side to 2*side, `steps` times) forward + backward. fused=False: F.interpolate and its backward around
    the activated conv3x3 at the high resolution (conv3x3.py: 1 + 3 launches); fused=True: upconv.py's
    sub-pixel phases (2 + 3 launches: 16 taps per low-resolution pixel, no upsampled tensor); with
    gz_pass, gz in a pass of its own, dW, then dX with the fold (2 + 3: the tuner's GZ_PASS candidate)."""
    rows = []
    for k in range(steps):
        s = side << k
        m_lo, m_hi = batch * s * s, 4 * batch * s * s
        lo, hi = m_lo * nf * BF16, m_hi * nf * BF16  # one bf16 activation at each resolution
        bits = m_hi * nf // 8
        wt = 9 * nf * nf
        tag = f"{s}->{2 * s}"
        if not fused:
            split = dw_split(m_hi, nf, nf, sms)
            rows += [dict(launch=f"{tag} upsample (interpolate)", flops=0, bytes=lo + hi),
                     dict(launch=f"{tag} fwd conv", flops=2 * m_hi * wt, bytes=hi + hi + bits + wt * BF16),
                     dict(launch=f"{tag} bwd dX (+ gz written)", flops=2 * m_hi * wt, bytes=hi + bits + hi + hi),
                     dict(launch=f"{tag} bwd dW + db", flops=2 * m_hi * wt, bytes=hi + hi + split * wt * FP32),
                     dict(launch=f"{tag} bwd finalize", flops=0, bytes=split * wt * FP32 + wt * BF16),
                     dict(launch=f"{tag} upsample backward (2x2 sums)", flops=0, bytes=hi + lo)]
            continue
        wc = 16 * nf * nf
        split = dw_split(m_lo, nf, nf, sms, taps=16)
        rows += [dict(launch=f"{tag} combine weights", flops=0, bytes=wt * BF16 + wc * BF16),
                 dict(launch=f"{tag} fwd (4 phases)", flops=2 * m_lo * wc, bytes=lo + hi + bits + wc * BF16)]
        fold = split * wc * FP32 + wt * BF16
        if gz_pass:  # gz, dW, then dX with the fold in extra programs
            rows += [dict(launch=f"{tag} bwd gz pass", flops=0, bytes=hi + bits + hi),
                     dict(launch=f"{tag} bwd dW + db", flops=2 * m_lo * wc, bytes=lo + hi + split * wc * FP32),
                     dict(launch=f"{tag} bwd dX (gz ready) + fold", flops=2 * m_lo * wc, bytes=hi + lo + fold)]
        else:
            rows += [dict(launch=f"{tag} bwd dX (+ gz written)", flops=2 * m_lo * wc, bytes=hi + bits + hi + lo),
                     dict(launch=f"{tag} bwd dW + db", flops=2 * m_lo * wc, bytes=lo + hi + split * wc * FP32),
                     dict(launch=f"{tag} bwd finalize (fold)", flops=0, bytes=fold)]
    return rows


def out_conv_launches(batch: int, owned: bool, nf: int = 64, c_out: int = 3, k: int = 9, side: int = 256) -> list[dict]:
    """Per launch of the output layer's backward, y = tanh(conv k x k (nf -> c_out)) at side x side.
    owned=False: torch's tanh backward and cuDNN's dgrad and wgrad (their FLOPs at the real K and N);
    owned=True: outconv.py (prep: gz with a zero border and its channels padded to 4, and the weight
    re-laid; dW over 32-row tiles; dX + fold over 64-row steps: the (tap, channel) rows padded as the
    kernels compute them). The forward (cuDNN + tanh) is the same."""
    m = batch * side * side
    x = m * nf * BF16
    small = m * c_out * BF16  # g, y or gz at the I/O dtype
    rows = k * k * c_out
    wt = rows * nf
    if not owned:
        flops = 2 * m * rows * nf
        return [dict(launch="tanh backward (torch)", flops=0, bytes=3 * small),
                dict(launch="dgrad (cuDNN)", flops=flops, bytes=small + x + wt * BF16),
                dict(launch="wgrad (cuDNN)", flops=flops, bytes=small + x + wt * BF16)]
    cp = 1 << max(0, c_out - 1).bit_length()
    rows_cp = k * k * cp
    gzp = batch * (side + k - 1) ** 2 * cp * BF16
    split = dw_split(m, nf, rows_cp, 132, taps=1)
    partials = split * rows_cp * nf * FP32
    return [dict(launch="prep: gz with zero border, weight re-laid", flops=0, bytes=2 * small + gzp + 2 * wt * BF16),
            dict(launch="dW partials (gathered gz, 32-row tiles; 64: +9 %)", flops=2 * m * (-(-rows_cp // 32) * 32) * nf,
                 bytes=gzp + x + partials),
            dict(launch="dX (gathered gz, 64-row steps) + fold", flops=2 * m * (-(-rows_cp // 64) * 64) * nf,
                 bytes=gzp + rows_cp * nf * BF16 + x + partials)]


def _print(rows, tflops, tbps, title) -> float:
    total_us = total_f = total_b = 0.0
    print(title)
    for r in rows:
        t_f = r["flops"] / (tflops * 1e12) * 1e6
        t_b = r["bytes"] / (tbps * 1e12) * 1e6
        total_us += max(t_f, t_b)
        total_f += r["flops"]
        total_b += r["bytes"]
        print(f"  {r['launch']:40s} {r['flops'] / 1e9:6.2f} GFLOP {r['bytes'] / 1e6:7.2f} MB  "
              f"compute {t_f:6.2f} us  memory {t_b:6.2f} us  floor {max(t_f, t_b):6.2f} us")
    print(f"  {'total (sum of launch floors)':40s} {total_f / 1e9:6.2f} GFLOP {total_b / 1e6:7.2f} MB  "
          f"floor {total_us:6.2f} us  ({len(rows)} launches)")
    return total_us


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tflops", type=float, default=800.0)
    parser.add_argument("--tbps", type=float, default=3.0)
    parser.add_argument("--ridb", action="store_true", help="also one RIDB: per-IDB Functions against fused_ridb")
    parser.add_argument("--up", action="store_true",
                        help="also the 3 upsampling steps: interpolate + conv against upconv.py's phases")
    parser.add_argument("--out", action="store_true",
                        help="also the output layer's backward (64 -> 3, 9x9 at 256x256): torch + cuDNN against outconv.py")
    args = parser.parse_args()
    _print(idb_launches(args.batch), args.tflops, args.tbps,
           f"IDB nf 64 gc 32 32x32 batch {args.batch} bf16; floor = max(FLOP/{args.tflops:g}T, bytes/{args.tbps:g}TB/s)")
    if args.ridb:
        for fused in (False, True):
            _print(ridb_launches(args.batch, fused), args.tflops, args.tbps,
                   f"RIDB (4 IDBs + conv, DNB residual) batch {args.batch}, "
                   + ("fused_ridb (kernels/ridb.py)" if fused else "per-IDB Functions + autograd adds"))
    if args.up:
        for fused, gz_pass, how in ((False, False, "interpolate + conv3x3 (before)"),
                                    (True, False, "sub-pixel phases (kernels/upconv.py), gz made in dX"),
                                    (True, True, "sub-pixel phases, gz pass, dW, dX + fold (GZ_PASS)")):
            _print(upsample_launches(args.batch, fused, gz_pass=gz_pass), args.tflops, args.tbps,
                   f"upsampling steps 32->64->128->256, nf 64, batch {args.batch}, {how}")
    if args.out:
        for owned in (False, True):
            _print(out_conv_launches(args.batch, owned), args.tflops, args.tbps,
                   f"output layer backward, tanh(conv 9x9 64->3) at 256x256, batch {args.batch}, "
                   + ("outconv.py (gathered (tap, channel) rows)" if owned else "torch tanh backward + cuDNN"))


if __name__ == "__main__":
    main()

"""FLOP and byte floor per kernel launch of one IDB forward + backward (the time no version beats).

    python -m gafh_fast.kernels.cost_model [--batch 64] [--tflops 800] [--tbps 3.0] [--ridb] [--up] [--out]

Per launch of idb.idb_forward / idb_backward (nf 64, gc 32, 32x32, bf16): the matmul FLOPs, and
the fewest bytes it must move through device memory (each tensor it reads once, each it writes
once; fp32 dW partials at the H100 split; masks 1 bit per element). The floor is the larger of
FLOPs / rate and bytes / bandwidth (issue 11 uses 800 TFLOP/s dense bf16 and 3 TB/s for an H100).
"""
from __future__ import annotations

import argparse

from .configs import dw_split

BF16, FP32 = 2, 4


# The Triton kernel that runs each launch (`kernel`), as torch.profiler names it: bench/floors.py matches a
# measured kernel row to its launch by this name, in launch order.
FWD, DX, DW, FIN = "conv3x3_fwd_kernel", "conv3x3_bwd_dx_kernel", "conv3x3_bwd_dw_kernel", "conv3x3_bwd_finalize_kernel"
GZ = "conv3x3_bwd_gz_kernel"


def idb_launches(batch: int, nf: int = 64, gc: int = 32, side: int = 32, sms: int = 132,
                 train: bool = True, gz_pass: bool = True) -> list[dict]:
    """Per launch of one IDB forward + backward, in launch order (train=False: the forward alone, as in
    inference, with no masks written). gz_pass: gz2 made by a pass of its own before a plain gz1 launch
    (configs.idb_gz2_candidates' first), else by the gz1 launch on its operand and written out."""
    m = batch * side * side
    act = lambda c: m * c * BF16  # noqa: E731  one bf16 activation of c channels
    bits = lambda c: m * c // 8 if train else 0  # noqa: E731  one bit-packed mask
    w1, w2 = 9 * nf * gc, 9 * (nf + gc) * nf
    split = dw_split(m, nf + gc, nf, sms, job_b=(nf, gc))  # dW2 and dW1 share the launch and its chunks
    forward = [
        dict(launch="fwd conv1", kernel=FWD, flops=2 * m * w1, bytes=act(nf) + act(gc) + bits(gc) + w1 * BF16),
        dict(launch="fwd conv2", kernel=FWD, flops=2 * m * w2,
             bytes=act(nf) + act(gc) + act(nf) + act(nf) + bits(nf) + w2 * BF16),  # x, h1, x0 in; y out
    ]
    if not train:
        return forward
    if gz_pass:
        first = [dict(launch="bwd gz2 pass", kernel=GZ, flops=0, bytes=act(nf) + bits(nf) + act(nf)),  # g, mask2 in; gz2 out
                 dict(launch="bwd gz1 (gz2 ready)", kernel=DX, flops=2 * m * 9 * nf * gc,  # gz2, mask1 in; gz1 out
                      bytes=act(nf) + bits(gc) + act(gc))]
    else:
        first = [dict(launch="bwd gz1 (+ gz2 written)", kernel=DX, flops=2 * m * 9 * nf * gc,  # g, mask2, mask1 in; gz1, gz2 out
                      bytes=act(nf) + bits(nf) + bits(gc) + act(gc) + act(nf))]
    return forward + first + [
        dict(launch="bwd dW2 + db2, dW1 + db1", kernel=DW, flops=2 * m * (w2 + w1),  # x, h1, gz2, gz1 in; partials out
             bytes=act(nf) + act(gc) + act(nf) + act(gc) + split * (w2 + w1) * FP32),
        dict(launch="bwd dx + finalize", kernel=DX, flops=2 * m * 9 * nf * (nf + gc),
             bytes=act(nf) + act(gc) + act(nf) + split * (w1 + w2) * FP32),
    ]


def ridb_launches(batch: int, fused: bool, n_idb: int = 4, nf: int = 64, gc: int = 32, side: int = 32,
                  sms: int = 132, residual2: bool = True) -> list[dict]:
    """Per launch of one RIDB forward + backward (n_idb IDBs and the closing conv; residual2: with the DNB
    residual, as the DNB's last RIDB). fused=False: per-IDB Functions (idb_launches per IDB, the conv's 3
    launches, and autograd's adds of x0's gradient terms, each reading two tensors and writing one);
    fused=True: kernels/ridb.py in launch order (the forwards, then the conv's backward, then each IDB's
    from the last: its gz2 written by the launch before it, x0's gradient summed in the dX epilogues)."""
    m = batch * side * side
    act = lambda c: m * c * BF16  # noqa: E731
    bits = lambda c: m * c // 8  # noqa: E731
    wc = 9 * nf * nf
    sc = dw_split(m, nf, nf, sms)
    idbs = [[dict(r, launch=f"IDB {q} {r['launch']}") for r in idb_launches(batch, nf, gc, side, sms, gz_pass=not fused)]
            for q in range(n_idb)]
    conv_fwd = dict(launch="conv fwd", kernel=FWD, flops=2 * m * wc,  # x, x0 (and r2) in; out
                    bytes=(3 if residual2 else 2) * act(nf) + act(nf) + wc * BF16)
    conv_dw = dict(launch="conv bwd dW + db", kernel=DW, flops=2 * m * wc, bytes=2 * act(nf) + sc * wc * FP32)
    if not fused:
        rows = [r for idb in idbs for r in idb] + [conv_fwd, conv_dw]
        rows.append(dict(launch="conv bwd dX + finalize", kernel=DX, flops=2 * m * wc, bytes=2 * act(nf) + sc * wc * FP32))
        rows += [dict(launch=f"autograd add {i} (x0's gradient)", flops=0, bytes=3 * act(nf)) for i in range(n_idb + 1)]
        return rows
    rows = [r for idb in idbs for r in idb[:2]] + [conv_fwd, conv_dw]
    # the conv's dX also writes gz2 of the last IDB (its mask read) and starts x0's sum (g read once)
    rows.append(dict(launch="conv bwd dX + finalize (+ gz2, sum)", kernel=DX, flops=2 * m * wc,
                     bytes=2 * act(nf) + bits(nf) + act(nf) + sc * wc * FP32))
    for q in reversed(range(n_idb)):
        gz1, dw, dx = idbs[q][2:]
        prev = bits(nf) + act(nf) if q > 0 else -act(nf)  # the previous IDB's gz2 (mask in) or no output at all
        rows += [dict(gz1, launch=f"IDB {q} bwd gz1 (gz2 ready)", bytes=act(nf) + bits(gc) + act(gc)),  # gz2, mask1 in; gz1 out
                 dw,
                 dict(dx, launch=f"IDB {q} bwd dx + finalize (+ sum)", bytes=dx["bytes"] + prev + 2 * act(nf))]  # x0's sum in, out
    return rows


def upsample_launches(batch: int, fused: bool, nf: int = 64, side: int = 32, steps: int = 3,
                      sms: int = 132, gz_pass: bool = False, gz_ready_last: bool = False) -> list[dict]:
    """Per launch of the generator's upsampling steps (nearest x2 -> conv nf -> nf -> LeakyReLU, from
    side to 2*side, `steps` times) forward + backward. fused=False: F.interpolate and its backward around
    the activated conv3x3 at the high resolution (conv3x3.py: 1 + 3 launches); fused=True: upconv.py's
    sub-pixel phases (2 + 3 launches: 16 taps per low-resolution pixel, no upsampled tensor); with
    gz_pass, gz in a pass of its own, dW, then dX with the fold (2 + 3: the tuner's GZ_PASS candidate).
    gz_ready_last: the last step gets its gz from the output layer (kernels/upout.py): dW, then dX with
    the fold (2 + 2)."""
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
        rows += [dict(launch=f"{tag} combine weights", kernel="upconv_combine_kernel", flops=0, bytes=wt * BF16 + wc * BF16),
                 dict(launch=f"{tag} fwd (4 phases)", kernel="upconv_fwd_kernel", flops=2 * m_lo * wc,
                      bytes=lo + hi + bits + wc * BF16)]
        fold = split * wc * FP32 + wt * BF16
        ready = gz_ready_last and k == steps - 1
        if gz_pass or ready:  # (gz,) dW, then dX with the fold in extra programs
            if not ready:
                rows.append(dict(launch=f"{tag} bwd gz pass", kernel=GZ, flops=0, bytes=hi + bits + hi))
            rows += [dict(launch=f"{tag} bwd dW + db", kernel="upconv_bwd_dw_kernel", flops=2 * m_lo * wc,
                          bytes=lo + hi + split * wc * FP32),
                     dict(launch=f"{tag} bwd dX (gz ready) + fold", kernel="upconv_bwd_dx_kernel", flops=2 * m_lo * wc,
                          bytes=hi + lo + fold)]
        else:
            rows += [dict(launch=f"{tag} bwd dX (+ gz written)", kernel="upconv_bwd_dx_kernel", flops=2 * m_lo * wc,
                          bytes=hi + bits + hi + lo),
                     dict(launch=f"{tag} bwd dW + db", kernel="upconv_bwd_dw_kernel", flops=2 * m_lo * wc,
                          bytes=lo + hi + split * wc * FP32),
                     dict(launch=f"{tag} bwd finalize (fold)", kernel="upconv_bwd_finalize_kernel", flops=0, bytes=fold)]
    return rows


def out_conv_launches(batch: int, owned: bool, nf: int = 64, c_out: int = 3, k: int = 9, side: int = 256,
                      act_mask: bool = False) -> list[dict]:
    """Per launch of the output layer's backward, y = tanh(conv k x k (nf -> c_out)) at side x side.
    owned=False: torch's tanh backward and cuDNN's dgrad and wgrad (their FLOPs at the real K and N);
    owned=True: outconv.py (prep: gz with a zero border and its channels padded to 4, and the weight
    re-laid; dW over 32-row tiles; dX + fold over 64-row steps: the (tap, channel) rows padded as the
    kernels compute them). The forward (torch's: out_conv_forward) is the same. act_mask: dX times the LeakyReLU' of
    the layer before, from its bit mask (kernels/upout.py: 1 bit per element more read)."""
    m = batch * side * side
    x = m * nf * BF16
    bits = m * nf // 8 if act_mask else 0
    small = m * c_out * BF16  # g, y or gz at the I/O dtype
    rows = k * k * c_out
    wt = rows * nf
    if not owned:
        flops = 2 * m * rows * nf
        return [dict(launch="tanh backward (torch)", flops=0, bytes=3 * small),
                dict(launch="dgrad (cuDNN)", flops=flops, bytes=small + x + bits + wt * BF16),
                dict(launch="wgrad (cuDNN)", flops=flops, bytes=small + x + wt * BF16)]
    cp = 1 << max(0, c_out - 1).bit_length()
    rows_cp = k * k * cp
    gzp = batch * (side + k - 1) ** 2 * cp * BF16
    split = dw_split(m, nf, rows_cp, 132, taps=1)
    partials = split * rows_cp * nf * FP32
    return [dict(launch="prep: gz with zero border, weight re-laid", kernel="outconv_prep_kernel", flops=0,
                 bytes=2 * small + gzp + 2 * wt * BF16),
            dict(launch="dW partials (gathered gz, 32-row tiles; 64: +9 %)", kernel="outconv_bwd_dw_kernel",
                 flops=2 * m * (-(-rows_cp // 32) * 32) * nf, bytes=gzp + x + partials),
            dict(launch="dX (gathered gz, 64-row steps) + fold", kernel="outconv_bwd_dx_kernel",
                 flops=2 * m * (-(-rows_cp // 64) * 64) * nf, bytes=gzp + rows_cp * nf * BF16 + x + bits + partials)]


def out_conv_forward(batch: int, nf: int = 64, c_out: int = 3, k: int = 9, side: int = 256) -> dict:
    """The output layer's forward, y = tanh(conv k x k (nf -> c_out)) + bias: one pass over x (the floor
    of both paths: cuDNN's conv, or on the triton path the GEMM + fold when the tuner picks it, whose
    launches out_conv_forward_fold counts)."""
    m = batch * side * side
    return dict(launch="fwd conv + tanh (cuDNN)", flops=2 * m * k * k * c_out * nf,
                bytes=m * nf * BF16 + m * c_out * BF16 + k * k * c_out * nf * BF16)


def out_conv_forward_fold(batch: int, nf: int = 64, c_out: int = 3, k: int = 9, side: int = 256) -> list[dict]:
    """The output layer's forward as outconv._out_forward_fold runs it: per chunk of images whose tap
    columns fit FOLD_CHUNK_BYTES, outconv_taps_kernel writing k*k*c_out columns per pixel (a GEMM,
    K = nf), then outconv_fold_kernel reading them (with the bias, tanh and channels_last store)."""
    from .outconv import FOLD_CHUNK_BYTES

    step = max(1, FOLD_CHUNK_BYTES // (k * k * c_out * side * side * BF16))
    rows = []
    for first in range(0, batch, step):
        m = min(step, batch - first) * side * side
        cols = m * k * k * c_out * BF16
        rows += [dict(launch="fwd GEMM onto the taps' columns", kernel="outconv_taps_kernel",
                      flops=2 * m * k * k * c_out * nf, bytes=m * nf * BF16 + k * k * c_out * nf * BF16 + cols),
                 dict(launch="fwd fold + bias + tanh", kernel="outconv_fold_kernel", flops=m * k * k * c_out,
                      bytes=cols + c_out * BF16 + m * c_out * BF16)]
    return rows


def up_out_launches(batch: int, owned: bool, nf: int = 64, side: int = 128, c_out: int = 3, k: int = 9,
                    sms: int = 132, fold: bool = False) -> list[dict]:
    """The last upsampling step (side -> 2 side) and the output layer as one op (kernels/upout.py), forward +
    backward in launch order: the step's 2 forward launches, the output layer's forward (cuDNN's conv, or
    with fold the GEMM + fold launches), its backward with the step's mask read in dX (owned: outconv.py's
    3 launches; else at the real K and N), then the step's gz-ready dW and dX + fold."""
    up = upsample_launches(batch, True, nf, side, steps=1, sms=sms, gz_ready_last=True)
    out = out_conv_launches(batch, owned, nf, c_out, k, 2 * side, act_mask=True)
    forward = (out_conv_forward_fold(batch, nf, c_out, k, 2 * side) if fold
               else [out_conv_forward(batch, nf, c_out, k, 2 * side)])
    return up[:2] + forward + out + up[2:]


def plain_conv_launches(batch: int, c_in: int, c_out: int, k: int, side: int, dgrad: bool = True) -> list[dict]:
    """A conv (k x k, same size) forward + backward at its real K and N, each pass reading its inputs and
    writing its output once: fwd, dgrad (dgrad=False: the input needs no gradient), wgrad with db."""
    m = batch * side * side
    w = k * k * c_in * c_out
    x, y = m * c_in * BF16, m * c_out * BF16
    rows = [dict(launch="conv fwd", flops=2 * m * w, bytes=x + y + w * BF16)]
    if dgrad:
        rows.append(dict(launch="conv bwd dgrad", flops=2 * m * w, bytes=y + w * BF16 + x))
    return rows + [dict(launch="conv bwd wgrad + db", flops=2 * m * w, bytes=y + x + w * BF16)]


def generator_launches(batch: int, nf: int = 64, gc: int = 32, lr: int = 32, n_dnb: int = 4, n_ridb: int = 3,
                       n_idb: int = 4, sfm_k: int = 9, out_k: int = 9, c_img: int = 3, sms: int = 132) -> list[dict]:
    """The whole generator's forward + backward (the kernels suite's gen_fwd_bwd: the LR input needs no
    gradient), layer by layer in forward order, each launch tagged with its `layer`: the SFM conv, every
    RIDB as kernels/ridb.py runs it, the fusion conv with its BatchNorm and the SFM residual, the three
    upsampling steps as upconv.py's sub-pixel phases (gz made in dX; the last step's handed to it by the
    output layer, kernels/upout.py), and the output layer at its real K and N (its forward, and cuDNN's
    backward with the mask read: the owned backward pads its rows, so its floor is higher).
    Elementwise work that a fused kernel could fold in (autograd's gradient sums) is left out: a floor.
    Each launch also says its `phase` (fwd or bwd)."""
    m = batch * lr * lr
    act = m * nf * BF16
    rows = [dict(r, layer="sfm conv", launch=f"sfm {r['launch']}")
            for r in plain_conv_launches(batch, c_img, nf, sfm_k, lr, dgrad=False)]
    for d in range(n_dnb):
        for r in range(n_ridb):
            rows += [dict(x, layer=f"DNB {d} RIDB {r}") for x in
                     ridb_launches(batch, True, n_idb, nf, gc, lr, sms, residual2=r == n_ridb - 1)]
    fusion = plain_conv_launches(batch, nf, nf, 3, lr)
    rows += [dict(fusion[0], layer="fusion", launch="fusion conv fwd"),
             # training BatchNorm + the SFM residual: the statistics read x, the apply reads x and sfm and
             # writes; its backward's reductions read g and x, then dx reads both again and writes
             dict(layer="fusion", launch="fusion BatchNorm + residual fwd", flops=0, bytes=4 * act),
             dict(layer="fusion", launch="fusion BatchNorm bwd", flops=0, bytes=5 * act)]
    rows += [dict(r, layer="fusion", launch=f"fusion {r['launch']}") for r in fusion[1:]]
    rows += [dict(r, layer=f"upsampling {r['launch'].split()[0]}")
             for r in upsample_launches(batch, True, nf, lr, 3, sms, gz_ready_last=True)]
    side = 8 * lr
    rows.append(dict(out_conv_forward(batch, nf, c_img, out_k, side), layer="output"))
    rows += [dict(r, layer="output") for r in out_conv_launches(batch, False, nf, c_img, out_k, side, act_mask=True)]
    for r in rows:  # forward or backward: the profiler's layer groups are one or the other
        r["phase"] = "fwd" if "fwd" in r["launch"].split() or "combine" in r["launch"] else "bwd"
    return rows


def floor_us(rows: list[dict], tflops: float, tbps: float) -> float:
    """Sum over launches of max(FLOPs / rate, bytes / bandwidth), in us."""
    return sum(max(r["flops"] / (tflops * 1e12), r["bytes"] / (tbps * 1e12)) for r in rows) * 1e6


def _print(rows, tflops, tbps, title) -> float:
    total_us = floor_us(rows, tflops, tbps)
    total_f = sum(r["flops"] for r in rows)
    total_b = sum(r["bytes"] for r in rows)
    print(title)
    for r in rows:
        t_f = r["flops"] / (tflops * 1e12) * 1e6
        t_b = r["bytes"] / (tbps * 1e12) * 1e6
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
    parser.add_argument("--gen", action="store_true",
                        help="also the whole paper generator forward + backward, per layer (the fused decomposition)")
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

    if args.gen:
        _print_layers(generator_launches(args.batch), args.tflops, args.tbps,
                      f"paper generator forward + backward, batch {args.batch}, per layer (fused decomposition)")


def _print_layers(rows, tflops, tbps, title) -> None:
    layers: dict[str, list[dict]] = {}
    for r in rows:
        layers.setdefault(r["layer"], []).append(r)
    total = floor_us(rows, tflops, tbps)
    print(title)
    for name, launches in layers.items():
        us = floor_us(launches, tflops, tbps)
        print(f"  {name:24s} {sum(r['flops'] for r in launches) / 1e9:8.2f} GFLOP "
              f"{sum(r['bytes'] for r in launches) / 1e6:9.2f} MB  floor {us:8.2f} us ({us / total:5.1%}, "
              f"{len(launches)} launches)")
    print(f"  {'total':24s} {sum(r['flops'] for r in rows) / 1e9:8.2f} GFLOP {sum(r['bytes'] for r in rows) / 1e6:9.2f} MB"
          f"  floor {total:8.2f} us ({len(rows)} launches)")

if __name__ == "__main__":
    main()

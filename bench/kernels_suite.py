"""The `kernels` benchmark suite: the fused Triton conv3x3 against eager PyTorch and torch.compile.

On a CUDA GPU, at LR 32x32, nf 64, gc 32, bf16, channels_last, for each batch it times
    idb_fwd      one IDB forward (inference: no autograd state)
    idb_fwd_bwd  one IDB forward + backward
    gen_fwd_bwd  the whole paper generator forward + backward (32x32 -> 256x256)
three ways: `triton` (kernels=triton), `eager` (kernels=torch, cudnn.benchmark on), `compile`
(torch.compile of the eager reference). Each row: ms (median of triton.testing.do_bench, after a
warm-up call that also runs the autotuner), conv TFLOP/s (analytic: 2*Cin*Cout*k*k*H*W per image for
the forward, x3 for forward + backward), speedup vs eager, and peak memory above the inputs and
parameters (torch.cuda.max_memory_allocated). Without CUDA it returns [] and says so: the Triton
interpreter is never timed.

    python bench/kernels_suite.py [--batches 8 64 256] [--smoke]
"""
from __future__ import annotations

import argparse
import gc

import torch

from gafh_fast.config import load_config
from gafh_fast.models.generator import IDB, Generator

NF, GC, LR_SIZE = 64, 32, 32
PATHS = ("triton", "eager", "compile")


def conv_flops(c_in: int, c_out: int, k: int, h: int, w: int) -> int:
    return 2 * c_in * c_out * k * k * h * w


def idb_forward_flops(batch: int) -> int:
    return batch * (conv_flops(NF, GC, 3, LR_SIZE, LR_SIZE) + conv_flops(NF + GC, NF, 3, LR_SIZE, LR_SIZE))


def generator_forward_flops(cfg, batch: int) -> int:
    """Every conv of the generator (spec section Generator G) at its own resolution."""
    g, s = cfg.model.generator, LR_SIZE
    trunk_per_idb = conv_flops(g.nf, g.gc, 3, s, s) + conv_flops(g.nf + g.gc, g.nf, 3, s, s)
    per_ridb = g.idb_per_ridb * trunk_per_idb + conv_flops(g.nf, g.nf, 3, s, s)
    total = conv_flops(3, g.nf, g.sfm_kernel, s, s) + g.num_dnb * g.ridb_per_dnb * per_ridb
    total += conv_flops(g.nf, g.nf, 3, s, s)  # fusion
    up_out = g.nf * 4 if g.upsample == "pixel_shuffle" else g.nf
    for level in range(3):
        side = s * 2 ** (level + 1) if g.upsample == "nearest_conv" else s * 2 ** level
        total += conv_flops(g.nf, up_out, 3, side, side)
    total += conv_flops(g.nf, 3, g.out_kernel, 8 * s, 8 * s)
    return batch * total


def _workloads(cfg, batch: int, device: torch.device):
    """name -> (module, make_fn(module) -> callable, flops, tensors whose grads do_bench clears)."""
    fmt = dict(device=device, dtype=torch.bfloat16)
    x = torch.randn(batch, NF, LR_SIZE, LR_SIZE, **fmt).contiguous(memory_format=torch.channels_last)
    lr = torch.rand(batch, 3, LR_SIZE, LR_SIZE, **fmt).mul(2).sub(1).contiguous(memory_format=torch.channels_last)
    idb = IDB(NF, GC).to(**fmt).to(memory_format=torch.channels_last)
    gen = Generator(cfg.model.generator, kernels="torch").to(**fmt).to(memory_format=torch.channels_last)
    x_leaf = x.clone().requires_grad_(True)

    def idb_fwd(module):
        def fn():
            with torch.no_grad():
                return module(x, x)
        return fn

    def idb_fwd_bwd(module):
        def fn():
            module(x_leaf, x_leaf).sum().backward()
        return fn

    def gen_fwd_bwd(module):
        def fn():
            module(lr).float().mean().backward()
        return fn

    return {
        "idb_fwd": (idb, idb_fwd, idb_forward_flops(batch), []),
        "idb_fwd_bwd": (idb, idb_fwd_bwd, 3 * idb_forward_flops(batch), [x_leaf, *idb.parameters()]),
        "gen_fwd_bwd": (gen, gen_fwd_bwd, 3 * generator_forward_flops(cfg, batch), list(gen.parameters())),
    }


def _set_kernels(module, kernels: str) -> None:
    if hasattr(module, "set_kernels"):
        module.set_kernels(kernels)
    else:
        for m in module.modules():
            if hasattr(m, "kernels"):
                m.kernels = kernels


def _time_one(module, make_fn, path: str, grads_to_clear, rep_ms: int):
    import triton.testing

    _set_kernels(module, "triton" if path == "triton" else "torch")
    runner = torch.compile(module) if path == "compile" else module
    fn = make_fn(runner)
    fn()  # warm-up: autotuning, cudnn.benchmark search, compilation all happen here, outside timing
    torch.cuda.synchronize()
    for t in grads_to_clear:
        t.grad = None
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    ms = triton.testing.do_bench(fn, warmup=max(5, rep_ms // 4), rep=rep_ms, grad_to_none=grads_to_clear,
                                 return_mode="median")
    return ms, peak_mb


partial_rows: list[dict] = []  # the rows finished so far (bench/throughput.py reads them after a SIGTERM)


def run(device: str, batches=(8, 64, 256), smoke: bool = False) -> list[dict]:
    """Time the fused kernels against eager and torch.compile; one dict per (workload, path, batch)."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        print("kernels suite: needs a CUDA GPU (the Triton interpreter is never timed); no numbers")
        return []
    torch.backends.cudnn.benchmark = True
    cfg = load_config(None, [f"data.hr_size={LR_SIZE * 8}"])
    if smoke:
        batches = (min(batches),)
    rep_ms = 20 if smoke else 200
    card = torch.cuda.get_device_name(dev)
    partial_rows.clear()
    rows = partial_rows  # a stage timeout in gpu_suite.sh keeps what was measured
    for batch in batches:
        workloads = _workloads(cfg, batch, dev)
        for name, (module, make_fn, flops, grads) in workloads.items():
            eager_ms = None
            for path in ("eager", "triton", "compile"):
                if smoke and path == "compile" and name == "gen_fwd_bwd":
                    continue  # compiling the whole generator takes minutes: not in a smoke run
                row = {"suite": "kernels", "name": name, "path": path, "batch": batch, "card": card}
                try:
                    ms, peak_mb = _time_one(module, make_fn, path, grads, rep_ms)
                except torch.cuda.OutOfMemoryError:
                    row.update(ms=None, tflops=None, speedup_vs_eager=None, peak_mem_mb=None, error="out of memory")
                    torch.cuda.empty_cache()
                    rows.append(row)
                    print(f"{name:12s} {path:8s} batch {batch:4d}: out of memory")
                    continue
                if path == "eager":
                    eager_ms = ms
                row.update(ms=ms, tflops=flops / ms / 1e9, peak_mem_mb=peak_mb,
                           speedup_vs_eager=(eager_ms / ms) if eager_ms else None)
                rows.append(row)
                print(f"{name:12s} {path:8s} batch {batch:4d}: {ms:9.3f} ms  {row['tflops']:7.1f} TFLOP/s  "
                      f"x{row['speedup_vs_eager'] or float('nan'):.2f} vs eager  peak {peak_mb:9.1f} MiB")
        del workloads
        gc.collect()
        torch.cuda.empty_cache()
    return list(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 64, 256])
    parser.add_argument("--smoke", action="store_true", help="smallest batch, short timing, no generator compile")
    args = parser.parse_args()
    run(args.device, tuple(args.batches), smoke=args.smoke)


if __name__ == "__main__":
    main()

"""The `model` suite: the generator forward and forward + backward with kernels=triton vs torch vs torch.compile.

On a GPU: the paper's G in bf16, channels_last, cudnn.benchmark on, at each batch of 32x32 inputs.
  - `torch`   : the reference path, eager PyTorch (cuDNN); the baseline of the other two
  - `triton`  : the project's fast path, kernels=triton (gafh_fast.kernels behind fused_conv3x3)
  - `compile` : torch.compile of the eager reference (what a user could get without our kernels)
"G fwd" is inference (eval, no_grad); "G fwd+bwd" is a training call (train mode, backward of a
fixed upstream gradient into every parameter). FLOPs: gafh_fast.flops.generator_flops per image,
x3 for forward + backward. `act_mem_mb` is the peak memory above what the model and inputs hold.

On CPU: eager torch in fp32 only (the Triton interpreter is not a speed path and is never timed;
torch.compile is skipped too), with rows that say so. --smoke uses a tiny generator.
"""
from __future__ import annotations

import time

import torch

from gafh_fast.config import load_config
from gafh_fast.flops import generator_flops
from gafh_fast.models import build_generator

try:  # run as `python bench/throughput.py` (bench/ on sys.path) or imported as bench.model_suite
    from common import (add_speedups, error_row, free_device_memory, make_row, peak_tflops_for,
                        resolve_device, skipped_row, throughput_fields, time_calls)
except ImportError:  # pragma: no cover
    from bench.common import (add_speedups, error_row, free_device_memory, make_row, peak_tflops_for,
                              resolve_device, skipped_row, throughput_fields, time_calls)

SUITE = "model"
# A generator small enough for a CPU smoke run in seconds (the shape of tests/conftest.py's tiny config).
TINY_GENERATOR = ("model.generator.nf=8", "model.generator.gc=4", "model.generator.num_dnb=1",
                  "model.generator.ridb_per_dnb=2", "model.generator.idb_per_ridb=2",
                  "model.generator.sfm_kernel=3", "model.generator.out_kernel=3", "data.hr_size=64")
VARIANTS = ("torch", "triton", "compile")
CPU_MAX_BATCH = 8  # the paper's G is ~50 GFLOP per image forward + backward: larger CPU batches take minutes
INPUT_SETS = 3
partial_rows: list[dict] = []  # the rows finished so far (bench/throughput.py reads them after a SIGTERM)


def _inputs(batch: int, lr_size: int, device, dtype, channels_last: bool) -> list[torch.Tensor]:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return [(torch.rand(batch, 3, lr_size, lr_size, device=device) * 2 - 1).to(dtype).contiguous(memory_format=fmt)
            for _ in range(INPUT_SETS)]


def _forward_fn(model):
    def call(x):
        with torch.no_grad():
            return model(x)
    return call


def _train_fn(model, grad_out: torch.Tensor):
    def call(x):
        for p in model.parameters():
            p.grad = None
        model(x).backward(grad_out)
    return call


def run(device: str, batches=(8, 64, 256), smoke: bool = False) -> list[dict]:
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    cfg = load_config(None, TINY_GENERATOR if smoke else ())
    dtype = torch.bfloat16 if cuda else torch.float32
    peak = peak_tflops_for(dev)
    fwd_flops = generator_flops(cfg.model.generator, cfg.lr_size)
    warmup, repeats = (1, 2) if smoke else ((5, 20) if cuda else (1, 3))
    if smoke:
        batches = tuple(min(b, 2) for b in batches[:1])

    torch.manual_seed(0)
    model = build_generator(cfg).to(dev, dtype)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    compiled: dict = {}
    partial_rows.clear()
    # compile last: if a stage timeout cuts the suite short, the eager and triton rows are already in
    # partial_rows (bench/throughput.py keeps them)
    for variant in VARIANTS:
        for batch in batches:
            for mode, flops in (("G fwd", fwd_flops), ("G fwd+bwd", 3 * fwd_flops)):
                fields = dict(path=variant, baseline=None if variant == "torch" else "torch", batch=batch,
                              dtype=str(dtype).replace("torch.", ""), channels_last=cuda, flops_per_image=flops)
                partial_rows.append(_one(model, variant, mode, batch, cfg, dev, dtype, cuda, peak, warmup,
                                         repeats, compiled, fields))
    order = {v: i for i, v in enumerate(VARIANTS)}
    rows = sorted(partial_rows, key=lambda r: (r["name"], r["batch"], order[r["path"]]))
    return add_speedups(rows)


def _one(model, variant, mode, batch, cfg, dev, dtype, cuda, peak, warmup, repeats, compiled, fields) -> dict:
    if not cuda and variant != "torch":
        why = ("the Triton interpreter is not a speed path and is never timed" if variant == "triton"
               else "torch.compile is timed on CUDA only (its CPU code is not what the project ships)")
        return skipped_row(SUITE, mode, f"CPU: {why}", **fields)
    if not cuda and batch > CPU_MAX_BATCH:
        return skipped_row(SUITE, mode, f"CPU: batch > {CPU_MAX_BATCH} is not timed (minutes per call)", **fields)
    try:
        return _time_variant(model, variant, mode, batch, cfg, dev, dtype, cuda, peak, warmup, repeats,
                             compiled, fields)
    except Exception as e:  # one variant failing must not hide the others' numbers
        row = error_row(SUITE, mode, f"{type(e).__name__}: {e}")
        row.update(fields)
        return row
    finally:
        model.set_kernels("torch")
        free_device_memory(dev)


def _time_variant(model, variant, mode, batch, cfg, dev, dtype, cuda, peak, warmup, repeats, compiled,
                  fields) -> dict:
    model.set_kernels("triton" if variant == "triton" else "torch")
    target = model
    note = None
    if variant == "compile":
        # dynamic=True: one graph per mode for every batch size (a graph per batch would cost minutes
        # of compilation each); the convolutions stay cuDNN calls either way
        target = compiled.setdefault(mode, torch.compile(model, dynamic=True))
    model.train(mode == "G fwd+bwd")
    inputs = _inputs(batch, cfg.lr_size, dev, dtype, cuda)
    if mode == "G fwd":
        fn = _forward_fn(target)
    else:
        hr = cfg.lr_size * cfg.model.scale
        fmt = torch.channels_last if cuda else torch.contiguous_format
        grad_out = torch.randn(batch, 3, hr, hr, device=dev, dtype=dtype).contiguous(memory_format=fmt)
        fn = _train_fn(target, grad_out)
    if variant == "compile":  # compilation is not part of the number: time it separately
        t0 = time.perf_counter()
        fn(inputs[0])
        if cuda:
            torch.cuda.synchronize(dev)
        note = f"first call (compile) {time.perf_counter() - t0:.1f} s, not timed"
    base_mb = torch.cuda.memory_allocated(dev) / 2**20 if cuda else None
    timing = time_calls(fn, inputs, dev, warmup=warmup, repeats=repeats)
    row = make_row(SUITE, mode, note=note, spread_pct=timing["spread_pct"], repeats=timing["repeats"],
                   peak_mem_mb=timing["peak_mem_mb"],
                   act_mem_mb=None if base_mb is None else timing["peak_mem_mb"] - base_mb, **fields)
    row.update(throughput_fields(timing["ms"], batch, fields["flops_per_image"], peak))
    return row

"""Run gafh_fast's precompile on this CPU machine as on an H100, with Triton's JIT pointed at a stand-in
sm_90 device: only the device is swapped; the recording, the JIT's binding and cache keys, the parallel
compiles and the cache lookups of the later launches are Triton's and ours, unchanged.

    python tests/kernels/sm90_precompile_check.py OUT.json     (TRITON_INTERPRET unset; test_precompile.py runs it)

The stand-in device is bench/precompile_sm90.py's: Triton's driver answers "device 0, stream 0, target
cuda:90", CPU tensors stand in for CUDA tensors, and a launch that gets past the JIT's cache lookup
reaches the driver's launcher, which raises LaunchReached. Every compile the JIT starts is counted
through Triton's jit_cache_hook.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))

import torch  # noqa: E402
from precompile_sm90 import LaunchReached, use_standin_sm90  # noqa: E402
import triton.compiler  # noqa: E402
from triton import knobs  # noqa: E402


def main(out_path: str) -> None:
    use_standin_sm90()
    from gafh_fast.config import GeneratorConfig
    from gafh_fast.kernels import launch
    from gafh_fast.kernels import precompile as pc
    from gafh_fast.models.generator import Generator, _kernel_twin, precompile_kernels
    from gafh_fast.ops import fused_out_conv, fused_upconv3x3

    compiles: list[str] = []

    def count_compile(**kw):
        compiles.append(kw["fn"].name)
        return False  # go on and compile

    knobs.runtime.jit_cache_hook = count_compile
    compile_threads: set[str] = set()
    real_compile = triton.compiler.compile

    def compile_in_thread(*args, **kwargs):  # the JIT binds triton.compiler.compile when a kernel first runs
        compile_threads.add(threading.current_thread().name)
        return real_compile(*args, **kwargs)

    triton.compiler.compile = compile_in_thread
    torch.manual_seed(0)
    cfg = GeneratorConfig(nf=16, gc=8, idb_per_ridb=2, ridb_per_dnb=1, num_dnb=1, trunk_norm="none")
    live = Generator(cfg).to(torch.bfloat16)  # parameters contiguous, as the trainer keeps them
    ema = Generator(cfg)                      # fp32, as the EMA copy validation runs
    out: dict = {"launches_before": dict(launch.LAUNCHES)}

    logged: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            logged.append(record.getMessage())

    logging.getLogger("gafh_fast").addHandler(Keep(logging.INFO))
    logging.getLogger("gafh_fast").setLevel(logging.INFO)
    # 1. the trainer's call: a bf16 training step and an fp32 validation forward, on 2 threads
    t0 = time.perf_counter()
    report = precompile_kernels([(live, 2, True), (ema, 3, False)], 4, workers=2)
    out["parallel"] = dict(vars(report), compiles=len(compiles), wall_s=time.perf_counter() - t0)
    out["launches_after"] = dict(launch.LAUNCHES)
    out["compile_threads"] = sorted(compile_threads)
    out["backend_log"] = [m for m in logged if "kernels=" in m]  # the twins' choice is not the run's

    # 2. every launch those passes make, now through the real launch path: no compile, all reach the device
    #    (on channels_last inputs here, contiguous in the precompile: the fused ops hand the kernels
    #    channels_last either way, so the variants are the same)
    twins = [(_kernel_twin(live), 2, True), (_kernel_twin(ema), 3, False)]

    def run():
        for twin, batch, train in twins:
            lr = torch.zeros(batch, 3, 4, 4, dtype=next(twin.parameters()).dtype).contiguous(
                memory_format=torch.channels_last)
            twin.train(train)
            with torch.set_grad_enabled(train):
                y = twin(lr)
            if train:
                y.float().mean().backward()
                # the last upsampling step and the output layer apart, as kernels=auto times them
                last = twin.upconvs[-1]
                x = torch.zeros(batch, last.in_channels, 16, 16, dtype=lr.dtype, requires_grad=True)
                up = fused_upconv3x3(x.contiguous(memory_format=torch.channels_last), last.weight, last.bias,
                                     backend="triton")
                fused_out_conv(up, twin.out.weight, twin.out.bias, backend="triton").float().mean().backward()

    records = pc.record(run)
    before, reached = len(compiles), 0
    for rec in records:
        try:
            pc.launcher(rec["name"]).kernel[rec["grid"]](*rec["args"], **rec["constexprs"], **rec["options"])
        except LaunchReached:
            reached += 1
    out["replay"] = dict(records=len(records), reached=reached, compiles=len(compiles) - before)

    # 3. one at a time (workers=1) on a pass with a few new variants (bf16 inference): same counting
    before = len(compiles)
    serial = precompile_kernels([(live, 2, False)], 4, workers=1)
    out["serial"] = dict(vars(serial), compiles=len(compiles) - before)
    with open(out_path, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])

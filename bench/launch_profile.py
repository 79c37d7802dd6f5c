"""Where the fused path's host time goes on a GPU machine: real Triton launches, not a stand-in.

    python bench/launch_profile.py [--device cuda] [--iters 100] [--json out.json] [--profile-out top.txt]

The H200 run of 2026-11-27 (bench/RESULTS.md, calls D1-D4) found the triton path host-bound: one IDB
forward + backward took 1.02 ms of wall time for 0.215 ms of device time at batch 64, and the paper G at
batch 8 22.9 ms for 4.1 ms. bench/host_overhead.py times our host code with a stand-in launcher on CPU
(~130 us per IDB), so most of that gap is in what only a GPU machine runs: Triton's launch of each kept
kernel, torch's CUDA allocator and autograd's device thread. This tool measures it there:

  1. wall time per call (N calls, then one synchronize; the median of 3 rounds) of an IDB forward +
     backward (nf 64, gc 32, 32x32, bf16, channels_last, batch 64) and of the paper G forward + backward
     at batch 8, four ways: kernels=torch (eager), kernels=triton with kept kernels launched through
     Triton's runner (compiled[grid](...), launch.DIRECT_RUNNER off), through launch.direct_runner
     (the default), and the same with the RIDB's and IDB's host code run plain instead of replaying its
     tapes (kernels/tape.py, tape.USE_TAPES off); with the Triton launches per call, so the difference
     per launch is a number;
  2. whether the triton ways give the same outputs and gradients, bit for bit (they launch the same
     kernels with the same arguments);
  3. a cProfile of the default triton way (autograd's multithreading off, so that the backward's Python
     runs on the profiled thread), top functions by own time.
Without CUDA: the same code at a tiny size with the stand-in launcher of bench/host_overhead.py (the
plumbing; its times say nothing about a GPU host).
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
from pathlib import Path

import torch

from gafh_fast.config import load_config
from gafh_fast.kernels import launch, tape
from gafh_fast.models.generator import IDB, Generator, precompile_kernels
from gafh_fast.ops import _drain, median_ms_per_call
from kernels_suite import _set_kernels as set_kernels

NF, GC, LR = 64, 32, 32
PLAIN = "triton, direct runner, no tapes"
WAYS = ("eager", "triton, Triton's runner", "triton, direct runner", PLAIN)


def _set_way(module, way: str) -> None:
    """kernels= of every layer, which runner kept kernels get (they are forgotten, so the next launches
    of every key compile or load again and are kept with this runner), and whether the RIDB's and IDB's
    host code replays its tapes (kernels/tape.py; the default) or runs plain."""
    launch.DIRECT_RUNNER = way != "triton, Triton's runner"
    tape.USE_TAPES = way != PLAIN
    for launcher in launch.LAUNCHERS.values():
        launcher.forget()
    set_kernels(module, "torch" if way == "eager" else "triton")


def workloads(device: torch.device, smoke: bool) -> dict:
    """name -> (module, call() running one forward + backward, tensors whose grads a call sets)."""
    fmt = dict(device=device, dtype=torch.bfloat16)
    cl = torch.channels_last
    idb_batch, gen_batch, lr = (1, 1, 4) if smoke else (64, 8, LR)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(idb_batch, NF, lr, lr, generator=gen).to(**fmt).contiguous(memory_format=cl).requires_grad_()
    idb = IDB(NF, GC).to(**fmt).to(memory_format=cl)
    cfg = load_config(None, [f"data.hr_size={lr * 8}"])
    g = Generator(cfg.model.generator, kernels="torch").to(**fmt).to(memory_format=cl)
    lr_faces = (torch.rand(gen_batch, 3, lr, lr, generator=gen) * 2 - 1).to(**fmt).contiguous(memory_format=cl)
    if device.type == "cuda":  # G's ~40 variants compile on parallel threads, as the trainer's start-up does
        g.set_kernels("triton")
        print(precompile_kernels([(g, gen_batch, True)], lr))
    return {
        f"idb_fwd_bwd batch {idb_batch}": (idb, lambda: idb(x, x).sum().backward(), [x, *idb.parameters()]),
        f"gen_fwd_bwd batch {gen_batch}": (g, lambda: g(lr_faces).float().mean().backward(), list(g.parameters())),
    }


def _clear(grads) -> None:
    for t in grads:
        t.grad = None


def wall_ms(call, grads, device: torch.device, iters: int, rounds: int = 3) -> float:
    """Median over rounds of (iters calls, then one synchronize) / iters, in ms: kernels=auto's own timer
    (gafh_fast.ops.median_ms_per_call), each call with fresh gradients."""
    def fresh_call():
        _clear(grads)
        call()
    return median_ms_per_call(fresh_call, device, iters, rounds)


def _results(call, grads) -> list[torch.Tensor]:
    """One call's gradients (fresh), cloned: what the two runners must agree on bit for bit."""
    _clear(grads)
    call()
    return [t.grad.detach().clone() for t in grads]


def _compare(one: list, other: list, device: torch.device) -> tuple:
    """(whether two ways' results are equal bit for bit, or None off the GPU; the verdict's words). The
    stand-in launches compute nothing (uninitialised outputs): only real kernels can agree."""
    same = all(torch.equal(a, b) for a, b in zip(one, other)) if device.type == "cuda" else None
    return same, {True: "identical to", False: "DIFFERENT from", None: "not compared with (stand-in launches)"}[same]


def profile_top(call, grads, calls: int, top: int) -> str:
    """cProfile of `calls` calls (backward on this thread): the `top` functions by own time, in us per
    profiled call (cProfile's own cost per Python call inflates every figure alike)."""
    prof = cProfile.Profile()
    with torch.autograd.set_multithreading_enabled(False):
        call()  # the first call on this thread's engine: not profiled
        prof.enable()
        for _ in range(calls):
            _clear(grads)
            call()
        prof.disable()
    stats = pstats.Stats(prof).stats  # (file, line, function) -> (primitive calls, calls, own s, cumulative s, _)
    total = sum(v[2] for v in stats.values())
    lines = [f"{calls} calls profiled; own time of all functions {total * 1e6 / calls:.0f} us per call",
             f"{'calls/call':>10s} {'own us/call':>11s} {'cum us/call':>11s}  function"]
    for (file, line, func), (_, n, own, cum, _) in sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]:
        where = func if file == "~" else f"{'/'.join(Path(file).parts[-2:])}:{line}({func})"
        lines.append(f"{n / calls:10.1f} {own * 1e6 / calls:11.1f} {cum * 1e6 / calls:11.1f}  {where}")
    return "\n".join(lines) + "\n"


def run(device: torch.device, iters: int, smoke: bool, profile_out: str | None) -> list[dict]:
    rows, reports = [], []
    for name, (module, call, grads) in workloads(device, smoke).items():
        by_way = {}
        for way in WAYS:
            _set_way(module, way)
            for _ in range(3):  # compiles or loads, autotuning, cudnn.benchmark: before timing
                _clear(grads)
                call()
            _drain(device)
            before = sum(launch.LAUNCHES.values())
            _clear(grads)
            call()
            launches = sum(launch.LAUNCHES.values()) - before
            results = _results(call, grads)
            ms = wall_ms(call, grads, device, iters if name.startswith("idb") else max(1, iters // 10))
            by_way[way] = (ms, results)
            row = {"suite": "launch", "name": name, "path": way, "ms": ms, "triton_launches": launches}
            if way != "eager":
                row["note"] = f"{launches} Triton launches per call"
            rows.append(row)
            print(f"{name:22s} {way:26s} {ms:9.3f} ms per call wall, {launches} Triton launches")
        runner_ms, runner_out = by_way["triton, Triton's runner"]
        direct_ms, direct_out = by_way["triton, direct runner"]
        same, verdict = _compare(runner_out, direct_out, device)
        launches = rows[-2]["triton_launches"]
        saved_us = (runner_ms - direct_ms) * 1000 / max(1, launches)
        rows[-2].update(identical_to_runner=same, saved_us_per_launch=saved_us,
                        note=rows[-2]["note"] + f"; results {verdict} Triton's runner's; {saved_us:+.1f} us per "
                                                f"launch saved")
        print(f"{name:22s} direct runner: results {verdict} Triton's runner's, {saved_us:+.1f} us per launch saved")
        plain_ms, plain_out = by_way[PLAIN]
        same, verdict = _compare(plain_out, direct_out, device)
        saved_ms = plain_ms - direct_ms
        rows[-2].update(identical_to_plain_host_code=same, tapes_saved_ms_per_call=saved_ms,
                        note=rows[-2]["note"] + f"; results {verdict} the plain host code's (no tapes); the tapes "
                                                f"save {saved_ms * 1000:+.1f} us per call")
        print(f"{name:22s} tapes: results {verdict} the plain host code's, {saved_ms * 1000:+.1f} us per call saved")
        _set_way(module, "triton, direct runner")  # the default, profiled
        reports.append(f"=== {name}, kernels=triton (direct runner): cProfile, own time ===\n"
                       + profile_top(call, grads, 3 if name.startswith("gen") else 50, 40))
    if profile_out:
        Path(profile_out).write_text("\n".join(reports))
    else:
        print("\n".join(reports))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--iters", type=int, default=100, help="calls per timed round (the G gets a tenth)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (the CPU plumbing check)")
    parser.add_argument("--json")
    parser.add_argument("--profile-out", help="write the cProfile reports here instead of printing them")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda":  # no GPU: the stand-in launcher, so that the triton ways run (plumbing)
        import host_overhead
        from gafh_fast import ops

        host_overhead._install_standin()
        ops.triton_unavailable_reason = lambda device: None
    rows = run(device, args.iters, args.smoke or device.type != "cuda", args.profile_out)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

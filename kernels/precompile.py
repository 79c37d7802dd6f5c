"""Compile every Triton kernel variant a workload will launch, in parallel, before it runs.

A cold process otherwise compiles each new variant (kernel x constexprs x tile config) at the moment
the model first reaches it, one after another, each blocking the first forward or backward for about a
second of compiler time; with two tile candidates per plan the tuner compiles both. Triton's compiler
releases the GIL (21 sm_90 variants of the trunk: 21.4 s on one thread, 11.7 s on two, on this
project's 2-core CPU), so threads overlap the compiles:

  1. `record(run)`: run the workload's host code once per tile candidate with every fused-kernel launch
     recorded instead of run (launch.STANDIN): the exact arguments, constexprs, grids and options the
     real launches will use. The fused kernels do not run; the workload's other torch ops do, on
     uninitialised values, so `run` must not depend on values (a forward + backward does not).
  2. `compile_records`: `kernel.warmup(*args, grid=..., **constexprs, **options)` per record inside
     `triton.AsyncCompileMode` over a thread pool. The JIT binds the arguments and computes its cache key
     exactly as a launch would, compiles in the pool and fills its in-memory and on-disk caches; the
     tuner's timing runs and the first real launches then find every variant compiled.

Under the interpreter there is nothing to compile: `precompile` refuses (the caller decides when to
call it: gafh_fast.models.generator.precompile_kernels, on CUDA only).
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import triton

from . import conv3x3, launch
from .conv3x3_fwd import INTERPRETING

N_CANDIDATES = 2  # configs.py gives at most two tile candidates per kernel


class PickTuner:
    """Stands in for tuning.Tuner: always the index-th candidate (or the last), timing nothing;
    recording visits every candidate."""

    def __init__(self, index: int):
        self.index = index

    def choose(self, kernel, key, candidates, *_, **__):
        return candidates[min(self.index, len(candidates) - 1)]


def record(run: Callable[[], None], picks: Iterable[int] = range(N_CANDIDATES)) -> list[dict]:
    """Every fused-kernel launch `run()` makes, once per tile candidate index in `picks`: dicts with the
    launcher name, grid, runtime args, constexprs, options and launch key. Leaves no plan, kept kernel or
    launch count behind."""
    records: list[dict] = []

    def standin(name, grid, args, constexprs, options, key):
        records.append(dict(name=name, grid=grid, args=args, constexprs=dict(constexprs), options=dict(options),
                            key=key))
        return None  # keep no compiled kernel: every launch of the run comes back here

    counts = launch.LAUNCHES.copy()
    old_standin, old_tuner = launch.STANDIN, conv3x3.set_tuner(None)
    launch.STANDIN = standin
    try:
        for index in picks:
            conv3x3.set_tuner(PickTuner(index))  # also drops the plans made with the previous pick
            run()
    finally:
        launch.STANDIN = old_standin
        conv3x3.set_tuner(old_tuner)
        launch.LAUNCHES.clear()
        launch.LAUNCHES.update(counts)
    return records


def launcher(name: str) -> launch.KernelLauncher:
    """The KernelLauncher a record names (conv3x3.py's fwd, dw, dx, fin; upconv.py's up_*; outconv.py's out_*)."""
    return launch.LAUNCHERS[name]


def distinct(records: list[dict]) -> list[dict]:
    """One record per launcher and launch key. A launch key pins everything the JIT specialises on
    (launch.py), so the records left name every variant; the JIT would find the others in its cache, but
    binding a launch's ~45 arguments to compute that costs host time (the paper G: ~900 launches
    recorded, ~45 variants)."""
    return list({(r["name"], r["key"]): r for r in records}.values())


def compile_records(records: list[dict], workers: int) -> tuple[int, bool]:
    """Compile every record's variant through the JIT's own warmup. Returns (distinct variants, whether
    the compiles ran in parallel: Triton >= 3.4 has AsyncCompileMode; before it they run one by one)."""
    mode_cls = getattr(triton, "AsyncCompileMode", None)
    if mode_cls is None or workers <= 1:
        kernels = [_warmup(r) for r in records]
        return len({id(k) for k in kernels}), False
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="triton-compile") as pool:
        with mode_cls(pool):
            # each warmup returns at once with a future; identical variants share one
            kernels = [_warmup(r) for r in records]
        # leaving the mode waited for every compile and put each kernel in the JIT's cache
    return len({id(k) for k in kernels}), True


def _warmup(rec: dict):
    kernel = launcher(rec["name"]).kernel
    return kernel.warmup(*rec["args"], grid=rec["grid"], **rec["constexprs"], **rec["options"])


@dataclass
class PrecompileReport:
    launches: int      # launches recorded (all candidates)
    warmups: int       # of which compiled or loaded: one per launcher and launch key (distinct)
    variants: int      # distinct kernel binaries among them
    seconds: float     # recording + compiling (or loading from Triton's disk cache)
    record_s: float    # of which recording: the workload's host code and its other (torch) ops
    workers: int
    parallel: bool

    def line(self) -> str:
        how = f"{self.workers} compile threads" if self.parallel else \
            "one at a time" + ("" if hasattr(triton, "AsyncCompileMode") else
                               f" (triton {triton.__version__} has no AsyncCompileMode)")
        return (f"Triton kernels precompiled: {self.variants} variants of {self.launches} recorded launches "
                f"(every tile candidate; {self.warmups} distinct launch keys) in {self.seconds:.1f} s ({self.record_s:.1f} s recording), {how}")


def default_workers(processes_per_node: int = 1) -> int:
    """The node's cores shared among the processes compiling at once, at most 16."""
    cores = len(os.sched_getaffinity(0))  # Linux: the cores this process may run on
    return max(1, min(16, cores // max(1, processes_per_node)))


def precompile(run: Callable[[], None], workers: Optional[int] = None) -> PrecompileReport:
    """Record `run`'s launches (every tile candidate) and compile their variants in `workers` threads."""
    if INTERPRETING:
        raise RuntimeError("precompile: TRITON_INTERPRET=1 runs kernels in the interpreter; there is nothing to compile")
    workers = default_workers() if workers is None else workers
    t0 = time.perf_counter()
    records = record(run)
    recorded = time.perf_counter() - t0
    keyed = distinct(records)
    variants, parallel = compile_records(keyed, workers)
    return PrecompileReport(len(records), len(keyed), variants, time.perf_counter() - t0, recorded, workers, parallel)

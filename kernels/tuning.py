"""Bounded autotuning: choose between a kernel's (at most two) heuristic candidates once per tuning
key, and remember the choice across processes.

The key buckets M (configs.m_bucket), so batch sizes share decisions. Choices persist in a JSON file
keyed by device name, Triton version and the kernel's key, in the user cache dir
($XDG_CACHE_HOME or ~/.cache)/gafh_fast/autotune.json, written atomically (temp file + os.replace,
merged with what another process wrote meanwhile). A warm process reads the file and times nothing.

The timer is injected: on a GPU it is triton.testing.do_bench (device events, median); the CPU tests
pass their own. With one candidate nothing is timed. Under the interpreter the host code asks for
`first` (no timing: interpreter time says nothing about the GPU).
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import tempfile
import time
from typing import Callable, Optional, Sequence

import triton

log = logging.getLogger("gafh_fast")


def default_cache_path() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "gafh_fast", "autotune.json")


def config_to_dict(cfg: triton.Config) -> dict:
    return {"kwargs": dict(cfg.kwargs), "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


# A candidate's timed calls queue up behind this many GPU clock cycles of torch.cuda._sleep (~1.5 ms at
# the H100's and H200's 1.98 GHz boost): the host enqueues every call before the device reaches them, so
# the events time the device alone, not the host's launch gaps.
QUEUE_AHEAD_CYCLES = 3_000_000
TIMER_WARMUP, TIMER_REPS, TIMER_MIN_REPS = 3, 10, 3
# Timed calls per candidate: as many as fit this many ms (by the last warm-up call's time), at least
# TIMER_MIN_REPS. The output layer's and the 256x256 stages' kernels take 1-5 ms at batch 64: ten calls
# each of two candidates would add ~0.1 s per decision to a cold start (issue 11: <= 10 s in all).
TIMER_BUDGET_MS = 10.0


def cuda_timer(fn: Callable[[], None], warmup: int = TIMER_WARMUP, reps: int = TIMER_REPS,
               event: Optional[Callable] = None, sleep: Optional[Callable[[int], None]] = None,
               synchronize: Optional[Callable[[], None]] = None) -> float:
    """Median ms of one call of fn on the current CUDA device: `warmup` calls (the last one between two
    events, to size what follows), then up to `reps` calls (TIMER_BUDGET_MS), each between two events,
    all queued behind a sleep kernel (QUEUE_AHEAD_CYCLES).

    Not triton.testing.do_bench: it zeroes a 256 MB buffer before every call (to flush L2) and repeats
    for 20 ms per candidate; on the H200 (2026-11-27) that was 5.9 s of the cold process's 14.1 s for the
    paper G's 24 decisions. Two candidates of one kernel see the same L2 state here, which is all a
    choice between them needs. event / sleep / synchronize are torch.cuda's unless given (the CPU test
    gives clock-based stand-ins)."""
    import torch

    event = event or (lambda: torch.cuda.Event(enable_timing=True))
    sleep = sleep or torch.cuda._sleep
    synchronize = synchronize or torch.cuda.synchronize
    for _ in range(warmup - 1):
        fn()
    probe = (event(), event())
    probe[0].record()
    fn()
    probe[1].record()
    synchronize()
    fits = int(TIMER_BUDGET_MS / max(probe[0].elapsed_time(probe[1]), 1e-6))
    pairs = [(event(), event()) for _ in range(max(min(reps, TIMER_MIN_REPS), min(reps, fits)))]
    sleep(QUEUE_AHEAD_CYCLES)
    for start, end in pairs:
        start.record()
        fn()
        end.record()
    synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in pairs)


class Tuner:
    """Choice of config per (kernel, key); `choose` times the candidates only on a miss."""

    def __init__(self, cache_path: Optional[str], device_name: str, timer: Optional[Callable] = None):
        self.cache_path = cache_path
        self.device_name = device_name
        self.timer = timer
        self.choices: dict[str, dict] = {}
        self.timed_seconds = 0.0  # wall time spent timing candidates in this process (bench reports it)
        self.log: list[dict] = []  # one entry per decision: kernel, key, candidates' ms, chosen, source
        self._loaded = False

    def _full_key(self, kernel: str, key: tuple) -> str:
        return f"{self.device_name}|triton {triton.__version__}|{kernel}|{key!r}"

    def _load(self) -> None:
        self._loaded = True
        if not self.cache_path or not os.path.exists(self.cache_path):
            return
        try:
            with open(self.cache_path) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:  # a corrupt cache is re-tuned, and said so
            log.warning("autotune cache %s unreadable (%s): tuning again", self.cache_path, e)
            return
        for k, v in data.items():
            self.choices.setdefault(k, v)

    def _save(self, full_key: str, entry: dict) -> None:
        if not self.cache_path:
            return
        os.makedirs(os.path.dirname(self.cache_path), exist_ok=True)
        data = {}
        if os.path.exists(self.cache_path):  # merge: another process may have added keys meanwhile
            try:
                with open(self.cache_path) as f:
                    data = json.load(f)
            except (OSError, ValueError):
                data = {}
        data[full_key] = entry
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.cache_path), prefix=".autotune.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, self.cache_path)  # atomic: readers see the old or the new file, never half

    def choose(self, kernel: str, key: tuple, candidates: Sequence[triton.Config],
               run_candidate: Optional[Callable[[triton.Config], None]] = None, first: bool = False) -> triton.Config:
        """The config for (kernel, key): from memory, the cache file, or by timing run_candidate(cfg)."""
        if first or len(candidates) == 1:
            return candidates[0]
        if not self._loaded:
            self._load()
        full_key = self._full_key(kernel, key)
        hit = self.choices.get(full_key)
        if hit is not None:
            for c in candidates:
                if config_to_dict(c) == hit["config"]:
                    return c
            # the cached winner is no longer a candidate (the heuristic changed): tune again
        if self.timer is None or run_candidate is None:
            raise RuntimeError(f"autotune of {kernel} {key}: no timer given and no cached choice")
        t0 = time.perf_counter()
        first_calls: list[float] = []  # host seconds of each candidate's first call (the JIT's lookup, module load)
        times = [float(self.timer(_first_call_clocked(run_candidate, c, first_calls))) for c in candidates]
        t1 = time.perf_counter()
        self.timed_seconds += t1 - t0
        best = min(range(len(candidates)), key=times.__getitem__)
        entry = {"config": config_to_dict(candidates[best]), "ms": times}
        self.choices[full_key] = entry
        log.info("autotune %s %s: %s ms -> %s", kernel, key, ["%.4f" % t for t in times], candidates[best])
        self._save(full_key, entry)
        # where a decision's wall time goes (the H200's cold start spent 3.5 s in 24 decisions whose timed
        # calls are ~1 ms each: bench/RESULTS.md, D3): first calls, the rest of the timing, the cache write
        self.log.append({"kernel": kernel, "key": key, "ms": times, "chosen": config_to_dict(candidates[best]),
                         "first_call_s": first_calls, "timing_s": t1 - t0, "save_s": time.perf_counter() - t1})
        return candidates[best]


def _first_call_clocked(run_candidate: Callable, cfg, first_calls: list) -> Callable[[], None]:
    """run_candidate(cfg) as the timer's fn; the host seconds of its first call are appended to first_calls."""
    calls = [0]

    def first_then_plain():
        if calls[0]:
            run_candidate(cfg)
            return
        calls[0] = 1
        t0 = time.perf_counter()
        run_candidate(cfg)
        first_calls.append(time.perf_counter() - t0)

    return first_then_plain

"""Profile the trainer's GAN step: where the device time goes, and how much of the step the device idles.

    python bench/profile_step.py --out DIR [--device auto|cuda|cpu] [--batch 64] [--steps 3] [--smoke]
                                 [section.key=value ...]

Runs the train suite's `bf16 ... step (deepspeed)` path (the trainer's own train_step on the two
DeepSpeed engines, paper model, random VGG) for a few warm-up steps, then `--steps` steps under
torch.profiler, and writes into DIR:
  profile_top.md     the top 40 kernels by device time (CUDA kernels on a GPU; aten ops by self CPU
                     time on CPU): name, calls, total ms, % of the profiled steps, input shapes where known
  profile.json       the same rows (and `all_rows`: every kernel / op), plus the step split: wall ms per step, device-busy ms (the union of
                     the device's activity intervals), device-idle ms (wall - busy), host ms per step
                     (Python time inside train_step, its own syncs included)
  trace.json[.gz]    the Chrome trace (chrome://tracing, Perfetto), gzipped when over 16 MB, dropped
                     (and said so) when still over
On CPU the "device" is the CPU's operator time, so the same code and the same files come out (tests).

After the profile, `--sync-steps` more steps (default 3) run under torch.cuda.set_sync_debug_mode("warn"):
every synchronizing CUDA call inside the trainer's step (an .item(), a bool() of a device tensor, a
blocking copy, one inside a C++ op) raises torch's warning, and profile.json's `sync_check` gives their
count and the first few places. The step must have none (gafh_fast/train/step.py); on CPU nothing can
stall a device, so the check says so and counts nothing (tests/test_train_sync_free.py counts host reads there).
"""
from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import time
import warnings
from typing import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

import train_suite  # noqa: E402
from common import resolve_device  # noqa: E402
from gafh_fast.config import load_config  # noqa: E402
from gafh_fast.train.layout import use_channels_last  # noqa: E402
from gafh_fast.train.step import train_step  # noqa: E402

TOP = 40
TRACE_LIMIT = 16 * 2**20
STEP_LABEL = "gan_step"


def union_us(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of [start, end) intervals (µs)."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total, end = total + (e - s), e
        elif e > end:
            total, end = total + (e - end), e
    return total


def device_rows(prof, cuda: bool, wall_ms_total: float) -> list[dict]:
    """Every kernel (CUDA) or operator (CPU, by self time) with calls, total ms, share and shapes,
    most time first."""
    averages = prof.key_averages(group_by_input_shape=True)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    rows = []
    for avg in averages:
        us = getattr(avg, key)
        if us <= 0 or avg.key == STEP_LABEL:
            continue
        shapes = [list(s) for s in (avg.input_shapes or []) if s]
        rows.append({"name": avg.key, "calls": avg.count, "total_ms": us / 1000.0,
                     "pct_of_steps": 100.0 * us / 1000.0 / wall_ms_total, "input_shapes": shapes or None})
    rows.sort(key=lambda r: -r["total_ms"])
    return rows


def busy_us(prof, cuda: bool) -> float:
    """The union of the device's activity: CUDA kernels and copies on a GPU; top-level operators on CPU."""
    from torch.autograd import DeviceType

    events = prof.events()
    if cuda:
        spans = [(e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA]
    else:
        spans = [(e.time_range.start, e.time_range.end) for e in events
                 if e.device_type == DeviceType.CPU and e.key != STEP_LABEL and e.key.startswith("aten::")]
    return union_us(spans)


def write_trace(prof, out: Path) -> str:
    path = out / "trace.json"
    prof.export_chrome_trace(str(path))
    if path.stat().st_size <= TRACE_LIMIT:
        return path.name
    with open(path, "rb") as src, gzip.open(out / "trace.json.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    path.unlink()
    if (out / "trace.json.gz").stat().st_size <= TRACE_LIMIT:
        return "trace.json.gz"
    (out / "trace.json.gz").unlink()
    return "dropped: over 16 MB even gzipped; rerun with --steps 1"


SYNC_WARNING = "synchronizing"  # torch's sync-debug warning: "called a synchronizing CUDA operation"


def sync_check(run_steps: Callable[[], None], set_mode: Callable[[str], None], keep: int = 5) -> dict:
    """Run `run_steps` with sync debugging at "warn" (set_mode: torch.cuda.set_sync_debug_mode, or a stand-in
    in the tests) and collect torch's warnings: {"syncs": count, "first": ["file:line: message", ...]}."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every sync, not one per place
        set_mode("warn")
        try:
            run_steps()
        finally:
            set_mode("default")
    syncs = [w for w in caught if SYNC_WARNING in str(w.message)]
    return {"syncs": len(syncs), "first": [f"{w.filename}:{w.lineno}: {str(w.message)[:160]}" for w in syncs[:keep]]}


def markdown(result: dict) -> str:
    s = result["split"]
    lines = [f"# GAN step profile: {result['device_name']}, batch {result['batch']}, {result['steps']} steps",
             "", f"wall {s['wall_ms_per_step']:.3f} ms/step | device busy {s['busy_ms_per_step']:.3f} ms "
             f"({s['busy_pct']:.1f} %) | device idle {s['idle_ms_per_step']:.3f} ms ({100 - s['busy_pct']:.1f} %) | "
             f"host in train_step {s['host_ms_per_step']:.3f} ms | trace: {result['trace']}", "",
             sync_line(result["sync_check"]), "",
             "| # | kernel / op | calls | total ms | % of steps | input shapes |", "|---|---|---|---|---|---|"]
    for i, r in enumerate(result["rows"], start=1):
        shapes = "" if r["input_shapes"] is None else str(r["input_shapes"])[:120]
        lines.append(f"| {i} | `{r['name'][:90]}` | {r['calls']} | {r['total_ms']:.3f} | {r['pct_of_steps']:.1f} | {shapes} |")
    return "\n".join(lines) + "\n"


def sync_line(check: dict) -> str:
    if check["syncs"] is None:
        return f"host syncs: not checked ({check['why']})"
    first = "; first: " + check["first"][0] if check["first"] else ""
    return f"host syncs in {check['steps']} steps under set_sync_debug_mode: {check['syncs']}{first}"


def profile_steps(device: str, batch: int, steps: int, warmup: int, smoke: bool, overrides: tuple[str, ...],
                  out: Path, sync_steps: int = 3) -> dict:
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    if not cuda:
        import os
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed's first import probes for CUDA
    cfg = load_config(None, (train_suite.TINY if smoke else ()) + (
        f"data.batch_size={batch}", "train.content.pretrained=false", "kernels=auto", "deepspeed.bf16=true") + overrides)
    g, d, vgg = train_suite._build(cfg, dev, torch.bfloat16, "deepspeed")
    g_engine, d_engine = train_suite._deepspeed_engines(cfg, g, d)
    inputs = train_suite._batches(cfg, batch, dev, torch.bfloat16, use_channels_last(cfg.train.channels_last, dev))

    codes = []

    def step(i: int) -> None:  # nothing read back inside: the trainer's step reads nothing either
        hr, lr = inputs[i % len(inputs)]
        codes.append(train_step(cfg, g_engine, d_engine, vgg, hr, lr, gan=True).skip_code)

    for i in range(warmup):
        step(i)
    sync = (lambda: torch.cuda.synchronize(dev)) if cuda else (lambda: None)
    sync()
    host_s = []
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=True) as prof:
        t_start = time.perf_counter()
        for i in range(steps):
            with record_function(STEP_LABEL):
                t0 = time.perf_counter()
                step(i)
                host_s.append(time.perf_counter() - t0)
        sync()  # a device sync point: the wall time below includes the device's tail
        wall_s = time.perf_counter() - t_start
    if cuda and sync_steps:
        sync_result = sync_check(lambda: [step(steps + i) for i in range(sync_steps)], torch.cuda.set_sync_debug_mode)
        sync()
        sync_result["steps"] = sync_steps
    else:
        sync_result = {"syncs": None, "steps": 0, "first": [],
                       "why": "no CUDA device: nothing to stall" if not cuda else "--sync-steps 0"}
    train_suite.raise_on_skips(codes, "a profiled step")
    wall_ms = 1000.0 * wall_s
    busy_ms = busy_us(prof, cuda) / 1000.0
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "device_name": torch.cuda.get_device_name(dev) if cuda else "cpu", "batch": batch, "steps": steps,
        "activity": "cuda kernels" if cuda else "cpu operators (self time)",
        "split": {"wall_ms_per_step": wall_ms / steps, "busy_ms_per_step": busy_ms / steps,
                  "idle_ms_per_step": max(0.0, wall_ms - busy_ms) / steps,
                  "busy_pct": 100.0 * min(busy_ms, wall_ms) / wall_ms,
                  "host_ms_per_step": 1000.0 * sum(host_s) / steps},
        "all_rows": device_rows(prof, cuda, wall_ms),
        "trace": write_trace(prof, out),
        "sync_check": sync_result,
    }
    result["rows"] = result["all_rows"][:TOP]
    (out / "profile.json").write_text(json.dumps(result, indent=1))
    (out / "profile_top.md").write_text(markdown(result))
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="the tiny model of the train suite's smoke run")
    p.add_argument("--sync-steps", type=int, default=3, help="steps run under set_sync_debug_mode (CUDA; 0: none)")
    p.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE")
    args = p.parse_args(argv)
    result = profile_steps(args.device, args.batch, args.steps, args.warmup, args.smoke, tuple(args.overrides), args.out,
                           args.sync_steps)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `kernels` benchmark suite: the fused Triton conv3x3 against eager PyTorch and torch.compile.

On a CUDA GPU, at LR 32x32, nf 64, gc 32, bf16, channels_last, for each batch it times
    idb_fwd      one IDB forward (inference: no autograd state)
    idb_fwd_bwd  one IDB forward + backward
    ridb_fwd_bwd one RIDB (4 IDBs + its conv, with the DNB residual) forward + backward: the generator's
                 unit of fusion (one autograd Function on the triton path); eager and triton only
    up_fwd_bwd   the generator's first upsampling step forward + backward (nearest x2 -> conv nf -> nf ->
                 LeakyReLU, 32x32 -> 64x64; triton: kernels/upconv.py's sub-pixel phases, 4/9 of the
                 FLOPs, no upsampled tensor; TFLOP/s count the reference conv's FLOPs)
    up_out_fwd_bwd the generator's last upsampling step and output layer forward + backward (128x128 ->
                 256x256, then tanh(conv 9x9, nf -> 3); triton: kernels/upout.py, the output layer's
                 Triton backward handing the step its gz; eager: interpolate, conv, LeakyReLU, conv, tanh)
    gen_fwd_bwd  the whole paper generator forward + backward (32x32 -> 256x256)
four ways: `triton` (kernels=triton), `auto` (kernels=auto: the per-shape timed choice between the two,
made in the warm-up call; issue 11's goal that it is never slower than eager), `eager` (kernels=torch,
cudnn.benchmark on), `compile` (torch.compile of the eager reference). Each row: ms (median of
triton.testing.do_bench, after a warm-up call that also runs the autotuner), conv TFLOP/s (analytic:
2*Cin*Cout*k*k*H*W per image for the forward, x3 for forward + backward), speedup vs eager, and peak
memory above the inputs and parameters (torch.cuda.max_memory_allocated).

So that one GPU call tells whether a slow row is host time or device time, each batch also gets:
    idb_fwd / idb_fwd_bwd  `triton (CUDA graph)` and `eager (CUDA graph)`: one graph replay, pure
                 device time (the wall rows minus these is the host's share)
    idb_fwd_bwd kernel i   torch.profiler device time of each kernel of one IDB forward + backward
                 (triton), and `device sum` rows for triton and eager next to their wall time; the same
                 rows for up_fwd_bwd (the upsampling stage's kernels) and up_out_fwd_bwd
    gen_fwd_bwd layer i    where the whole generator's forward + backward spends its device time, per
                 layer (bench/device_profile.py: kernels grouped by the operator that launched them,
                 the top 15 groups and one `other` row, for triton and eager, and a `device sum` row
                 per path next to its wall time); at batch 64 only (or the run's first batch without 64)
    triton configs         the tile config of every launch plan (JSON keys configs, decisions)
and, at batch 64 (not in --smoke), `autotune gen_fwd_bwd`: the first forward + backward of the whole
paper generator in a fresh process with empty autotune and Triton caches (cold), then in a second
process that finds them filled (warm), then cold again with the forward tiles untimed (conv3x3.UNTIMED,
the cut the 10 s goal may need); the rows carry the tuner's timing seconds and its decisions.
Without CUDA nothing is timed (the Triton interpreter never is): the suite runs its plumbing only (the
profiler parsing on the eager IDB, the autotune probe process on a tiny IDB under the interpreter) and
returns skipped rows that say what ran.

    python bench/kernels_suite.py [--batches 8 64 256] [--smoke]
    python bench/kernels_suite.py --probe generator|idb --batch 64 --device cuda --probe-json out.json
    python bench/kernels_suite.py --autotune-only rows.json [--batch 64] [--device cuda]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from gafh_fast.config import load_config
from gafh_fast.models.generator import IDB, RIDB, Generator, precompile_kernels
from gafh_fast.ops import fused_up_out_conv, fused_upconv3x3
from device_profile import (ITERS, TOP, group_by_layer, kernel_rows, launch_records, layer_rows, profile_kernels,
                            profiled_events)

NF, GC, LR_SIZE = 64, 32, 32
PATHS = ("eager", "triton", "auto", "compile")  # eager first: the others' speedups are against it
AUTOTUNE_BATCH = 64  # the autotune goal is for one batch size: the trunk benchmark's
# The generator's per-layer breakdown runs at one batch, the goals' (the run's first batch when 64 is not
# in it): at 8 the host, not the device, sets the time (the device sum rows say that much), and 256 only
# scales the same kernels, so profiling hundreds of launches per call there too would spend the
# kernels-b8-256 stage's cap for little
BREAKDOWN_BATCH = 64
REPO = Path(__file__).resolve().parents[1]


def conv_flops(c_in: int, c_out: int, k: int, h: int, w: int) -> int:
    return 2 * c_in * c_out * k * k * h * w


def idb_forward_flops(batch: int) -> int:
    return batch * (conv_flops(NF, GC, 3, LR_SIZE, LR_SIZE) + conv_flops(NF + GC, NF, 3, LR_SIZE, LR_SIZE))


def ridb_forward_flops(cfg, batch: int) -> int:
    return cfg.model.generator.idb_per_ridb * idb_forward_flops(batch) + batch * conv_flops(NF, NF, 3, LR_SIZE, LR_SIZE)


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


class UpsampleStep(torch.nn.Module):
    """One upsampling step of the generator (its `nearest_conv` path): fused_upconv3x3 with the module's backend."""

    def __init__(self, nf: int):
        super().__init__()
        self.conv = torch.nn.Conv2d(nf, nf, 3, padding=1)
        self.kernels = "torch"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_upconv3x3(x, self.conv.weight, self.conv.bias, backend=self.kernels)


class UpOutLayer(torch.nn.Module):
    """The generator's last upsampling step and output layer (its `nearest_conv` path): fused_up_out_conv
    (nearest x2, conv3x3 nf -> nf, LeakyReLU, then tanh(conv k x k, nf -> 3)) with the module's backend."""

    def __init__(self, nf: int, k: int):
        super().__init__()
        self.up = torch.nn.Conv2d(nf, nf, 3, padding=1)
        self.conv = torch.nn.Conv2d(nf, 3, k, padding=k // 2)
        self.kernels = "torch"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_up_out_conv(x, self.up.weight, self.up.bias, self.conv.weight, self.conv.bias,
                                 backend=self.kernels)


def _workloads(cfg, batch: int, device: torch.device):
    """name -> (module, make_fn(module) -> callable, flops, tensors whose grads do_bench clears)."""
    fmt = dict(device=device, dtype=torch.bfloat16)
    x = torch.randn(batch, NF, LR_SIZE, LR_SIZE, **fmt).contiguous(memory_format=torch.channels_last)
    lr = torch.rand(batch, 3, LR_SIZE, LR_SIZE, **fmt).mul(2).sub(1).contiguous(memory_format=torch.channels_last)
    idb = IDB(NF, GC).to(**fmt).to(memory_format=torch.channels_last)
    ridb = RIDB(NF, GC, cfg.model.generator.idb_per_ridb, cfg.model.generator.res_scale).to(**fmt).to(
        memory_format=torch.channels_last)
    gen = Generator(cfg.model.generator, kernels="torch").to(**fmt).to(memory_format=torch.channels_last)
    up = UpsampleStep(NF).to(**fmt).to(memory_format=torch.channels_last)
    k_out = cfg.model.generator.out_kernel
    up_out = UpOutLayer(NF, k_out).to(**fmt).to(memory_format=torch.channels_last)
    x_leaf = x.clone().requires_grad_(True)
    half_leaf = torch.randn(batch, NF, 4 * LR_SIZE, 4 * LR_SIZE, **fmt).contiguous(  # the last step's input
        memory_format=torch.channels_last).requires_grad_(True)

    def idb_fwd(module):
        def fn():
            with torch.no_grad():
                return module(x, x)
        return fn

    def idb_fwd_bwd(module):
        def fn():
            module(x_leaf, x_leaf).sum().backward()
        return fn

    def ridb_fwd_bwd(module):
        def fn():
            module(x_leaf, x_leaf).sum().backward()  # x0 and the DNB residual: the DNB's last RIDB
        return fn

    def up_fwd_bwd(module):
        def fn():
            module(x_leaf).sum().backward()
        return fn

    def up_out_fwd_bwd(module):
        def fn():
            module(half_leaf).float().mean().backward()
        return fn

    def gen_fwd_bwd(module):
        def fn():
            module(lr).float().mean().backward()
        return fn

    return {
        "idb_fwd": (idb, idb_fwd, idb_forward_flops(batch), []),
        "idb_fwd_bwd": (idb, idb_fwd_bwd, 3 * idb_forward_flops(batch), [x_leaf, *idb.parameters()]),
        "ridb_fwd_bwd": (ridb, ridb_fwd_bwd, 3 * ridb_forward_flops(cfg, batch), [x_leaf, *ridb.parameters()]),
        "up_fwd_bwd": (up, up_fwd_bwd, 3 * batch * conv_flops(NF, NF, 3, 2 * LR_SIZE, 2 * LR_SIZE),
                       [x_leaf, *up.parameters()]),
        "up_out_fwd_bwd": (up_out, up_out_fwd_bwd, 3 * batch * (conv_flops(NF, NF, 3, 8 * LR_SIZE, 8 * LR_SIZE)
                                                                + conv_flops(NF, 3, k_out, 8 * LR_SIZE, 8 * LR_SIZE)),
                           [half_leaf, *up_out.parameters()]),
        "gen_fwd_bwd": (gen, gen_fwd_bwd, 3 * generator_forward_flops(cfg, batch), list(gen.parameters())),
    }


def _set_kernels(module, kernels: str) -> None:
    if hasattr(module, "set_kernels"):
        module.set_kernels(kernels)
    else:
        for m in module.modules():
            if hasattr(m, "kernels"):
                m.kernels = kernels


def kernels_of(path: str) -> str:
    """The `kernels:` setting a timed path runs with (compile compiles the eager reference)."""
    return path if path in ("triton", "auto") else "torch"


def _time_one(module, make_fn, path: str, grads_to_clear, rep_ms: int):
    import triton.testing

    _set_kernels(module, kernels_of(path))
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


# ------------------------------------------------------------------------------------------------
# Host time or device time? CUDA graphs, torch.profiler, the autotuner's cost (issue 11, item 6)
# ------------------------------------------------------------------------------------------------
def graph_ms(module, make_fn, kernels: str, grads_to_clear, rep_ms: int) -> float:
    """Median ms of one replay of a CUDA graph of make_fn(module): device time with no Python in it.
    Warm-up runs on a side stream first (plans, compiled kernels, autotuning and cudnn.benchmark are
    all done before capture); grads are None at capture, so every replay writes them afresh."""
    import triton.testing

    _set_kernels(module, kernels)
    fn = make_fn(module)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    for t in grads_to_clear:
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    ms = triton.testing.do_bench(graph.replay, warmup=max(5, rep_ms // 4), rep=rep_ms, return_mode="median")
    del graph
    return ms


def fresh_calls(module, make_fn, grads) -> dict:
    """path -> one call of the workload on that path (triton, eager) with its grads cleared first, as
    do_bench clears them for the timed rows (no accumulation kernels in a profile)."""
    calls = {}
    for path, kernels in (("triton", "triton"), ("eager", "torch")):
        def fresh_call(kernels=kernels, fn=make_fn(module)):
            _set_kernels(module, kernels)  # the module is shared by both paths: set at each call
            for t in grads:
                t.grad = None
            fn()
        calls[path] = fresh_call
    return calls


def profiler_rows(module, make_fn, grads, batch: int, card: str, wall_ms: dict, device: torch.device,
                  workload: str = "idb_fwd_bwd") -> list[dict]:
    """Per-kernel device times of one call of `workload` (an IDB or an upsampling stage, forward +
    backward; triton), and the device sum per call of each path next to its wall time (from the timed
    rows): wall >> device sum means host-bound. Grads are cleared before each call, as do_bench does for
    the timed rows (no accumulation kernels)."""
    return kernel_rows(fresh_calls(module, make_fn, grads), workload, batch, card, wall_ms, device)


def layer_breakdown_rows(module, make_fn, grads, batch: int, card: str, wall_ms: dict, device: torch.device,
                         workload: str = "gen_fwd_bwd", iters: int = ITERS, top: int = TOP) -> list[dict]:
    """Per-layer device time of `workload` (the whole generator: hundreds of kernels per call) on the
    triton and eager paths, grads cleared before each call: bench/device_profile.py's rows."""
    return layer_rows(fresh_calls(module, make_fn, grads), workload, batch, card, wall_ms, device, iters, top)


PROBE_TIMEOUT_S = {"cold": 120, "warm": 60}
UNTIMED_PROBE = ("fwd", "up_fwd")  # the third probe's untimed kernels (conv3x3.UNTIMED)


def probe(workload: str, batch: int, device: str, untimed: tuple = ()) -> dict:
    """In a fresh process: the first forward + backward of `workload` with kernels=triton (every
    compile and autotune happens here), timed; then what the tuner did and which configs it chose.
    workload: `generator` (the paper's G, bf16) or `idb` (a tiny IDB, fp32: the CPU plumbing check).
    untimed: kernels whose first heuristic tile is taken untimed (conv3x3.UNTIMED) in this process."""
    from gafh_fast.kernels import conv3x3, launch

    conv3x3.UNTIMED = frozenset(untimed)

    dev = torch.device(device)
    if workload == "generator":
        cfg = load_config(None, [f"data.hr_size={LR_SIZE * 8}"])
        module = Generator(cfg.model.generator, kernels="triton").to(device=dev, dtype=torch.bfloat16)
        inputs = (torch.rand(batch, 3, LR_SIZE, LR_SIZE, device=dev, dtype=torch.bfloat16) * 2 - 1,)
    else:
        module = IDB(8, 4).to(dev)
        x = torch.randn(batch, 8, 4, 4, device=dev)
        inputs = (x, x)
    module = module.to(memory_format=torch.channels_last)
    _set_kernels(module, "triton")
    precompiled = None
    if workload == "generator":  # what the trainer does before step 1: every variant, on parallel threads
        precompiled = vars(precompile_kernels([(module, batch, True)], LR_SIZE))
    t0 = time.perf_counter()
    module(*[t.contiguous(memory_format=torch.channels_last) for t in inputs]).float().mean().backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    first = time.perf_counter() - t0
    tuner = conv3x3.tuner()
    return {"workload": workload, "batch": batch, "device": device, "untimed": sorted(conv3x3.UNTIMED),
            "precompile": precompiled, "first_call_s": first,
            "tuner_timed_s": tuner.timed_seconds, "decisions": tuner.log, "configs": conv3x3.plan_configs(),
            "launches": dict(launch.LAUNCHES)}


def run_probe(workload: str, batch: int, device: str, cache_root: str, timeout_s: float, untimed: tuple = ()) -> dict:
    """probe() in a child process whose autotune cache and Triton kernel cache live under cache_root
    (empty: a cold process; filled by an earlier probe: a warm one). Adds process_s."""
    out = os.path.join(cache_root, "probe.json")
    env = dict(os.environ, XDG_CACHE_HOME=os.path.join(cache_root, "xdg"),
               TRITON_CACHE_DIR=os.path.join(cache_root, "triton"),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"  # no GPU: the interpreter (and so no timing in the tuner)
    else:
        env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--probe", workload, "--batch", str(batch),
           "--device", device, "--probe-json", out] + (["--untimed", ",".join(untimed)] if untimed else [])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"probe exit {proc.returncode}: {proc.stderr.strip()[-500:]}")
    result = json.loads(Path(out).read_text())
    result["process_s"] = time.perf_counter() - t0
    return result


def _probe_note(r: dict) -> str:
    kinds = Counter(c["kernel"] for c in r["configs"])
    pre = r.get("precompile")
    return ((f"precompile {pre['seconds']:.2f} s ({pre['variants']} variants, {pre['workers']} threads"
             f"{'' if pre['parallel'] else ', serial'}), then " if pre else "")
            + f"first fwd+bwd {r['first_call_s']:.2f} s (compiles + autotuning), tuner timing "
            f"{r['tuner_timed_s']:.2f} s over {len(r['decisions'])} decisions{_decision_split(r['decisions'])}, "
            f"whole process {r['process_s']:.1f} s; "
            f"{len(r['configs'])} launch plans ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))})")


def _decision_split(decisions: list[dict]) -> str:
    """Where the tuner's timing went (kernels/tuning.py logs it per decision): the candidates' first calls (the
    JIT's lookup and module load, on the host), and the cache file's writes, which come on top."""
    if not decisions:
        return ""
    first = sum(sum(d["first_call_s"]) for d in decisions)
    return f" (of which first calls {first:.2f} s; cache writes {sum(d['save_s'] for d in decisions):.2f} s more)"


def autotune_rows(batch: int, device: torch.device, card: str) -> list[dict]:
    """The autotuner's cost for the whole paper generator at one batch: a cold process (empty
    autotune and Triton caches), then a warm one (the same machine, a second process). Goal: cold
    <= 10 s, warm <= 1 s. On CPU: one tiny-IDB probe under the interpreter (plumbing; nothing timed)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="gafh_autotune_probe.") as root:
        if device.type != "cuda":
            try:
                r = run_probe("idb", 1, "cpu", root, PROBE_TIMEOUT_S["warm"], untimed=UNTIMED_PROBE)
                note = (f"CPU plumbing only (interpreter: nothing timed; {'/'.join(r['untimed'])} untimed, as the "
                        f"third GPU probe): {_probe_note(r)}")
                rows.append({"suite": "kernels", "name": "autotune probe", "path": "cold process", "batch": 1,
                             "card": card, "skipped": note, "configs": r["configs"], "untimed": r["untimed"]})
            except Exception as e:  # noqa: BLE001  the row says what broke
                rows.append({"suite": "kernels", "name": "autotune probe", "path": "cold process", "batch": 1,
                             "card": card, "error": f"{type(e).__name__}: {e}"})
            return rows
        # cold, then warm on its caches, then cold again in empty ones with the forward tiles untimed (the
        # cut the 10 s goal may need: bench/RESULTS.md, Round 13)
        for phase, untimed in (("cold", ()), ("warm", ()), ("cold", UNTIMED_PROBE)):
            row = {"suite": "kernels", "name": "autotune gen_fwd_bwd", "batch": batch, "card": card,
                   "path": f"{phase} process" + (f", {'/'.join(untimed)} untimed" if untimed else "")}
            # the untimed probe gets empty caches of its own (inside root, which the with-block removes)
            caches = tempfile.mkdtemp(prefix="untimed.", dir=root) if untimed else root
            try:
                r = run_probe("generator", batch, "cuda", caches, PROBE_TIMEOUT_S[phase], untimed=untimed)
            except Exception as e:  # noqa: BLE001  a timeout or crash is a row, and the warm probe still runs
                row["error"] = f"{type(e).__name__}: {e}"[:500]
            else:
                goal = 10.0 if phase == "cold" else 1.0
                precompile_s = r["precompile"]["seconds"] if r.get("precompile") else 0.0
                # the goal's clock: everything before the first step can run (precompile + first fwd+bwd)
                row.update(ms=(precompile_s + r["first_call_s"]) * 1000, precompile_s=precompile_s,
                           first_call_s=r["first_call_s"], tuner_timed_s=r["tuner_timed_s"],
                           process_s=r["process_s"], decisions=r["decisions"], configs=r["configs"],
                           note=f"{_probe_note(r)}; goal <= {goal:g} s")
            rows.append(row)
            print(f"autotune {phase}: {row.get('note') or row.get('error')}")
    return rows


def auto_decisions() -> list[dict]:
    """kernels=auto's per-shape choices this process made (gafh_fast.ops.AUTO): the op and its shape key,
    each backend's timed ms per call, and the pick. The library logs them at INFO, which the suite does
    not print, so they travel in the configs row."""
    from gafh_fast import ops

    def plain(part):
        return str(part).replace("torch.", "") if isinstance(part, (torch.dtype, torch.device)) else part

    return [{"key": repr(tuple(plain(p) for p in key)), "ms": dict(ops.AUTO.timings.get(key, {})), "chosen": chosen}
            for key, chosen in ops.AUTO.decisions.items()]


def config_row(batch: int, card: str) -> dict:
    """The tile config of every launch plan this process made, this process's own autotuning, and the
    `auto` path's choices so far."""
    from gafh_fast.kernels import conv3x3

    configs = conv3x3.plan_configs()
    tuner = conv3x3.tuner()
    auto = auto_decisions()
    for c in configs:
        print(f"config {c['kernel']:3s} {c['plan']}: {c['config']['kwargs']} warps {c['config']['num_warps']} "
              f"stages {c['config']['num_stages']}")
    for d in auto:
        print(f"auto {d['key']}: {', '.join(f'{k} {v:.4f} ms' for k, v in d['ms'].items())} -> {d['chosen']}")
    return {"suite": "kernels", "name": "triton configs", "path": "triton", "batch": batch, "card": card,
            "configs": configs, "decisions": list(tuner.log), "auto_decisions": auto,
            "note": f"{len(configs)} launch plans; in-process autotuning so far {tuner.timed_seconds:.2f} s over "
                    f"{len(tuner.log)} decisions; kernels=auto chose for {len(auto)} shapes "
                    f"(JSON keys configs, decisions, auto_decisions)"}


partial_rows: list[dict] = []  # the rows finished so far (bench/throughput.py reads them after a SIGTERM)


def run(device: str, batches=(8, 64, 256), smoke: bool = False) -> list[dict]:
    """Time the fused kernels against eager and torch.compile; one dict per (workload, path, batch)."""
    dev = torch.device(device)
    partial_rows.clear()
    if dev.type != "cuda" or not torch.cuda.is_available():
        print("kernels suite: numbers need a CUDA GPU (the Triton interpreter is never timed); plumbing only")
        partial_rows.extend(cpu_plumbing_rows())
        return list(partial_rows)
    torch.backends.cudnn.benchmark = True
    cfg = load_config(None, [f"data.hr_size={LR_SIZE * 8}"])
    if smoke:
        batches = (min(batches),)
    rep_ms = 20 if smoke else 200
    card = torch.cuda.get_device_name(dev)
    breakdown_batch = BREAKDOWN_BATCH if BREAKDOWN_BATCH in batches else batches[0]
    rows = partial_rows  # a stage timeout in gpu_suite.sh keeps what was measured
    for batch in batches:
        workloads = _workloads(cfg, batch, dev)
        wall_ms: dict = {}
        for name, (module, make_fn, flops, grads) in workloads.items():
            eager_ms = None
            for path in PATHS:
                if smoke and path == "compile" and name == "gen_fwd_bwd":
                    continue  # compiling the whole generator takes minutes: not in a smoke run
                if path == "compile" and name == "ridb_fwd_bwd":
                    continue  # its compile row is the IDB's and the generator's: device minutes are scarce
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
                wall_ms[(name, path)] = ms
                row.update(ms=ms, tflops=flops / ms / 1e9, peak_mem_mb=peak_mb,
                           speedup_vs_eager=(eager_ms / ms) if eager_ms else None)
                rows.append(row)
                print(f"{name:12s} {path:8s} batch {batch:4d}: {ms:9.3f} ms  {row['tflops']:7.1f} TFLOP/s  "
                      f"x{row['speedup_vs_eager'] or float('nan'):.2f} vs eager  peak {peak_mb:9.1f} MiB")
        rows.extend(device_time_rows(workloads, batch, card, wall_ms, rep_ms, dev, layers=batch == breakdown_batch))
        rows.append(config_row(batch, card))
        del workloads
        gc.collect()
        torch.cuda.empty_cache()
    if AUTOTUNE_BATCH in batches and not smoke:  # last: two fresh processes, the longest item here
        rows.extend(autotune_rows(AUTOTUNE_BATCH, dev, card))
    return list(rows)


def device_time_rows(workloads, batch: int, card: str, wall_ms: dict, rep_ms: int, dev,
                     layers: bool = True) -> list[dict]:
    """CUDA-graph rows of the IDB (forward, forward + backward), the profiler rows of its fwd+bwd and of
    the upsampling stage's, and with `layers` the generator's per-layer breakdown."""
    rows = []
    for name in ("idb_fwd", "idb_fwd_bwd"):
        module, make_fn, flops, grads = workloads[name]
        graphed = {}
        for path, kernels in (("eager", "torch"), ("triton", "triton")):
            row = {"suite": "kernels", "name": name, "path": f"{path} (CUDA graph)", "batch": batch, "card": card}
            try:
                ms = graphed[path] = graph_ms(module, make_fn, kernels, grads, rep_ms)
            except Exception as e:  # noqa: BLE001  a capture that fails is a row, the suite goes on
                torch.cuda.synchronize()
                row["error"] = f"CUDA graph: {type(e).__name__}: {e}"[:500]
                rows.append(row)
                continue
            wall = wall_ms.get((name, path))
            row.update(ms=ms, tflops=flops / ms / 1e9, note="one CUDA-graph replay: device time, no Python" + (
                f"; not graphed {wall:.3f} ms, so ~{max(0.0, wall - ms):.3f} ms per call is host time" if wall else ""))
            if path == "triton" and graphed.get("eager"):
                row.update(baseline="eager (CUDA graph)", speedup=graphed["eager"] / ms)
            rows.append(row)
            print(f"{name:12s} {path + ' graph':14s} batch {batch:4d}: {ms:9.3f} ms")
    # the upsampling stage too: its dX makes gz in the GEMM's operand (RESULTS, Round 7: split it if its
    # device time is far above its floor)
    for name in ("idb_fwd_bwd", "up_fwd_bwd", "up_out_fwd_bwd"):
        module, make_fn, _, grads = workloads[name]
        try:
            rows.extend(profiler_rows(module, make_fn, grads, batch, card,
                                      {p: wall_ms.get((name, p)) for p in ("triton", "eager")}, dev, workload=name))
        except Exception as e:  # noqa: BLE001
            rows.append({"suite": "kernels", "name": f"{name} device sum", "path": "profiler", "batch": batch,
                         "card": card, "error": f"torch.profiler: {type(e).__name__}: {e}"[:500]})
    if layers:  # where the generator's device time goes, per layer: after the cheap rows above
        module, make_fn, _, grads = workloads["gen_fwd_bwd"]
        try:
            rows.extend(layer_breakdown_rows(module, make_fn, grads, batch, card,
                                             {p: wall_ms.get(("gen_fwd_bwd", p)) for p in ("triton", "eager")}, dev))
        except Exception as e:  # noqa: BLE001  an OOM or a profiler failure is a row, the suite goes on
            torch.cuda.empty_cache()
            rows.append({"suite": "kernels", "name": "gen_fwd_bwd device sum", "path": "profiler (per layer)",
                         "batch": batch, "card": card,
                         "error": f"torch.profiler per layer: {type(e).__name__}: {e}"[:500]})
    return rows


def cpu_plumbing_rows() -> list[dict]:
    """Without CUDA: run what can run (nothing timed) and say so in skipped rows."""
    base = {"suite": "kernels", "card": "cpu"}
    rows = [dict(base, name="idb_fwd, idb_fwd_bwd, ridb_fwd_bwd, up_fwd_bwd, up_out_fwd_bwd, gen_fwd_bwd", path="triton, auto, eager, compile, CUDA graphs",
                 batch=None, skipped="numbers need CUDA (the Triton interpreter is never timed)")]
    idb = IDB(8, 4).to(memory_format=torch.channels_last)
    x = torch.randn(1, 8, 4, 4).contiguous(memory_format=torch.channels_last).requires_grad_(True)

    def fwd_bwd(module):
        return lambda: module(x, x).sum().backward()

    _set_kernels(idb, "torch")
    seq, matched = profile_kernels(fwd_bwd(idb), torch.device("cpu"))
    rows.append(dict(base, name="idb_fwd_bwd device sum", path="eager (device)", batch=1, kernels_per_call=len(seq),
                     skipped=f"CPU plumbing only: torch.profiler parsed {len(seq)} top-level operators per call of a "
                             f"tiny eager IDB (launch by launch: {matched}); device times need CUDA"))
    groups, _ = group_by_layer(launch_records(profiled_events(fwd_bwd(idb), torch.device("cpu"), ITERS, True), False),
                               ITERS)
    rows.append(dict(base, name="gen_fwd_bwd layer rows", path="eager (device)", batch=1,
                     skipped=f"CPU plumbing only: the per-layer grouping (bench/device_profile.py) of a tiny eager "
                             f"IDB's operators by self CPU time: {len(groups)} groups, the longest "
                             f"{groups[0]['group']} ({groups[0]['share']:.0%}); device times need CUDA"))
    rows.extend(autotune_rows(1, torch.device("cpu"), "cpu"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 64, 256])
    parser.add_argument("--smoke", action="store_true", help="smallest batch, short timing, no generator compile")
    parser.add_argument("--probe", choices=("generator", "idb"), help="the autotune probe (run_probe starts it)")
    parser.add_argument("--batch", type=int, default=AUTOTUNE_BATCH, help="the probe's batch")
    parser.add_argument("--probe-json", help="where the probe writes its result")
    parser.add_argument("--untimed", default="", help="the probe's untimed kernels, comma-separated (conv3x3.UNTIMED)")
    parser.add_argument("--autotune-only", metavar="JSON",
                        help="only the cold and warm autotune rows (at --batch), written to JSON")
    args = parser.parse_args()
    if args.autotune_only:
        dev = torch.device(args.device)
        card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
        Path(args.autotune_only).write_text(json.dumps(autotune_rows(args.batch, dev, card), default=str, indent=1))
        return
    if args.probe:
        result = probe(args.probe, args.batch, args.device, tuple(k for k in args.untimed.split(",") if k))
        Path(args.probe_json).write_text(json.dumps(result, default=str))
        return
    run(args.device, tuple(args.batches), smoke=args.smoke)


if __name__ == "__main__":
    main()

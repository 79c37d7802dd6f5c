"""kernels/precompile.py: recording every launch of a workload (each tile candidate) and compiling the
variants up front, in parallel, into the JIT's own cache.

In-process (interpreter): what `record` captures against the launches a real call makes, and that it
leaves no state behind. In a subprocess without the interpreter (sm90_precompile_check.py): the real
compiles for sm_90 on a stand-in device, then the launches replayed through the JIT find them all.
"""
import json
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch

from gafh_fast.kernels import configs, conv3x3, fused_conv3x3_triton, fused_idb_triton, launch
from gafh_fast.kernels import precompile as pc
from gafh_fast.ops import fused_idb_reference, wants_precompile

from .test_conv3x3 import DEVICE

HERE = os.path.dirname(os.path.abspath(__file__))


def _workload(batch=2, c=16, gc=8, s=5):
    """An IDB forward + backward and an activated conv (the upsampling convs' kind) forward + backward."""
    torch.manual_seed(0)
    cl = torch.channels_last

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape) * scale).to(DEVICE).requires_grad_()

    x = leaf(batch, c, s, s).detach().contiguous(memory_format=cl).requires_grad_()
    w1, w2, w3 = leaf(gc, c, 3, 3, scale=0.1), leaf(c, c + gc, 3, 3, scale=0.1), leaf(c, c, 3, 3, scale=0.1)
    b1, b2, b3 = leaf(gc, scale=0.0), leaf(c, scale=0.0), leaf(c, scale=0.0)

    def run():
        fused_idb_triton(x, x, w1, b1, w2, b2, 0.2).sum().backward()
        fused_conv3x3_triton([x], w3, b3, 0.2, None, 1.0, None, 1.0).sum().backward()

    return run, (x, w1, b1, w2, b2)


def test_record_captures_every_candidates_launches_and_leaves_no_trace():
    run, (x, w1, b1, w2, b2) = _workload()
    run()  # real launches first: the counts record must leave as they were are not empty
    old_tuner = conv3x3.tuner()
    counts = launch.LAUNCHES.copy()
    assert sum(counts.values()) >= 10

    records = pc.record(run)

    # once per candidate: 6 launches per IDB forward + backward with the gz2 pass (the first way), 5 with
    # gz2 made by gz1's launch (the second); 1 + 3 per activated conv
    assert pc.N_CANDIDATES == 2 and len(records) == (6 + 4) + (5 + 4)
    per_candidate = [records[:10], records[10:]]
    assert Counter(r["name"] for r in per_candidate[0]) == {"fwd": 3, "gz": 1, "dx": 3, "dw": 2, "fin": 1}
    assert Counter(r["name"] for r in per_candidate[1]) == {"fwd": 3, "dx": 3, "dw": 2, "fin": 1}
    # the two passes took the two heuristic candidates of every tuned kernel (the finalize has one config)
    m = x.shape[0] * x.shape[2] * x.shape[3]
    fwd_conv1 = configs.fwd_candidates(16, 0, 8, 5, m)
    assert [per_candidate[i][0]["constexprs"]["BLOCK_M"] for i in (0, 1)] == [c.kwargs["BLOCK_M"] for c in fwd_conv1]
    assert [per_candidate[i][0]["options"]["num_stages"] for i in (0, 1)] == [c.num_stages for c in fwd_conv1]
    dw = [r for r in records if r["name"] == "dw"]
    assert {r["constexprs"]["BLOCK_P"] for r in dw} == {c.kwargs["BLOCK_P"] for c in configs.dw_candidates(16, 8, 16, 5, m)}
    # no state left: the tuner, the launch counts, no plan made with a forced pick, no kept kernel
    assert conv3x3.tuner() is old_tuner
    assert launch.LAUNCHES == counts
    assert not conv3x3._PLANS
    assert not any(ln._compiled for ln in (conv3x3.FWD, conv3x3.DW, conv3x3.DX, conv3x3.FIN, conv3x3.GZ))
    # and the kernels still compute the IDB afterwards (no plan poisoned by the recording)
    for p in (x, w1, b1, w2, b2):
        p.grad = None
    y = fused_idb_triton(x, x, w1, b1, w2, b2, 0.2)
    ref = fused_idb_reference(*(t.detach().double().cpu() for t in (x, x, w1, b1, w2, b2)), 0.2)
    torch.testing.assert_close(y.detach().double().cpu(), ref, rtol=1e-5, atol=1e-5)


def test_untimed_kernels_are_recorded_with_their_first_tile_only(monkeypatch):
    """conv3x3.UNTIMED (the kernels suite's third autotune probe): those kernels keep the heuristic's first
    candidate in both recording passes, so precompile compiles one variant of theirs; the others still
    get both."""
    run, (x, *_) = _workload()
    monkeypatch.setattr(conv3x3, "UNTIMED", frozenset({"fwd"}))
    records = pc.record(run)
    m = x.shape[0] * x.shape[2] * x.shape[3]
    first = configs.fwd_candidates(16, 0, 8, 5, m)[0]
    fwd = [r for r in records if r["name"] == "fwd"]
    assert len(fwd) == pc.N_CANDIDATES * 3
    assert {(r["constexprs"]["BLOCK_M"], r["options"]["num_stages"]) for r in fwd} == {(first.kwargs["BLOCK_M"],
                                                                                      first.num_stages)}
    dw = {r["constexprs"]["BLOCK_P"] for r in records if r["name"] == "dw"}
    assert dw == {c.kwargs["BLOCK_P"] for c in configs.dw_candidates(16, 8, 16, 5, m)}  # still both
    monkeypatch.setattr(conv3x3, "UNTIMED", frozenset())
    timed = [r for r in pc.record(run) if r["name"] == "fwd"]
    assert len({(r["constexprs"]["BLOCK_M"], r["options"]["num_stages"]) for r in timed}) == 2  # timed: both tiles


def _same_argument(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and (a.shape, a.stride(), a.dtype, a.device) == (b.shape, b.stride(), b.dtype, b.device)
    return type(a) is type(b) and a == b


def test_records_are_the_launches_a_real_call_makes(monkeypatch):
    """What `record` keeps (pick 0) is what a real call launches with the first candidate: kernel, grid,
    every runtime argument (tensors by shape, strides, dtype, device; scalars by value), constexprs and
    options, in order. The variants compiled up front are then the ones the run needs."""
    run, _ = _workload()
    seen = []
    real_launch = launch.KernelLauncher.launch

    def spy(self, key, grid, args, flags, config):
        seen.append(dict(name=self.name, grid=tuple(grid) + (1,) * (3 - len(grid)), args=args,
                         constexprs={**flags, **config.kwargs}, options={"num_warps": config.num_warps,
                                                                         "num_stages": config.num_stages}))
        return real_launch(self, key, grid, args, flags, config)

    monkeypatch.setattr(launch.KernelLauncher, "launch", spy)
    run()  # the interpreter takes each kernel's first candidate
    monkeypatch.setattr(launch.KernelLauncher, "launch", real_launch)
    records = pc.record(run, picks=[0])
    assert len(records) == len(seen) == 10
    for rec, real in zip(records, seen):
        assert (rec["name"], rec["grid"], rec["constexprs"], rec["options"]) == \
            (real["name"], real["grid"], real["constexprs"], real["options"])
        assert len(rec["args"]) == len(real["args"])
        assert all(_same_argument(a, b) for a, b in zip(rec["args"], real["args"])), rec["name"]


def test_distinct_keeps_one_record_per_launch_key_and_every_variant():
    """precompile warms one record per launch key: a second pass over the same plans adds nothing, a new
    batch size adds its plans, and no kernel/constexprs/options combination recorded is ever dropped."""
    run, _ = _workload()
    run2, _ = _workload(batch=3)
    once = pc.record(run)
    twice = pc.record(lambda: (run(), run()))
    mixed = pc.record(lambda: (run(), run2(), run()))
    assert len(twice) == 2 * len(once)
    # the finalize's key (no tile candidates, so no plan id) is the same for both candidates' passes
    assert len(pc.distinct(twice)) == len(pc.distinct(once)) == len(once) - 1
    assert len(pc.distinct(mixed)) > len(pc.distinct(once))

    def variant(r):
        return r["name"], tuple(sorted(r["constexprs"].items())), tuple(sorted(r["options"].items()))

    for recs in (once, twice, mixed):
        kept = pc.distinct(recs)
        assert len({(r["name"], r["key"]) for r in kept}) == len(kept)
        assert {variant(r) for r in kept} == {variant(r) for r in recs}


def test_pick_tuner_takes_the_indexed_candidate_or_the_last():
    assert pc.PickTuner(1).choose("k", (), ["a", "b"]) == "b"
    assert pc.PickTuner(0).choose("k", (), ["a", "b"]) == "a"
    assert pc.PickTuner(1).choose("k", (), ["only"]) == "only"
    assert pc.PickTuner(5).choose("k", (), ["a", "b", "c"]) == "c"


def test_record_restores_state_when_the_workload_fails():
    old_tuner = conv3x3.tuner()

    def broken():
        raise RuntimeError("workload failed")

    with pytest.raises(RuntimeError, match="workload failed"):
        pc.record(broken)
    assert conv3x3.tuner() is old_tuner
    assert launch.STANDIN is None


@pytest.mark.skipif(not pc.INTERPRETING, reason="the interpreter's refusal")
def test_precompile_refuses_the_interpreter():
    with pytest.raises(RuntimeError, match="nothing to compile"):
        pc.precompile(lambda: None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real compiles and launches need a GPU")
def test_precompile_on_gpu_then_the_real_call_is_right():
    """On a GPU: every variant of the workload (both candidates) compiled in parallel, then the real
    call runs on those kernels and equals the float64 reference."""
    run, (x, w1, b1, w2, b2) = _workload()
    report = pc.precompile(run, workers=4)
    assert report.parallel == hasattr(pc.triton, "AsyncCompileMode") and report.variants > 0
    assert report.launches == pc.N_CANDIDATES * 10
    y = fused_idb_triton(x, x, w1, b1, w2, b2, 0.2)
    ref = fused_idb_reference(*(t.detach().double().cpu() for t in (x, x, w1, b1, w2, b2)), 0.2)
    torch.testing.assert_close(y.detach().double().cpu(), ref, rtol=1e-5, atol=1e-5)


def test_wants_precompile_only_for_compiled_triton_on_cuda():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert wants_precompile("auto", cuda) and wants_precompile("triton", cuda)
    assert not wants_precompile("torch", cuda)
    assert not wants_precompile("auto", cpu) and not wants_precompile("torch", cpu)
    assert not wants_precompile("triton", cpu)  # the interpreter runs it: nothing to compile


@pytest.mark.parametrize("cores", [2, 12, 64])
def test_default_workers_share_the_cores(monkeypatch, cores):
    monkeypatch.setattr(pc.os, "sched_getaffinity", lambda pid: set(range(cores)) if pid == 0 else {0})
    assert pc.default_workers() == pc.default_workers(0) == min(16, cores)
    assert pc.default_workers(cores * 4) == 1
    assert pc.default_workers(2) == max(1, min(16, cores // 2))


class _Report:
    """precompile_kernels' report as the callers use it: only its log line."""

    def line(self):
        return "the report's line"


def test_precompile_line_turns_a_failure_into_a_warning(monkeypatch):
    """Compiling up front only saves time: a failure (say, a Triton without the APIs it uses) is a warning
    line in the log, and each kernel still compiles on its first launch."""
    import gafh_fast.models.generator as generator_module

    def failing(passes, lr_size, **kwargs):
        raise AttributeError("no warmup here")

    monkeypatch.setattr(generator_module, "precompile_kernels", failing)
    assert generator_module.precompile_line([], 4) == (
        "WARNING: Triton kernel precompile failed (AttributeError: no warmup here); kernels compile on first use")

    monkeypatch.setattr(generator_module, "precompile_kernels", lambda passes, lr_size, **kwargs: _Report())
    assert generator_module.precompile_line([], 4) == "the report's line"


@pytest.mark.parametrize("local_rank, world, events", [
    (0, 1, ["compile on all cores"]),
    (1, 1, ["compile on 1 thread"]),  # a second process on the node without a group: nobody to wait for
    (0, 4, ["compile on all cores", "barrier"]),
    (2, 4, ["barrier", "compile on 1 thread"]),  # waits for local rank 0, then loads from the disk cache
])
def test_precompile_node_first_puts_local_rank_0_first(monkeypatch, local_rank, world, events):
    """The trainer's and inference's call: in a group, local rank 0 compiles and then meets the barrier
    the node's other ranks wait at before they compile (from Triton's disk cache, one thread)."""
    import gafh_fast.models.generator as generator_module

    seen = []

    def spy(passes, lr_size, *, workers):
        seen.append("compile on all cores" if workers is None else f"compile on {workers} thread")
        return _Report()

    monkeypatch.setattr(generator_module, "precompile_kernels", spy)
    monkeypatch.setattr(torch.distributed, "barrier", lambda: seen.append("barrier"))
    assert generator_module.precompile_node_first([], 4, local_rank, world) == "the report's line"
    assert seen == events


def test_report_line_says_how_the_compiles_ran(monkeypatch):
    report = pc.PrecompileReport(launches=902, warmups=90, variants=37, seconds=25.66, record_s=3.04, workers=2,
                                 parallel=True)
    assert report.line() == ("Triton kernels precompiled: 37 variants of 902 recorded launches (every tile candidate; "
                             "90 distinct launch keys) in 25.7 s (3.0 s recording), 2 compile threads")
    serial = pc.PrecompileReport(902, 90, 37, 43.1, 3.0, 1, False)
    assert serial.line().endswith("in 43.1 s (3.0 s recording), one at a time")
    monkeypatch.delattr(pc.triton, "AsyncCompileMode")
    assert serial.line().endswith(f"one at a time (triton {pc.triton.__version__} has no AsyncCompileMode)")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the trainer's and the autotune probe's real precompile run")
def test_precompile_for_sm90_fills_the_jit_cache(tmp_path):
    """The real compiles (Triton's JIT, cuda:90 target) in 2 threads; then every launch of the same
    passes, replayed through the JIT, finds its kernel: no compile, each reaches the device loader."""
    out = tmp_path / "precompile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "sm90_precompile_check.py"), str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    par = r["parallel"]
    assert par["parallel"] and par["workers"] == 2
    # every compile ran in the pool's 2 threads, none in the caller's
    assert set(r["compile_threads"]) <= {"triton-compile_0", "triton-compile_1"} and r["compile_threads"]
    assert 0 < par["record_s"] < par["seconds"] <= par["wall_s"]
    assert r["backend_log"] == []  # the twins' kernels=triton stays out of the run's log
    # each distinct variant compiled exactly once (a cold cache), and nothing counted as a launch
    assert par["compiles"] == par["variants"] > 0
    assert par["launches"] > par["warmups"] >= par["variants"]  # one warmup per launch key, not per launch
    assert r["launches_after"] == r["launches_before"]
    rep = r["replay"]
    assert rep["records"] == par["launches"] and rep["reached"] == rep["records"] and rep["compiles"] == 0
    ser = r["serial"]
    assert not ser["parallel"] and ser["workers"] == 1
    # bf16 inference forwards: new variants (no mask saved) beside kernels compiled in step 1
    assert 0 < ser["compiles"] <= ser["variants"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_twin_tensors_sit_where_the_live_ones_do(dtype):
    """The JIT specialises on 16-byte alignment; DeepSpeed's flat buffers put parameters at any element
    offset. A twin tensor keeps shape, strides, dtype, device and the address modulo 16."""
    from gafh_fast.models.generator import _empty_like_placed

    flat = torch.empty(4096, dtype=dtype, device=DEVICE)
    per_line = 16 // flat.element_size()
    for offset in range(per_line + 1):
        for live in (flat[offset:offset + 3 * 5 * 2 * 2].view(3, 5, 2, 2),
                     flat[offset:offset + 2 * 8 * 3 * 3].view(2, 8, 3, 3).permute(0, 2, 3, 1)[:, :, :, :],
                     flat[offset:offset + 7], flat[offset:offset]):
            twin = _empty_like_placed(live)
            assert (twin.shape, twin.stride(), twin.dtype, twin.device) == (live.shape, live.stride(), live.dtype,
                                                                           live.device)
            assert twin.data_ptr() % 16 == live.data_ptr() % 16, (offset, live.shape)
            # and it holds no more than the offset plus what the view reaches
            reach = 1 + sum((n - 1) * st for n, st in zip(live.shape, live.stride())) if live.numel() else 0
            assert twin.untyped_storage().nbytes() == (twin.storage_offset() + reach) * twin.element_size()
            assert twin.untyped_storage().data_ptr() != flat.untyped_storage().data_ptr()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real compiles need a GPU")
def test_precompile_kernels_of_a_generator_on_gpu():
    """The trainer's call on a GPU: a tiny G's bf16 step and fp32 inference, every variant compiled;
    the real step then compiles nothing new (Triton's JIT cache-miss hook counts compiles)."""
    runtime_knobs = getattr(getattr(pc.triton, "knobs", None), "runtime", None)
    if not hasattr(runtime_knobs, "jit_cache_hook"):  # the compile counter below needs it (Triton >= 3.4)
        pytest.skip(f"triton {pc.triton.__version__} has no knobs.runtime.jit_cache_hook to count compiles with")
    from gafh_fast.config import GeneratorConfig
    from gafh_fast.models.generator import Generator, precompile_kernels

    cfg = GeneratorConfig(nf=16, gc=8, idb_per_ridb=2, ridb_per_dnb=1, num_dnb=1, trunk_norm="none")
    live, ema = Generator(cfg, kernels="triton").to(DEVICE, torch.bfloat16), Generator(cfg).to(DEVICE)
    report = precompile_kernels([(live, 2, True), (ema, 3, False)], 4, workers=4)
    assert report.variants > 0 and report.launches > report.variants
    compiles = []
    old_hook = runtime_knobs.jit_cache_hook
    runtime_knobs.jit_cache_hook = lambda **kw: compiles.append(1) or False  # a cache miss: a compile
    try:
        old_tuner = conv3x3.set_tuner(pc.PickTuner(0))  # the candidate the recording's first pass took
        live(torch.randn(2, 3, 4, 4, device=DEVICE, dtype=torch.bfloat16)).float().mean().backward()
    finally:
        runtime_knobs.jit_cache_hook = old_hook
        conv3x3.set_tuner(old_tuner)
    assert compiles == []


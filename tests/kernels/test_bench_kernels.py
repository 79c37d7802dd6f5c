"""bench/kernels_suite.py's parsing of torch.profiler events (bench/device_profile.py) into per-kernel
times and per-layer groups (the GPU rows that say whether a slow row is host or device time, and where
the generator's device time goes), on hand-made event lists and on CPU runs with the device swapped. The
suite's CPU plumbing as a whole runs in tests/test_bench.py (bench/throughput.py --smoke --device cpu)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import device_profile  # noqa: E402
import kernels_suite  # noqa: E402

from gafh_fast.kernels.conv3x3_fwd import INTERPRETING  # noqa: E402

# The CPU twins below run the suite's CUDA-only profiling with the device swapped, the Triton path under
# the interpreter. The GPU kernel-test stage runs tests/kernels without it, where the same calls would
# hand CPU tensors to compiled kernels: there the suite's own rows are the check.
cpu_twin = pytest.mark.skipif(not INTERPRETING, reason="the CPU twin of a CUDA-only path (Triton under the "
                              "interpreter); on a GPU the kernels suite runs the real thing")


def test_kernel_sequence_medians_per_launch_position():
    # three calls of fwd, fwd, dx: per position the median of (10, 12, 50), (20, 21, 22), (5, 7, 6)
    calls = [(10, 20, 5), (12, 21, 7), (50, 22, 6)]
    events = []
    for c, times in enumerate(calls):
        for i, (name, us) in enumerate(zip(("fwd", "fwd", "dx"), times)):
            events.append((1000.0 * c + 100.0 * i, float(us), name))
    seq, matched = device_profile.kernel_sequence(events[::-1], 3)  # any input order: sorted by start
    assert matched
    assert seq == [{"index": 0, "name": "fwd", "us": 12.0}, {"index": 1, "name": "fwd", "us": 21.0},
                   {"index": 2, "name": "dx", "us": 6.0}]


def test_kernel_sequence_falls_back_to_names_when_calls_differ():
    # the second call launched an extra kernel: no position matching, mean us per call and name
    events = [(0.0, 10.0, "fwd"), (1.0, 4.0, "dx"), (10.0, 12.0, "fwd"), (11.0, 2.0, "copy"), (12.0, 6.0, "dx")]
    seq, matched = device_profile.kernel_sequence(events, 2)
    assert not matched
    assert seq == [{"index": 0, "name": "fwd", "us": 11.0}, {"index": 1, "name": "dx", "us": 5.0},
                   {"index": 2, "name": "copy", "us": 1.0}]


def test_workloads_run_with_the_device_swapped_and_count_their_flops():
    """The suite's timed workloads (CUDA only) built and run on CPU, eager: each calls its module the way
    the module takes it, and the analytic FLOPs of the IDB and RIDB rows equal torch's FlopCounterMode
    count of the same forward (the fused RIDB row is new: a wrong count would misstate its TFLOP/s; the
    upsampling row counts the reference's conv at the high resolution, not the phases' 4/9)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from gafh_fast.config import load_config

    cfg = load_config(None, [f"data.hr_size={kernels_suite.LR_SIZE * 8}"])
    work = kernels_suite._workloads(cfg, 1, torch.device("cpu"))
    assert set(work) == {"idb_fwd", "idb_fwd_bwd", "ridb_fwd_bwd", "up_fwd_bwd", "up_out_fwd_bwd", "gen_fwd_bwd"}
    for name in ("idb_fwd", "idb_fwd_bwd", "ridb_fwd_bwd", "up_fwd_bwd", "up_out_fwd_bwd"):
        module, make_fn, flops, grads = work[name]
        kernels_suite._set_kernels(module, "torch")
        counter = FlopCounterMode(display=False)
        with counter:
            make_fn(module)()
        # forward-only rows count the forward; fwd_bwd rows the x3 convention (backward = 2x forward)
        assert counter.get_total_flops() == flops, name
        assert all(t.grad is not None for t in grads), name


def test_every_timed_path_sets_a_kernels_backend_every_workload_runs():
    """The suite's paths map to kernels= settings (auto: the per-shape timed choice on CUDA, torch on
    the CPU), and a workload's module runs a forward + backward with the new `auto` path's setting (the
    upsampling stage, batch 1, on CPU: auto resolves to torch there)."""
    import torch

    from gafh_fast.config import load_config

    assert {p: kernels_suite.kernels_of(p) for p in kernels_suite.PATHS} == {
        "eager": "torch", "triton": "triton", "auto": "auto", "compile": "torch"}
    cfg = load_config(None, ["data.hr_size=256"])
    work = kernels_suite._workloads(cfg, 1, torch.device("cpu"))
    module, make_fn, _, grads = work["up_fwd_bwd"]
    for path in ("auto", "eager"):
        kernels_suite._set_kernels(module, kernels_suite.kernels_of(path))
        for t in grads:
            t.grad = None
        make_fn(module)()
        assert all(t.grad is not None for t in grads), path


@cpu_twin
def test_profiler_rows_of_the_upsampling_stage_with_the_device_swapped():
    """profiler_rows (CUDA-only in the suite) on CPU: an upsampling stage, both paths, under the
    interpreter. On CPU the profiled events are the top-level operators, not device kernels; what is
    checked is the rows' plumbing: per-kernel rows of the triton path under the workload's name, a
    device-sum row per path next to its wall time."""
    import torch

    up = kernels_suite.UpsampleStep(8).to(memory_format=torch.channels_last)
    x = torch.randn(1, 8, 3, 4).contiguous(memory_format=torch.channels_last).requires_grad_(True)

    def make_fn(module):
        return lambda: module(x).sum().backward()

    rows = kernels_suite.profiler_rows(up, make_fn, [x, *up.parameters()], 1, "cpu", {"triton": 5.0, "eager": 5.0},
                                       torch.device("cpu"), workload="up_fwd_bwd")
    sums = [r for r in rows if r["name"] == "up_fwd_bwd device sum"]
    assert [r["path"] for r in sums] == ["triton (device)", "eager (device)"]
    assert all(r["kernels_per_call"] > 0 and "wall 5.000 ms" in r["note"] for r in sums)
    per_kernel = [r for r in rows if r["name"].startswith("up_fwd_bwd kernel ")]
    assert per_kernel and all(r["path"] == "triton (device)" for r in per_kernel)
    assert len(per_kernel) == sums[0]["kernels_per_call"]


# ------------------------------------------------------------------------------------------------
# Per layer (device_profile.layer_rows): the grouping by hand, then the generator end to end on CPU
# ------------------------------------------------------------------------------------------------
def test_group_by_layer_sums_per_call_ranks_and_folds_the_rest_into_other():
    # two profiled calls; per call: A 40 us (k1 32 + k2 8, 2 kernels), B 25, C 20 (k4 10 = k5 10: a tie),
    # D 10 = F 10 (a tie), E 2.5 (one kernel in one call only): 107.5 us per call
    records = [("A", "k1", 30.0), ("A", "k1", 34.0), ("A", "k2", 10.0), ("A", "k2", 6.0),
               ("B", "k3", 25.0), ("B", "k3", 25.0),
               ("C", "k5", 10.0), ("C", "k5", 10.0), ("C", "k4", 12.0), ("C", "k4", 8.0),
               ("F", "k8", 10.0), ("F", "k8", 10.0), ("D", "k6", 10.0), ("D", "k6", 10.0),
               ("E", "k7", 5.0)]
    groups, total = device_profile.group_by_layer(records, 2, top=3)
    assert total == 107.5
    assert [(g["group"], g["us"], g["kernels"], g["members"]) for g in groups] == [
        ("A", 40.0, 2.0, ["A"]), ("B", 25.0, 1.0, ["B"]), ("C", 20.0, 2.0, ["C"]),
        ("other", 22.5, 2.5, ["D", "F", "E"])]  # D before F: equal time, ordered by name
    assert groups[0]["top_kernels"] == [("k1", 32.0), ("k2", 8.0)]
    assert groups[2]["top_kernels"] == [("k4", 10.0), ("k5", 10.0)]
    assert groups[3]["top_kernels"] == [("k6", 10.0), ("k8", 10.0), ("k7", 2.5)]
    assert [g["share"] for g in groups] == [40 / 107.5, 25 / 107.5, 20 / 107.5, 22.5 / 107.5]
    # no rest, no `other`
    groups, total = device_profile.group_by_layer(records, 2, top=6)
    assert [g["group"] for g in groups] == ["A", "B", "C", "D", "F", "E"] and total == 107.5


class FakeEvent:
    """The FunctionEvent fields device_profile reads."""

    def __init__(self, name, parent=None, shapes=(), kernels=(), self_us=0.0, device="CPU", us=0.0):
        from torch.autograd import DeviceType
        from torch.autograd.profiler_util import Interval, Kernel

        self.name, self.cpu_parent, self.cpu_children = name, parent, []
        self.input_shapes = [list(s) for s in shapes]
        self.kernels = [Kernel(k, 0, t) for k, t in kernels]
        self.self_cpu_time_total, self.is_async = self_us, False
        self.device_type = getattr(DeviceType, device)
        self.time_range = Interval(100.0, 100.0 + us)
        if parent is not None:
            parent.cpu_children.append(self)


def fake_profile():
    """One forward + backward as the profiler links it on CUDA: a conv (its cuDNN kernel and bias add
    launched two ops down), its backward node (kernels launched by aten::convolution_backward, under
    the engine's wrapper), a fused Function's backward node launching its own kernels and a memset
    through aten::zeros, the engine's gradient sum after that node, and a kernel no operator claims."""
    x, w, g = (2, 3, 8, 8), (16, 3, 9, 9), (2, 16, 8, 8)
    conv = FakeEvent("aten::conv2d", shapes=[x, w, (16,)], self_us=1.0)
    impl = FakeEvent("aten::_convolution", FakeEvent("aten::convolution", conv, shapes=[x, w, (16,)]),
                     shapes=[x, w, (16,)])
    FakeEvent("aten::cudnn_convolution", impl, shapes=[x, w], kernels=[("sm90_conv_fprop", 50.0)], self_us=2.0)
    FakeEvent("aten::add_", impl, shapes=[g, (1, 16, 1, 1)], kernels=[("add_kernel", 5.0)], self_us=3.0)
    wrap = FakeEvent("autograd::engine::evaluate_function: ConvolutionBackward0", self_us=4.0)
    node = FakeEvent("ConvolutionBackward0", wrap, shapes=[g], self_us=5.0)
    FakeEvent("aten::convolution_backward", node, shapes=[g, x, w],
              kernels=[("sm90_dgrad", 40.0), ("sm90_wgrad", 30.0)], self_us=6.0)
    wrap2 = FakeEvent("autograd::engine::evaluate_function: _FusedBackward", self_us=7.0)
    fused = FakeEvent("_FusedBackward", wrap2, shapes=[g], kernels=[("_fused_dx", 70.0)], self_us=8.0)
    zeros = FakeEvent("aten::zeros", fused, self_us=9.0)
    FakeEvent("aten::zero_", zeros, shapes=[(16,)], kernels=[("Memset (Device)", 2.0)], self_us=10.0)
    FakeEvent("aten::add", wrap2, shapes=[g, g], kernels=[("add_kernel", 4.0)], self_us=11.0)
    ops = [*_walk(conv), *_walk(wrap), *_walk(wrap2)]
    device = [FakeEvent(k.name, device="CUDA", us=k.duration) for op in ops for k in op.kernels]
    device.append(FakeEvent("orphan_kernel", device="CUDA", us=3.0))
    return ops + device


def _walk(event):
    yield event
    for child in event.cpu_children:
        yield from _walk(child)


def test_launch_records_group_each_kernel_under_its_layer_and_keep_the_unclaimed():
    """On CUDA: every kernel under its launching op's top-level op or backward node (with the conv's
    weight and input size, from the conv op beneath where the top op has none), the engine's own work
    after a node as such, the kernel no op launched as `unattributed`: the groups add up to the device
    events' time."""
    events = fake_profile()
    records = device_profile.launch_records(events, cuda=True)
    groups, total = device_profile.group_by_layer(records, 1)
    assert {g["group"]: g["us"] for g in groups} == {
        "ConvolutionBackward0 w(16,3,9,9) in 8x8": 70.0,
        "_FusedBackward (2,16,8,8)": 72.0,
        "aten::conv2d w(16,3,9,9) in 8x8": 55.0,
        "autograd engine: aten::add (2,16,8,8)": 4.0,
        "unattributed: orphan_kernel": 3.0}
    assert total == sum(e.time_range.elapsed_us() for e in events if e.device_type.name == "CUDA") == 204.0
    # on CPU the same tree by self CPU time: every op's own time, the engine's wrappers' included
    groups, total = device_profile.group_by_layer(device_profile.launch_records(events, cuda=False), 1)
    assert {g["group"]: g["us"] for g in groups} == {
        "aten::conv2d w(16,3,9,9) in 8x8": 1.0 + 2.0 + 3.0, "autograd engine": 4.0 + 7.0,
        "ConvolutionBackward0 w(16,3,9,9) in 8x8": 5.0 + 6.0, "_FusedBackward (2,16,8,8)": 8.0 + 9.0 + 10.0,
        "autograd engine: aten::add (2,16,8,8)": 11.0}
    assert total == sum(range(1, 12))


@cpu_twin
def test_layer_rows_of_a_tiny_generator_with_the_device_swapped():
    """layer_breakdown_rows (CUDA-only in the suite) on CPU: a tiny generator, both paths (triton under the
    interpreter), each operator's self CPU time standing for device time. Per path: the groups, top 6 and
    `other`, add up to the device sum row, and that sum is every top-level operator's time (nothing
    dropped); the output conv's groups (its weight shape, forward and backward) are there on both paths,
    the last upsampling conv's only on eager (triton runs it and the output conv as one op); the rows render through
    bench/common's table and RESULTS.md markdown."""
    import torch
    from torch.autograd import DeviceType

    import common
    from gafh_fast.config import GeneratorConfig
    from gafh_fast.models.generator import Generator

    gen = Generator(GeneratorConfig(nf=8, gc=4, idb_per_ridb=1, ridb_per_dnb=1, num_dnb=1)).to(
        memory_format=torch.channels_last)
    lr = torch.rand(1, 3, 2, 2).contiguous(memory_format=torch.channels_last)  # HF 16x16

    def make_fn(module):
        return lambda: module(lr).float().mean().backward()

    grads = list(gen.parameters())
    rows = kernels_suite.layer_breakdown_rows(gen, make_fn, grads, 1, "cpu", {"triton": 50.0, "eager": 5.0},
                                              torch.device("cpu"), iters=1, top=6)
    groups = {}
    for path in ("triton", "eager"):
        mine = [r for r in rows if r["path"] == f"{path} (device)"]
        layers, total = mine[:-1], mine[-1]
        assert total["name"] == "gen_fwd_bwd device sum" and "wall " in total["note"]
        assert len(layers) == 7 and layers[-1]["layer"] == "other"
        assert layers[-1]["name"].startswith("gen_fwd_bwd layer other (")
        assert [r["name"].split(" (")[0] for r in layers[:6]] == [f"gen_fwd_bwd layer {i}" for i in range(1, 7)]
        assert [r["ms"] for r in layers[:6]] == sorted((r["ms"] for r in layers[:6]), reverse=True)
        assert sum(r["ms"] for r in layers) == pytest.approx(total["ms"], rel=1e-9)
        assert sum(r["share"] for r in layers) == pytest.approx(1.0)
        assert total["layer_groups"] == 6 + len(layers[-1]["layers"])
        assert total["kernels_per_call"] == sum(r["kernels_per_call"] for r in layers)
        groups[path] = {g for r in layers for g in r["layers"]}
    out_conv = "w(3,8,9,9) in 16x16"  # the output conv: cuDNN's on the eager path, on triton's in fused_up_out_conv
    assert {f"aten::conv2d {out_conv}", f"ConvolutionBackward0 {out_conv}"} <= groups["eager"]
    assert {f"_EagerFusedUpOutConv {out_conv}", "_EagerFusedUpOutConvBackward (1,3,16,16)"} <= groups["triton"]
    last_up = "aten::conv2d w(8,8,3,3) in 16x16"
    assert last_up in groups["eager"] and last_up not in groups["triton"]

    # nothing dropped: the records' time is the top-level operators' (each op's self time, summed)
    eager_call = kernels_suite.fresh_calls(gen, make_fn, grads)["eager"]
    events = device_profile.profiled_events(eager_call, torch.device("cpu"), 1, record_shapes=True)
    records = device_profile.launch_records(events, cuda=False)
    top_level = [e for e in events if e.device_type == DeviceType.CPU and not e.is_async and e.cpu_parent is None]
    assert sum(us for _, _, us in records) == pytest.approx(sum(e.cpu_time_total for e in top_level), rel=1e-9)

    normalised = [common.normalise_row(r, None) for r in rows]
    assert "gen_fwd_bwd layer 1" in common.format_table(normalised)
    env = {"date": "2026-11-27T00:00:00", "device_name": "cpu", "commit": "0" * 40, "dirty": False,
           "command": "test", "device": "cpu"}
    lines = common.markdown_rows({"env": env, "rows": normalised}).splitlines()
    assert len(lines) == len(rows) and all(f"| {r['name']} | {r['path']} |" in line for r, line in zip(rows, lines))


# torch's and autograd's own work in a generator's profile, which the cost model leaves out (elementwise
# work a fused kernel could fold in, the loss, parameter gradients' accumulation)
UNMODELLED = ("torch::autograd::AccumulateGrad", "autograd engine", "aten::mean", "MeanBackward0", "aten::add",
              "aten::add_", "AddBackward0", "aten::ones_like", "aten::to", "aten::cat", "CatBackward0",
              "aten::leaky_relu", "LeakyReluBackward0", "aten::upsample_nearest2d", "UpsampleNearest2DBackward0",
              "aten::tanh", "TanhBackward0", "aten::mul", "MulBackward0")


@cpu_twin
def test_floors_cover_a_tiny_generators_profiled_layers_exactly():
    """bench/floors.py gives a `gen_fwd_bwd layer` row its floor by the group's name. On a tiny generator's
    real profile (both paths, the suite's grouping, triton under the interpreter): every group is either
    modelled or torch's own work, and the modelled groups hold the model's work exactly once: on the
    triton path each of cost_model.generator_launches' launches in one group; on the eager path the conv
    groups' FLOPs are the generator's 3 forwards less the LR input's gradient (gafh_fast/flops.py)."""
    import torch
    from collections import Counter

    import floors
    from gafh_fast.config import GeneratorConfig
    from gafh_fast.flops import conv_flops, generator_flops
    from gafh_fast.kernels import cost_model as cm
    from gafh_fast.models.generator import Generator

    cfg = GeneratorConfig(nf=8, gc=4, idb_per_ridb=1, ridb_per_dnb=2, num_dnb=1)
    dims = dict(nf=8, gc=4, lr=2, n_dnb=1, n_ridb=2, n_idb=1, sfm_k=9, out_k=9, c_img=3)
    gen = Generator(cfg).to(memory_format=torch.channels_last)
    lr = torch.rand(2, 3, 2, 2).contiguous(memory_format=torch.channels_last)
    calls = kernels_suite.fresh_calls(gen, lambda m: (lambda: m(lr).float().mean().backward()), list(gen.parameters()))
    modelled = {}
    for path, call in calls.items():
        events = device_profile.profiled_events(call, torch.device("cpu"), 1, record_shapes=True)
        groups, _ = device_profile.group_by_layer(device_profile.launch_records(events, cuda=False), 1, top=1000)
        modelled[path] = []
        for g in groups:
            launches = floors.layer_launches(g["group"], 2, dims)
            if launches is None:
                assert g["group"].startswith(UNMODELLED), g["group"]
            modelled[path] += launches or []
    key = lambda r: (r["flops"], r["bytes"])  # noqa: E731  (the SFM's group is a plain conv's: no layer tag)
    assert Counter(map(key, modelled["triton"])) == Counter(map(key, cm.generator_launches(2, **dims)))
    sfm_dgrad = conv_flops(3, 8, 9, 2, 2)
    assert sum(r["flops"] for r in modelled["eager"]) == 2 * (3 * generator_flops(cfg, 2) - sfm_dgrad)


def test_autotune_only_writes_the_probe_rows(tmp_path):
    """`kernels_suite.py --autotune-only JSON` (the probes alone, as the H200's calls D3/D4 ran them): on
    CPU the tiny-IDB probe under the interpreter, its row written with the launch plans it made."""
    import json
    import subprocess

    out = tmp_path / "autotune.json"
    proc = subprocess.run([sys.executable, str(Path(kernels_suite.__file__)), "--autotune-only", str(out),
                           "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads(out.read_text())
    assert (row["name"], row["path"], row["batch"]) == ("autotune probe", "cold process", 1)
    assert "interpreter: nothing timed" in row["skipped"] and row["configs"]
    assert row["untimed"] == ["fwd", "up_fwd"]  # the third GPU probe's --untimed reached the child's conv3x3.UNTIMED


def test_gpu_autotune_rows_run_three_probes_in_the_right_caches(monkeypatch):
    """The CUDA branch of autotune_rows with the probe process swapped for a recorder (the probes
    themselves need a GPU): cold, warm on the cold probe's caches, then cold in empty caches with the
    forward tiles untimed; each row carries its probe's numbers and the goal."""
    import os

    import torch

    calls = []

    def fake_probe(workload, batch, device, root, timeout_s, untimed=()):
        calls.append(dict(workload=workload, batch=batch, device=device, root=root, empty=not os.listdir(root),
                          untimed=untimed, timeout_s=timeout_s))
        open(os.path.join(root, "probe.json"), "w").close()  # what a real probe leaves in its cache root
        return {"configs": [], "first_call_s": 1.5, "tuner_timed_s": 0.5, "decisions": [], "process_s": 4.0,
                "precompile": {"seconds": 2.0, "variants": 3, "workers": 16, "parallel": True}}

    monkeypatch.setattr(kernels_suite, "run_probe", fake_probe)
    rows = kernels_suite.autotune_rows(64, torch.device("cuda", 0), "Test GPU")
    assert [r["path"] for r in rows] == ["cold process", "warm process", "cold process, fwd/up_fwd untimed"]
    assert [c["untimed"] for c in calls] == [(), (), ("fwd", "up_fwd")]
    assert [c["empty"] for c in calls] == [True, False, True]  # the warm probe finds the cold one's caches
    assert calls[0]["root"] == calls[1]["root"] != calls[2]["root"]
    assert [c["timeout_s"] for c in calls] == [120, 60, 120]
    assert all(c["workload"] == "generator" and c["batch"] == 64 and c["device"] == "cuda" for c in calls)
    assert all(r["ms"] == 3500.0 and r["precompile_s"] == 2.0 for r in rows)
    assert [r["note"].endswith(f"goal <= {g} s") for r, g in zip(rows, (10, 1, 10))] == [True] * 3


def test_probe_note_splits_the_tuners_time():
    """The autotune row's note sums the tuner log's split (kernels/tuning.py): the first calls within the
    timing, the cache writes on top; a process that timed nothing says nothing more."""
    decisions = [{"first_call_s": [0.25, 0.125], "timing_s": 0.5, "save_s": 0.0125},
                 {"first_call_s": [0.0625, 0.0625], "timing_s": 0.25, "save_s": 0.0175}]
    assert kernels_suite._decision_split(decisions) == " (of which first calls 0.50 s; cache writes 0.03 s more)"
    assert kernels_suite._decision_split([]) == ""
    r = {"configs": [], "first_call_s": 2.0, "tuner_timed_s": 0.75, "decisions": decisions, "process_s": 3.0}
    assert "tuner timing 0.75 s over 2 decisions (of which first calls 0.50 s; cache writes 0.03 s more), " \
           "whole process 3.0 s" in kernels_suite._probe_note(r)


def test_configs_row_carries_kernels_auto_decisions(monkeypatch):
    """The `auto` path's per-shape choices (logged at INFO, which the suite does not print) travel in the
    configs row, plain enough for its JSON: the shape key, each backend's ms and the pick."""
    import json

    import torch

    from gafh_fast import ops

    chooser = ops.AutoChooser(lambda fn, device: 0.0)
    key = ("idb", torch.Size([64, 64, 32, 32]), torch.bfloat16, torch.device("cuda", 0), True)
    chooser.decisions[key], chooser.timings[key] = "triton", {"triton": 1.0, "torch": 1.25}
    monkeypatch.setattr(ops, "AUTO", chooser)
    row = kernels_suite.config_row(64, "Test GPU")
    assert row["auto_decisions"] == [{"key": repr(("idb", torch.Size([64, 64, 32, 32]), "bfloat16", "cuda:0", True)),
                                      "ms": {"triton": 1.0, "torch": 1.25}, "chosen": "triton"}]
    assert "kernels=auto chose for 1 shapes" in row["note"]
    json.dumps(row)  # the suite writes it

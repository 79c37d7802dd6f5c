"""bench/kernels_suite.py's parsing of torch.profiler events into per-kernel times (the GPU rows that
say whether a slow row is host or device time), on hand-made event lists. The suite's CPU plumbing as
a whole runs in tests/test_bench.py (bench/throughput.py --smoke --device cpu)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import kernels_suite  # noqa: E402


def test_kernel_sequence_medians_per_launch_position():
    # three calls of fwd, fwd, dx: per position the median of (10, 12, 50), (20, 21, 22), (5, 7, 6)
    calls = [(10, 20, 5), (12, 21, 7), (50, 22, 6)]
    events = []
    for c, times in enumerate(calls):
        for i, (name, us) in enumerate(zip(("fwd", "fwd", "dx"), times)):
            events.append((1000.0 * c + 100.0 * i, float(us), name))
    seq, matched = kernels_suite.kernel_sequence(events[::-1], 3)  # any input order: sorted by start
    assert matched
    assert seq == [{"index": 0, "name": "fwd", "us": 12.0}, {"index": 1, "name": "fwd", "us": 21.0},
                   {"index": 2, "name": "dx", "us": 6.0}]


def test_kernel_sequence_falls_back_to_names_when_calls_differ():
    # the second call launched an extra kernel: no position matching, mean us per call and name
    events = [(0.0, 10.0, "fwd"), (1.0, 4.0, "dx"), (10.0, 12.0, "fwd"), (11.0, 2.0, "copy"), (12.0, 6.0, "dx")]
    seq, matched = kernels_suite.kernel_sequence(events, 2)
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
    assert set(work) == {"idb_fwd", "idb_fwd_bwd", "ridb_fwd_bwd", "up_fwd_bwd", "gen_fwd_bwd"}
    for name in ("idb_fwd", "idb_fwd_bwd", "ridb_fwd_bwd", "up_fwd_bwd"):
        module, make_fn, flops, grads = work[name]
        kernels_suite._set_kernels(module, "torch")
        counter = FlopCounterMode(display=False)
        with counter:
            make_fn(module)()
        # forward-only rows count the forward; fwd_bwd rows the x3 convention (backward = 2x forward)
        assert counter.get_total_flops() == flops, name
        assert all(t.grad is not None for t in grads), name


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

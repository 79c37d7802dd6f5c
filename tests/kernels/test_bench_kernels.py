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

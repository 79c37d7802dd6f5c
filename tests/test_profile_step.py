"""bench/profile_step.py on CPU: the same code the GPU suite's `profile` stage runs, with the CPU's
operators standing in for CUDA kernels. Checked against the step's structure counted by hand: one
GAN step runs G once, D four times (real and fake in D's step, real and fake in G's) and VGG twice."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS, BATCH = 2, 2


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["DS_ACCELERATOR"] = "cpu"
    proc = subprocess.run([sys.executable, "bench/profile_step.py", "--smoke", "--device", "cpu", "--batch", str(BATCH),
                           "--steps", str(STEPS), "--warmup", "1", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "profile.json").read_text())


def calls(result: dict, name: str, shapes: list) -> int:
    return sum(r["calls"] for r in result["all_rows"] if r["name"] == name and r["input_shapes"] == shapes)


def test_files_and_split(profiled):
    out, result = profiled
    assert (out / "profile_top.md").read_text().count("\n| ") == len(result["rows"]) + 1  # header + one per row
    assert 0 < len(result["rows"]) <= 40 and result["rows"] == result["all_rows"][:40]
    trace = out / result["trace"]
    assert trace.is_file() and trace.stat().st_size <= 16 * 2**20
    s = result["split"]
    assert s["busy_ms_per_step"] + s["idle_ms_per_step"] == pytest.approx(s["wall_ms_per_step"], rel=1e-9)
    assert 0 < s["busy_pct"] <= 100 and 0 < s["host_ms_per_step"] <= s["wall_ms_per_step"]
    totals = [r["total_ms"] for r in result["rows"]]
    assert totals == sorted(totals, reverse=True)
    assert all(r["pct_of_steps"] == pytest.approx(100 * r["total_ms"] / (STEPS * s["wall_ms_per_step"])) for r in result["rows"])


def test_profiled_window_is_exactly_the_steps(profiled):
    """Conv calls by shape, counted by hand for the smoke model (train_suite.TINY, batch 2, 32x32 HR)."""
    _, result = profiled
    conv = "aten::mkldnn_convolution"
    # D's first conv (3 -> nf=4 channels): 4 D forwards per step
    assert calls(result, conv, [[BATCH, 3, 32, 32], [4, 3, 3, 3], [4]]) == 4 * STEPS
    # VGG's conv1_1 (3 -> 64): VGG on HF and on HR, once each per step
    assert calls(result, conv, [[BATCH, 3, 32, 32], [64, 3, 3, 3], [64]]) == 2 * STEPS
    # G's output conv (nf=8 -> 3): one G forward per step
    assert calls(result, conv, [[BATCH, 8, 32, 32], [3, 8, 3, 3], [3]]) == STEPS


def test_sync_check_is_reported_and_skipped_on_cpu(profiled):
    out, result = profiled
    assert result["sync_check"] == {"syncs": None, "steps": 0, "first": [], "why": "no CUDA device: nothing to stall"}
    assert "host syncs: not checked (no CUDA device: nothing to stall)" in (out / "profile_top.md").read_text()


def test_sync_check_counts_torchs_sync_warnings_and_restores_the_mode():
    """The CUDA branch of the check with only torch.cuda.set_sync_debug_mode swapped for a stand-in: the
    steps raise torch's warning (as a sync under mode "warn" does) twice, and one unrelated warning."""
    import warnings
    sys.path.insert(0, str(REPO / "bench"))
    from profile_step import sync_check

    modes = []

    def steps():
        assert modes == ["warn"]  # the steps run under "warn"
        for _ in range(2):
            warnings.warn("called a synchronizing CUDA operation")  # the line reported below
        warnings.warn("an unrelated deprecation", DeprecationWarning)

    check = sync_check(steps, modes.append)
    assert modes == ["warn", "default"] and check["syncs"] == 2 and len(check["first"]) == 2
    line = steps.__code__.co_firstlineno + 3
    assert check["first"][0] == f"{__file__}:{line}: called a synchronizing CUDA operation"

    modes.clear()
    with pytest.raises(ZeroDivisionError):  # a failing step still puts the mode back
        sync_check(lambda: 1 / 0, modes.append)
    assert modes == ["warn", "default"]

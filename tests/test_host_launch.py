"""The compiled-kernel launch path (kernels/launch.py), run on CPU with a stand-in for Triton's
CompiledKernel: the CUDA-only part is then only the stand-in itself. The first H100 run of this path
crashed because the direct launch passed a 1-d grid, which Triton's runner reads as grid[0..2]; the
stand-in reads it the same way. It runs in a subprocess without TRITON_INTERPRET, because under the
interpreter every launch goes through kernel[grid] and the kept-kernel path never runs."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_idb_forward_backward_through_kept_compiled_kernels():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "bench/host_overhead.py", "--rounds", "1", "--iters", "3", "--phases"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if "per IDB fwd+bwd" in line]
    assert len(rows) == 2, proc.stdout
    # 2 forward + 4 backward launches per IDB, every one after the warm-up through a kept kernel
    assert all(re.search(r"\| 6 launches \|", row) for row in rows), rows
    # --phases: the same IDB through the Function and autograd, and its host code alone
    phases = [line for line in proc.stdout.splitlines() if line.startswith("phases")]
    assert len(phases) == 1 and re.search(r"our host code \d+\.\d us, PyTorch's autograd around it -?\d+\.\d us of "
                                          r"\d+\.\d", phases[0]), proc.stdout
    assert re.search(r"fastest rounds of our host code: forward \d+\.\d \+ backward \d+\.\d us$", phases[0]), phases



def _host_overhead_rows(mode: str, tmp_path) -> list:
    """The JSON rows of `bench/host_overhead.py <mode>` (one short round), run without the interpreter."""
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, "bench/host_overhead.py", mode, "--rounds", "1", "--iters", "2",
                           "--json", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_ridb_custom_ops_through_kept_compiled_kernels(tmp_path):
    """The compiled trainer's calls (the RIDB forward op, then its backward op with the forward's weight
    copies), NCHW and channels_last weights, every launch after the warm-up through a kept kernel."""
    rows = _host_overhead_rows("--ridb-ops", tmp_path)
    assert [r["ridb_ops"] for r in rows] == ["nchw", "channels_last"]
    assert all(r["launches"] == 9 + 14 and r["backward_takes_copies"] and r["host_us"] > 0 for r in rows), rows


def test_upsampling_stage_through_kept_compiled_kernels(tmp_path):
    """One upsampling stage forward + backward on the direct-launch path: fused_upconv3x3 (upconv.py's five
    launches, its 3-d forward grid included) and, for comparison, interpolate + the fused conv (four)."""
    rows = _host_overhead_rows("--up", tmp_path)
    assert [(r["launches"], r["host_us"] > 0) for r in rows] == [(4, True), (5, True)], rows


def test_output_layer_through_kept_compiled_kernels(tmp_path):
    """The output layer forward + backward on the direct-launch path: fused_out_conv (outconv.py's three
    backward launches after torch's forward), conv2d + tanh for comparison (no Triton launch), and the
    last upsampling step with the output layer, fused_up_out_conv (upout.py: 2 forward, 5 backward, the
    output layer's dX with the step's mask)."""
    rows = _host_overhead_rows("--out", tmp_path)
    assert [(r["launches"], r["host_us"] > 0) for r in rows] == [(0, True), (3, True), (7, True)], rows


def test_whole_generator_through_kept_compiled_kernels(tmp_path):
    """The paper generator (4 DNBs x 3 RIDBs x 4 IDBs) forward + backward on the direct-launch path, every
    Triton launch after the warm-up through a kept kernel: 12 RIDBs of 9 + 14 launches, the fusion conv 1 + 2,
    the first two upsampling steps 2 + 3 each, then the last with the output layer 2 + 5 (296); the eager
    generator launches none."""
    rows = _host_overhead_rows("--gen", tmp_path)
    assert [(r["gen"], r["launches"]) for r in rows] == [("kernels=torch (eager)", 0),
                                                          ("kernels=triton (stand-in launches)", 296)], rows
    assert 12 * (9 + 14) + (1 + 2) + 2 * (2 + 3) + (2 + 5) == 296
    assert all(r["host_us"] > 0 for r in rows)


def test_tapes_through_kept_compiled_kernels(tmp_path):
    """The tapes (kernels/tape.py) on the direct-launch path: the IDB, a RIDB and the paper generator, each
    through its replays and through the plain host code, with the same launch counts; the recorded
    signatures are the IDB's (2 + 4 launches) and the RIDB's, with and without the DNB residual (9 + 14)."""
    rows = _host_overhead_rows("--tapes", tmp_path)
    assert [(r["tapes"], r["launches"]) for r in rows] == [
        ("IDB (x is x0, .sum() gradient)", 6), ("RIDB (8x8)", 9 + 14), ("paper generator (2x2)", 296)], rows
    assert rows[0]["recorded_launches"] == {"fused_idb forward": [2], "fused_idb backward": [4],
                                            "fused_ridb forward": [9, 9, 9], "fused_ridb backward": [14, 14, 14]}
    assert all(r["taped_us"] > 0 and r["plain_us"] > 0 for r in rows)


def test_launch_profile_plumbing_on_cpu(tmp_path):
    """bench/launch_profile.py without a GPU (a subprocess: it installs the stand-in launcher): its rows
    for the IDB and G at tiny sizes, each path with its Triton launch count, the two triton runners and the
    tapes against the plain host code compared only where kernels ran (not here), and a cProfile report
    per workload."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench"
    out, top = tmp_path / "launch.json", tmp_path / "top.txt"
    proc = subprocess.run([sys.executable, str(bench / "launch_profile.py"), "--device", "cpu", "--iters", "1",
                           "--json", str(out), "--profile-out", str(top)], capture_output=True, text=True,
                          timeout=300, cwd=bench)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [(r["name"], r["path"]) for r in rows] == [
        (name, path) for name in ("idb_fwd_bwd batch 1", "gen_fwd_bwd batch 1")
        for path in ("eager", "triton, Triton's runner", "triton, direct runner", "triton, direct runner, no tapes")]
    assert [r["triton_launches"] for r in rows] == [0, 6, 6, 6, 0, 296, 296, 296]  # the IDB's 2 + 4, the paper G's
    assert all(r["ms"] > 0 for r in rows)
    assert [r["identical_to_runner"] for r in rows if "identical_to_runner" in r] == [None, None]
    assert [r["identical_to_plain_host_code"] for r in rows if "identical_to_plain_host_code" in r] == [None, None]
    assert all("tapes_saved_ms_per_call" in r for r in rows if r["path"] == "triton, direct runner")
    report = top.read_text()
    assert report.count("cProfile, own time") == 2 and "calls profiled" in report

"""Bounded autotuning: the tile heuristic, bucketed keys, and the choice persisted across processes.

The timing itself is injected (a timer that returns set numbers per config); everything else (the
choice, the JSON cache, its atomic write, a second process reading it) is the real code."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from gafh_fast.kernels import configs, conv3x3
from gafh_fast.kernels.tuning import Tuner, config_to_dict

from .test_conv3x3 import DEVICE

TRUNK = dict(nf=64, gc=32, side=32)


@pytest.mark.parametrize("batch", [8, 64, 256])
def test_heuristic_tiles_fit_the_trunk_channels(batch):
    m = batch * TRUNK["side"] ** 2
    conv1 = configs.fwd_candidates(64, 0, 32, 32, m)
    conv2 = configs.fwd_candidates(64, 32, 64, 32, m)
    assert all(c.kwargs["BLOCK_N"] == 32 and c.kwargs["BLOCK_K1"] == 64 and c.kwargs["K2_STEPS"] == 0 for c in conv1)
    assert all(c.kwargs["BLOCK_N"] == 64 and (c.kwargs["BLOCK_K1"], c.kwargs["BLOCK_K2"]) == (64, 32) for c in conv2)
    # batch 8: 128-pixel tiles would fill 132 SMs less than twice, so 64 comes first
    assert conv1[0].kwargs["BLOCK_M"] == (64 if batch == 8 else 128)
    dx = configs.dx_candidates(64, 32, 64, 32, m)
    assert all((c.kwargs["BLOCK_N"], c.kwargs["BLOCK_KA"], c.kwargs["BLOCK_KB"]) == (64, 64, 32) for c in dx)
    dw = configs.dw_candidates(64, 0, 32, 32, m)
    assert all((c.kwargs["BLOCK_C"], c.kwargs["BLOCK_CO"]) == (64, 32) for c in dw)


@pytest.mark.parametrize("c1, c2, c_out", [(3, 0, 17), (17, 0, 17), (40, 24, 33), (64, 32, 64), (256, 0, 256)])
def test_at_most_two_candidates_with_legal_tiles(c1, c2, c_out):
    for m in (1, 1000, 2**16, 2**20):
        for cands in (configs.fwd_candidates(c1, c2, c_out, 7, m), configs.dx_candidates(c_out, c2, c1, 7, m),
                      configs.dw_candidates(c1, c2, c_out, 7, m)):
            assert 1 <= len(cands) <= 2
            for c in cands:
                blocks = [v for k, v in c.kwargs.items() if k.startswith("BLOCK_")]
                assert all(b >= 16 and b & (b - 1) == 0 for b in blocks) and c.num_warps == 4


# Shared memory per block on an H100 (227 KiB). A pipelined loop keeps num_stages copies of its A and B
# tiles: compile_check's sm_90 report matches this count exactly (IDB conv1 fwd, M128 N32 K64, 3 stages,
# bf16: 3 * (128*64 + 64*32) * 2 = 61440 B; dW C64 CO64 P128: 3 * (128*64 + 128*64) * 2 = 98304 B).
H100_SMEM_PER_BLOCK = 227 * 1024


def _ring_bytes(cfg, rows: str, ks: tuple[str, str], cols: str, elem: int) -> int:
    """num_stages copies of an A tile (rows x K) and a B tile (K x cols), K the wider of the two loops'."""
    k = max(cfg.kwargs[name] for name in ks)
    return cfg.num_stages * (cfg.kwargs[rows] * k + k * cfg.kwargs[cols]) * elem


@pytest.mark.parametrize("c1, c2, c_out", [(3, 0, 17), (64, 32, 64), (96, 0, 128), (40, 200, 160), (256, 0, 256)])
def test_candidates_fit_h100_shared_memory_at_fp32(c1, c2, c_out):
    """fp32 (the exactness path: fp32 training and the GPU kernel tests) is the widest operand type."""
    for m in (1, 1000, 2**16, 2**20):
        for c in configs.fwd_candidates(c1, c2, c_out, 7, m):
            assert _ring_bytes(c, "BLOCK_M", ("BLOCK_K1", "BLOCK_K2"), "BLOCK_N", 4) <= H100_SMEM_PER_BLOCK, ("fwd", m, c)
        for c in configs.dx_candidates(c_out, c2, c1, 7, m):
            assert _ring_bytes(c, "BLOCK_M", ("BLOCK_KA", "BLOCK_KB"), "BLOCK_N", 4) <= H100_SMEM_PER_BLOCK, ("dx", m, c)
        for c in configs.dw_candidates(c1, c2, c_out, 7, m):  # dW: (P x C) and (P x CO) tiles, P the K side
            assert _ring_bytes(c, "BLOCK_C", ("BLOCK_P", "BLOCK_P"), "BLOCK_CO", 4) <= H100_SMEM_PER_BLOCK, ("dw", m, c)


def test_m_is_bucketed():
    assert configs.m_bucket(10) == 1024 and configs.m_bucket(65536) == 65536 and configs.m_bucket(65537) == 131072


class ScriptedTimer:
    """Returns the set ms of whichever candidate the timed callable ran (it records its config)."""

    def __init__(self, ms_by_block_m):
        self.ms_by_block_m = ms_by_block_m
        self.ran = []
        self.calls = 0

    def run_candidate(self, cfg):
        self.ran.append(cfg)

    def __call__(self, fn):
        self.calls += 1
        fn()
        return self.ms_by_block_m[self.ran[-1].kwargs["BLOCK_M"]]


def test_each_decision_logs_where_its_time_went(tmp_path):
    """The log splits a decision's wall time: each candidate's first call (on a GPU, the JIT's lookup and
    module load), the timing in all, and the cache write after it. Clocked here on a run_candidate whose
    first call per config sleeps 40 ms and later calls 20 ms, under a timer that makes 4 calls (the first
    call alone: 40 ms; all four would be 100 ms)."""
    import time

    runs = []

    def run_candidate(cfg):
        runs.append(cfg.kwargs["BLOCK_M"])
        time.sleep(0.04 if runs.count(runs[-1]) == 1 else 0.02)

    def timer(fn):
        for _ in range(4):
            fn()
        return {128: 0.3, 64: 0.2}[runs[-1]]

    tuner = Tuner(str(tmp_path / "autotune.json"), "Test GPU", timer)
    cands = configs.fwd_candidates(64, 32, 64, 32, 2**16)
    tuner.choose("fwd", (1,), cands, run_candidate)
    (entry,) = tuner.log
    assert runs == [128] * 4 + [64] * 4  # every call of the timer's fn ran its candidate once
    assert len(entry["first_call_s"]) == 2
    assert all(0.04 <= s < 0.09 for s in entry["first_call_s"])  # the first call only, not the three after it
    assert sum(entry["first_call_s"]) + 6 * 0.02 <= entry["timing_s"] == pytest.approx(tuner.timed_seconds)
    assert 0 < entry["save_s"] < 5.0
    assert json.loads((tmp_path / "autotune.json").read_text())  # saved after the timing, as logged


def test_choice_is_timed_once_and_persisted_atomically(tmp_path):
    path = tmp_path / "cache" / "autotune.json"
    cands = configs.fwd_candidates(64, 32, 64, 32, 2**16)
    timer = ScriptedTimer({128: 0.30, 64: 0.20})
    tuner = Tuner(str(path), "Test GPU", timer)
    key = (64, 32, 64, 32, configs.m_bucket(2**16), "bf16")
    chosen = tuner.choose("fwd", key, cands, timer.run_candidate)
    assert chosen.kwargs["BLOCK_M"] == 64 and timer.calls == 2
    assert tuner.choose("fwd", key, cands, timer.run_candidate) is chosen and timer.calls == 2  # memory hit
    data = json.loads(path.read_text())
    (full_key, entry), = data.items()
    assert full_key.startswith("Test GPU|triton ") and "fwd" in full_key
    assert entry["config"] == config_to_dict(chosen) and entry["ms"] == [0.30, 0.20]
    assert os.listdir(path.parent) == ["autotune.json"]  # no temp file left behind

    # A second process reads the file and times nothing (it has no timer: timing would raise).
    code = (
        "import sys; from gafh_fast.kernels import configs; from gafh_fast.kernels.tuning import Tuner\n"
        f"t = Tuner({str(path)!r}, 'Test GPU', None)\n"
        f"c = t.choose('fwd', {key!r}, configs.fwd_candidates(64, 32, 64, 32, 2**16), lambda c: None)\n"
        "print(c.kwargs['BLOCK_M'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "64"

    # Another device, or a Triton version, does not share the entry: it is timed again.
    other = Tuner(str(path), "Other GPU", ScriptedTimer({128: 0.1, 64: 0.2}))
    assert other.choose("fwd", key, cands, other.timer.run_candidate).kwargs["BLOCK_M"] == 128
    assert len(json.loads(path.read_text())) == 2  # merged, not overwritten


@pytest.mark.parametrize("probe_ms, timed, median", [
    (1.0, [1.0, 5.0, 2.0, 4.0, 13.0], 4.0),  # 10 ms fit 10 calls of 1 ms: all 5 asked for (mean 5, median 4)
    (4.0, [3.0, 1.0, 2.0], 2.0),  # 10 ms fit 2 calls of 4 ms: the minimum of 3
])
def test_cuda_timer_times_each_call_between_events_behind_one_sleep(probe_ms, timed, median):
    """cuda_timer's CUDA path with the device swapped: its events read a fake device clock that each
    call of fn advances by a scripted duration. The warm-up calls come first, the last of them between
    events: its time sizes the timed calls to TIMER_BUDGET_MS (10 ms), at least 3 and at most `reps`.
    One sleep is queued before the timed calls (so the host enqueues them all before the device runs
    them), and the result is the median timed call."""
    from gafh_fast.kernels.tuning import QUEUE_AHEAD_CYCLES, TIMER_BUDGET_MS, cuda_timer

    assert TIMER_BUDGET_MS == 10.0
    log, clock = [], [0.0]
    durations = iter([9.0, 9.0, probe_ms, *timed])

    class ClockEvent:
        def record(self):
            self.t = clock[0]
            log.append("event")

        def elapsed_time(self, end):
            return end.t - self.t

    def fn():
        clock[0] += next(durations)
        log.append("call")

    ms = cuda_timer(fn, warmup=3, reps=5, event=ClockEvent, sleep=lambda cycles: log.append(("sleep", cycles)),
                    synchronize=lambda: log.append("sync"))
    assert ms == median
    assert log == (["call"] * 2 + ["event", "call", "event", "sync", ("sleep", QUEUE_AHEAD_CYCLES)]
                   + ["event", "call", "event"] * len(timed) + ["sync"])


def test_no_timer_and_no_cached_choice_is_an_error(tmp_path):
    tuner = Tuner(str(tmp_path / "a.json"), "Test GPU", None)
    with pytest.raises(RuntimeError, match="no timer"):
        tuner.choose("dw", ("k",), configs.dw_candidates(64, 0, 32, 32, 4096), lambda c: None)


def test_corrupt_cache_is_retuned(tmp_path, caplog):
    path = tmp_path / "autotune.json"
    path.write_text("{not json")
    timer = ScriptedTimer({128: 0.5, 64: 0.4})
    tuner = Tuner(str(path), "Test GPU", timer)
    assert tuner.choose("fwd", ("k",), configs.fwd_candidates(16, 0, 16, 8, 4096), timer.run_candidate)
    assert timer.calls == 2 and "unreadable" in caplog.text
    assert json.loads(path.read_text())  # rewritten whole


class KeyRecorder(Tuner):
    def __init__(self):
        super().__init__(None, "recorder")
        self.keys = []

    def choose(self, kernel, key, candidates, run_candidate=None, first=False):
        self.keys.append((kernel, key))
        return candidates[0]


def test_host_path_asks_with_bucketed_keys():
    """Batch 1 and batch 2 at the same image size fall in one M bucket: the same tuning keys."""
    from gafh_fast.kernels import fused_idb_triton

    recorder = KeyRecorder()
    old = conv3x3.set_tuner(recorder)
    try:
        keys = []
        for batch in (1, 2):
            recorder.keys.clear()
            x = torch.randn(batch, 8, 3, 5, device=DEVICE, requires_grad=True)
            w1 = torch.randn(4, 8, 3, 3, device=DEVICE, requires_grad=True)
            w2 = torch.randn(8, 12, 3, 3, device=DEVICE, requires_grad=True)
            b1, b2 = (torch.randn(c, device=DEVICE, requires_grad=True) for c in (4, 8))
            fused_idb_triton(x, x, w1, b1, w2, b2).sum().backward()
            keys.append(list(recorder.keys))
    finally:
        conv3x3.set_tuner(old)
    # fwd1, fwd2, the gz2 way, dW2 with dW1, dx (gz1's tile is the gz2 way's)
    assert len(keys[0]) == 5 and keys[0] == keys[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="times real launches: GPU only (the logic is tested above)")
def test_autotune_on_gpu(tmp_path):
    """The one GPU test that times candidates: the IDB at the trunk's channels, small images."""
    from gafh_fast.kernels import fused_idb_triton
    from gafh_fast.kernels.tuning import cuda_timer

    tuner = Tuner(str(tmp_path / "autotune.json"), torch.cuda.get_device_name(), cuda_timer)
    old = conv3x3.set_tuner(tuner)
    conv3x3.AUTOTUNE = True
    try:
        x = torch.randn(8, 64, 16, 16, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w1 = torch.randn(32, 64, 3, 3, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w2 = torch.randn(64, 96, 3, 3, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        b1 = torch.zeros(32, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        b2 = torch.zeros(64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        fused_idb_triton(x, x, w1, b1, w2, b2).float().sum().backward()
        torch.cuda.synchronize()
    finally:
        conv3x3.set_tuner(old)
    assert len(tuner.log) == 6 and all(len(e["ms"]) == 2 for e in tuner.log)
    assert len(json.loads((tmp_path / "autotune.json").read_text())) == 6

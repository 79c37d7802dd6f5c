"""Cold precompile of the paper generator's fused kernels for sm_90 (H100), on a machine without a GPU.

    python bench/precompile_sm90.py [--batch 64] [--workers 1,2] [--json out.json]

What a cold training process does before step 1 on CUDA (gafh_fast.models.generator.precompile_kernels:
a bf16 forward + backward at `--batch` and an fp32 validation forward), with Triton's JIT pointed at a
stand-in sm_90 device (StandInSm90): the recording, the JIT's binding and cache keys and the compiles
(ptxas included) are the real ones; only launches are impossible. Each worker count runs in a fresh
process with an empty Triton cache. The compile time is CPU time, so this machine's cores set it; the
GPU host (16 cores) runs the same code. After each cold process a warm one runs on the same cache
(the issue's second process: every variant loads from Triton's disk cache).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class LaunchReached(Exception):
    """A launch found its kernel compiled and went on to load it on the device."""


class StandInSm90:
    """Triton's active driver for a machine without a GPU: device 0, stream 0, target cuda:90. Loading
    a compiled kernel on the device (the first step of a real launch) raises LaunchReached."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    @property
    def launcher_cls(self):
        raise LaunchReached


def use_standin_sm90() -> None:
    """Point Triton's JIT at the stand-in device and let gafh_fast.ops run Triton on CPU tensors (the
    device swap). TRITON_INTERPRET must be unset: the kernels must be JIT functions."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: this compiles for sm_90")
    from triton.runtime import driver

    import gafh_fast.ops as ops

    driver.set_active(StandInSm90())
    ops.triton_unavailable_reason = lambda device: None


def one(batch: int, workers: int) -> dict:
    """In this process: the trainer's precompile of the paper G for sm_90 (bf16 step, fp32 validation)."""
    import torch

    use_standin_sm90()
    from gafh_fast.config import load_config
    from gafh_fast.models.generator import Generator, precompile_kernels

    cfg = load_config(None, [])
    live = Generator(cfg.model.generator).to(torch.bfloat16)  # parameters contiguous, as the trainer keeps them
    ema = Generator(cfg.model.generator)                       # fp32, as validation's EMA copy
    t0 = time.perf_counter()
    report = precompile_kernels([(live, batch, True), (ema, cfg.data.val_batch_size, False)], cfg.lr_size,
                                workers=workers)
    return dict(vars(report), wall_s=time.perf_counter() - t0, batch=batch, val_batch=cfg.data.val_batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", default="1,2", help="comma-separated thread counts, one fresh process each")
    parser.add_argument("--json")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child: one worker count
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        Path(args.out).write_text(json.dumps(one(args.batch, args.one)))
        return
    rows = []
    for w in (int(x) for x in args.workers.split(",")):
        with tempfile.TemporaryDirectory(prefix="gafh_precompile.") as root:
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            env.update(TRITON_CACHE_DIR=os.path.join(root, "triton"),
                       PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
            for phase in ("cold", "warm"):  # warm: a second process that finds Triton's disk cache filled
                out = os.path.join(root, f"{phase}.json")
                subprocess.run([sys.executable, __file__, "--batch", str(args.batch), "--one", str(w), "--out", out],
                               env=env, check=True)
                r = dict(json.loads(Path(out).read_text()), phase=phase, cores=os.cpu_count(),
                         load=os.getloadavg()[0])
                rows.append(r)
                print(f"{phase} process, workers {w}: {r['variants']} variants ({r['launches']} launches recorded) "
                      f"in {r['seconds']:.1f} s ({r['record_s']:.1f} s of it recording; compiles "
                      f"{'parallel' if r['parallel'] else 'serial'}), "
                      f"cores {r['cores']}, load {r['load']:.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

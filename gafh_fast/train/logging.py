"""Rank-0 progress bar and run-dir logs: img/s (total and per GPU), step-time split, MFU, losses.

metrics.jsonl gets one JSON object per line: {"kind": "train" | "val" | "nan_skip" | "info", "step", ...}.
TensorBoard scalars go to run_dir/tensorboard when tensorboard is importable (said once if not).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional

from tqdm import tqdm

log = logging.getLogger("gafh_fast")


class TrainLogger:
    def __init__(self, run_dir: Path, *, rank: int, world_size: int, batch_per_gpu: int, start_step: int,
                 max_steps: int, log_every: int, peak_tflops: Optional[float]):
        self.rank, self.world, self.batch = rank, world_size, batch_per_gpu
        self.log_every, self.peak = max(1, log_every), peak_tflops
        self.path = Path(run_dir) / "metrics.jsonl"
        self.window: dict[str, float] = {}
        self.window_steps = 0
        self.tb = None
        self.bar = None
        if rank == 0:
            self.bar = tqdm(total=max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError as e:
                self.info(f"TensorBoard scalars off: tensorboard is not installed ({e}); metrics.jsonl has them all")

    def info(self, message: str) -> None:
        if self.rank == 0:
            tqdm.write(message)
            self.write({"kind": "info", "time": time.time(), "message": message})

    def write(self, record: dict) -> None:
        if self.rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def step(self, step: int, seconds: dict[str, float], losses: dict[str, float], flops_per_image: int,
             lr: float, timed: bool = True) -> None:
        """Accumulate one step's timings; every log_every steps, refresh the bar and write a train line.
        timed=False (a step that compiled): its losses are logged, its time stays out of img/s and MFU."""
        if timed:
            for key, value in seconds.items():
                self.window[key] = self.window.get(key, 0.0) + value
            self.window["flops"] = self.window.get("flops", 0.0) + flops_per_image * self.batch
            self.window_steps += 1
        if self.bar is not None:
            self.bar.update(1)
        if step % self.log_every != 0 or self.rank != 0:
            if self.rank != 0:
                self.window, self.window_steps = {}, 0
            return
        if self.window_steps == 0:  # every step of this window compiled: no rate to report
            self.write({"kind": "train", "step": step, "lr_g": lr, **{f"loss_{k}": v for k, v in losses.items()},
                        "img_s": None, "img_s_per_gpu": None, "mfu": None, "compiling": True})
            self.bar.set_postfix_str("compiling " + " ".join(f"{k} {v:.3g}" for k, v in losses.items()), refresh=False)
            return
        total = self.window.get("total", 0.0) or 1e-9
        per_gpu = self.window_steps * self.batch / total
        record = {"kind": "train", "step": step, "lr_g": lr, **{f"loss_{k}": v for k, v in losses.items()},
                  "img_s": per_gpu * self.world, "img_s_per_gpu": per_gpu,
                  **{f"ms_{k}": 1e3 * v / self.window_steps for k, v in self.window.items()
                     if k not in ("flops", "total")},
                  "ms_step": 1e3 * total / self.window_steps}
        achieved = self.window["flops"] / total  # FLOP/s on this GPU
        record["tflops_per_gpu"] = achieved / 1e12
        record["mfu"] = achieved / (self.peak * 1e12) if self.peak else None
        self.write(record)
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(f"train/{key}", value, step)
        mfu = f"{100 * record['mfu']:.1f}%" if record["mfu"] is not None else "n/a"
        self.bar.set_postfix_str(
            f"{record['img_s']:.1f} img/s ({per_gpu:.1f}/GPU) data {record.get('ms_data', 0):.0f}ms "
            # host time queueing D's and G's step: the step does not wait for the device (train/step.py)
            f"host D {record.get('ms_host_d', 0):.0f}ms G {record.get('ms_host_g', 0):.0f}ms MFU {mfu} "
            + " ".join(f"{k} {v:.3g}" for k, v in losses.items()), refresh=False)
        self.window, self.window_steps = {}, 0

    def val(self, step: int, metrics: dict) -> None:
        self.write({"kind": "val", "step": step, **metrics})
        if self.tb is not None:
            for key, value in metrics.items():
                self.tb.add_scalar(f"val/{key}", value, step)
        self.info(f"val step {step}: G PSNR {metrics['g_psnr_rgb']:.2f} dB (Y {metrics['g_psnr_y']:.2f}), "
                  f"SSIM {metrics['g_ssim_rgb']:.4f} | bicubic PSNR {metrics['bicubic_psnr_rgb']:.2f} dB "
                  f"(Y {metrics['bicubic_psnr_y']:.2f}), SSIM {metrics['bicubic_ssim_rgb']:.4f} "
                  f"on {metrics['images']} images")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()

"""Evaluation mode: per-image PSNR/SSIM of G and of the bicubic baseline, reduced over ranks, and the table.

Scores follow the spec: RGB on the full image (the default) and BT.601 Y with an 8-pixel border crop
(`val.crop_border`). G is scored on exactly the 8-bit image that is written to disk.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from gafh_fast import metrics

METRIC_KEYS = metrics.SCORE_KEYS
METHODS = ("gafh_ridn", "bicubic")


def score_batch(hf_uint8_nchw: torch.Tensor, hr: torch.Tensor, lr: torch.Tensor, crop_border: int) -> dict:
    """{method: {metric: (N,) float64 cpu}} for G's 8-bit output and for bicubic(lr); hr, lr in [-1, 1]."""
    hr01 = (hr.float() + 1) / 2
    candidates = {
        "gafh_ridn": hf_uint8_nchw.double() / 255.0,
        "bicubic": (metrics.bicubic_upsample(lr.float()) + 1) / 2,
    }
    out = {}
    for method, x in candidates.items():
        out[method] = {k: v.cpu() for k, v in metrics.score_images(x, hr01, crop_border).items()}
    return out


def rows_for_batch(paths: list[str], scores: dict) -> list[dict]:
    rows = []
    for i, path in enumerate(paths):
        row = {"path": path}
        for method in METHODS:
            row[method] = {k: float(scores[method][k][i]) for k in METRIC_KEYS}
        rows.append(row)
    return rows


def gather_rows(rows: list[dict], world_size: int) -> list[dict]:
    """All ranks' per-image rows (all_gather_object; a few hundred bytes per image), sorted by path."""
    if world_size > 1:
        import torch.distributed as dist

        gathered: list = [None] * world_size
        dist.all_gather_object(gathered, rows)
        rows = [r for part in gathered for r in part]
    return sorted(rows, key=lambda r: r["path"])


def summarise(rows: list[dict], crop_border: int) -> dict:
    summary = {"images": len(rows), "crop_border_y": crop_border, "means": {}}
    for method in METHODS:
        means = {}
        for k in METRIC_KEYS:
            values = torch.tensor([r[method][k] for r in rows], dtype=torch.float64)
            # identical images give PSNR = +inf; finite_mean says so instead of hiding it
            means[k] = metrics.finite_mean(values) if k.startswith("psnr") else float(values.mean())
        summary["means"][method] = means
    summary["paper_table1"] = {name: {"psnr": p, "ssim": s} for name, (p, s) in metrics.PAPER_TABLE1.items()}
    return summary


def write_results(out_dir: Path, rows: list[dict], summary: dict) -> tuple[Path, Path]:
    per_image, summary_path = out_dir / "metrics.jsonl", out_dir / "metrics_summary.json"
    for path, text in ((per_image, "".join(json.dumps(r) + "\n" for r in rows)),
                       (summary_path, json.dumps(summary, indent=2, allow_nan=True) + "\n")):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return per_image, summary_path


def format_table(summary: dict) -> str:
    """This run's means next to the paper's Table 1 (whose metric protocol the paper leaves unstated)."""
    cb = summary["crop_border_y"]
    lines = [f"evaluation on {summary['images']} images (x8)",
             f"{'method':<28}{'PSNR RGB':>10}{'SSIM RGB':>10}{f'PSNR Y c{cb}':>12}{f'SSIM Y c{cb}':>12}"]
    names = {"gafh_ridn": "GAFH-RIDN (this run)", "bicubic": "Bicubic (this run)"}
    for method in METHODS:
        m = summary["means"][method]
        lines.append(f"{names[method]:<28}{_fmt(m['psnr_rgb'], 2):>10}{_fmt(m['ssim_rgb'], 4):>10}"
                     f"{_fmt(m['psnr_y'], 2):>12}{_fmt(m['ssim_y'], 4):>12}")
    lines.append("paper Table 1 (CelebA x8, PSNR dB / SSIM; metric protocol unstated in the paper):")
    for name, (p, s) in metrics.PAPER_TABLE1.items():
        lines.append(f"  {name:<26}{p:>10.2f}{s:>10.2f}")
    return "\n".join(lines)


def _fmt(value: float, digits: int) -> str:
    return "inf" if math.isinf(value) else f"{value:.{digits}f}"

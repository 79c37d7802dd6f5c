"""Inference throughput: G forward (eager / fused Triton / torch.compile + CUDA graphs) and end to end.

    python bench/infer_suite.py [--device cuda] [--batch 256] [--smoke]

`run(device, batch, smoke)` returns one dict per row:
    {"name", "device", "batch", "dtype", "img_per_s" (None when skipped), "skipped" (reason or None), "detail"}
GPU rows use the paper generator in bf16, channels_last. On CPU only the eager and end-to-end rows
run; `smoke=True` shrinks everything (batch 2, the tiny generator, a few images) so it takes seconds.
The end-to-end row also times each stage alone (PIL decode, G, PNG encode + write) and names the
slowest as the bound.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gafh_fast.config import load_config
from gafh_fast.models import build_generator

TINY = ["model.generator.nf=8", "model.generator.gc=8", "model.generator.num_dnb=1",
        "model.generator.ridb_per_dnb=1", "model.generator.idb_per_ridb=1"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _row(name, device, batch, dtype, img_per_s=None, skipped=None, detail=""):
    return {"name": name, "device": str(device), "batch": batch, "dtype": str(dtype).replace("torch.", ""),
            "img_per_s": None if img_per_s is None else round(float(img_per_s), 1), "skipped": skipped,
            "detail": detail}


def _time_forward(model, x: torch.Tensor, iters: int, warmup: int) -> float:
    """Images per second of model(x) after `warmup` calls (compilation, autotuning, graph capture)."""
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        _sync(x.device)
        start = time.perf_counter()
        for _ in range(iters):
            model(x)
        _sync(x.device)
    return x.shape[0] * iters / (time.perf_counter() - start)


def forward_rows(device: torch.device, batch: int, smoke: bool) -> list[dict]:
    cfg = load_config(None, TINY if smoke else ())
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = build_generator(cfg).to(device=device, dtype=dtype, memory_format=torch.channels_last).eval()
    x = torch.randn(batch, 3, cfg.lr_size, cfg.lr_size, device=device, dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    iters, warmup = (2, 1) if smoke else (20, 3)
    rows = []
    g.set_kernels("torch")
    rows.append(_row("G forward eager (kernels=torch)", device, batch, dtype, _time_forward(g, x, iters, warmup)))
    if device.type != "cuda":
        reason = "needs CUDA (the Triton kernels and CUDA graphs run on the GPU only)"
        rows.append(_row("G forward fused (kernels=triton)", device, batch, dtype, skipped=reason))
        for kernels in ("torch", "triton"):
            rows.append(_row(f"G forward torch.compile reduce-overhead (CUDA graphs), kernels={kernels}",
                             device, batch, dtype, skipped=reason))
        return rows
    try:
        g.set_kernels("triton")
        rows.append(_row("G forward fused (kernels=triton)", device, batch, dtype, _time_forward(g, x, iters, warmup)))
    except Exception as e:  # report, do not hide: the row says why it did not run
        rows.append(_row("G forward fused (kernels=triton)", device, batch, dtype, skipped=f"{type(e).__name__}: {e}"))
    for kernels in ("torch", "triton"):
        name = f"G forward torch.compile reduce-overhead (CUDA graphs), kernels={kernels}"
        try:
            g.set_kernels(kernels)
            compiled = torch.compile(g, mode="reduce-overhead", dynamic=False)
            rows.append(_row(name, device, batch, dtype, _time_forward(compiled, x, iters, warmup + 2)))
        except Exception as e:
            rows.append(_row(name, device, batch, dtype, skipped=f"{type(e).__name__}: {e}"))
    return rows


def _synthetic_faces(folder: Path, count: int, size: int = 32) -> None:
    """Smooth random 32x32 PNGs (bicubic-upsampled 8x8 noise + grain): compress like small photos."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        base = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
        grain = rng.integers(-6, 7, (size, size, 3))
        arr = np.clip(np.asarray(base, dtype=np.int16) + grain, 0, 255).astype(np.uint8)
        sub = folder / f"{i // 1000:03d}"
        sub.mkdir(exist_ok=True)
        Image.fromarray(arr).save(sub / f"{i:07d}.png")


def end_to_end_rows(device: torch.device, batch: int, smoke: bool, threads: int = 8) -> list[dict]:
    from gafh_fast.export import save_generator
    from gafh_fast.inference import InferenceOptions, run_inference
    from gafh_fast.inference.decode import ThreadedBatches
    from gafh_fast.inference.inputs import ResizeNotice, list_inputs, load_lr_uint8
    from gafh_fast.inference.outputs import ManifestPart, OutputWriter

    cfg = load_config(None, (TINY if smoke else []) + ["kernels=auto"])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    count = 6 if smoke else max(8 * batch, 2048)
    rows = []
    with tempfile.TemporaryDirectory(prefix="gafh_infer_bench_") as tmp:
        tmp = Path(tmp)
        weights = save_generator(build_generator(cfg), cfg, tmp / "g.safetensors")
        _synthetic_faces(tmp / "faces", count)
        common = dict(weights=weights, batch_size=batch, device=str(device), decode_threads=threads,
                      write_threads=threads, progress=False)
        # warm-up on one batch (model load, cuDNN / Triton autotuning), then the timed run
        (tmp / "warm.txt").write_text("\n".join(i.source for i in list_inputs(tmp / "faces")[:batch]))
        run_inference(InferenceOptions(input=tmp / "warm.txt", output=tmp / "warm_out", **common))
        s = run_inference(InferenceOptions(input=tmp / "faces", output=tmp / "out", **common))
        e2e = s.ok / s.seconds

        # each stage alone, at the same batch size and thread counts
        items = list_inputs(tmp / "faces")
        notice = ResizeNotice(cfg.lr_size)
        decode = ThreadedBatches(items, batch, lambda p: (load_lr_uint8(p, cfg.lr_size, 0, notice),), threads,
                                 pin_memory=device.type == "cuda")
        t0 = time.perf_counter()
        for _ in decode:
            pass
        decode_rate = len(items) / (time.perf_counter() - t0)
        g = build_generator(cfg).to(device=device, dtype=dtype, memory_format=torch.channels_last).eval()
        x = torch.randn(batch, 3, cfg.lr_size, cfg.lr_size, device=device, dtype=dtype).contiguous(
            memory_format=torch.channels_last)
        model_rate = _time_forward(g, x, 2 if smoke else 10, 1 if smoke else 2)
        out = tmp / "write_only"
        out.mkdir()
        manifest = ManifestPart(out, 0)
        writer = OutputWriter(out, "png", threads, manifest, png_compress_level=1)
        hf = np.random.default_rng(0).integers(0, 256, (cfg.data.hr_size, cfg.data.hr_size, 3), dtype=np.uint8)
        t0 = time.perf_counter()
        for item in items:
            writer.submit(item, hf)
        writer.close()
        write_rate = len(items) / (time.perf_counter() - t0)
        manifest.close()
    stages = {"decode (PIL)": decode_rate, "G forward": model_rate, "PNG encode + write": write_rate}
    bound = min(stages, key=stages.get)
    detail = (f"{count} images; stages alone (img/s): " + ", ".join(f"{k} {v:.0f}" for k, v in stages.items())
              + f"; bound by {bound}; runner waits: decode {s.waits['decode']:.2f} s, writes {s.waits['write']:.2f} s"
              + f"; decoder {s.decoder}")
    rows.append(_row("end to end: decode + G + PNG (launch/infer.py path)", device, batch, dtype, e2e, detail=detail))
    return rows


def run(device: str, batch: int = 256, smoke: bool = False) -> list[dict]:
    """All rows for `device`; smoke=True: the tiny generator, batch <= 2 on CPU, 6 images end to end."""
    dev = torch.device(device)
    if smoke and dev.type == "cpu":
        batch = min(batch, 2)
    return forward_rows(dev, batch, smoke) + end_to_end_rows(dev, batch, smoke)


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'row':<72}{'device':>8}{'batch':>7}{'dtype':>10}{'img/s':>12}"]
    for r in rows:
        rate = "skipped" if r["skipped"] else f"{r['img_per_s']:.1f}"
        lines.append(f"{r['name']:<72}{r['device']:>8}{r['batch']:>7}{r['dtype']:>10}{rate:>12}")
        if r["skipped"] or r["detail"]:
            lines.append(f"    {r['skipped'] or r['detail']}")
    return "\n".join(lines)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args()
    print(format_rows(run(a.device, a.batch, a.smoke)))

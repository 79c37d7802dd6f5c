"""Inference throughput: G forward (eager / fused Triton / torch.compile + CUDA graphs), each stage of the
launch/infer.py pipeline alone, and end to end.

    python bench/infer_suite.py [--device cuda] [--batch 256] [--smoke]

`run(device, batch, smoke)` returns one dict per row:
    {"name", "device", "batch", "dtype", "img_per_s" (None when skipped), "skipped" (reason or None), "detail"}
GPU rows use the paper generator in bf16, channels_last. On CPU the Triton and compiled forward rows
are skipped; `smoke=True` shrinks everything (batch 2, the tiny generator, a few images) so it takes
seconds. Stage rows: decode alone (the PIL process pool; DALI where it can run), G alone as the
runner runs it (its model path, fixed padded batch, after its warm-up), the PNG writer alone at each
worker count (1 and 2 on CPU; up to the core count on CUDA, with the speed-up over 1 worker), and the
end-to-end row, which names the slowest stage and the runner's own verdict (where rank 0 waited).
`partial_rows` keeps the rows finished so far (bench/throughput.py reads it after a stage timeout).
"""
from __future__ import annotations

import argparse
import os
import statistics
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
partial_rows: list[dict] = []


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


def _smooth_faces(rng: np.random.Generator, count: int, size: int) -> list[np.ndarray]:
    """Bicubic-upsampled noise plus grain: compresses like small photos (pure noise would not)."""
    faces = []
    for _ in range(count):
        base = Image.fromarray(rng.integers(0, 256, (max(size // 4, 2),) * 2 + (3,), dtype=np.uint8))
        base = np.asarray(base.resize((size, size), Image.BICUBIC), dtype=np.int16)
        faces.append(np.clip(base + rng.integers(-6, 7, (size, size, 3)), 0, 255).astype(np.uint8))
    return faces


def _synthetic_faces(folder: Path, count: int, size: int = 32) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i, face in enumerate(_smooth_faces(rng, count, size)):
        sub = folder / f"{i // 1000:03d}"
        sub.mkdir(exist_ok=True)
        Image.fromarray(face).save(sub / f"{i:07d}.png")


def _rate_after_first(batches) -> float:
    """Images per second after the first batch arrives (the pool's start-up stays out of the rate), or of
    the first batch alone when there is only one."""
    t_start = time.perf_counter()
    it = iter(batches)
    first = next(it)
    t_first, n = time.perf_counter(), 0
    for b in it:
        n += len(b)
    end = time.perf_counter()
    return n / (end - t_first) if n else len(first) / (t_first - t_start)


def writer_rate(out: Path, faces: list[np.ndarray], workers: int, count: int) -> tuple[float, float]:
    """PNG encode + atomic write alone: `count` images through OutputWriter with `workers` threads.

    Returns (img/s, cores busy = this process's CPU seconds / wall seconds): a writer serialised by the GIL
    cannot keep more than about one core busy, whatever else runs on the machine.
    """
    from gafh_fast.inference.inputs import InputItem
    from gafh_fast.inference.outputs import ManifestPart, OutputWriter

    out.mkdir(parents=True)
    manifest = ManifestPart(out, 0)
    writer = OutputWriter(out, "png", workers, manifest, png_compress_level=1, max_in_flight=4 * count)
    items = [InputItem(f"in/{i}.png", f"{i // 1000:03d}/{i:07d}") for i in range(count)]
    t0, cpu0 = time.perf_counter(), time.process_time()
    for i, item in enumerate(items):
        writer.submit(item, faces[i % len(faces)])
    writer.close()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    manifest.close()
    if manifest.counts["ok"] != count:
        raise RuntimeError(f"the writer wrote {manifest.counts['ok']} of {count} images: {manifest.counts}")
    return count / wall, cpu / wall


def gil_stall(side: int = 2048) -> tuple[float, float]:
    """(longest stall of this thread in ms, encode ms) while another thread PNG-encodes a side x side image.

    An encoder that holds the GIL stalls every other Python thread for its whole encode; one that releases
    it leaves them running (stalls of a switch interval, 5 ms, or of the OS scheduler on a loaded machine).
    """
    import threading

    from gafh_fast.inference.outputs import encode_png

    image = _smooth_faces(np.random.default_rng(2), 1, side)[0]
    encoded = threading.Event()
    took: list[float] = []

    def encode() -> None:
        t0 = time.perf_counter()
        encode_png(image, 1)
        took.append(time.perf_counter() - t0)
        encoded.set()

    worker = threading.Thread(target=encode)
    last, stall = time.perf_counter(), 0.0
    worker.start()
    while not encoded.is_set():
        now = time.perf_counter()
        stall, last = max(stall, now - last), now
    worker.join()
    return 1000 * stall, 1000 * took[0]


def cores_given(threads: int = 2, seconds: float = 0.5) -> float:
    """CPU seconds per wall second that `threads` threads hashing (hashlib releases the GIL) get right now:
    the ceiling of any writer's scaling on this machine at this moment (other work shares the cores)."""
    import hashlib
    import threading

    block = bytes(1 << 20)

    def hash_for() -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            hashlib.sha256(block).digest()

    workers = [threading.Thread(target=hash_for) for _ in range(threads)]
    t0, cpu0 = time.perf_counter(), time.process_time()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return (time.process_time() - cpu0) / (time.perf_counter() - t0)


def pipeline_rows(device: torch.device, batch: int, smoke: bool) -> list[dict]:
    from gafh_fast.export import save_generator
    from gafh_fast.inference import InferenceOptions, run_inference
    from gafh_fast.inference.dali_decode import DaliBatches, dali_unavailable_reason
    from gafh_fast.inference.decode import PooledBatches
    from gafh_fast.inference.inputs import LrDecoder, list_inputs
    from gafh_fast.inference.runner import bounding_stage, forward_padded, load_model, split_cores, warm_up

    cfg = load_config(None, (TINY if smoke else []) + ["kernels=auto"])
    count = 6 if smoke else max(8 * batch, 2048)
    write_count = 160 if smoke else 1024
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    worker_counts = [1, 2] if device.type != "cuda" else sorted({1, 2, 4, 8, cores} & set(range(1, cores + 1)))
    rows = []

    def add(row: dict) -> None:
        rows.append(row)
        partial_rows.append(row)

    with tempfile.TemporaryDirectory(prefix="gafh_infer_bench_") as tmp:
        tmp = Path(tmp)
        weights = save_generator(build_generator(cfg), cfg, tmp / "g.safetensors")
        _synthetic_faces(tmp / "faces", count)
        opts = InferenceOptions(weights=weights, input=tmp / "faces", output=tmp / "out", batch_size=batch,
                                device=str(device), progress=False)
        decode_workers, write_workers = split_cores(opts, "pil")
        items = list_inputs(tmp / "faces")
        stages = {}

        # end to end first (a stage timeout keeps the row that matters most): launch/infer.py's path with its
        # defaults; its warm-up (compilation) is not in its seconds; the stage rates are added to it below
        s = run_inference(opts)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the runner's --dtype auto
        e2e = _row("end to end: decode + G + PNG (launch/infer.py path)", device, batch, dtype,
                   s.ok / s.seconds, detail=f"{count} images; the run was bound by {bounding_stage(s.waits, s.seconds)}"
                   f" (rank 0 waited {s.waits['first_batch']:.2f} s for the first batch, then {s.waits['decode']:.2f} s"
                   f" on decode, {s.waits['write']:.2f} s on writes, of {s.seconds:.2f} s); decoder {s.decoder}")
        add(e2e)

        # decode alone: the PIL process pool the runner uses off DALI; DALI where it can run
        pil = PooledBatches(items, batch, LrDecoder(cfg.lr_size, 0), decode_workers, device.type == "cuda")
        stages[f"decode (PIL, {decode_workers} process(es))"] = _rate_after_first(pil)
        add(_row(f"stage alone: decode, PIL in {decode_workers} process(es)", device, batch, "uint8",
                 stages[f"decode (PIL, {decode_workers} process(es))"],
                 detail=f"{count} 32x32 PNGs, after the first batch (worker start-up)"))
        reason = dali_unavailable_reason(device)
        if reason is None:
            dali = DaliBatches(items, batch, cfg.lr_size, device, decode_workers, 0, pil_fallback=pil)
            stages["decode (DALI)"] = _rate_after_first(dali)
            add(_row("stage alone: decode, DALI on the GPU", device, batch, "uint8", stages["decode (DALI)"]))
        else:
            add(_row("stage alone: decode, DALI on the GPU", device, batch, "uint8", skipped=reason))

        # G alone, exactly as the runner runs it (its defaults: kernels auto, compile auto, padded batch)
        g = load_model(opts, device)
        warm = warm_up(g.model, g.compiled, batch, cfg.lr_size, g.dtype, device)
        lr = torch.randint(0, 256, (batch, cfg.lr_size, cfg.lr_size, 3), dtype=torch.uint8, device=device)
        iters = 2 if smoke else 10
        with torch.inference_mode():
            t0 = time.perf_counter()
            for _ in range(iters):
                out = forward_padded(g.model, lr, g.dtype, batch)
            out.cpu()  # waits for the device
        stages["G (runner path)"] = batch * iters / (time.perf_counter() - t0)
        add(_row("stage alone: G forward, the runner's path", device, batch, g.dtype, stages["G (runner path)"],
                 detail=f"{g.path}; first batch {warm:.1f} s"))

        # the writer alone at each worker count: 3 rounds, counts interleaved (a shared machine's load
        # drifts), the median of each
        faces = _smooth_faces(np.random.default_rng(1), 16, cfg.data.hr_size)
        rounds = {w: [] for w in worker_counts}
        for r in range(3):
            for w in worker_counts:
                rounds[w].append(writer_rate(tmp / f"write_{w}_{r}", faces, w, write_count))
        by_workers = {w: statistics.median(rate for rate, _ in got) for w, got in rounds.items()}
        stall_ms, encode_ms = gil_stall()
        ceiling = cores_given(max(worker_counts))
        for w, rate in by_workers.items():
            add(_row(f"stage alone: PNG encode + write, {w} worker(s)", device, batch, "uint8", rate,
                     detail=f"{write_count} images {cfg.data.hr_size}x{cfg.data.hr_size}, median of 3 "
                            f"({', '.join(f'{x:.0f}' for x, _ in rounds[w])} img/s; cores busy "
                            f"{', '.join(f'{c:.2f}' for _, c in rounds[w])}); x{rate / by_workers[1]:.2f} the "
                            f"rate of 1 worker; GIL: another thread stalled at most {stall_ms:.0f} ms during a "
                            f"{encode_ms:.0f} ms encode of 2048x2048; {max(worker_counts)} GIL-free hashing threads "
                            f"got {ceiling:.2f} cores at the time"))
        stages[f"PNG write ({write_workers} worker(s))"] = (
            by_workers[write_workers] if write_workers in by_workers
            else writer_rate(tmp / "write_default", faces, write_workers, write_count)[0])
        e2e["detail"] += ("; stages alone (img/s): " + ", ".join(f"{k} {v:.0f}" for k, v in stages.items())
                          + f"; slowest stage alone: {min(stages, key=stages.get)}")
    return rows


def run(device: str, batch: int = 256, smoke: bool = False) -> list[dict]:
    """All rows for `device`; smoke=True: the tiny generator, batch <= 2 on CPU, 6 images end to end."""
    dev = torch.device(device)
    if smoke and dev.type == "cpu":
        batch = min(batch, 2)
    partial_rows.clear()
    rows = forward_rows(dev, batch, smoke)
    partial_rows.extend(rows)
    return rows + pipeline_rows(dev, batch, smoke)


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

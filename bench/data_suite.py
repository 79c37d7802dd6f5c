"""The `data` suite: HR+LR pairs per second of the DALI pipeline against a PIL DataLoader.

Both read the same synthetic 178x218 JPEGs (generated into a temporary folder), crop 178x178, resize
to 256 (HR) and 32 (LR) with the antialiased bicubic, flip at random and normalise: the training
split's work, batch after batch, as `gafh_fast.data` does it.

  - `dali-mixed` (CUDA): nvJPEG / hardware decode and every resize on the GPU
  - `dali-cpu`   (no CUDA): the same pipeline with every operator on the CPU (the correctness path)
  - `pil`        : the reference loader, a torch DataLoader with `num_threads` worker processes;
                   the baseline of the DALI row

Each path reads the set once as warm-up (page cache, thread pools, allocations), then once timed.
The timed epoch counts from its first batch to its last, so a pipeline (re)build or the DataLoader's
worker start-up is not in the number; images in the first batch are not counted either.

On CUDA a further row checks the mixed pipeline against the CPU pipeline on the validation split
(no flip): the worst per-image PSNR of HR and of LR, which must be >= 45 dB (status "error" if not).
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from gafh_fast.data.layouts import index_split
from gafh_fast.data.pil import PILLoader
from gafh_fast.data.synthetic import make_synthetic_celeba
from gafh_fast.metrics import psnr

try:  # run as `python bench/throughput.py` (bench/ on sys.path) or imported as bench.data_suite
    from common import add_speedups, error_row, format_table, make_row, skipped_row
except ImportError:  # pragma: no cover
    from bench.common import add_speedups, error_row, format_table, make_row, skipped_row

SUITE = "data"
NAME = "HR+LR pairs 256/32"
PSNR_FLOOR_DB = 45.0


def _timed_epoch(loader, device: str) -> tuple[float, int]:
    """(seconds, images) from the first batch's arrival to the end of the epoch, first batch not counted."""
    iterator = iter(loader)
    next(iterator)
    if device == "cuda":
        torch.cuda.synchronize()
    start, images = time.perf_counter(), 0
    for batch in iterator:
        images += batch["hr"].shape[0]
    if device == "cuda":
        torch.cuda.synchronize()   # a device sync point: the last batch is really there
    return time.perf_counter() - start, images


def _measure(loader, device: str, path: str, batch_size: int, baseline, note: str) -> dict:
    loader.set_epoch(0)
    _timed_epoch(loader, device)           # warm-up epoch
    loader.set_epoch(1)
    seconds, images = _timed_epoch(loader, device)
    if images == 0:
        return skipped_row(SUITE, NAME, "the set holds a single batch: nothing left to time", path=path)
    return make_row(SUITE, NAME, path=path, baseline=baseline, batch=batch_size,
                    ms=1000.0 * seconds * batch_size / images, img_s=images / seconds, images_timed=images,
                    note=note)


def _parity_row(index, batch_size: int, num_threads: int) -> dict:
    """Mixed (GPU) pipeline against the CPU pipeline on the same files: worst per-image PSNR."""
    from gafh_fast.data.dali import DALILoader

    common = dict(split="val", batch_size=batch_size, hr_size=256, num_threads=num_threads)
    gpu = DALILoader(index, device_id=torch.cuda.current_device(), **common)
    cpu = DALILoader(index, device_id=None, **common)
    worst = {"hr": float("inf"), "lr": float("inf")}
    for g, c in zip(gpu, cpu):
        for key in worst:
            db = psnr((g[key].cpu().double() + 1) / 2, (c[key].double() + 1) / 2)
            worst[key] = min(worst[key], db.min().item())
    ok = min(worst.values()) >= PSNR_FLOOR_DB
    return make_row(SUITE, "mixed vs cpu PSNR (dB)", path="dali-mixed", baseline="dali-cpu", batch=batch_size,
                    psnr_hr_db=worst["hr"], psnr_lr_db=worst["lr"], status="ok" if ok else "error",
                    note=f"worst per-image PSNR HR {worst['hr']:.2f} dB, LR {worst['lr']:.2f} dB "
                         f"(floor {PSNR_FLOOR_DB} dB)")


def run(device: str, num_images: int = 512, batch_size: int = 64, num_threads: int = 2,
        smoke: bool = False) -> list[dict]:
    if smoke:
        num_images, batch_size = min(num_images, 48), min(batch_size, 16)
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda was asked for but torch sees no CUDA device")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="gafh_data_bench-") as tmp:
        make_synthetic_celeba(tmp, num_images, seed=0)
        index = index_split(tmp, "celeba_aligned", "all", "train", num_threads=num_threads)
        common = dict(split="train", batch_size=batch_size, hr_size=256, seed=0, flip=True)
        pil = PILLoader(index, num_workers=num_threads, **common)
        rows.append(_measure(pil, device, "pil", batch_size, None,
                             f"PIL decode + BICUBIC, torch DataLoader, {num_threads} workers"))
        try:
            from gafh_fast.data.dali import DALILoader
        except ImportError as e:
            rows.append(skipped_row(SUITE, NAME, f"nvidia.dali not importable: {e}", path="dali"))
            return rows
        try:
            device_id = torch.cuda.current_device() if device == "cuda" else None
            path = "dali-mixed" if device == "cuda" else "dali-cpu"
            dali = DALILoader(index, num_threads=num_threads, device_id=device_id, **common)
            rows.append(_measure(dali, device, path, batch_size, "pil",
                                 f"fn.readers.file + decoders.image({'mixed' if device_id is not None else 'cpu'}), "
                                 f"{num_threads} threads"))
        except Exception as e:  # an error row, never a crash of the other suites
            rows.append(error_row(SUITE, NAME, f"{type(e).__name__}: {e}"))
        if device == "cuda":
            try:
                rows.append(_parity_row(index_split(tmp, "celeba_aligned", "all", "val", num_threads=num_threads),
                                        batch_size, num_threads))
            except Exception as e:
                rows.append(error_row(SUITE, "mixed vs cpu PSNR (dB)", f"{type(e).__name__}: {e}"))
    return add_speedups(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="HR+LR pairs/s: DALI vs a PIL DataLoader")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--num-images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    rows = run(args.device, args.num_images, args.batch_size, args.num_threads, args.smoke)
    print(format_table(rows))
    for row in rows:
        if row.get("note") and row.get("status") == "ok":
            print(f"  [{row['path']}] {row['note']}")


if __name__ == "__main__":
    main()

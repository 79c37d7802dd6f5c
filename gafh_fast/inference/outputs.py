"""What sharded inference writes: 256x256 results (atomically, in a background pool) and the manifest.

PNGs are encoded by libpng through imagecodecs (`png_encode`), which releases the GIL while it encodes;
file writes and renames release it too. So the writer's threads run on as many cores as they are given:
the Python each image still costs under the GIL (~40 us of user time per image, measured with the encode
stubbed out: a ceiling near 20 000 img/s per process) is far below its encode time (~1-3 ms per core).
Pillow's `save` runs its chunk and buffer loop in Python under the GIL and did not scale (748 img/s
with 8 threads on a 16-core host, issue 13).

manifest.jsonl has one JSON object per input, sorted by `path`:
    {"path": <input file>, "output": <path under OUTPUT or null>,
     "status": "ok" | "skipped-existing" | "failed", "reason": <null or why it failed>, "rank": <int>}
Each rank appends whole lines to its own part file (one write per line, under a lock); rank 0 merges
the parts once every rank is done, so no line is ever interleaved or partial.
"""
from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import imagecodecs
import numpy as np

from gafh_fast.inference.inputs import InputItem

OK, SKIPPED, FAILED = "ok", "skipped-existing", "failed"
FORMAT_SUFFIX = {"png": ".png", "npy": ".npy"}
MANIFEST = "manifest.jsonl"


def _part_path(out_dir: Path, rank: int) -> Path:
    return out_dir / f".manifest.rank{rank:05d}.jsonl.part"


class ManifestPart:
    """This rank's manifest lines; thread-safe (writer threads and the main loop both add)."""

    def __init__(self, out_dir: Path, rank: int):
        self.rank = rank
        self.counts = {OK: 0, SKIPPED: 0, FAILED: 0}
        self._lock = threading.Lock()
        self._file = open(_part_path(out_dir, rank), "w", encoding="utf-8")

    def add(self, item: InputItem, output: Optional[str], status: str, reason: Optional[str] = None) -> None:
        line = json.dumps({"path": item.source, "output": output, "status": status, "reason": reason,
                           "rank": self.rank}) + "\n"
        with self._lock:
            self.counts[status] += 1
            self._file.write(line)

    def close(self) -> None:
        with self._lock:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()


def merge_manifest(out_dir: Path, world_size: int) -> Path:
    """Rank 0, after a barrier: concatenate the parts sorted by path into manifest.jsonl (atomic)."""
    records = []
    for rank in range(world_size):
        part = _part_path(out_dir, rank)
        with open(part, encoding="utf-8") as f:
            records.extend(json.loads(line) for line in f if line.strip())
    records.sort(key=lambda r: r["path"])
    final = out_dir / MANIFEST
    tmp = out_dir / f".{MANIFEST}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(tmp, final)
    for rank in range(world_size):
        _part_path(out_dir, rank).unlink()
    return final


def encode_png(array_hwc: np.ndarray, compress_level: int) -> bytes:
    """Lossless 8-bit RGB PNG of an (H, W, 3) uint8 array (the GIL is released while it encodes).

    Level 1 (the default) uses zlib's RLE strategy and the SUB filter (OpenCV's fast PNG settings): about
    2x faster than level 1 with libpng's adaptive filters, for ~3 % larger files. Other levels: plain zlib
    level with adaptive filters (0: stored).
    """
    if compress_level == 1:
        return imagecodecs.png_encode(array_hwc, level=1, strategy=imagecodecs.PNG.STRATEGY.RLE,
                                      filter=imagecodecs.PNG.FILTER.SUB)
    return imagecodecs.png_encode(array_hwc, level=compress_level)


def write_atomic(array_hwc: np.ndarray, path: Path, fmt: str, png_compress_level: int) -> None:
    """Write to a temporary name in the same folder, then rename: a killed run leaves no truncated file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    data = encode_png(array_hwc, png_compress_level) if fmt == "png" else None
    try:
        with open(tmp, "wb") as f:
            if data is not None:
                f.write(data)
            else:
                np.save(f, array_hwc, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class OutputWriter:
    """`workers` threads that encode and write results while the next batch runs on the device.

    At most `max_in_flight` images wait in the pool; past that, `submit` blocks (back-pressure from
    a slow disk) and the time it blocked is added to `wait_seconds` so the run can say it was
    write-bound.
    """

    def __init__(self, out_dir: Path, fmt: str, workers: int, manifest: ManifestPart,
                 png_compress_level: int = 1, max_in_flight: int = 1024):
        self.out_dir, self.fmt, self.manifest = out_dir, fmt, manifest
        self.suffix = FORMAT_SUFFIX[fmt]
        self.png_compress_level = png_compress_level
        self.wait_seconds = 0.0
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gafh-write")
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self._made_dirs: set[Path] = set()
        self._dirs_lock = threading.Lock()
        self._errors: list[BaseException] = []

    def submit(self, item: InputItem, array_hwc: np.ndarray) -> None:
        start = time.perf_counter()
        self._slots.acquire()
        self.wait_seconds += time.perf_counter() - start
        self._pool.submit(self._write, item, array_hwc)

    def _write(self, item: InputItem, array_hwc: np.ndarray) -> None:
        path = item.output(self.out_dir, self.suffix)
        rel = Path(item.rel_stem + self.suffix).as_posix()
        try:
            self._ensure_dir(path.parent)
            write_atomic(array_hwc, path, self.fmt, self.png_compress_level)
            self.manifest.add(item, rel, OK)
        except OSError as e:  # disk full, permission: this input failed, the run goes on
            self.manifest.add(item, None, FAILED, f"write failed: {e}")
        except BaseException as e:  # a bug: keep it for close() to re-raise in the main thread
            self._errors.append(e)
        finally:
            self._slots.release()

    def _ensure_dir(self, folder: Path) -> None:
        if folder in self._made_dirs:
            return
        folder.mkdir(parents=True, exist_ok=True)
        with self._dirs_lock:
            self._made_dirs.add(folder)

    def close(self) -> None:
        start = time.perf_counter()
        self._pool.shutdown(wait=True)
        self.wait_seconds += time.perf_counter() - start
        if self._errors:
            raise self._errors[0]

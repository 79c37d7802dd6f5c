"""GPU decoding with NVIDIA DALI (nvJPEG / nvImageCodec): the fast path of decode.PooledBatches.

Only the LR inference mode uses it (evaluation always takes the PIL reference path). Python reads
each file's bytes and checks the header with PIL in a thread pool (zero-byte, non-image and
decompression-bomb inputs are caught there, cheaply); DALI then decodes, centre-crops and resizes with
its antialiased cubic filter (the spec's bicubic, 57 dB from PIL) on the GPU. A file that is corrupt
past its header makes DALI raise for the whole batch: that batch is decoded again by PIL, which names
the bad file and decodes the rest, and the pipeline is rebuilt.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from gafh_fast.inference.decode import DecodedBatch, PooledBatches, in_background
from gafh_fast.inference.inputs import BadInputError, InputItem


def dali_unavailable_reason(device: torch.device) -> Optional[str]:
    """None when the DALI GPU decoder can run on `device`, else why not."""
    if device.type != "cuda":
        return f"tensors are on {device.type!r}; the DALI decoder runs on CUDA devices"
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as e:
        return f"nvidia.dali is not importable ({e})"
    return None


def _read_checked(path: str, max_pixels: int) -> bytes:
    """File bytes after a header-only PIL check; raises BadInputError like inputs.open_rgb."""
    from gafh_fast.inference.inputs import open_rgb

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise BadInputError(f"unreadable: {e.strerror or e}") from None
    if not data:
        raise BadInputError("empty file (0 bytes)")
    try:
        with Image.open(path) as im:
            w, h = im.size
    except Exception:
        open_rgb(path, max_pixels)  # raises the same reason the PIL path gives
        raise
    if max_pixels and w * h > max_pixels:
        raise BadInputError(f"decompression bomb: {w}x{h} = {w * h} pixels > max pixels {max_pixels}")
    return data


class DaliBatches:
    """Same iteration contract as PooledBatches (tensors = (uint8 (n, lr, lr, 3) on the GPU,)).

    threads: DALI's CPU threads and the file-reading threads (reads release the GIL).
    pil_fallback: the PIL decoding of the same items; a batch DALI rejects is decoded again by it.
    """

    def __init__(self, items: Sequence[InputItem], batch_size: int, lr_size: int, device: torch.device,
                 threads: int, max_pixels: int, pil_fallback: PooledBatches):
        self.items, self.batch_size, self.lr_size = list(items), batch_size, lr_size
        self.device, self.threads, self.max_pixels = device, threads, max_pixels
        # "mixed" = nvImageCodec on the GPU; a CPU device runs the same graph on DALI's CPU operators,
        # which is how the graph is tested on machines without a GPU
        self.decode_device = "mixed" if device.type == "cuda" else "cpu"
        self.pil_fallback = pil_fallback
        self._pipe = None

    def __len__(self) -> int:
        return -(-len(self.items) // self.batch_size)

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.math import min as dali_min

        device_id = (self.device.index or 0) if self.device.type == "cuda" else None

        @pipeline_def(batch_size=self.batch_size, num_threads=self.threads, device_id=device_id,
                      prefetch_queue_depth=1)
        def lr_faces():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, no_copy=False)
            images = fn.decoders.image(encoded, device=self.decode_device, output_type=types.RGB)  # (H, W, 3)
            shape = images.shape()
            side = fn.cast(dali_min(shape[0], shape[1]), dtype=types.FLOAT)
            square = fn.crop(images, crop_h=side, crop_w=side, crop_pos_x=0.5, crop_pos_y=0.5)
            return fn.resize(square, resize_x=self.lr_size, resize_y=self.lr_size,
                             interp_type=types.INTERP_CUBIC, antialias=True, dtype=types.UINT8)

        pipe = lr_faces()
        pipe.build()
        return pipe

    def _run(self, encoded: list[np.ndarray]) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        if self._pipe is None:
            self._pipe = self._build()
        self._pipe.feed_input("encoded", encoded)
        (out,) = self._pipe.run()
        dense = out.as_tensor()
        if self.decode_device == "cpu":
            return torch.from_numpy(np.array(dense))
        result = torch.empty(tuple(dense.shape()), dtype=torch.uint8, device=self.device)
        feed_ndarray(dense, result, cuda_stream=torch.cuda.current_stream(self.device))
        return result

    def __iter__(self) -> Iterator[DecodedBatch]:
        # file reads and DALI's work for the next batch overlap the model's work on this one
        return in_background(self._produce(), depth=2)

    def _produce(self) -> Iterator[DecodedBatch]:
        with ThreadPoolExecutor(self.threads, thread_name_prefix="gafh-read") as pool:
            for start in range(0, len(self.items), self.batch_size):
                chunk = self.items[start:start + self.batch_size]
                t0 = time.perf_counter()

                def read(item: InputItem):
                    try:
                        return np.frombuffer(_read_checked(item.source, self.max_pixels), dtype=np.uint8)
                    except BadInputError as e:
                        return str(e)

                results = list(pool.map(read, chunk))
                oks = [(it, r) for it, r in zip(chunk, results) if not isinstance(r, str)]
                failures = [(it, r) for it, r in zip(chunk, results) if isinstance(r, str)]
                if not oks:
                    yield DecodedBatch([], (), failures, time.perf_counter() - t0)
                    continue
                try:
                    lr = self._run([r for _, r in oks])
                except RuntimeError:
                    # corrupt data past the header: PIL decodes this batch and names the bad file(s)
                    self._pipe = None
                    for batch in self.pil_fallback.subset([it for it, _ in oks]):
                        batch.failures = failures + batch.failures
                        yield batch
                    continue
                yield DecodedBatch([it for it, _ in oks], (lr,), failures, time.perf_counter() - t0)

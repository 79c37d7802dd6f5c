"""Decoding batches ahead of the model: PIL in a pool of worker processes (runs anywhere), into pinned memory.

PIL holds the GIL for most of a small image's decode (profiled on 32x32 PNGs: the C decoder is ~5 % of
the time, opening and chunk parsing in Python the rest), so threads do not add cores: processes do. Workers are spawned, never forked (this process may
hold CUDA and threads). A spawned worker imports the main script again, so a script that runs inference
needs the `if __name__ == "__main__":` guard, and launch/infer.py keeps its imports free of torch; then
it imports inputs.py and gets the decoder once. Each batch is split into one chunk of paths per worker;
up to `prefetch` batches are in the pool at once, and a producer thread stacks finished batches while
the device runs the current one. Bad inputs come back as (item, reason) pairs in the batch; they never
stop the run. The GPU decoder (nvidia.dali) lives in dali_decode.py and yields the same `DecodedBatch`.
"""
from __future__ import annotations

import multiprocessing
import queue
import threading
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from gafh_fast.inference.inputs import InputItem, decode_paths, install_decoder


@dataclass
class DecodedBatch:
    items: list[InputItem]                 # inputs decoded fine, in order
    tensors: tuple[torch.Tensor, ...]      # one stacked tensor per field of the decoder's output
    failures: list[tuple[InputItem, str]] = field(default_factory=list)
    decode_seconds: float = 0.0            # wall time from submitting this batch to the pool to stacking it

    def __len__(self) -> int:
        return len(self.items)


_END = object()


class PooledBatches:
    """Iterate DecodedBatch of `batch_size` items (the last may be smaller), decoded by `decoder` in `workers`
    processes.

    decoder: picklable; decoder(path) -> (tuple of numpy arrays of fixed shapes, (w, h) when the input was
    resized else None), or raises BadInputError (inputs.LrDecoder, inputs.PairDecoder).
    on_resized(path, w, h): called in this process for inputs the decoder resized (the resize notice).
    pin_memory: stack straight into page-locked buffers so the host-to-device copy can be async.
    """

    def __init__(self, items: Sequence[InputItem], batch_size: int, decoder, workers: int,
                 pin_memory: bool = False, prefetch: int = 3, on_resized: Optional[Callable] = None):
        self.items, self.batch_size, self.decoder = list(items), batch_size, decoder
        self.workers, self.pin_memory, self.prefetch, self.on_resized = workers, pin_memory, prefetch, on_resized

    def __len__(self) -> int:
        return -(-len(self.items) // self.batch_size)

    def subset(self, items: Sequence[InputItem]) -> "PooledBatches":
        """The same decoding for other items, as one batch (the DALI decoder's redo of a failed batch)."""
        return PooledBatches(items, max(len(items), 1), self.decoder, self.workers, self.pin_memory, 1,
                             self.on_resized)

    def _assemble(self, chunk: list[InputItem], results: list, seconds: float) -> DecodedBatch:
        oks = [(it, r) for it, r in zip(chunk, results) if not isinstance(r, str)]
        failures = [(it, r) for it, r in zip(chunk, results) if isinstance(r, str)]
        if self.on_resized is not None:
            for it, (_, resized) in oks:
                if resized is not None:
                    self.on_resized(it.source, *resized)
        tensors = ()
        if oks:
            fields = []
            for k, first in enumerate(oks[0][1][0]):
                out = torch.empty((len(oks),) + first.shape, dtype=torch.from_numpy(np.empty(0, first.dtype)).dtype,
                                  pin_memory=self.pin_memory)
                np.stack([r[0][k] for _, r in oks], out=out.numpy())
                fields.append(out)
            tensors = tuple(fields)
        return DecodedBatch([it for it, _ in oks], tensors, failures, seconds)

    def _produce(self) -> Iterator[DecodedBatch]:
        starts = iter(range(0, len(self.items), self.batch_size))
        in_pool: deque = deque()  # (items, futures of its chunks, submit time)
        pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=install_decoder, initargs=(self.decoder,))

        def submit_next() -> None:
            start = next(starts, None)
            if start is None:
                return
            chunk = self.items[start:start + self.batch_size]
            step = -(-len(chunk) // self.workers)  # one chunk of paths per worker
            futures = [pool.submit(decode_paths, [it.source for it in chunk[i:i + step]])
                       for i in range(0, len(chunk), step)]
            in_pool.append((chunk, futures, time.perf_counter()))

        try:
            for _ in range(self.prefetch):
                submit_next()
            while in_pool:
                chunk, futures, t0 = in_pool.popleft()
                results = [r for f in futures for r in f.result()]
                submit_next()
                yield self._assemble(chunk, results, time.perf_counter() - t0)
        finally:
            # no waiting for the workers to exit: the consumer's last next() would wait with it
            pool.shutdown(wait=False, cancel_futures=True)

    def __iter__(self) -> Iterator[DecodedBatch]:
        return in_background(self._produce(), self.prefetch)


class in_background:
    """Run `iterator` in a producer thread, at most `depth` items ahead of the consumer.

    The producer starts at once (decoding overlaps the model's compilation), not at the first next().
    Exceptions in the producer are re-raised in the consumer. close() (also at the end or on an error, and
    in a `with` block) stops the producer; a consumer that leaves early must call it.
    """

    def __init__(self, iterator: Iterator, depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._producer = threading.Thread(target=self._produce, args=(iterator,), name="gafh-decode-producer",
                                          daemon=True)
        self._producer.start()

    def _put(self, obj) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(obj, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def _produce(self, iterator: Iterator) -> None:
        try:
            for obj in iterator:
                if not self._put(obj):
                    break
            else:
                self._put(_END)
        except BaseException as e:  # re-raised in the consumer
            self._put(e)
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()  # a generator's finally (the process pool's shutdown) runs in this thread

    def __iter__(self) -> "in_background":
        return self

    def __next__(self):
        if self._stop.is_set():
            raise StopIteration
        obj = self._queue.get()
        if obj is _END or isinstance(obj, BaseException):
            self.close()
            if obj is _END:
                raise StopIteration
            raise obj
        return obj

    def close(self) -> None:
        self._stop.set()
        self._producer.join()

    def __enter__(self) -> "in_background":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["DecodedBatch", "PooledBatches", "in_background"]

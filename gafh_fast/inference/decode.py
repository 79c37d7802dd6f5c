"""Decoding batches ahead of the model: a PIL thread pool (the reference, runs anywhere) into pinned memory.

A producer thread decodes up to `prefetch` batches ahead while the device runs the current one. Bad
inputs come back as (item, reason) pairs in the batch; they never stop the run. The GPU decoder
(nvidia.dali) lives in dali_decode.py and yields the same `DecodedBatch`.
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from gafh_fast.inference.inputs import BadInputError, InputItem


@dataclass
class DecodedBatch:
    items: list[InputItem]                 # inputs decoded fine, in order
    tensors: tuple[torch.Tensor, ...]      # one stacked tensor per field of the decode function
    failures: list[tuple[InputItem, str]] = field(default_factory=list)
    decode_seconds: float = 0.0            # wall time the producer spent decoding this batch

    def __len__(self) -> int:
        return len(self.items)


_END = object()


class ThreadedBatches:
    """Iterate DecodedBatch of `batch_size` items (the last may be smaller), decoded by `decode_one`.

    decode_one(path) -> tuple of numpy arrays (fixed shapes) or raises BadInputError.
    pin_memory: stack straight into page-locked buffers so the host-to-device copy can be async.
    """

    def __init__(self, items: Sequence[InputItem], batch_size: int, decode_one: Callable,
                 threads: int = 8, pin_memory: bool = False, prefetch: int = 3):
        self.items, self.batch_size, self.decode_one = list(items), batch_size, decode_one
        self.threads, self.pin_memory, self.prefetch = threads, pin_memory, prefetch

    def __len__(self) -> int:
        return -(-len(self.items) // self.batch_size)

    def _decode_safely(self, item: InputItem):
        try:
            return self.decode_one(item.source)
        except BadInputError as e:
            return str(e)

    def _assemble(self, chunk: list[InputItem], results: list, seconds: float) -> DecodedBatch:
        oks = [(it, r) for it, r in zip(chunk, results) if not isinstance(r, str)]
        failures = [(it, r) for it, r in zip(chunk, results) if isinstance(r, str)]
        tensors = ()
        if oks:
            fields = []
            for k in range(len(oks[0][1])):
                first = oks[0][1][k]
                out = torch.empty((len(oks),) + first.shape, dtype=torch.from_numpy(np.empty(0, first.dtype)).dtype,
                                  pin_memory=self.pin_memory)
                np.stack([r[k] for _, r in oks], out=out.numpy())
                fields.append(out)
            tensors = tuple(fields)
        return DecodedBatch([it for it, _ in oks], tensors, failures, seconds)

    def _produce(self) -> Iterator[DecodedBatch]:
        with ThreadPoolExecutor(self.threads, thread_name_prefix="gafh-decode") as pool:
            for start in range(0, len(self.items), self.batch_size):
                chunk = self.items[start:start + self.batch_size]
                t0 = time.perf_counter()
                results = list(pool.map(self._decode_safely, chunk))
                yield self._assemble(chunk, results, time.perf_counter() - t0)

    def __iter__(self) -> Iterator[DecodedBatch]:
        return in_background(self._produce(), self.prefetch)


def in_background(iterator: Iterator, depth: int) -> Iterator:
    """Run `iterator` in a producer thread, at most `depth` items ahead of the consumer.

    Exceptions in the producer are re-raised in the consumer; leaving the loop early stops the producer.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(obj) -> bool:
        while not stop.is_set():
            try:
                q.put(obj, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for obj in iterator:
                if not put(obj):
                    return
            put(_END)
        except BaseException as e:  # re-raised in the consumer
            put(e)

    producer = threading.Thread(target=produce, name="gafh-decode-producer", daemon=True)
    producer.start()
    try:
        while True:
            obj = q.get()
            if obj is _END:
                return
            if isinstance(obj, BaseException):
                raise obj
            yield obj
    finally:
        stop.set()
        producer.join()


__all__ = ["DecodedBatch", "ThreadedBatches", "in_background"]

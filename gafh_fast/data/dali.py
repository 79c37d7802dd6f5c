"""The DALI pipeline: decode, crop, bicubic HR and LR, flip, normalise; on the GPU or on the CPU.

Per sample (one DALI graph, HR and LR from the same decoded image):

    jpeg  = fn.readers.file(files=<this rank's files for this epoch, in order>, random_shuffle=False)
    image = fn.decoders.image(jpeg, device="mixed" | "cpu")           # nvJPEG / HW decoder on a GPU
    crop  = fn.slice(image, anchor, shape)                            # per-sample window (layouts.py)
    hr    = fn.resize(crop, 256x256, INTERP_CUBIC, antialias=True)    # uint8, like PIL's BICUBIC
    lr    = fn.resize(hr, 32x32, INTERP_CUBIC, antialias=True)
    out   = fn.crop_mirror_normalize(hr | lr, mirror=flip, (x - 127.5) / 127.5, float, HWC)

Order, sharding and flips are not DALI's: they come from sampling.EpochPlan, so the PIL loader can
reproduce them sample for sample (DALI's internal shuffle buffer cannot be reproduced outside it). The
reader gets the already-ordered per-rank list (the rank's contiguous shard, DALI's own shard rule,
cut in Python so a resume can start mid-shard) and the crop windows and flips come in through
`fn.external_source` in the same order. The pipeline is rebuilt at the start of each epoch and on a
resume (`set_epoch(e, start_batch=k)` feeds the list from batch k); building one costs milliseconds
on the CPU and well under a second on a GPU, against thousands of batches per epoch.

Last batch: train batches are always full (the plan drops the tail); val/test read with
`pad_last_batch=True` and `LastBatchPolicy.PARTIAL`, so the last batch is smaller and no padding
duplicate reaches the user.

HWC output seen through `.permute(0, 3, 1, 2)` is an NCHW tensor in channels_last memory format, the
layout the model wants, with no copy.

A file that breaks the decoder (it passed the cheap check) makes DALI raise and invalidates the
pipeline. The loader then finds the culprit (the file DALI names, else a full PIL decode of the
batches in flight), marks it bad, and rebuilds the pipeline from the failed batch with that slot
re-planned (sampling.EpochPlan.batch): training goes on, `loader.skipped` counts it, the log names it.
If no culprit can be found, the original DALI error is raised.
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch

from .layouts import BadImage, SplitIndex, full_decode_check
from .sampling import LoaderBase

log = logging.getLogger("gafh_fast.data")


class DALIUnavailableError(ImportError):
    """`data.loader: dali` was asked for, but nvidia.dali cannot be imported."""


def _import_dali():
    try:
        import nvidia.dali as dali
        from nvidia.dali import fn, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
    except ImportError as e:
        raise DALIUnavailableError(
            "data.loader=dali needs NVIDIA DALI (pip install nvidia-dali-cuda120 or -cuda130, from "
            "https://pypi.nvidia.com); it could not be imported. Install it, or set data.loader=pil "
            f"explicitly for the (slower) PIL reference loader. Import error: {e}") from e
    return dali, fn, types, DALIGenericIterator, LastBatchPolicy


class _BatchSource:
    """external_source callback: crop anchors, crop shapes and flips of batch after batch, in plan order."""

    def __init__(self, plans, samples, batch_size: int):
        self.batches = []
        for plan in plans:
            rows = list(plan) + [plan[-1]] * (batch_size - len(plan))   # the reader pads with the last sample too
            windows = [samples[i].window for i, _, _ in rows]
            self.batches.append((
                [np.array(w[:2], np.float32) for w in windows],        # anchor (x, y)
                [np.array(w[2:], np.float32) for w in windows],        # shape (w, h)
                [np.array(int(f), np.int32) for _, f, _ in rows]))
        self.calls = 0

    def __call__(self):
        # prefetching may ask past the end; the reader wraps around there too, so wrap likewise
        out = self.batches[self.calls % len(self.batches)]
        self.calls += 1
        return out


class DALILoader(LoaderBase):
    """The contract's loader object (see gafh_fast.data), backed by a DALI pipeline."""

    def __init__(self, index: SplitIndex, *, split: str, batch_size: int, hr_size: int, scale: int = 8,
                 rank: int = 0, world_size: int = 1, seed: int = 0, flip: bool = True, num_threads: int = 4,
                 device_id: Optional[int] = -1, prefetch_queue_depth: int = 2, decoder_options: Optional[dict] = None):
        """device_id: -1 picks the current CUDA device when torch sees one, else None (CPU only).
        decoder_options: extra fn.decoders.image arguments (e.g. hw_decoder_load) for tuning on a GPU."""
        self._dali = _import_dali()
        super().__init__(index, split=split, batch_size=batch_size, hr_size=hr_size, scale=scale, rank=rank,
                         world_size=world_size, seed=seed, flip=flip)
        if device_id == -1:
            device_id = torch.cuda.current_device() if torch.cuda.is_available() else None
        self.device_id, self.num_threads, self.prefetch = device_id, num_threads, prefetch_queue_depth
        self.decoder_options = dict(decoder_options or {})

    @property
    def device(self) -> str:
        return "cpu" if self.device_id is None else f"cuda:{self.device_id}"

    def _pipeline(self, plans):
        dali, fn, types, _, _ = self._dali
        files = [self.samples[i].path for plan in plans for i, _, _ in plan]
        source = _BatchSource(plans, self.samples, self.batch_size)
        decode_device = "cpu" if self.device_id is None else "mixed"
        hr_size, lr_size, decoder_options = self.hr_size, self.lr_size, self.decoder_options

        @dali.pipeline_def(batch_size=self.batch_size, num_threads=self.num_threads, device_id=self.device_id,
                           prefetch_queue_depth=self.prefetch, seed=self.plan.seed)
        def pipeline():
            jpegs, _ = fn.readers.file(files=files, random_shuffle=False, pad_last_batch=True, name="Reader")
            anchor, shape, flip = fn.external_source(source=source, num_outputs=3, batch=True)
            images = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB,
                                       **decoder_options)                               # (H, W, 3) uint8
            crops = fn.slice(images, anchor, shape, axis_names="WH", normalized_anchor=False,
                             normalized_shape=False)
            hr = fn.resize(crops, size=[hr_size, hr_size], interp_type=types.INTERP_CUBIC, antialias=True)
            lr = fn.resize(hr, size=[lr_size, lr_size], interp_type=types.INTERP_CUBIC, antialias=True)
            norm = dict(mirror=flip, mean=127.5, std=127.5, dtype=types.FLOAT, output_layout="HWC")
            return fn.crop_mirror_normalize(hr, **norm), fn.crop_mirror_normalize(lr, **norm)

        return pipeline()

    def _iterator(self, plans):
        _, _, _, DALIGenericIterator, LastBatchPolicy = self._dali
        pipe = self._pipeline(plans)
        pipe.build()
        return DALIGenericIterator([pipe], ["hr", "lr"], reader_name="Reader",
                                   last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=False)

    def _find_culprits(self, error: Exception, plans) -> list[tuple[int, str]]:
        """Samples to blame for a DALI error: named in its message, else failing a full PIL decode."""
        message = str(error)
        in_flight = {i for plan in plans[:self.prefetch + 2] for i, _, _ in plan}
        named = [(i, "DALI: " + message.strip().splitlines()[-1][:200])
                 for i in sorted(in_flight) if self.samples[i].path in message]
        found = []
        for i in sorted(in_flight):
            try:
                full_decode_check(self.samples[i].path)
            except BadImage as e:
                found.append((i, str(e)))
        blamed = {i for i, _ in found}
        return found + [(i, r) for i, r in named if i not in blamed]

    def __iter__(self):
        epoch, b = self.epoch, self.start_batch
        while b < len(self):
            bad = set(self.runtime_bad)
            plans = [self.plan.batch(epoch, k, bad) for k in range(b, len(self))]
            try:
                iterator = self._iterator(plans)
            except RuntimeError as e:   # prepare_first_batch runs the pipeline already
                self._recover(e, plans)
                continue
            for k, plan in enumerate(plans):
                try:
                    out = next(iterator)[0]
                except StopIteration:
                    raise RuntimeError(f"DALI pipeline ended after {k} of {len(plans)} batches") from None
                except RuntimeError as e:
                    del iterator
                    self._recover(e, plans[k:])   # then rebuild from batch b
                    break
                b += 1
                keep = [j for j, (_, _, kept) in enumerate(plan) if kept]
                hr, lr = out["hr"], out["lr"]                      # (N, H, W, 3) float32
                if len(keep) < len(plan):                           # val/test: drop re-planned bad slots
                    if not keep:
                        continue
                    rows = torch.tensor(keep, device=hr.device)
                    hr, lr = hr.index_select(0, rows), lr.index_select(0, rows)
                yield {"hr": hr.permute(0, 3, 1, 2), "lr": lr.permute(0, 3, 1, 2)}   # channels_last NCHW
            else:
                del iterator
        self._finish_epoch()

    def _recover(self, error: RuntimeError, plans) -> None:
        culprits = self._find_culprits(error, plans)
        if not culprits:
            raise error
        for sample, reason in culprits:
            self.mark_bad(sample, reason)

"""The reference loader: PIL decode, crop and BICUBIC resizes, batched by a torch DataLoader.

It produces what the DALI pipeline produces, sample for sample (same files, order, flips: see
sampling.py), with PIL's BICUBIC, which is the spec's Keys a = -0.5 antialiased filter. It serves
the parity tests and `data.loader: pil`. Workers: `data.num_threads` DataLoader processes (0 =
in the main process).
"""
from __future__ import annotations

import signal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .layouts import BadImage, Sample, SplitIndex
from .sampling import LoaderBase


def load_pair(sample: Sample, hr_size: int, lr_size: int, flip: bool) -> tuple[np.ndarray, np.ndarray]:
    """(HR (hr, hr, 3), LR (lr, lr, 3)) uint8 of one sample: crop, BICUBIC to HR, BICUBIC HR -> LR, flip."""
    x, y, w, h = sample.window
    try:
        with Image.open(sample.path) as im:
            crop = im.convert("RGB").crop((x, y, x + w, y + h))
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        raise BadImage(f"{type(e).__name__}: {e}") from e
    hr = crop.resize((hr_size, hr_size), Image.BICUBIC)
    lr = hr.resize((lr_size, lr_size), Image.BICUBIC)     # LR from the 8-bit HR, as DALI does
    hr_arr, lr_arr = np.asarray(hr), np.asarray(lr)
    if flip:
        hr_arr, lr_arr = hr_arr[:, ::-1], lr_arr[:, ::-1]
    return hr_arr, lr_arr


def to_model_tensor(batch_hwc) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [-1, 1], channels_last (a view of NHWC memory)."""
    t = torch.as_tensor(np.ascontiguousarray(batch_hwc)) if isinstance(batch_hwc, np.ndarray) else batch_hwc
    return t.float().sub_(127.5).div_(127.5).permute(0, 3, 1, 2)


class _Entries(Dataset):
    """Item i of an epoch's flat (sample index, flip) list -> (sample index, HR, LR, error)."""

    def __init__(self, samples: list[Sample], entries: list[tuple[int, bool]], hr_size: int, lr_size: int):
        self.samples, self.entries, self.hr_size, self.lr_size = samples, entries, hr_size, lr_size

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int):
        sample, flip = self.entries[i]
        try:
            hr, lr = load_pair(self.samples[sample], self.hr_size, self.lr_size, flip)
            return sample, hr, lr, None
        except BadImage as e:
            return sample, None, None, str(e)

    def collate(self, items) -> dict:
        """In the worker: one batch as uint8 tensors (shared memory to the main process, 4x less than
        float); a failed item is a zero image plus its error, so positions stay aligned."""
        hr = np.zeros((len(items), self.hr_size, self.hr_size, 3), np.uint8)
        lr = np.zeros((len(items), self.lr_size, self.lr_size, 3), np.uint8)
        for k, (_, h, l, error) in enumerate(items):
            if error is None:
                hr[k], lr[k] = h, l
        return {"samples": [it[0] for it in items], "errors": [it[3] for it in items],
                "hr": torch.from_numpy(hr), "lr": torch.from_numpy(lr)}


def _ignore_shutdown_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM/SIGINT to the training process.

    The deepspeed launcher signals every descendant; a worker that died of it would make the rank
    raise "DataLoader worker killed" instead of finishing its step and saving. The workers still end
    with their parent (the DataLoader's watchdog), so nothing outlives the run.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class PILLoader(LoaderBase):
    """The contract's loader object (see gafh_fast.data), on the CPU."""

    def __init__(self, index: SplitIndex, *, split: str, batch_size: int, hr_size: int, scale: int = 8,
                 rank: int = 0, world_size: int = 1, seed: int = 0, flip: bool = True, num_workers: int = 2):
        super().__init__(index, split=split, batch_size=batch_size, hr_size=hr_size, scale=scale, rank=rank,
                         world_size=world_size, seed=seed, flip=flip)
        self.num_workers = num_workers

    def __iter__(self):
        epoch, bad = self.epoch, set(self.runtime_bad)
        numbers = range(self.start_batch, len(self))
        plans = [self.plan.batch(epoch, b, bad) for b in numbers]
        entries = [(i, f) for batch in plans for i, f, _ in batch]
        bounds = np.cumsum([0] + [len(batch) for batch in plans]).tolist()
        dataset = _Entries(self.samples, entries, self.hr_size, self.lr_size)
        loader = DataLoader(dataset, batch_sampler=[list(range(bounds[k], bounds[k + 1])) for k in range(len(plans))],
                            num_workers=self.num_workers, collate_fn=dataset.collate,
                            worker_init_fn=_ignore_shutdown_signals if self.num_workers > 0 else None)
        for b, plan, batch in zip(numbers, plans, loader):
            while any(e is not None for e in batch["errors"]):
                # a file failed to decode: remember it, re-plan this batch without it, load it here
                for sample, error in zip(batch["samples"], batch["errors"]):
                    if error is not None:
                        self.mark_bad(sample, error)
                plan = self.plan.batch(epoch, b, set(self.runtime_bad))
                redo = _Entries(self.samples, [(i, f) for i, f, _ in plan], self.hr_size, self.lr_size)
                batch = redo.collate([redo[k] for k in range(len(redo))])
            hr, lr = batch["hr"], batch["lr"]                     # (N, H, W, 3) uint8
            keep = [k for k, (_, _, kept) in enumerate(plan) if kept]
            if len(keep) < len(plan):                              # val/test: drop re-planned bad slots
                if not keep:
                    continue
                hr, lr = hr[keep], lr[keep]
            yield {"hr": to_model_tensor(hr), "lr": to_model_tensor(lr)}
        self._finish_epoch()

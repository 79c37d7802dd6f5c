"""Which sample each rank reads, in which order, flipped or not: one rule for the DALI and PIL loaders.

Both loaders take their per-epoch order from this module rather than from a reader's internal
shuffle, so they produce the same samples in the same order (DALI's `random_shuffle` buffer cannot be
reproduced outside DALI). DALI is fed the already-ordered per-rank file list with
`random_shuffle=False`, and its pipeline is rebuilt for each epoch (and for a resume mid-epoch).

train  epoch e: rng = numpy default_rng(data.seed + e); perm = rng.permutation(N); flip = rng.integers(0, 2, N)
       (flip is all False when data.flip is off). Rank r of W takes the contiguous block
       perm[r*(N//W) : (r+1)*(N//W)] (DALI's shard rule with equal shard sizes) and keeps only its
       full batches, so every rank has (N//W)//B batches: the incomplete tail is dropped.
val/   no shuffle, no flip; rank r takes files [r*N//W, (r+1)*N//W) in index order: each file
test   exactly once over the ranks, the last batch may be smaller.

A file that fails to decode at run time (it slipped past the cheap check) is remembered as bad. In
training its slot is filled by the first good sample of the same batch, so batch shapes and the
number of batches stay equal on every rank; in val/test it is dropped. Either way it is counted in
`loader.skipped` and logged once.
"""
from __future__ import annotations

import logging

import numpy as np

from .layouts import SplitIndex

log = logging.getLogger("gafh_fast.data")


class EpochPlan:
    """Per-rank order and flips of a split; pure bookkeeping, no I/O."""

    def __init__(self, num_samples: int, *, train: bool, batch_size: int, rank: int, world_size: int,
                 seed: int, flip: bool):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.n, self.train, self.batch_size = num_samples, train, batch_size
        self.rank, self.world_size, self.seed, self.flip = rank, world_size, seed, flip and train
        if train:
            per_rank = num_samples // world_size
            self.num_batches = per_rank // batch_size
            if self.num_batches == 0:
                raise ValueError(f"the train split has {num_samples} usable files: fewer than one batch of "
                                 f"{batch_size} per rank for {world_size} rank(s)")
            self.rank_samples = self.num_batches * batch_size
        else:
            lo, hi = rank * num_samples // world_size, (rank + 1) * num_samples // world_size
            self._eval_block = np.arange(lo, hi)
            self.rank_samples = hi - lo
            self.num_batches = -(-self.rank_samples // batch_size)
        self._cached_epoch, self._cached_order = None, None

    def order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(sample indices, flip flags) that this rank reads in `epoch`, batch after batch."""
        if not self.train:
            return self._eval_block, np.zeros(self.rank_samples, dtype=bool)
        rng = np.random.default_rng(self.seed + epoch)
        perm = rng.permutation(self.n)
        flips = rng.integers(0, 2, self.n).astype(bool) if self.flip else np.zeros(self.n, dtype=bool)
        per_rank = self.n // self.world_size
        lo = self.rank * per_rank
        return perm[lo:lo + self.rank_samples], flips[lo:lo + self.rank_samples]

    def batch(self, epoch: int, b: int, bad=()) -> list[tuple[int, bool, bool]]:
        """Batch `b` of `epoch` as (sample index, flip, keep) with known-bad samples substituted.

        A bad sample's slot gets the batch's first good sample (with its flip); `keep` is False for
        such slots in val/test, where the user must not see duplicates, and True in training, where
        the duplicate keeps the batch full.
        """
        if not 0 <= b < self.num_batches:
            raise ValueError(f"batch {b} is outside 0..{self.num_batches - 1}")
        if self._cached_epoch != epoch:
            self._cached_order, self._cached_epoch = self.order(epoch), epoch
        indices, flips = self._cached_order
        lo, hi = b * self.batch_size, min((b + 1) * self.batch_size, self.rank_samples)
        entries = list(zip(indices[lo:hi].tolist(), flips[lo:hi].tolist()))
        if not any(i in bad for i, _ in entries):
            return [(i, f, True) for i, f in entries]
        good = [e for e in entries if e[0] not in bad]
        if not good:   # a whole batch of bad files: borrow this rank's first good sample
            first = next((int(i) for i in indices if int(i) not in bad), None)
            if first is None:
                raise RuntimeError("every file of this rank's shard failed to decode")
            good = [(first, False)]
        return [(i, f, True) if i not in bad else (good[0][0], good[0][1], self.train) for i, f in entries]


class LoaderBase:
    """What both loaders share: the contract's set_epoch / len / skipped / num_samples."""

    def __init__(self, index: SplitIndex, *, split: str, batch_size: int, hr_size: int, scale: int,
                 rank: int, world_size: int, seed: int, flip: bool):
        if hr_size % scale:
            raise ValueError(f"data.hr_size={hr_size} is not a multiple of the scale {scale}")
        self.index, self.split = index, split
        self.samples = index.samples
        self.hr_size, self.lr_size = hr_size, hr_size // scale
        self.batch_size = batch_size
        self.plan = EpochPlan(len(index.samples), train=split == "train", batch_size=batch_size, rank=rank,
                              world_size=world_size, seed=seed, flip=flip)
        self.epoch, self.start_batch = 0, 0
        self.runtime_bad: dict[int, str] = {}    # sample index -> reason, found while decoding

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The next iteration is epoch `epoch`'s order, from batch `start_batch` (exact resume)."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch {start_batch} is outside 0..{len(self)}")
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def _finish_epoch(self) -> None:
        # iterating again without set_epoch moves on to the next epoch's shuffle
        self.epoch, self.start_batch = self.epoch + 1, 0

    def mark_bad(self, sample: int, reason: str) -> None:
        if sample not in self.runtime_bad:
            self.runtime_bad[sample] = reason
            log.warning("skipping bad file %s (failed to decode: %s)", self.samples[sample].path, reason)

    def __len__(self) -> int:
        return self.plan.num_batches

    @property
    def skipped(self) -> int:
        """Bad files skipped: by the indexing check plus those that failed to decode since."""
        return len(self.index.skipped) + len(self.runtime_bad)

    @property
    def num_samples(self) -> int:
        """Files this rank reads per epoch (train: its full batches only)."""
        return self.plan.rank_samples

"""Data: CelebA (aligned, in the wild) or a folder of images -> batches of HR / LR faces.

    loader = build_loader(cfg, "train", rank, world_size)
    loader.set_epoch(epoch, start_batch=0)
    for batch in loader:   # {"hr": (N, 3, H, W), "lr": (N, 3, H/8, W/8)}, float32 in [-1, 1], channels_last
        ...

`data.loader: dali` (dali.py; GPU decode when torch sees a GPU, CPU-only otherwise) or `pil` (pil.py,
the reference). Both follow one order/shard/flip rule (sampling.py) and give the same samples. Layouts
and splits: layouts.py. Synthetic faces: synthetic.py.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from .layouts import LayoutError, index_split
from .sampling import LoaderBase
from .synthetic import make_synthetic_celeba

__all__ = ["build_loader", "resolve_root", "make_synthetic_celeba", "LayoutError"]
log = logging.getLogger("gafh_fast.data")
_DONE_MARKER = ".complete"


def resolve_root(cfg) -> Path:
    """cfg.data.root (with ~ expanded); else a cached synthetic set when data.synthetic_count > 0.

    The synthetic set is written to a private temporary folder and renamed into place, so another
    rank or process never sees half a set; when two race, the loser deletes its copy and uses the
    winner's (the sets are identical: they depend only on count and seed).
    """
    data = cfg.data
    if data.root:
        return Path(data.root).expanduser()
    if data.synthetic_count <= 0:
        raise LayoutError("data.root is not set: set data.root=/path/to/celeba (or to a folder of images "
                          "with data.layout=folder), or data.synthetic_count=N for N generated faces")
    if data.layout != "celeba_aligned":
        raise LayoutError(f"synthetic faces are written in the celeba_aligned layout, but data.layout={data.layout}")
    cache = Path.home() / ".cache" / "gafh_fast"
    final = cache / f"synthetic-{data.synthetic_count}-{data.seed}"
    if (final / _DONE_MARKER).exists():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=cache))
    try:
        log.info("generating %d synthetic faces (seed %d) into %s", data.synthetic_count, data.seed, final)
        make_synthetic_celeba(tmp, data.synthetic_count, data.seed)
        (tmp / _DONE_MARKER).write_text("")
        os.chmod(tmp, 0o755)                           # mkdtemp made it private; the set is not
        try:
            os.rename(tmp, final)                      # atomic; fails if another process got there first
        except OSError:
            if not (final / _DONE_MARKER).exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def build_loader(cfg, split: str, rank: int = 0, world_size: int = 1) -> LoaderBase:
    """The loader of `split` ("train" | "val" | "test") for this rank; see the module docstring."""
    data = cfg.data
    index = index_split(resolve_root(cfg), data.layout, data.split, split, seed=data.seed,
                        num_threads=data.num_threads)
    common = dict(split=split, batch_size=data.batch_size if split == "train" else data.val_batch_size,
                  hr_size=data.hr_size, scale=cfg.model.scale, rank=rank, world_size=world_size,
                  seed=data.seed, flip=data.flip)
    if data.loader == "dali":
        from .dali import DALILoader   # raises DALIUnavailableError (no silent fallback to PIL)
        return DALILoader(index, num_threads=data.num_threads, **common)
    if data.loader == "pil":
        from .pil import PILLoader
        return PILLoader(index, num_workers=data.num_threads, **common)
    raise ValueError(f"data.loader must be 'dali' or 'pil', got {data.loader!r}")

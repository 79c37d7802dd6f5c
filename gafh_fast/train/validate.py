"""Validation: PSNR/SSIM (RGB, and Y with a border crop) of G and of bicubic on the same LR, plus a grid.

Every rank scores its shard of the validation split; per-image sums are all-reduced, so the numbers
are over the whole split whatever the world size. Rank 0 draws the grid LR | bicubic | HF | HR from
the first faces of its shard (the val loader does not shuffle, so they are the same faces each time).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

from gafh_fast.metrics import SCORE_KEYS, bicubic_upsample, score_images
from gafh_fast.train.layout import to_activation_layout

def save_grid(rows: list[tuple[torch.Tensor, ...]], path: Path) -> None:
    """rows of (LR, bicubic, HF, HR) images (3, H, W) in [0, 1], LR shown nearest-upsampled."""
    tiles = []
    for lr, bic, hf, hr in rows:
        lr_big = F.interpolate(lr[None], size=hr.shape[-2:], mode="nearest")[0]
        tiles.append(torch.cat([lr_big, bic, hf, hr], dim=2))  # (3, H, 4W)
    grid = torch.cat(tiles, dim=1).clamp(0, 1)  # (3, rows*H, 4W)
    array = (grid.permute(1, 2, 0).float().numpy() * 255.0).round().astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    Image.fromarray(array).save(tmp)
    tmp.replace(path)


@torch.no_grad()
def validate(model: torch.nn.Module, loader: Iterable[dict], *, device: torch.device, crop_border: int,
             max_images: int = 0, grid_images: int = 8, grid_path: Optional[Path] = None,
             channels_last: bool = False) -> dict:
    """Returns {"g_psnr_rgb", ..., "bicubic_ssim_y", "images"} over the (sharded) split."""
    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    per_rank_cap = -(-max_images // world) if max_images else None
    sums = torch.zeros(2 * len(SCORE_KEYS) + 1, dtype=torch.float64)
    grid_rows: list[tuple[torch.Tensor, ...]] = []
    seen = 0
    for batch in loader:
        lr, hr = batch["lr"].to(device).float(), batch["hr"].to(device).float()
        if per_rank_cap is not None:
            lr, hr = lr[: per_rank_cap - seen], hr[: per_rank_cap - seen]
        if lr.shape[0] == 0:
            break
        hf = model(to_activation_layout(lr.to(dtype), channels_last)).float()
        bic = bicubic_upsample(lr, scale=hr.shape[-1] // lr.shape[-1])
        to01 = lambda t: ((t + 1.0) * 0.5).clamp(0, 1)  # noqa: E731
        hr01, hf01, bic01 = to01(hr), to01(hf), to01(bic)
        per_method = [score_images(x01, hr01, crop_border) for x01 in (hf01, bic01)]
        scores = [m[k] for m in per_method for k in SCORE_KEYS]
        sums[:-1] += torch.stack([s.double().sum().cpu() for s in scores])
        sums[-1] += lr.shape[0]
        seen += lr.shape[0]
        for i in range(min(grid_images - len(grid_rows), lr.shape[0])):
            grid_rows.append(tuple(t[i].cpu() for t in (to01(lr), bic01, hf01, hr01)))
        if per_rank_cap is not None and seen >= per_rank_cap:
            break
    if world > 1:
        backend_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
        reduced = sums.to(backend_device)
        dist.all_reduce(reduced)
        sums = reduced.cpu()
    count = max(sums[-1].item(), 1.0)
    names = [f"g_{k}" for k in SCORE_KEYS] + [f"bicubic_{k}" for k in SCORE_KEYS]
    result = {name: sums[i].item() / count for i, name in enumerate(names)}
    result["images"] = int(sums[-1].item())
    if rank == 0 and grid_path is not None and grid_rows:
        save_grid(grid_rows, grid_path)
    model.train(was_training)
    return result

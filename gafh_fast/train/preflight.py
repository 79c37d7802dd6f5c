"""Checks that need no model, run before any model or engine is built, so a wrong path costs seconds.

Each failure is a `UsageError` with one line a user can act on; `launch/train.py` prints it on rank 0
without a traceback and exits with code 2 (the same contract as `launch/infer.py`).
"""
from __future__ import annotations

import torch

from gafh_fast.config import Config
from gafh_fast.data import LayoutError, resolve_root
from gafh_fast.data.layouts import split_names
from gafh_fast.models.vgg import check_torchvision_state, find_vgg19_weights

EXIT_USAGE = 2


class UsageError(RuntimeError):
    """A config, data-root or weights problem found before anything was built."""


def check_data(cfg: Config) -> None:
    """data.root (or the synthetic set) holds the layout's files and non-empty train and val splits.
    Listing names is cheap; the per-file checks happen when the loaders index the splits."""
    d = cfg.data
    try:
        root = resolve_root(cfg)
        for which in ("train", "val"):
            _, names = split_names(root, d.layout, d.split, which, d.seed)
            if not names:
                raise LayoutError(f"the {which} split of data.root={root} (layout {d.layout}, split {d.split}) is empty")
    except LayoutError as e:
        raise UsageError(str(e)) from None


def check_weights(cfg: Config) -> None:
    """The content loss's VGG-19 weights exist and are a torchvision VGG-19 state dict up to the layer
    used. The file is memory-mapped, so this reads its index, not its 550 MB."""
    content = cfg.train.content
    if not content.pretrained:
        return
    try:
        path = find_vgg19_weights(content.weights)
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        check_torchvision_state(state, content.layer, source=str(path))
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    except Exception as e:  # not a zip/pickle torch file, or the wrong network
        raise UsageError(f"train.content.weights: {path} is not a usable VGG-19 state dict ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None


def preflight(cfg: Config, *, data: bool = True) -> None:
    """Every check that needs no model; `data=False` when the caller brings its own loaders."""
    check_weights(cfg)
    if data:
        check_data(cfg)

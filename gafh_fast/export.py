"""The exported generator: a safetensors file of G's weights (no optimizer state) plus its config.

The model config travels inside the file (safetensors metadata), so inference builds exactly the
network that was trained and a mismatch is caught before any image is processed.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Union

import torch
from safetensors.torch import load_file, safe_open, save_file

from gafh_fast.config import Config, config_from_dict
from gafh_fast.models import Generator, build_generator


def save_generator(generator: torch.nn.Module, cfg: Config, path: Union[str, Path]) -> Path:
    """Write G's state dict (fp32, contiguous) and `cfg` to `path` atomically (tmp name + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous().cpu() if v.is_floating_point() else v.detach().contiguous().cpu()
             for k, v in generator.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={"format": "gafh_fast.generator.v1", "config": json.dumps(cfg.to_dict())})
    tmp.replace(path)
    return path


def read_generator_config(path: Union[str, Path]) -> Config:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "gafh_fast.generator.v1" or "config" not in meta:
        raise ValueError(f"{path} is not a gafh_fast generator export (no gafh_fast config in its metadata)")
    return config_from_dict(json.loads(meta["config"]), source=str(path))


def load_state_strict(module: torch.nn.Module, state: dict, source: str) -> None:
    """load_state_dict that names the first missing, unexpected or mis-shaped tensor and both shapes."""
    own = module.state_dict()
    for key, ref in own.items():
        if key not in state:
            raise ValueError(f"{source}: tensor {key!r} (shape {tuple(ref.shape)}) is missing from the file")
        if tuple(state[key].shape) != tuple(ref.shape):
            raise ValueError(f"{source}: tensor {key!r} has shape {tuple(state[key].shape)} in the file "
                             f"but {tuple(ref.shape)} in the model")
    extra = sorted(set(state) - set(own))
    if extra:
        raise ValueError(f"{source}: unexpected tensor {extra[0]!r} (shape {tuple(state[extra[0]].shape)}) "
                         "in the file; the model has no such parameter")
    module.load_state_dict(state)


def load_generator(path: Union[str, Path], cfg: Config | None = None, device="cpu") -> tuple[Generator, Config]:
    """Build G from the file's config (or `cfg`, which must then fit the weights) and load them, in eval mode."""
    file_cfg = read_generator_config(path)
    cfg = cfg or file_cfg
    generator = build_generator(cfg)
    load_state_strict(generator, load_file(str(path)), str(path))
    return generator.to(device).eval(), cfg

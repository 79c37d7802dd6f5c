"""Checkpoints: both DeepSpeed engines + our own state, written so that a half-written one is never resumed.

Layout of one checkpoint, run_dir/checkpoints/step_00001000/:
    generator/, discriminator/   DeepSpeed's save_checkpoint (module, optimizer, LR schedule) per engine
    trainer_state.pt             step, epoch, batch position in the epoch, NaN-skip count, EMA weights,
                                 the world size that wrote it
    rng_rank00000.pt, ...        python / numpy / torch (+ CUDA) RNG states of each rank
    config.yaml                  the run's config
    generator.safetensors        the exported generator (EMA weights when EMA is on), no optimizer state
    COMPLETE                     written last; a directory without it is never picked by resume
run_dir/checkpoints/latest holds the newest complete tag (a convenience; resume scans for COMPLETE).

A checkpoint resumes only on the world size that wrote it (`check_world_size`, before any model is
built): ZeRO-1/2 optimizer partitions, the RNG files and the data position (`batch_in_epoch` counts
per-rank batches of a rank-sharded epoch) are all per rank, and re-sharding them is not implemented.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from gafh_fast.config import Config, save_config
from gafh_fast.export import save_generator
from gafh_fast.train.preflight import UsageError

MARKER = "COMPLETE"
_TAG = re.compile(r"^step_(\d+)$")


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint directories that carry the completion marker, oldest first."""
    root = checkpoint_root(run_dir)
    found = []
    if root.is_dir():
        for d in root.iterdir():
            m = _TAG.match(d.name)
            if m and (d / MARKER).is_file():
                found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def resolve_resume(resume: str, run_dir: Path) -> Optional[Path]:
    """`auto`: the newest complete checkpoint of run_dir (None if there is none); `none`; or a path."""
    if resume == "none":
        return None
    if resume == "auto":
        done = complete_checkpoints(run_dir)
        return done[-1] if done else None
    path = Path(resume)
    if not (path / MARKER).is_file():
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint (no {MARKER} marker in it)")
    return path


class WorldSizeMismatch(UsageError):
    """A checkpoint written by another number of ranks than this run has."""


def saved_world_size(path: Path) -> int:
    """The world size that wrote a checkpoint: recorded in trainer_state.pt, or (checkpoints written
    before it was recorded) the number of per-rank RNG files."""
    state = torch.load(Path(path) / "trainer_state.pt", map_location="cpu", weights_only=False)
    return state.get("world_size") or len(list(Path(path).glob("rng_rank*.pt")))


def check_world_size(path: Optional[Path], world_size: int) -> None:
    """Refuse, in one line, to resume a checkpoint on another world size than the one that wrote it."""
    if path is None:
        return
    saved = saved_world_size(path)
    if saved != world_size:
        raise WorldSizeMismatch(
            f"cannot resume {path}: it was written by {saved} rank(s) and this run has {world_size}; resuming on "
            "another world size is not supported (ZeRO optimizer partitions, RNG states and the data position are "
            f"per rank): run on {saved} rank(s), or start fresh with --resume none")


def save_checkpoint(run_dir: Path, cfg: Config, step: int, g_engine, d_engine, trainer_state: dict,
                    export_model: torch.nn.Module, keep: int) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    path = checkpoint_root(run_dir) / f"step_{step:08d}"
    if rank == 0 and path.exists():  # a leftover from a run killed mid-write at this very step
        shutil.rmtree(path)
    _barrier()
    g_engine.save_checkpoint(str(path), tag="generator", save_latest=False)
    d_engine.save_checkpoint(str(path), tag="discriminator", save_latest=False)
    torch.save(rng_state(), path / f"rng_rank{rank:05d}.pt")
    if rank == 0:
        world = dist.get_world_size() if dist.is_initialized() else 1
        torch.save({**trainer_state, "world_size": world}, path / "trainer_state.pt")
        save_config(cfg, path / "config.yaml")
        save_generator(export_model, cfg, path / "generator.safetensors")
    _barrier()  # every rank's files are on disk before the marker says so
    if rank == 0:
        _write_atomic(path / MARKER, f"{step}\n")
        _write_atomic(checkpoint_root(run_dir) / "latest", path.name + "\n")
        shutil.copyfile(path / "generator.safetensors", Path(run_dir) / "generator.safetensors.tmp")
        (Path(run_dir) / "generator.safetensors.tmp").replace(Path(run_dir) / "generator.safetensors")
        for old in complete_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return path


def load_checkpoint(path: Path, g_engine, d_engine) -> dict:
    """Restore both engines and this rank's RNG; returns the trainer state saved with them."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    for engine, tag in ((g_engine, "generator"), (d_engine, "discriminator")):
        loaded, _ = engine.load_checkpoint(str(path), tag=tag)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load {path / tag}")
    # our own files hold numpy/python RNG tuples, hence weights_only=False (files this code wrote)
    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    rng_file = path / f"rng_rank{rank:05d}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
    return state

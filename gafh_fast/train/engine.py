"""The two DeepSpeed engines, G and D, each built from its own config dict generated from our YAML.

DeepSpeed asserts when a config dict and a `deepspeed_config` argument are both given, so the dict is
the only config path. The optimizer is torch Adam (GatedAdam, gafh_fast/train/optim.py: fused by
default, `train.adam_impl`) passed as DeepSpeed's client optimizer: with ZeRO 0/1/2 DeepSpeed wraps it
(flat fp32 master partitions under ZeRO, bf16 master copies under bf16) but the update is element-wise
torch Adam, which is what makes the trainer equal the plain-PyTorch reference loop in tests/test_train.py.

No host sync inside engine.step() (see gafh_fast/train/step.py): DeepSpeed's gradient-norm and
overflow checks read values back to the host, so they are off (`compute_grad_norm`,
`bf16.check_grad_overflow`) and GatedAdam does the clipping and the NaN veto on the device; its
throughput timer synchronizes the device at every forward and step, so it is off too. bf16 with
zero_stage 0 is the exception: DeepSpeed's FP16_UnfusedOptimizer then reads the norm and an overflow
flag in every step, and 0.19.8 has no switch for it.
"""
from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gafh_fast.config import Config
from gafh_fast.train.optim import GatedAdam


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> DistInfo:
    """Join the process group that the launcher described (deepspeed, torchrun: env://), or make a
    one-process group when started as plain `python` so that the same code path runs everywhere."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:  # plain `python launch/train.py`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    accel = get_accelerator()
    if accel.device_name() == "cuda":
        accel.set_device(local_rank)
    deepspeed.init_distributed(dist_backend=accel.communication_backend_name(), verbose=False)
    device = torch.device(accel.device_name(local_rank)) if accel.device_name() == "cuda" else torch.device("cpu")
    rank = int(os.environ["RANK"])
    if device.type == "cpu":
        unlink_shm_allreduce_buffer(rank)
    return DistInfo(rank, int(os.environ["WORLD_SIZE"]), local_rank, device)


def shm_allreduce_buffer(rank: int) -> str:
    """The shared-memory file of DeepSpeed's CPU all-reduce for this process group and rank
    (deepspeed/ops/csrc/cpu/comm/shm.cpp: SHM_BUFFER_NAME_{uid}_{MASTER_ADDR}_{MASTER_PORT}_{rank})."""
    return (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_"
            f"{os.environ['MASTER_PORT']}_{rank}")


def unlink_shm_allreduce_buffer(rank: int) -> None:
    """DeepSpeed's CPU communication backend maps a 69 MB shared-memory buffer per rank at init and never
    unlinks it, so every CPU run left 69 MB of RAM per rank in /dev/shm (the test suite ~1.3 GB; 19 GB
    piled up on a development machine, and the OOM killer took a test's rank). Each rank opens every
    peer's buffer inside init; after a barrier all have, so the name can go: the mappings stay valid
    until the processes exit, and then the memory is freed, after a kill -9 too."""
    dist.barrier()
    try:
        os.unlink(shm_allreduce_buffer(rank))
    except FileNotFoundError:  # a DeepSpeed build without the shm op (or one that cleans up itself)
        pass


def deepspeed_config(cfg: Config) -> dict:
    """DeepSpeed's config dict from our `deepspeed` and `train` sections (the same shape for G and D)."""
    ds = cfg.deepspeed
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": ds.gradient_accumulation_steps,
        "gradient_clipping": 0.0,  # GatedAdam clips on the device (DeepSpeed's reads the norm)
        "steps_per_print": ds.steps_per_print or 10**12,
        "bf16": {"enabled": ds.bf16, **({"check_grad_overflow": False} if ds.bf16 else {})},
        # DeepSpeed casts parameters but not buffers; BatchNorm wants its running stats in the
        # parameters' dtype, so they follow into bf16.
        **({"data_types": {"buffer_dtype": "bf16"}} if ds.bf16 else {}),
        # the norm is unused (GatedAdam clips) and fp32's overflow test reads it on the host;
        # compute_grad_norm exists for stages 1 and 2 only (DeepSpeed refuses it on stage 0)
        "zero_optimization": {"stage": ds.zero_stage, **({"compute_grad_norm": False} if ds.zero_stage else {})},
        "zero_allow_untested_optimizer": True,  # torch Adam as the client optimizer under ZeRO
        "wall_clock_breakdown": False,
        "timers": {"throughput": {"enabled": False}},  # it synchronizes the device every forward/step
    }


def lr_lambda(cfg: Config):
    """LR multiplier per optimizer step: linear warm-up, then constant | cosine (to 0 at max_steps)
    | multistep (halves at each of train.lr_milestones)."""
    t = cfg.train

    def factor(step: int) -> float:
        if t.warmup_steps and step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.lr_schedule == "cosine":
            span = max(1, t.max_steps - t.warmup_steps)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - t.warmup_steps) / span)))
        if t.lr_schedule == "multistep":
            return 0.5 ** sum(step >= m for m in t.lr_milestones)
        return 1.0

    return factor


def build_optimizer(cfg: Config, params, lr: float) -> GatedAdam:
    """torch Adam(lr, betas, weight_decay) in the configured implementation, clipping at train.grad_clip.
    One param group: ZeRO steps the client optimizer once per group, so a clip norm over several
    groups would see one group at a time."""
    return GatedAdam(params, impl=cfg.train.adam_impl, max_grad_norm=cfg.train.grad_clip, lr=lr,
                     betas=tuple(cfg.train.betas), weight_decay=cfg.train.weight_decay)


def gated_optimizer(engine) -> GatedAdam:
    """The GatedAdam inside an engine (DeepSpeed keeps the client optimizer as basic_optimizer)."""
    optimizer = getattr(engine, "basic_optimizer", None) or engine.optimizer
    if not isinstance(optimizer, GatedAdam):
        raise TypeError(f"train_step needs engines whose optimizer is GatedAdam (engine.build_optimizer), "
                        f"got {type(optimizer).__name__}")
    return optimizer


def build_engine(cfg: Config, module: torch.nn.Module, lr: float):
    """One DeepSpeed engine around `module` with GatedAdam and the LR schedule."""
    import deepspeed

    optimizer = build_optimizer(cfg, module.parameters(), lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg))
    optimizer.partitioned = cfg.deepspeed.zero_stage in (1, 2)
    return engine


def build_engines(cfg: Config, generator: torch.nn.Module, discriminator: torch.nn.Module):
    """(G engine, D engine). Each has its own optimizer, schedule and gradient buffers."""
    return build_engine(cfg, generator, cfg.train.lr_g), build_engine(cfg, discriminator, cfg.train.lr_d)

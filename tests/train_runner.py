"""Test helper: run the library's Trainer on deterministic in-memory data, in-process or as a script.

As a script (under `deepspeed`, `torchrun` or plain python):
    python tests/train_runner.py RUN_DIR [--kill-at K] [--sigterm-at K] [--nan-at K] [--input-dependent-d] [override ...]
It records, per step, the losses, a flat copy of G's and D's parameters and of their optimizer states, the
gradient each optimizer stepped with and D's logits into RUN_DIR/trace_rank{R}.pt, so tests can compare
runs step by step.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import random
import signal
import sys
from pathlib import Path

import numpy as np
import torch

from gafh_fast.config import Config, load_config
from gafh_fast.resize import bicubic_resize

TINY = (
    "model.generator.nf=8", "model.generator.gc=4", "model.generator.num_dnb=1",
    "model.generator.ridb_per_dnb=1", "model.generator.idb_per_ridb=2",
    "model.generator.sfm_kernel=3", "model.generator.out_kernel=3",
    "model.discriminator.nf=4", "model.discriminator.dense=8",
    "data.hr_size=32", "data.batch_size=2", "train.content.pretrained=false", "train.content.layer=relu1_2",
    "kernels=torch", "deepspeed.bf16=false", "train.log_every=1", "train.checkpoint_every=0",
    "val.every=0", "val.crop_border=2", "val.grid_images=2", "train.max_steps=3",
)


def tiny_config(*overrides: str) -> Config:
    return load_config(None, TINY + tuple(overrides))


def make_batch(cfg: Config, epoch: int, index: int, count: int) -> dict:
    """A deterministic batch of `count` smooth random images (seeded by epoch and index)."""
    g = torch.Generator().manual_seed(1000 * epoch + index + 7)
    s = cfg.data.hr_size
    coarse = torch.rand(count, 3, s // 4, s // 4, generator=g) * 2 - 1
    hr = bicubic_resize(coarse, (s, s)).clamp(-1, 1)
    return {"hr": hr, "lr": bicubic_resize(hr, (s // 8, s // 8))}


class SyntheticLoader:
    """The data-loader contract (set_epoch, len, rank sharding) over generated tensors: each step's
    global batch is batch_size * world_size images, and rank r gets the r-th slice, so a world-1 run
    with batch_size * world_size sees the concatenation of every rank's batch."""

    def __init__(self, cfg: Config, rank: int = 0, world_size: int = 1, batches: int = 4, nan_at: int = -1,
                 nan_from: int = -1):
        self.cfg, self.rank, self.world, self.batches, self.nan_at = cfg, rank, world_size, batches, nan_at
        self.nan_from = nan_from
        self.epoch, self.start = 0, 0
        self.served = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start = epoch, start_batch

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        b = self.cfg.data.batch_size
        for i in range(self.start, self.batches):
            full = make_batch(self.cfg, self.epoch, i, b * self.world)
            batch = {k: v[self.rank * b:(self.rank + 1) * b].contiguous() for k, v in full.items()}
            if self.served == self.nan_at or 0 <= self.nan_from <= self.served:
                batch["hr"][0, 0, 0, 0] = float("nan")
            self.served += 1
            yield batch


def val_batches(cfg: Config, count: int = 4) -> list[dict]:
    return [make_batch(cfg, 10_000, 0, count)]


def flat_params(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten().cpu() for p in module.parameters()])


def flat_optimizer_state(engine) -> torch.Tensor:
    """Everything the optimizer steps with: its parameters (DeepSpeed's fp32 master copy under ZeRO) and
    its per-parameter state (Adam's step, exp_avg, exp_avg_sq), flattened in a fixed order."""
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    parts = []
    for group in base.param_groups:
        for p in group["params"]:
            parts.append(p.detach().float().flatten().cpu())
            for key in sorted(base.state.get(p, {})):
                value = base.state[p][key]
                parts.append(torch.as_tensor(value).detach().float().flatten().cpu())
    return torch.cat(parts)


def jsonl(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl records."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch Adam inside a DeepSpeed engine (ZeRO and bf16 wrap it; stage 0 fp32 uses it as is)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def optimizer_tensors(engine) -> list[dict]:
    """Per parameter the optimizer steps (DeepSpeed's flat fp32 partition under ZeRO / bf16): a copy of
    it and of its Adam state, in param-group order; what an Adam step can be replayed from."""
    base = base_optimizer(engine)
    return [{"param": p.detach().clone(), **{k: torch.as_tensor(v).detach().clone() for k, v in base.state.get(p, {}).items()}}
            for group in base.param_groups for p in group["params"]]


def flat_grads(engine) -> torch.Tensor:
    """The gradients the optimizer is about to step with, flattened in param-group order."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().flatten()
                      for group in base_optimizer(engine).param_groups for p in group["params"]])


def adam_hparams(engine) -> dict:
    """The constructor arguments of the engine's torch Adam as its first param group holds them now."""
    group = base_optimizer(engine).param_groups[0]
    return {k: group[k] for k in inspect.signature(torch.optim.Adam).parameters if k in group and k != "params"}


def input_dependent_d(discriminator: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Re-initialise D so its logits depend on the input (test-only). With PyTorch's default init the
    tiny D's signal shrinks layer by layer and every image gets nearly the same logit (-0.035078 +-
    1e-5), so a local and a gathered relativistic mean would agree to ~3e-8 and a missing gather could
    not be seen. Kaiming-normal for LeakyReLU(0.2), fan_in, zero bias keeps the signal's scale."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in discriminator.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                std = (2.0 / (1 + 0.2**2) / m.weight[0].numel()) ** 0.5
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * std)
                m.bias.zero_()
    return discriminator


def build_test_models(cfg: Config, d_init: str = "default"):
    """The trainer's build_models, with D re-initialised by `input_dependent_d` when d_init='input_dependent'."""
    from gafh_fast.train import build_models  # the package's name: run() swaps the trainer module's own

    G, D, vgg = build_models(cfg)
    return G, (input_dependent_d(D) if d_init == "input_dependent" else D), vgg


def _flat_ema(trainer) -> torch.Tensor:
    return flat_params(trainer.ema.module) if trainer.ema is not None else torch.empty(0)


def run(cfg: Config, run_dir, *, resume="auto", kill_at=-1, sigterm_at=-1, nan_at=-1, nan_from=-1, rank=0, world=1,
        d_init="default"):
    """Run the Trainer with a tracing step; returns (trainer, metrics, trace)."""
    import gafh_fast.train.step as step_module
    import gafh_fast.train.trainer as trainer_module

    real_step, real_build, real_d_loss = trainer_module.train_step, trainer_module.build_models, step_module.ragan_d_loss
    trace = {"step": [], "losses": [], "g": [], "d": [], "skipped": [], "opt_g": [], "opt_d": [], "start": None,
             "batch": [], "grad_g": [], "grad_d": [], "logits": [], "opt_state_g": [], "opt_state_d": [], "rng_draws": []}
    holder = {}

    def traced_d_loss(c_real, c_fake, **kwargs):  # this rank's logits of the D step
        trace["logits"].append((c_real.detach().clone(), c_fake.detach().clone()))
        return real_d_loss(c_real, c_fake, **kwargs)

    def record_step(key, engine):  # before each optimizer step: its gradient and hyperparameters
        trace["grad_" + key].append(flat_grads(engine))
        trace.setdefault("hparams_" + key, []).append(adam_hparams(engine))

    def hook_optimizers(trainer):
        for key, engine in (("g", trainer.g_engine), ("d", trainer.d_engine)):
            base_optimizer(engine).register_step_pre_hook(
                lambda opt, args, kwargs, key=key, engine=engine: record_step(key, engine))

    def traced_step(cfg_, g_engine, d_engine, *args, **kwargs):
        if trace["start"] is None:  # the state this run starts from (fresh or restored from a checkpoint)
            trace["start"] = {"g": flat_params(g_engine.module), "d": flat_params(d_engine.module),
                              "opt_g": flat_optimizer_state(g_engine), "opt_d": flat_optimizer_state(d_engine),
                              "rng": torch.get_rng_state(), "ema": _flat_ema(holder["trainer"]),
                              "opt_state_g": optimizer_tensors(g_engine), "opt_state_d": optimizer_tensors(d_engine)}
            hook_optimizers(holder["trainer"])
        # a draw from each global RNG, as dropout or an augmentation would take: makes their restore visible
        trace["rng_draws"].append(torch.tensor([torch.rand(1).item(), random.random(), np.random.rand()], dtype=torch.float64))
        hr = args[1]  # train_step(cfg, g_engine, d_engine, vgg, hr, lr, ...)
        trace["batch"].append(hr.double().sum().item())  # which data this step saw (resume position)
        out = real_step(cfg_, g_engine, d_engine, *args, **kwargs)
        step = holder["trainer"].step + 1  # the trainer increments after the step returns
        trace["step"].append(step)
        losses, skipped = out.read()  # a device sync the trainer itself does not do (test instrumentation)
        trace["losses"].append(losses)
        trace["skipped"].append(skipped)
        trace["g"].append(flat_params(g_engine.module))
        trace["d"].append(flat_params(d_engine.module))
        trace["opt_g"].append(flat_optimizer_state(g_engine))
        trace["opt_d"].append(flat_optimizer_state(d_engine))
        trace["opt_state_g"].append(optimizer_tensors(g_engine))
        trace["opt_state_d"].append(optimizer_tensors(d_engine))
        trace.setdefault("rng", []).append(torch.get_rng_state())
        trace.setdefault("ema", []).append(_flat_ema(holder["trainer"]))
        if holder.get("trace_path") is not None:  # written every step, so a kill -9 leaves what ran
            torch.save(trace, holder["trace_path"])
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # kill -9 between checkpoints
        if step == sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    trainer_module.train_step, step_module.ragan_d_loss = traced_step, traced_d_loss
    trainer_module.build_models = lambda cfg_: build_test_models(cfg_, d_init)
    holder["trace_path"] = Path(run_dir) / f"partial_trace_rank{int(os.environ.get('RANK', rank))}.pt" if kill_at > 0 else None
    try:
        rank = int(os.environ.get("RANK", rank))
        world = int(os.environ.get("WORLD_SIZE", world))
        trainer = trainer_module.Trainer(cfg, run_dir, resume=resume,
                                         train_loader=SyntheticLoader(cfg, rank, world, nan_at=nan_at, nan_from=nan_from),
                                         val_loader=val_batches(cfg))
        holder["trainer"] = trainer
        metrics = trainer.fit()
    finally:
        trainer_module.train_step, trainer_module.build_models, step_module.ragan_d_loss = real_step, real_build, real_d_loss
    return trainer, metrics, trace


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--resume", default="auto")
    parser.add_argument("--kill-at", type=int, default=-1)
    parser.add_argument("--sigterm-at", type=int, default=-1)
    parser.add_argument("--nan-at", type=int, default=-1)
    parser.add_argument("--local_rank", type=int, default=None)
    parser.add_argument("--input-dependent-d", action="store_true", help="D re-initialised by input_dependent_d")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    cfg = tiny_config(*args.overrides)
    trainer, metrics, trace = run(cfg, args.run_dir, resume=args.resume, kill_at=args.kill_at,
                                  sigterm_at=args.sigterm_at, nan_at=args.nan_at,
                                  d_init="input_dependent" if args.input_dependent_d else "default")
    torch.save({**trace, "final_step": trainer.step}, Path(args.run_dir) / f"trace_rank{trainer.rank}.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main())

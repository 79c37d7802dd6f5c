"""The training loop: engines, data, the step, EMA, validation, checkpoints, logging, signals.

`Trainer(cfg, run_dir).fit()` runs under the deepspeed launcher, under torchrun, or as one plain
process. `max_steps` counts iterations (one batch per rank each); with gradient accumulation the
optimizers step every `deepspeed.gradient_accumulation_steps` iterations.
"""
from __future__ import annotations

import itertools
import logging
import random
import signal
import time
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist

from gafh_fast.config import Config, save_config
from gafh_fast.flops import peak_bf16_tflops, step_flops_per_image
from gafh_fast.models import build_discriminator, build_generator, build_vgg
from gafh_fast.models.generator import precompile_node_first
from gafh_fast.ops import wants_precompile
from gafh_fast.train.checkpoint import check_world_size, load_checkpoint, resolve_resume, save_checkpoint
from gafh_fast.train.compile import TrainCompiler, eager
from gafh_fast.train.determinism import make_deterministic
from gafh_fast.train.ema import EMA
from gafh_fast.train.engine import build_engines, init_distributed
from gafh_fast.train.layout import to_activation_layout, use_channels_last
from gafh_fast.train.preflight import preflight
from gafh_fast.train.logging import TrainLogger
from gafh_fast.train.step import StepWindow, train_step
from gafh_fast.train.validate import validate

log = logging.getLogger("gafh_fast")


class TrainingAborted(RuntimeError):
    """Too many consecutive non-finite steps."""


def build_models(cfg: Config):
    """G, D and VGG from cfg.seed, always in this order (the reference loop in the tests relies on it)."""
    torch.manual_seed(cfg.seed)
    return build_generator(cfg), build_discriminator(cfg), build_vgg(cfg)


def _average_buffers(module: torch.nn.Module) -> None:
    """BatchNorm running stats drift apart across ranks (DeepSpeed syncs gradients, not buffers);
    average them before they are used (validation) or saved, so every rank holds the same model."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    for buf in module.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf)
            buf.div_(dist.get_world_size())


def check_replicas_identical(*modules: torch.nn.Module) -> str:
    """Data parallelism keeps every rank's parameters bitwise equal; check it (at each checkpoint) by
    comparing per-rank float64 checksums, and raise if they drifted. Returns a line for the log."""
    values = [p.detach().double() for m in modules for p in m.parameters()]
    local = torch.stack([sum(v.sum() for v in values), sum((v * v).sum() for v in values)])
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        return "parameter checksum %.17g (one rank)" % local[0].item()
    device = values[0].device if dist.get_backend() == "nccl" else torch.device("cpu")
    gathered = [torch.empty(2, dtype=torch.float64, device=device) for _ in range(world)]
    dist.all_gather(gathered, local.to(device))
    sums = [tuple(g.tolist()) for g in gathered]
    if any(s != sums[0] for s in sums):
        raise RuntimeError(f"parameters differ across ranks (checksums per rank: {sums}); data parallelism is broken")
    return "parameters identical on all %d ranks (checksum %.17g)" % (world, sums[0][0])


class Trainer:
    def __init__(self, cfg: Config, run_dir, *, resume: str = "auto",
                 train_loader: Optional[Iterable[dict]] = None, val_loader: Optional[Iterable[dict]] = None):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        preflight(cfg, data=train_loader is None or val_loader is None)  # before anything is built
        self.dist = init_distributed()
        self.rank, self.world = self.dist.rank, self.dist.world_size
        # before anything is built or computed: seeds alone do not fix the bits (see train/determinism.py)
        self.determinism = make_deterministic(self.dist.device) if cfg.train.deterministic else None
        # a checkpoint written by another world size is refused before anything is built
        check_world_size(resolve_resume(resume, self.run_dir), self.world)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        generator, discriminator, vgg = build_models(cfg)
        # Activations only: parameters stay contiguous (see gafh_fast/train/layout.py for why)
        self.channels_last = use_channels_last(cfg.train.channels_last, self.dist.device)
        if self.dist.device.type == "cuda":
            torch.backends.cudnn.benchmark = not cfg.train.deterministic
        self.g_engine, self.d_engine = build_engines(cfg, generator, discriminator)
        self.device = self.dist.device
        self.dtype = torch.bfloat16 if cfg.deepspeed.bf16 else torch.float32
        self.vgg = vgg.to(self.device, self.dtype)  # frozen, eval, in the training dtype
        self.ema = EMA(self.g_engine.module, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
        self.compiler = TrainCompiler(cfg.train.compile, self.device)  # compiles before the 2nd iteration
        self.train_loader = train_loader if train_loader is not None else self._build_loader("train")
        self._val_loader = val_loader
        self.step = self.epoch = self.batch_in_epoch = self.nan_in_a_row = 0
        self._stop_requested = False
        self.window = StepWindow(self.device)  # step outputs not yet read by the host

        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.world > 1:
            dist.barrier()
        resume_from = resolve_resume(resume, self.run_dir)
        if resume_from is not None:
            state = load_checkpoint(resume_from, self.g_engine, self.d_engine)
            self.step, self.epoch = state["step"], state["epoch"]
            self.batch_in_epoch, self.nan_in_a_row = state["batch_in_epoch"], state["nan_in_a_row"]
            if self.ema is not None and state.get("ema") is not None:
                self.ema.load_state_dict(state["ema"])
        self.start_step = self.step
        if self.rank == 0:
            save_config(cfg, self.run_dir / "config.yaml")
        device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None
        self.logger = TrainLogger(self.run_dir, rank=self.rank, world_size=self.world,
                                  batch_per_gpu=cfg.data.batch_size, start_step=self.step,
                                  max_steps=cfg.train.max_steps, log_every=cfg.train.log_every,
                                  peak_tflops=peak_bf16_tflops(device_name))
        self.logger.info(f"world size {self.world} on {device_name or self.device.type}; "
                         + (f"resumed from {resume_from} at step {self.step}" if resume_from else "fresh start")
                         + f"; activations {'channels_last' if self.channels_last else 'NCHW'}, parameters "
                         f"contiguous (train.channels_last={cfg.train.channels_last})"
                         + ("" if self.logger.peak else "; MFU n/a (no bf16 peak known for this device)")
                         + "; " + self.compiler.describe())
        if self.determinism:
            self.logger.info(self.determinism)
        if wants_precompile(cfg.kernels, self.device):
            self.logger.info(self._precompile_kernels())

    def _precompile_kernels(self) -> str:
        """Every fused Triton variant of G's training step and of validation, compiled before step 1
        on parallel threads (kernels/precompile.py) instead of one by one inside the first steps. Per
        node, local rank 0 compiles first on all cores while the node's other ranks wait at a barrier;
        they then load every kernel from Triton's on-disk cache, which the node's processes share."""
        cfg = self.cfg
        return precompile_node_first([(self.g_engine.module, cfg.data.batch_size, True),
                                      (self.eval_generator, cfg.data.val_batch_size, False)],
                                     cfg.lr_size, self.dist.local_rank, self.world)

    # --- data -------------------------------------------------------------------------------------
    def _build_loader(self, split: str):
        from gafh_fast.data import build_loader  # here, so tests that pass their own loaders skip DALI's import

        return build_loader(self.cfg, split, self.rank, self.world)

    @property
    def val_loader(self):
        if self._val_loader is None:
            self._val_loader = self._build_loader("val")
        return self._val_loader

    def _batches(self) -> Iterator[dict]:
        """Endless batches; self.epoch / self.batch_in_epoch always say where the next one comes from."""
        loader = self.train_loader
        while True:
            if hasattr(loader, "__len__") and self.batch_in_epoch >= len(loader):
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(self.epoch, start_batch=self.batch_in_epoch)
                it = iter(loader)
            else:  # any iterable of {"hr", "lr"}: the same batches every epoch
                it = itertools.islice(iter(loader), self.batch_in_epoch, None)
            got = 0
            for batch in it:
                got += 1
                self.batch_in_epoch += 1
                yield batch
            if got == 0 and self.batch_in_epoch == 0:
                raise RuntimeError("the train loader yielded no batches (is the train split empty?)")
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    # --- signals, agreement -----------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        if self._stop_requested:  # a second signal: the user means it; stop without saving
            raise KeyboardInterrupt(f"signal {signum} received twice")
        self._stop_requested = True
        if self.rank == 0:
            log.warning("signal %d: stopping at the next read-back (within train.log_every steps), saving a "
                        "checkpoint, then exiting", signum)

    # --- pieces -----------------------------------------------------------------------------------
    @property
    def eval_generator(self) -> torch.nn.Module:
        return self.ema.module if self.ema is not None else self.g_engine.module

    def save(self) -> Path:
        _average_buffers(self.g_engine.module)
        _average_buffers(self.d_engine.module)
        state = {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                 "nan_in_a_row": self.nan_in_a_row, "config": self.cfg.to_dict(),
                 "ema": self.ema.state_dict() if self.ema is not None else None}
        path = save_checkpoint(self.run_dir, self.cfg, self.step, self.g_engine, self.d_engine, state,
                               self.eval_generator, self.cfg.train.keep_checkpoints)
        self.logger.info(f"checkpoint {path}; "
                         + check_replicas_identical(self.g_engine.module, self.d_engine.module))
        return path

    def validate(self) -> dict:
        _average_buffers(self.eval_generator)
        v = self.cfg.val
        with eager():  # validation shapes are not training's: no compile for them
            metrics = validate(self.eval_generator, self.val_loader, device=self.device, crop_border=v.crop_border,
                               max_images=v.max_images, grid_images=v.grid_images,
                               grid_path=self.run_dir / "val" / f"grid_step_{self.step:08d}.png",
                               channels_last=self.channels_last)
        self.logger.val(self.step, metrics)
        return metrics

    def _handle_skip(self, step: int, what: str) -> None:
        """Step `step` dropped an update (read back up to log_every - 1 steps later, see train/step.py)."""
        self.nan_in_a_row += 1
        self.logger.write({"kind": "nan_skip", "step": step, "loss": what, "in_a_row": self.nan_in_a_row})
        self.logger.info(f"step {step}: non-finite {what} loss, step skipped "
                         f"({self.nan_in_a_row} in a row, limit {self.cfg.train.max_nan_skips})")
        if self.nan_in_a_row >= self.cfg.train.max_nan_skips:
            raise TrainingAborted(
                f"{self.nan_in_a_row} consecutive steps had a non-finite loss (train.max_nan_skips = "
                f"{self.cfg.train.max_nan_skips}); aborting. Check the data for NaN/inf, lower the learning "
                "rates, or enable train.grad_clip.")

    # --- the loop ---------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        flops = {True: step_flops_per_image(cfg, gan=True)["total"], False: step_flops_per_image(cfg, gan=False)["total"]}
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        batches = self._batches()
        saved_at = validated_at = -1
        metrics: dict = {}
        try:
            while self.step < t.max_steps:
                for line in self.compiler.before_step(self.g_engine, self.d_engine, self.vgg):
                    self.logger.info(line)
                t0 = time.perf_counter()
                batch = next(batches)
                hr, lr = (to_activation_layout(batch[k].to(self.device, non_blocking=True).to(self.dtype),
                                               self.channels_last) for k in ("hr", "lr"))  # (N, 3, H, W), (N, 3, H/8, W/8)
                data_s = time.perf_counter() - t0  # host time: the copies are queued, not waited for
                gan = self.step >= t.pretrain_steps
                out = train_step(cfg, self.g_engine, self.d_engine, self.vgg, hr, lr, gan=gan)
                if self.ema is not None:  # gated on the device: a dropped G update leaves the EMA as it was
                    self.ema.update(self.g_engine.module, applied=out.applied["g"])
                self.step += 1
                compile_s = self.compiler.take_seconds()
                if compile_s:  # this step's time is mostly compiling: logged, and left out of img/s
                    self.logger.info(f"step {self.step}: " + self.compiler.summary(compile_s))
                    self.logger.write({"kind": "compile", "step": self.step, "seconds": compile_s})
                self.window.add(self.step, out)
                losses, stop = {}, False
                if (self.step % self.logger.log_every == 0 or self.step == t.max_steps
                        or (t.checkpoint_every and self.step % t.checkpoint_every == 0)):
                    # the loop's one device-to-host read (train/step.py); a collective on every rank
                    losses, steps, stop = self.window.read(out, self._stop_requested)
                    for step, what in steps:
                        if what:
                            self._handle_skip(step, what)
                        else:
                            self.nan_in_a_row = 0
                seconds = {"data": data_s, **out.seconds, "total": time.perf_counter() - t0}
                self.logger.step(self.step, seconds, losses, flops[gan], self.g_engine.get_lr()[0],
                                 timed=not compile_s)
                if cfg.val.every and self.step % cfg.val.every == 0:
                    metrics, validated_at = self.validate(), self.step
                if (t.checkpoint_every and self.step % t.checkpoint_every == 0) or stop:
                    self.save()
                    saved_at = self.step
                if stop:
                    self.logger.info(f"stopped by signal at step {self.step}; checkpoint saved")
                    return metrics
            if saved_at != self.step and self.step != self.start_step:  # else: resumed a finished run
                self.save()
            if validated_at != self.step:
                metrics = self.validate()
            self.logger.info(
                f"final: G PSNR {metrics['g_psnr_rgb']:.2f} dB vs bicubic {metrics['bicubic_psnr_rgb']:.2f} dB "
                f"({metrics['g_psnr_rgb'] - metrics['bicubic_psnr_rgb']:+.2f} dB) on {metrics['images']} "
                f"validation images; exported generator: {self.run_dir / 'generator.safetensors'}")
            return metrics
        finally:
            # Closing the batch generator shuts the PIL loader's workers down through their done
            # event. Left to interpreter exit, multiprocessing SIGTERMs them (which they ignore, so
            # that the launcher's SIGTERM cannot kill them before the ranks save) and joins forever.
            batches.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.logger.close()

"""The `train` suite: one full GAN step (D step, then G step with VGG) in img/s and MFU.

Every path runs the project's own step, gafh_fast.train.step.train_step, on the paper's model:
  - `bf16 fused step (deepspeed)`: the trainer's step as the trainer runs it, on every device: models
    from gafh_fast.train.build_models (parameters contiguous), the two DeepSpeed engines of
    gafh_fast.train.engine (ZeRO stage and bf16 of the config, world size 1), activations in the
    layout of `train.channels_last: auto` (gafh_fast.train.layout), kernels=auto (Triton on CUDA).
    On CPU it runs with DS_ACCELERATOR=cpu (gloo), so CI's smoke run times this row too.
  - `bf16 fused step (deepspeed, compiled)`: the same with train.compile's parts compiled as the
    trainer compiles them (gafh_fast/train/compile.py): one eager step first (kernels=auto decides
    per shape), then compile_parts; the compile seconds go in the note, never in the timing. CUDA
    only: inductor's CPU compile of this step alone takes ~30-130 s on a 2-core CPU, past the smoke
    bench's budget (tests/test_train_compile.py checks the compiled step on CPU instead).
  - `bf16 fused step (torch Adam)`: the same step and model with the engines replaced by
    TorchEngine below (bf16 parameters, fp32 master weights, torch.optim.Adam): a diagnostic of what
    DeepSpeed's bookkeeping costs.
  - `fp32 eager step`: the baseline, BasicSR's way: fp32, NCHW, eager PyTorch (kernels=torch),
    torch.optim.Adam, same step function, same model, same batch.
MFU is against the card's dense bf16 peak for every row (the fp32 row too), with the step's FLOPs
from gafh_fast.flops.step_flops_per_image: the same count the trainer's progress bar uses. VGG uses
random weights (pretrained=false): the speed does not depend on the values. On CPU the bf16 rows
run with kernels=torch (no Triton off CUDA).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os

import torch

from gafh_fast.config import load_config
from gafh_fast.flops import step_flops_per_image
from gafh_fast.models import build_discriminator, build_generator, build_vgg
from gafh_fast.train.layout import to_activation_layout, use_channels_last
from gafh_fast.train.step import SKIP_REASONS, train_step

try:
    from common import (add_speedups, error_row, free_device_memory, make_row, peak_tflops_for,
                        resolve_device, skipped_row, throughput_fields, time_calls)
except ImportError:  # pragma: no cover
    from bench.common import (add_speedups, error_row, free_device_memory, make_row, peak_tflops_for,
                              resolve_device, skipped_row, throughput_fields, time_calls)

SUITE = "train"
NAME = "GAN step"
BASELINE = "fp32 eager step"
TINY = ("model.generator.nf=8", "model.generator.gc=4", "model.generator.num_dnb=1",
        "model.generator.ridb_per_dnb=2", "model.generator.idb_per_ridb=2",
        "model.generator.sfm_kernel=3", "model.generator.out_kernel=3",
        "model.discriminator.nf=4", "model.discriminator.dense=16",
        "data.hr_size=32", "train.content.layer=relu2_1")
INPUT_SETS = 3
partial_rows: list[dict] = []  # the rows finished so far (bench/throughput.py reads them after a SIGTERM)


class TorchEngine:
    """The part of a DeepSpeed engine that train_step uses (call, backward, step, .module,
    is_gradient_accumulation_boundary) over torch Adam (the trainer's GatedAdam, which train_step
    hands its NaN veto, in implementation `impl`). With master_fp32 the module holds bf16 parameters
    and Adam updates fp32 copies, as DeepSpeed's bf16 mode does; without it the module's own
    parameters are stepped."""

    def __init__(self, module: torch.nn.Module, lr: float, betas, master_fp32: bool, impl: str):
        from gafh_fast.train.optim import GatedAdam

        self.module = module
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.masters = [p.detach().float().clone() for p in self.params] if master_fp32 else None
        self.optimizer = GatedAdam(self.masters or self.params, impl=impl, lr=lr, betas=tuple(betas))

    def is_gradient_accumulation_boundary(self) -> bool:
        return True  # no accumulation: every step() steps

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        if self.masters is not None:
            for master, p in zip(self.masters, self.params):
                master.grad = None if p.grad is None else p.grad.float()
            self.optimizer.step()
            with torch.no_grad():
                torch._foreach_copy_(self.params, self.masters)
        else:
            self.optimizer.step()
        for p in self.params:
            p.grad = None
        if self.masters is not None:
            for master in self.masters:
                master.grad = None


def _build(cfg, dev, dtype, engine: str):
    """G, D, VGG as the trainer builds them: same seed and order, parameters contiguous. DeepSpeed
    engines get fp32 modules and cast them themselves (bf16 copies of fp32 master weights)."""
    from gafh_fast.train.trainer import build_models

    g, d, vgg = build_models(cfg)
    if engine == "torch":
        g, d = g.to(dev, dtype), d.to(dev, dtype)
    return g, d, vgg.to(dev, dtype).eval().requires_grad_(False)


def _batches(cfg, batch, dev, dtype, channels_last):
    hr, lr = cfg.data.hr_size, cfg.lr_size

    def image(side):
        return to_activation_layout((torch.rand(batch, 3, side, side, device=dev) * 2 - 1).to(dtype), channels_last)
    return [(image(hr), image(lr)) for _ in range(INPUT_SETS)]


def _deepspeed_engines(cfg, g, d):
    from gafh_fast.train.engine import build_engines, init_distributed

    init_distributed()  # a world of one when no launcher set RANK
    return build_engines(cfg, g, d)


def run(device: str, batch: int = 64, smoke: bool = False) -> list[dict]:
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    if smoke:
        batch = min(batch, 2)
    overrides = (TINY if smoke else ()) + (f"data.batch_size={batch}", "train.content.pretrained=false")
    peak = peak_tflops_for(dev)
    warmup, repeats = (1, 2) if smoke else ((3, 10) if cuda else (1, 2))
    # find_spec, not import: importing deepspeed probes accelerators (slow, noisy) even when unused
    have_deepspeed = importlib.util.find_spec("deepspeed") is not None
    fused = "fused " if cuda else ""  # off CUDA, kernels=auto resolves to the torch reference
    layout = use_channels_last("auto", dev)  # the trainer's train.channels_last=auto
    paths = [  # (path, dtype, kernels, channels_last, engine)
        (f"bf16 {fused}step (deepspeed)", torch.bfloat16, "auto", layout, "deepspeed"),
        (f"bf16 {fused}step (deepspeed, compiled)", torch.bfloat16, "auto", layout, "deepspeed+compile"),
        (f"bf16 {fused}step (torch Adam)", torch.bfloat16, "auto", layout, "torch"),
        (BASELINE, torch.float32, "torch", False, "torch"),
    ]
    rows = partial_rows
    rows.clear()
    for path, dtype, kernels, channels_last, engine in paths:
        fields = dict(path=path, baseline=None if path == BASELINE else BASELINE, batch=batch,
                      dtype=str(dtype).replace("torch.", ""), kernels=kernels)
        if engine.startswith("deepspeed") and not have_deepspeed:
            rows.append(skipped_row(SUITE, NAME, "deepspeed is not installed (see bench/README.md)", **fields))
            continue
        if engine == "deepspeed+compile" and not cuda:
            rows.append(skipped_row(SUITE, NAME, "torch.compile of the step is timed on CUDA only: inductor's CPU "
                                    "compile takes 30-130 s on 2 cores (tests/test_train_compile.py checks it)",
                                    **fields))
            continue
        if engine.startswith("deepspeed") and not cuda:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed's first import probes for CUDA
        try:
            rows.append(_time_path(overrides, kernels, dev, dtype, channels_last, engine, batch, peak,
                                   warmup, repeats, fields))
        except Exception as e:  # one path failing must not hide the others' numbers
            row = error_row(SUITE, NAME, f"{type(e).__name__}: {e}")
            row.update(fields)
            rows.append(row)
        free_device_memory(dev)
    return add_speedups(list(rows))


def _time_path(overrides, kernels, dev, dtype, channels_last, engine, batch, peak, warmup, repeats, fields):
    cfg = load_config(None, overrides + (f"kernels={kernels}", f"deepspeed.bf16={dtype == torch.bfloat16}".lower()))
    g, d, vgg = _build(cfg, dev, dtype, engine)
    g.train(), d.train()
    if engine.startswith("deepspeed"):
        g_engine, d_engine = _deepspeed_engines(cfg, g, d)
    else:
        betas = cfg.train.betas
        master = dtype != torch.float32
        impl = cfg.train.adam_impl if master else "foreach"  # fp32 = BasicSR's way: torch Adam's CUDA default
        g_engine = TorchEngine(g, cfg.train.lr_g, betas, master_fp32=master, impl=impl)
        d_engine = TorchEngine(d, cfg.train.lr_d, betas, master_fp32=master, impl=impl)
    inputs = _batches(cfg, batch, dev, dtype, channels_last)
    outputs = []

    def step(pair):  # nothing read back here: the trainer's step reads nothing either (train/step.py)
        outputs.append(train_step(cfg, g_engine, d_engine, vgg, pair[0], pair[1], gan=True))

    flops = step_flops_per_image(cfg)["total"]
    compiler, compile_note = (_compile(cfg, dev, g_engine, d_engine, vgg, step, inputs)
                              if engine == "deepspeed+compile" else (None, None))
    timing = time_calls(step, inputs, dev, warmup=warmup, repeats=repeats)
    raise_on_skips([o.skip_code for o in outputs], "a timed step")
    losses = outputs[-1].read()[0]
    row = make_row(SUITE, NAME, spread_pct=timing["spread_pct"], repeats=timing["repeats"],
                   peak_mem_mb=timing["peak_mem_mb"], flops_per_image=flops,
                   last_losses={k: round(v, 5) for k, v in losses.items()}, **fields)
    row.update(throughput_fields(timing["ms"], batch, flops, peak))
    if dtype == torch.float32 and dev.type == "cuda":
        row["note"] = "MFU against the bf16 peak; cuDNN may use TF32 for fp32 convs (PyTorch's default)"
    elif dev.type != "cuda" and kernels == "auto":
        row["note"] = "CPU: kernels=auto resolves to the torch reference (no Triton off CUDA)"
    if compiler is not None:
        late = compiler.take_seconds()  # a recompile inside the timed calls would make the number a compile time
        row["note"] = compile_note + (f"; RECOMPILED while timed: {late}" if late else "")
    return row


def raise_on_skips(skip_codes: list[torch.Tensor], what: str) -> None:
    """One read of the steps' skip codes, after the timing: a step that skipped would make it wrong."""
    skipped = [SKIP_REASONS[c] for c in torch.stack(skip_codes).tolist() if c]
    if skipped:
        raise RuntimeError(f"{what} skipped a non-finite loss ({skipped[0]}): the timing would be wrong")


def _compile(cfg, dev, g_engine, d_engine, vgg, step, inputs):
    """Compile as the trainer does (its TrainCompiler: one eager step, for kernels=auto's decisions, then
    the parts compile), then two steps (compile, settle): (the compiler, a note of what it did)."""
    from gafh_fast.train.compile import TrainCompiler

    compiler = TrainCompiler(dataclasses.replace(cfg.train.compile, enabled=True), dev)
    how = []
    for pair in (inputs[0], *inputs[:2]):
        how += compiler.before_step(g_engine, d_engine, vgg)
        step(pair)
    return compiler, compiler.summary(compiler.take_seconds()) + ", not timed; " + "; ".join(how)

"""The training step without host syncs (gafh_fast/train/step.py's docstring): what a skipped step
leaves, and that nothing between two read-backs brings a device value to the host.

CPU twin of the CUDA path: the same code with the device swapped. On CPU a "host read" cannot stall
anything, so it is counted where it would stall a GPU: every Python-level way of taking a tensor's
value (item, tolist, bool, float, int, index, numpy, cpu), every aten op that reads or sizes its
result from data (_local_scalar_dense, nonzero, masked_select, unique, equal, is_nonzero, a boolean
index, repeat_interleave), and torch's or DeepSpeed's synchronize. What this cannot see: a blocking
host<->device copy (`.to(device)` of a host tensor is a no-op on CPU) and a sync inside a C++ kernel;
the GPU suite's `profile` stage runs the trainer's step under torch.cuda.set_sync_debug_mode("warn") and
counts them (bench/profile_step.py `sync_check`).
"""
from __future__ import annotations

import math
import os
import sys
import traceback
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from train_runner import jsonl, make_batch, run, tiny_config, val_batches  # noqa: E402

import gafh_fast.train.step as step_module  # noqa: E402
import gafh_fast.train.trainer as trainer_module  # noqa: E402
from gafh_fast.train import TrainingAborted, build_models  # noqa: E402
from gafh_fast.train.ema import EMA  # noqa: E402
from gafh_fast.train.engine import build_engines, gated_optimizer, init_distributed, lr_lambda  # noqa: E402
from gafh_fast.train.step import train_step  # noqa: E402

NO_NORM = ("model.discriminator.norm=none", "model.generator.trunk_norm=none")


# ------------------------------------------------------------------------------------------------
# counting host reads
# ------------------------------------------------------------------------------------------------
PY_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "__complex__", "numpy", "__array__",
            "cpu")
ATEN_READS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_dim",
              "unique_consecutive", "equal", "is_nonzero", "repeat_interleave"}


class HostReads(TorchDispatchMode):
    """While active, records (kind, where) for every host read (module docstring); `where` is the
    innermost frame outside torch. A read inside another (item -> _local_scalar_dense) counts once."""

    def __init__(self, allowed=lambda tensor: False):
        super().__init__()
        self.events: list[tuple[str, str]] = []
        self.allowed = allowed  # host-resident tensors, whose reads stall nothing
        self._depth = 0
        self._saved = []

    def _record(self, kind: str) -> None:
        frames = [f for f in traceback.extract_stack()[:-2]
                  if "/torch/" not in f.filename
                  and not (f.filename == __file__ and f.name in ("_record", "counted", "__torch_dispatch__", "<lambda>"))]
        where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
        self.events.append((kind, where))

    def _wrap(self, name, original):
        mode = self

        def counted(tensor, *args, **kwargs):
            if mode._depth == 0 and not mode.allowed(tensor):
                mode._record(name)
            mode._depth += 1
            try:
                return original(tensor, *args, **kwargs)
            finally:
                mode._depth -= 1
        return counted

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        boolean_index = name == "index" and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in (args[1] or ()))
        if self._depth == 0 and (name in ATEN_READS or boolean_index) and not (args and self.allowed(args[0])):
            self._record("aten." + name)
        self._depth += 1
        try:
            return func(*args, **kwargs)
        finally:
            self._depth -= 1

    def __enter__(self):
        from deepspeed.accelerator import get_accelerator

        accel = get_accelerator()
        for name in PY_READS:
            self._saved.append((torch.Tensor, name, getattr(torch.Tensor, name)))
            setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))
        for owner, name in ((torch.cuda, "synchronize"), (accel, "synchronize")):
            original = getattr(owner, name)
            self._saved.append((owner, name, original))
            setattr(owner, name, lambda *a, _n=name, **k: self._record(_n))
        return super().__enter__()

    def __exit__(self, *exc):
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved = []
        return super().__exit__(*exc)


def test_the_counter_sees_each_kind_of_read():
    """The counter itself: each way of reading counts once, device-side work counts nothing."""
    x = torch.arange(6.0)
    with HostReads() as reads:
        y = (x * 2).sum()  # device work only
        torch.where(x > 2, x, 0.0)
        y.item(), float(y), bool(y > 0), int(y), x.tolist(), x[x > 2], x.nonzero(), torch.equal(x, x), x.cpu()
        torch.cuda.synchronize()
    assert [k for k, _ in reads.events] == ["item", "__float__", "__bool__", "__int__", "tolist", "aten.index",
                                            "aten.nonzero", "aten.equal", "cpu", "synchronize"]
    assert all(w.startswith(__file__) for _, w in reads.events)


# ------------------------------------------------------------------------------------------------
# no host read between read-backs, in the trainer's loop
# ------------------------------------------------------------------------------------------------
def reads_per_iteration(cfg, tmp_path, monkeypatch) -> dict:
    """Trainer.fit on in-memory batches under HostReads: the reads of each iteration, from its
    train_step call to the next one (its data for the next iteration included), until the loop ends."""
    batches = [make_batch(cfg, 0, i, cfg.data.batch_size) for i in range(cfg.train.max_steps)]
    trainer = trainer_module.Trainer(cfg, tmp_path, resume="none", train_loader=batches, val_loader=val_batches(cfg))
    marks = []  # (iteration, index of its first event)
    real_step, real_save = trainer_module.train_step, trainer.save

    def marked_step(*args, **kwargs):
        marks.append((len(marks) + 1, len(reads.events)))
        return real_step(*args, **kwargs)

    def marked_save():
        marks.append(("after the loop", len(reads.events)))
        return real_save()

    monkeypatch.setattr(trainer_module, "train_step", marked_step)
    monkeypatch.setattr(trainer, "save", marked_save)
    with HostReads(allowed=_adam_host_step(trainer)) as reads:
        trainer.fit()
    ends = [i for _, i in marks[1:]] + [len(reads.events)]
    return {it: reads.events[start:end] for (it, start), end in zip(marks, ends) if it != "after the loop"}


def _adam_host_step(trainer):
    """foreach/for_loop Adam keep their step counter on the host by design (torch reads it for the
    bias correction): reading it stalls nothing on a GPU. The fused Adam's lives on the device."""
    optimizers = [gated_optimizer(e) for e in (trainer.g_engine, trainer.d_engine)]
    if all(opt.impl == "fused" for opt in optimizers):
        return lambda tensor: False
    return lambda tensor: any(tensor is state.get("step") for opt in optimizers for state in opt.state.values())


@pytest.mark.parametrize("bf16,zero,impl", [(True, 1, "fused"), (True, 2, "fused"), (False, 0, "fused"),
                                           (False, 1, "fused"), (True, 1, "foreach")])
def test_no_host_read_between_read_backs(bf16, zero, impl, tmp_path, monkeypatch):
    """Iterations 1, 2, 4, 5 read nothing; the logging iterations 3 and 6 read once, in
    StepWindow.read. With EMA and device-side gradient clipping on."""
    cfg = tiny_config("train.max_steps=6", "train.log_every=3", f"deepspeed.bf16={str(bf16).lower()}",
                      f"deepspeed.zero_stage={zero}", f"train.adam_impl={impl}", "train.ema_decay=0.9",
                      "train.grad_clip=0.05")
    per_iteration = reads_per_iteration(cfg, tmp_path, monkeypatch)
    assert sorted(per_iteration) == [1, 2, 3, 4, 5, 6]
    for it, events in per_iteration.items():
        if it % 3:
            assert events == [], f"iteration {it} read the device on the host: {events}"
        else:
            assert [k for k, _ in events] == ["tolist"], f"logging iteration {it}: {events}"
            assert "gafh_fast/train/step.py" in events[0][1], events


def test_bf16_zero0_reads_only_inside_deepspeed(tmp_path, monkeypatch):
    """bf16 with zero_stage 0 runs DeepSpeed's FP16_UnfusedOptimizer, which reads an overflow flag
    and the gradient norm on the host in every step (no switch in 0.19.8; engine.py says so). The
    trainer's own code adds nothing to them: every read outside the read-backs is DeepSpeed's."""
    cfg = tiny_config("train.max_steps=3", "train.log_every=3", "deepspeed.bf16=true", "deepspeed.zero_stage=0")
    per_iteration = reads_per_iteration(cfg, tmp_path, monkeypatch)
    outside = [e for it in (1, 2) for e in per_iteration[it]]
    assert outside, "DeepSpeed's bf16 ZeRO-0 optimizer no longer reads: extend test_no_host_read_between_read_backs"
    assert all("/deepspeed/runtime/" in where for _, where in outside), outside
    assert [e for e in per_iteration[3] if "/deepspeed/" not in e[1]] == [("tolist", per_iteration[3][-1][1])]


# ------------------------------------------------------------------------------------------------
# what a skipped step leaves
# ------------------------------------------------------------------------------------------------
def build(cfg):
    """The trainer's engines, EMA and VGG on the tiny model, world size 1."""
    init_distributed()
    G, D, vgg = build_models(cfg)
    g, d = build_engines(cfg, G, D)
    dtype = torch.bfloat16 if cfg.deepspeed.bf16 else torch.float32
    return g, d, vgg.to(dtype), EMA(g.module, cfg.train.ema_decay), dtype


def batch(cfg, i: int, dtype, nan: bool = False):
    b = make_batch(cfg, 0, i, cfg.data.batch_size)
    if nan:
        b["hr"][0, 0, 0, 0] = float("nan")  # LR stays finite: G's forward is fine, L_D is not
    return b["hr"].to(dtype), b["lr"].to(dtype)


def snapshot(engine, buffers: bool = True) -> dict:
    """All a step may change in an engine: the module's parameters and buffers (BatchNorm
    statistics), and per optimizer parameter (DeepSpeed's fp32 master partition) it and Adam's state."""
    opt = gated_optimizer(engine)
    module = engine.module.state_dict() if buffers else dict(engine.module.named_parameters())
    return {"module": {k: v.detach().clone() for k, v in module.items()},
            "opt": [{"param": p.detach().clone(), **{k: v.detach().clone() for k, v in opt.state[p].items()}}
                    for group in opt.param_groups for p in group["params"]]}


def differing(a: dict, b: dict, skip=("step",)) -> list[str]:
    """Names of the tensors that are not bit for bit equal (a missing Adam state counts as zeros)."""
    out = [k for k in a["module"] if not torch.equal(a["module"][k], b["module"][k])]
    for j, (x, y) in enumerate(zip(a["opt"], b["opt"])):
        for key in (set(x) | set(y)) - set(skip):
            xv = x[key] if key in x else torch.zeros_like(y[key])
            yv = y[key] if key in y else torch.zeros_like(x[key])
            if not torch.equal(xv, yv):
                out.append(f"optimizer param {j} {key}")
    return out


def adam_steps(engine) -> list[float]:
    opt = gated_optimizer(engine)
    return [float(opt.state[p]["step"]) for group in opt.param_groups for p in group["params"] if p in opt.state]


@pytest.mark.parametrize("impl", ["fused", "foreach", "for_loop"])
def test_skipped_steps_leave_weights_moments_buffers_and_ema_bitwise(impl, monkeypatch):
    """bf16, ZeRO 1, BatchNorm on, EMA on, a warm-up schedule. Iteration 1 (fresh state) and 3: a NaN
    in the HR batch makes L_D non-finite, so neither engine's update goes in; iteration 4: only L_G
    is non-finite, so D steps and G does not. Whatever is skipped stays bit for bit: modules
    (parameters, BatchNorm statistics), fp32 master weights, Adam moments, EMA. The LR schedule
    ticks every iteration; Adam's step counter stays put with the fused kernel and ticks with
    foreach/for_loop (a host tensor), as train/step.py documents."""
    cfg = tiny_config(f"train.adam_impl={impl}", "deepspeed.bf16=true", "deepspeed.zero_stage=1",
                      "train.ema_decay=0.9", "train.warmup_steps=8", "train.lr_g=1.0e-3", "train.lr_d=1.0e-3")
    g, d, vgg, ema, dtype = build(cfg)
    ticks = 0 if impl == "fused" else 1  # Adam step counter per skipped step

    def step(i, nan=False):
        out = train_step(cfg, g, d, vgg, *batch(cfg, i, dtype, nan), gan=True)
        ema.update(g.module, applied=out.applied["g"])
        return out.read()[1]

    def state():
        return snapshot(g), snapshot(d), {k: v.clone() for k, v in ema.state_dict().items()}

    g0, d0, e0 = state()
    assert step(0, nan=True) == "d"
    g1, d1, e1 = state()
    assert differing(g0, g1) == [] and differing(d0, d1) == [], "a skipped first step changed something"
    assert all(torch.equal(e0[k], e1[k]) for k in e0), "EMA moved on a skipped step"
    assert adam_steps(g) == adam_steps(d) == [ticks]  # state exists (zeros), counter as documented

    assert step(1) is None
    g2, d2, e2 = state()
    assert differing(g1, g2) and differing(d1, d2) and not all(torch.equal(e1[k], e2[k]) for k in e1)
    assert adam_steps(g) == adam_steps(d) == [1 + ticks]

    assert step(2, nan=True) == "d"
    g3, d3, e3 = state()
    assert differing(g2, g3) == [] and differing(d2, d3) == []
    assert all(torch.equal(e2[k], e3[k]) for k in e2)
    assert adam_steps(g) == adam_steps(d) == [1 + 2 * ticks]

    real_content = step_module.content_loss
    monkeypatch.setattr(step_module, "content_loss", lambda *a, **k: real_content(*a, **k) * float("nan"))
    assert step(3) == "g"
    g4, d4, e4 = state()
    assert differing(g3, g4) == [] and all(torch.equal(e3[k], e4[k]) for k in e3), "G or EMA moved on L_G = NaN"
    assert "optimizer param 0 exp_avg" in differing(d3, d4), "D did not step on a finite L_D"
    assert adam_steps(d) == [2 + 2 * ticks] and adam_steps(g) == [1 + 3 * ticks]

    factor = lr_lambda(cfg)
    for engine, base in ((g, cfg.train.lr_g), (d, cfg.train.lr_d)):  # 4 scheduler ticks
        assert gated_optimizer(engine).param_groups[0]["lr"] == pytest.approx(base * factor(4), rel=1e-12)


def test_a_bad_micro_batch_drops_the_whole_accumulated_update():
    """gradient_accumulation_steps=2: the NaN in micro-batch 1 is summed into the gradient, so the
    update at micro-batch 2 is dropped (both engines' weights, masters, moments); the next window
    steps normally. (Micro-batch 2's own BatchNorm statistics go in: its batch was finite.)"""
    cfg = tiny_config("deepspeed.gradient_accumulation_steps=2", "deepspeed.zero_stage=2", "train.ema_decay=0.5")
    g, d, vgg, _, dtype = build(cfg)
    start = snapshot(g, buffers=False), snapshot(d, buffers=False)
    codes = [train_step(cfg, g, d, vgg, *batch(cfg, i, dtype, nan=i == 0), gan=True).read()[1] for i in range(2)]
    assert codes == ["d", None]
    assert differing(start[0], snapshot(g, False)) == [] and differing(start[1], snapshot(d, False)) == []
    assert adam_steps(g) == adam_steps(d) == [0.0]
    for i in (2, 3):
        train_step(cfg, g, d, vgg, *batch(cfg, i, dtype), gan=True)
    assert differing(start[0], snapshot(g, False)) and differing(start[1], snapshot(d, False))
    assert adam_steps(g) == adam_steps(d) == [1.0]


def test_pretraining_step_drops_a_non_finite_l1_and_hands_back_detached_losses():
    """The PSNR pre-training step (gan=False) with a NaN in the HR batch: skip code "pixel", G's
    update and its BatchNorm statistics (G's forward was finite) dropped bit for bit, `applied` False.
    A finite step then goes in (applied True, weights and statistics move), and a GAN step after it
    too. Every loss handed back is detached: a StepOutput holds no graph while it waits for the read."""
    cfg = tiny_config("deepspeed.zero_stage=1")
    g, d, vgg, _, dtype = build(cfg)
    assert any(name.endswith("running_mean") for name, _ in g.module.named_buffers())
    before = snapshot(g)
    out = train_step(cfg, g, d, vgg, *batch(cfg, 0, dtype, nan=True), gan=False)
    losses, reason = out.read()
    assert reason == "pixel" and list(losses) == ["pixel"] and math.isnan(losses["pixel"])
    assert out.applied["g"].tolist() is False
    assert differing(before, snapshot(g)) == []
    out = train_step(cfg, g, d, vgg, *batch(cfg, 1, dtype), gan=False)
    assert out.read()[1] is None and out.applied["g"].tolist() is True
    changed = differing(before, snapshot(g))
    assert any(k.endswith("running_mean") for k in changed) and "optimizer param 0 exp_avg" in changed
    assert not out.losses["pixel"].requires_grad
    out = train_step(cfg, g, d, vgg, *batch(cfg, 2, dtype), gan=True)
    assert out.read()[1] is None and all(v.tolist() is True for v in out.applied.values())
    assert set(out.losses) == {"d", "g", "content", "adv"} and not any(v.requires_grad for v in out.losses.values())


def test_nan_abort_comes_at_the_read_back_and_names_its_steps(tmp_path, monkeypatch):
    """log_every=4, max_nan_skips=2, every batch from the 2nd on bad: the 2nd skip in a row is step
    3, the host reads it at step 4 and aborts there, with step 2's and 3's skip records."""
    calls = []
    real = trainer_module.train_step
    monkeypatch.setattr(trainer_module, "train_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = tiny_config("train.max_steps=8", "train.log_every=4", "train.max_nan_skips=2")
    with pytest.raises(TrainingAborted, match="2 consecutive steps had a non-finite loss"):
        run(cfg, tmp_path, resume="none", nan_from=1)
    assert len(calls) == 4, "the abort is read at the logging step (4), not before"
    records = jsonl(tmp_path)
    assert [(r["step"], r["loss"], r["in_a_row"]) for r in records if r["kind"] == "nan_skip"] == [(2, "d", 1),
                                                                                                  (3, "d", 2)]


# ------------------------------------------------------------------------------------------------
# clipping over ZeRO partitions, 2 gloo ranks
# ------------------------------------------------------------------------------------------------
def _clip_on_rank(rank: int, out_dir: str) -> None:
    import torch.distributed as dist

    from gafh_fast.train.optim import GatedAdam

    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=2)
    full = torch.randn(2, 1000, generator=torch.Generator().manual_seed(0))  # the whole gradient
    part = torch.nn.Parameter(torch.zeros(1000))  # this rank's partition, as ZeRO hands it over
    part.grad = full[rank].clone()
    opt = GatedAdam([part], impl="fused", max_grad_norm=1.0, lr=0.0)
    opt.partitioned = True
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(part.grad.clone()))  # after GatedAdam's clip
    opt.step()
    # a replicated gradient (ZeRO 0, no partitions): each rank's norm is already the whole one
    whole = torch.nn.Parameter(torch.zeros(2000))
    whole.grad = full.flatten().clone()
    replicated = GatedAdam([whole], impl="fused", max_grad_norm=1.0, lr=0.0)  # partitioned: its default
    replicated.register_step_pre_hook(lambda o, a, k: seen.append(whole.grad.clone()))
    replicated.step()
    torch.save(seen, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_clip_norm_over_zero_partitions_is_the_global_norm(tmp_path):
    """Each rank's optimizer holds half the gradient; the clipped halves together are
    torch.nn.utils.clip_grad_norm_ of the whole (its formula, a norm of ~22 clipped to 1). An
    optimizer not told it holds a partition (GatedAdam's default) clips each rank's whole gradient
    by its own norm, not by the sum over ranks."""
    import torch.multiprocessing as mp

    mp.spawn(_clip_on_rank, args=(str(tmp_path),), nprocs=2, join=True)
    seen = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    want = torch.randn(2, 1000, generator=torch.Generator().manual_seed(0)).flatten().requires_grad_(True)
    want.grad = want.detach().clone()
    assert torch.nn.utils.clip_grad_norm_([want], 1.0) > 10
    torch.testing.assert_close(torch.cat([seen[0][0], seen[1][0]]), want.grad, rtol=1e-6, atol=0)
    for rank in (0, 1):
        torch.testing.assert_close(seen[rank][1], want.grad, rtol=1e-6, atol=0)

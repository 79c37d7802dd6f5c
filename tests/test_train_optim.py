"""GatedAdam (gafh_fast/train/optim.py) on its own, in one process: without a veto it is torch Adam
in the implementation train.adam_impl names, and its device-side clipping is
torch.nn.utils.clip_grad_norm_. (The veto itself: tests/test_train_sync_free.py; clipping over ZeRO
partitions on 2 ranks: test_clip_norm_over_zero_partitions_is_the_global_norm there.)"""
from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.optim.adam as torch_adam  # noqa: E402

from gafh_fast.train.optim import GatedAdam  # noqa: E402

TORCH_FLAGS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}
TORCH_FUNCTION = {"fused": "_fused_adam", "foreach": "_multi_tensor_adam", "for_loop": "_single_tensor_adam"}


def grads(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [3 * torch.randn(5, 4, generator=g), 3 * torch.randn(7, generator=g)]  # norm ~ 15: a clip at 1 would act


@pytest.mark.parametrize("impl", ["fused", "foreach", "for_loop"])
def test_without_a_veto_gated_adam_is_torch_adam_in_the_named_implementation(impl, monkeypatch):
    """3 steps with weight decay, no clipping asked: parameters and moments bit for bit torch Adam's,
    and torch ran the implementation train.adam_impl names (a speed choice that must not be ignored)."""
    ran = []
    for name in TORCH_FUNCTION.values():
        real = getattr(torch_adam, name)
        monkeypatch.setattr(torch_adam, name, lambda *a, _real=real, _name=name, **k: ran.append(_name) or _real(*a, **k))
    start = [torch.randn(5, 4, generator=torch.Generator().manual_seed(1)), torch.zeros(7)]
    ours = [torch.nn.Parameter(t.clone()) for t in start]
    want = [torch.nn.Parameter(t.clone()) for t in start]
    kwargs = dict(lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    gated = GatedAdam(ours, impl=impl, **kwargs)  # max_grad_norm left at its default: no clipping
    reference = torch.optim.Adam(want, **kwargs, **TORCH_FLAGS[impl])
    for step in range(3):
        for params in (ours, want):
            for p, g in zip(params, grads(step)):
                p.grad = g.clone()
        gated.step()
        reference.step()
    assert ran == [TORCH_FUNCTION[impl]] * 6
    for p, q in zip(ours, want):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(gated.state[p][key], reference.state[q][key]), key


@pytest.mark.parametrize("norm,max_norm", [(22.0, 1.0), (0.1, 1.0), (3e-6, 1e-6)],
                         ids=["clipped", "below-the-limit", "norm-near-eps"])
def test_clipping_is_clip_grad_norm(norm, max_norm):
    """One parameter, one gradient scaled to `norm`: the gradient Adam steps with (seen by a step
    pre-hook registered after GatedAdam's) equals clip_grad_norm_'s, whose formula is
    min(1, max_norm / (norm + 1e-6)): above the limit, below it (unchanged), and at a norm comparable
    to the 1e-6 (where the eps halves or quarters the coefficient)."""
    g = torch.randn(1000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grad = (g * (norm / g.norm())).float()
    param = torch.nn.Parameter(torch.zeros(1000))
    param.grad = grad.clone()
    opt = GatedAdam([param], impl="fused", max_grad_norm=max_norm, lr=0.0)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(param.grad.clone()))
    opt.step()
    want = torch.nn.Parameter(torch.zeros(1000))
    want.grad = grad.clone()
    torch.nn.utils.clip_grad_norm_([want], max_norm)
    torch.testing.assert_close(seen[0], want.grad, rtol=1e-6, atol=0)
    if norm < max_norm:
        assert torch.equal(seen[0], grad)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_optimizer_knows_it_holds_a_zero_partition(stage):
    """The clip norm is summed over ranks exactly when the optimizer holds one rank's partition:
    GatedAdam.partitioned is set on the engines whose optimizer DeepSpeed's ZeRO 1/2 optimizer wraps
    (flat fp32 partitions), and only on those. Two ranks: tests/test_train_sync_free.py."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from gafh_fast.config import load_config
    from gafh_fast.train.engine import build_engine, gated_optimizer, init_distributed

    init_distributed()
    cfg = load_config(None, ("deepspeed.bf16=false", f"deepspeed.zero_stage={stage}", "train.grad_clip=1.0",
                             "data.batch_size=2"))
    engine = build_engine(cfg, torch.nn.Linear(4, 3), 1e-3)
    assert isinstance(engine.optimizer, DeepSpeedZeroOptimizer) == (stage > 0)
    assert gated_optimizer(engine).partitioned == (stage > 0)

"""Every optional training feature, each with a test that fails when the feature is wrong.

EMA (formula; used for validation and export), LR schedules (warm-up, cosine, multistep: the LR of
every step against hand-computed values, across a SIGTERM + resume), pretrain_steps (L1 only, D
idle, then the GAN step), grad_clip and weight_decay (what Adam actually received, read back from
its first moment), the content loss (against a hand-written VGG-feature MSE), and a run on the DALI
CPU pipeline. In-process runs of the tiny model of tests/train_runner.py, fp32.

How the optimizer's input is read back: after torch Adam's first step, exp_avg = (1 - beta1) * g,
where g is the gradient Adam saw (after clipping, plus weight_decay * p for its L2 decay). And every
Adam step moves p by exactly -lr * u with u = m_hat / (sqrt(v_hat) + eps), so the LR a step really
used is -dp / u (least squares over all elements), whatever the scheduler reports.
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import spec_reference as spec  # noqa: E402
from train_runner import base_optimizer, flat_params, run, tiny_config, val_batches  # noqa: E402

import gafh_fast.train.trainer as trainer_module  # noqa: E402
from gafh_fast.losses import content_loss  # noqa: E402
from gafh_fast.models import build_discriminator, build_generator, build_vgg  # noqa: E402
from gafh_fast.train.ema import EMA  # noqa: E402
from gafh_fast.train.optim import adam_impl_flags  # noqa: E402
from gafh_fast.train.validate import validate  # noqa: E402


# ------------------------------------------------------------------------------------------------
# recording what each step did
# ------------------------------------------------------------------------------------------------
def clone_state(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class StepRecorder:
    """Wraps gafh_fast.train.trainer.train_step: per step, the inputs, the phase, both models and
    both optimizers' parameters before and after, and the LR each optimizer held when it stepped."""

    def __init__(self):
        self.steps: list[dict] = []

    def install(self, monkeypatch) -> None:
        real = trainer_module.train_step

        def recorded(cfg, g_engine, d_engine, vgg, hr, lr, **kwargs):
            rec = {"gan": kwargs["gan"], "hr": hr.detach().clone(), "lr": lr.detach().clone(),
                   "g_before": clone_state(g_engine.module), "d_before": clone_state(d_engine.module)}
            for name, engine in (("g", g_engine), ("d", d_engine)):
                opt = base_optimizer(engine)
                rec[f"{name}_lr"] = [group["lr"] for group in opt.param_groups]
                rec[f"{name}_opt_before"] = [p.detach().clone() for grp in opt.param_groups for p in grp["params"]]
            out = real(cfg, g_engine, d_engine, vgg, hr, lr, **kwargs)
            rec["out"] = out
            rec["g_after"], rec["d_after"] = clone_state(g_engine.module), clone_state(d_engine.module)
            for name, engine in (("g", g_engine), ("d", d_engine)):
                rec[f"{name}_lr_used"] = adam_lr_used(base_optimizer(engine), rec[f"{name}_opt_before"],
                                                      cfg.train.betas)
            self.steps.append(rec)
            return out

        monkeypatch.setattr(trainer_module, "train_step", recorded)


def adam_lr_used(opt: torch.optim.Optimizer, before: list[torch.Tensor], betas) -> float | None:
    """The LR of the Adam step just taken: dp = -lr * m_hat / (sqrt(v_hat) + eps), solved for lr by
    least squares over all elements. None when this optimizer has not stepped."""
    params = [p for group in opt.param_groups for p in group["params"]]
    num, den, stepped = 0.0, 0.0, False
    eps = opt.param_groups[0]["eps"]
    for p, p0 in zip(params, before):
        st = opt.state.get(p)
        if not st:
            continue
        stepped = True
        t = float(st["step"])
        m_hat = st["exp_avg"].double() / (1 - betas[0] ** t)
        v_hat = st["exp_avg_sq"].double() / (1 - betas[1] ** t)
        u = m_hat / (v_hat.sqrt() + eps)
        dp = p.detach().double() - p0.double()
        num += -(dp * u).sum().item()
        den += (u * u).sum().item()
    return num / den if stepped and den > 0 else None


@pytest.fixture
def recorder(monkeypatch):
    rec = StepRecorder()
    rec.install(monkeypatch)
    return rec


def models_from(cfg, g_state=None, d_state=None):
    """Library G / D (checked against the spec in test_spec.py) holding recorded weights, train mode."""
    g, d = build_generator(cfg), build_discriminator(cfg)
    if g_state is not None:
        g.load_state_dict(g_state)
    if d_state is not None:
        d.load_state_dict(d_state)
    return g.train(), d.train()


def vgg_params(vgg) -> dict:
    return {f"features.{k}": v for k, v in vgg.features.state_dict().items()}


def reference_grads(cfg, rec: dict, vgg) -> tuple[dict, dict]:
    """The gradients of the spec's L_D (at the step's starting D and G) and L_G (at the starting G,
    with D after its own step, frozen), by parameter name, written from the spec."""
    t = cfg.train
    g, d = models_from(cfg, rec["g_before"], rec["d_before"])
    hr, lr = rec["hr"], rec["lr"]
    hf = g(lr)
    loss_d = spec.ragan_loss(d(hr), d(hf.detach()), real_target=1)
    d_grads = dict(zip([n for n, _ in d.named_parameters()], torch.autograd.grad(loss_d, list(d.parameters()))))
    d.load_state_dict(rec["d_after"])
    d.requires_grad_(False)
    with torch.no_grad():
        c_real = d(hr)
    loss_g = (t.content.weight * spec.content_loss(vgg_params(vgg), hf, hr, t.content.layer)
              + t.gan.weight * spec.ragan_loss(c_real, d(hf), real_target=0))
    if t.pixel_weight:
        loss_g = loss_g + t.pixel_weight * (hf - hr).abs().mean()
    g_grads = dict(zip([n for n, _ in g.named_parameters()], torch.autograd.grad(loss_g, list(g.parameters()))))
    return g_grads, d_grads


def adam_input(engine, beta1: float) -> dict:
    """The gradient Adam saw on its first step, by parameter name: exp_avg / (1 - beta1)."""
    opt = base_optimizer(engine)
    return {n: opt.state[p]["exp_avg"] / (1 - beta1) for n, p in engine.module.named_parameters()}


def assert_rel(what: str, got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    """max |got - want| <= rtol * max |want|: the same sums in another order, or one in fp32."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got.double() - want.double()).abs().max().item()
    scale = want.double().abs().max().item()
    assert err <= rtol * scale + 1e-12, f"{what}: max error {err:.3g}, max |reference| {scale:.3g}"


def assert_tensors_close(what: str, got: dict, want: dict, rtol: float) -> None:
    """assert_rel per tensor, on the scale of the largest tensor: a few of D's biases get ~1e-12
    gradients (RaGAN is blind to a shift of every logit), which are rounding noise."""
    assert got.keys() == want.keys()
    scale = max(w.double().abs().max().item() for w in want.values())
    for name in want:
        err = (got[name].double() - want[name].double()).abs().max().item()
        assert got[name].shape == want[name].shape and err <= rtol * scale, (
            f"{what} {name}: max error {err:.3g}, max |reference| {want[name].abs().max().item():.3g}")


# ------------------------------------------------------------------------------------------------
# EMA
# ------------------------------------------------------------------------------------------------
def test_ema_update_formula_and_buffers():
    """shadow <- decay * shadow + (1 - decay) * current; buffers copied; the shadow is fp32 and frozen."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = EMA(net, decay=0.75)
    start = [p.detach().double().clone() for p in net.parameters()]
    assert all(not p.requires_grad for p in ema.module.parameters()) and not ema.module.training
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
        net[1].running_mean.fill_(0.5)
    ema.update(net)
    for shadow, p0, p in zip(ema.module.parameters(), start, net.parameters()):
        torch.testing.assert_close(shadow.double(), 0.75 * p0 + 0.25 * p.detach().double(), rtol=1e-6, atol=1e-7)
    assert torch.equal(ema.module[1].running_mean, net[1].running_mean)


def test_ema_of_a_bf16_model_is_kept_in_fp32():
    """A bf16 shadow could not move by (1 - 0.999) x a weight (bf16 has 8 bits of mantissa)."""
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 4).to(torch.bfloat16)
    ema = EMA(net, decay=0.999)
    assert all(p.dtype == torch.float32 for p in ema.module.parameters())
    start = [p.detach().double().clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(net)
    for shadow, p0, p in zip(ema.module.parameters(), start, net.parameters()):
        torch.testing.assert_close(shadow.double(), 0.999 * p0 + 0.001 * p.double(), rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    """3 steps with ema_decay 0.9 and a large LR (so the average differs clearly from G), validated
    and exported at the end."""
    run_dir = tmp_path_factory.mktemp("ema")
    cfg = tiny_config("train.max_steps=3", "train.ema_decay=0.9", "train.lr_g=1.0e-2")
    trainer, metrics, trace = run(cfg, run_dir, resume="none")
    return cfg, run_dir, trainer, metrics, trace


def test_ema_follows_the_formula_every_step(ema_run):
    _, _, trainer, _, trace = ema_run
    decay = 0.9
    shadow = trace["start"]["g"].double()  # the EMA starts as a copy of G
    expected = []
    for g_after in trace["g"]:
        expected.append(shadow)
        shadow = decay * shadow + (1 - decay) * g_after.double()
    # the trace records the EMA before the trainer's update of that step: expected[i] = after i updates
    for i, (got, want) in enumerate(zip(trace["ema"], expected)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6, msg=f"EMA before update {i + 1}")
    torch.testing.assert_close(flat_params(trainer.ema.module).double(), shadow, rtol=1e-5, atol=1e-6)
    assert (shadow - trace["g"][-1].double()).abs().max() > 1e-3  # the average is not G itself
    for a, b in zip(trainer.ema.module.buffers(), trainer.g_engine.module.buffers()):
        assert torch.equal(a, b.to(a.dtype))  # BatchNorm statistics copied, not averaged


def test_ema_weights_are_validated_and_exported(ema_run):
    cfg, run_dir, trainer, metrics, _ = ema_run
    from safetensors.torch import load_file

    exported = load_file(str(run_dir / "generator.safetensors"))
    ema_state, g_state = trainer.ema.module.state_dict(), trainer.g_engine.module.state_dict()
    assert exported.keys() == ema_state.keys()
    for key, value in exported.items():
        assert torch.equal(value, ema_state[key].float() if value.is_floating_point() else ema_state[key]), key
    assert any(not torch.equal(exported[k], g_state[k].float()) for k in exported if exported[k].is_floating_point())

    def score(model):
        return validate(model, val_batches(cfg), device=torch.device("cpu"), crop_border=cfg.val.crop_border,
                        grid_images=0)

    on_ema, on_g = score(trainer.ema.module), score(trainer.g_engine.module)
    assert metrics["g_psnr_rgb"] == pytest.approx(on_ema["g_psnr_rgb"], rel=1e-9)
    assert metrics["g_ssim_rgb"] == pytest.approx(on_ema["g_ssim_rgb"], rel=1e-9)
    assert abs(on_g["g_psnr_rgb"] - on_ema["g_psnr_rgb"]) > 1e-3  # the check can tell the two apart


# ------------------------------------------------------------------------------------------------
# LR schedules, across a SIGTERM + resume
# ------------------------------------------------------------------------------------------------
# LR multiplier of optimizer steps 1..6 (max_steps = 6), computed by hand:
#   warm-up W: (k) / W for steps k = 1..W, then the schedule;
#   cosine after warm-up W=2: 0.5 (1 + cos(pi (k - 1 - W) / (6 - W))) for k = 3..6;
#   multistep [2, 4]: halves once 2 steps are done, again after 4.
SCHEDULES = {
    "warmup3-constant": (("train.warmup_steps=3",), [1 / 3, 2 / 3, 1.0, 1.0, 1.0, 1.0]),
    "warmup2-cosine": (("train.warmup_steps=2", "train.lr_schedule=cosine"),
                       [0.5, 1.0, 1.0, 0.8535533905932737, 0.5, 0.14644660940672627]),
    "multistep-2-4": (("train.lr_schedule=multistep", "train.lr_milestones=[2,4]"),
                      [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_lr_schedule_per_step_and_restored_on_resume(name, recorder, tmp_path):
    overrides, factors = SCHEDULES[name]
    cfg = tiny_config("train.max_steps=6", "train.lr_g=1.0e-3", "train.lr_d=2.0e-3", "train.ema_decay=0.5",
                      "train.betas=[0.8,0.99]", *overrides)
    stopped, _, _ = run(cfg, tmp_path, resume="none", sigterm_at=3)  # stops after step 3 with a checkpoint
    assert len(recorder.steps) == 3
    _, _, trace = run(cfg, tmp_path, resume="auto")
    assert trace["step"] == [4, 5, 6]
    assert torch.equal(trace["start"]["ema"], flat_params(stopped.ema.module)), "EMA not restored on resume"
    assert len(recorder.steps) == 6
    for k, (rec, f) in enumerate(zip(recorder.steps, factors), start=1):
        for engine, base in (("g", cfg.train.lr_g), ("d", cfg.train.lr_d)):
            assert rec[f"{engine}_lr"] == [pytest.approx(base * f, rel=1e-12)], f"{name}: {engine} LR at step {k}"
            used = rec[f"{engine}_lr_used"]  # what Adam actually applied
            assert used == pytest.approx(base * f, rel=2e-3), f"{name}: {engine} step {k} moved with LR {used}"


# ------------------------------------------------------------------------------------------------
# pretrain_steps
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pretrain")
    cfg = tiny_config("train.max_steps=3", "train.pretrain_steps=2", "train.pixel_weight=0.5",
                      "deepspeed.zero_stage=0", "train.lr_g=1.0e-3")
    rec = StepRecorder()
    with pytest.MonkeyPatch.context() as mp:
        rec.install(mp)
        trainer, _, trace = run(cfg, run_dir, resume="none")
    return cfg, trainer, trace, rec.steps


def test_pretrain_steps_are_l1_only_with_d_idle(pretrain_run):
    cfg, trainer, trace, steps = pretrain_run
    assert [s["gan"] for s in steps] == [False, False, True]
    assert [sorted(loss) for loss in trace["losses"][:2]] == [["pixel"], ["pixel"]]
    # D neither moves nor builds optimizer state before the GAN phase
    for k in range(2):
        assert all(torch.equal(steps[k]["d_after"][n], v) for n, v in steps[k]["d_before"].items()), \
            f"D changed in pretrain step {k + 1}"
        assert steps[k]["d_lr_used"] is None
    # G: plain torch Adam on the spec's L1 loss, same batches
    g, _ = models_from(cfg, steps[0]["g_before"])
    # the trainer's Adam implementation: fused and for-loop differ in the last bit, which Adam
    # turns into lr * sign(noise) on weights whose gradient is ~0 (fusion.bias here)
    opt = torch.optim.Adam(g.parameters(), lr=cfg.train.lr_g, betas=cfg.train.betas,
                           **adam_impl_flags(cfg.train.adam_impl))
    for k in range(2):
        loss = (g(steps[k]["lr"]) - steps[k]["hr"]).abs().mean()
        assert trace["losses"][k]["pixel"] == pytest.approx(loss.item(), rel=1e-6), f"L1 at step {k + 1}"
        opt.zero_grad()
        loss.backward()
        opt.step()
    want = {n: p.detach() for n, p in g.named_parameters()}
    got = {n: steps[1]["g_after"][n] for n in want}
    assert_tensors_close("G after 2 L1 steps", got, want, rtol=1e-5)


def test_gan_step_after_pretraining_has_the_spec_losses(pretrain_run):
    """Step 3: D steps, and every reported loss equals the spec's formula on the recorded state."""
    cfg, trainer, trace, steps = pretrain_run
    rec, losses, t = steps[2], trace["losses"][2], cfg.train
    assert sorted(losses) == ["adv", "content", "d", "g", "pixel"]
    assert rec["d_lr_used"] == pytest.approx(t.lr_d, rel=2e-3)
    g, d = models_from(cfg, rec["g_before"], rec["d_before"])
    with torch.no_grad():
        hf = g(rec["lr"])
        assert losses["d"] == pytest.approx(spec.ragan_loss(d(rec["hr"]), d(hf), 1).item(), rel=1e-5)
        d.load_state_dict(rec["d_after"])  # L_G sees the D that just stepped
        adv = spec.ragan_loss(d(rec["hr"]), d(hf), 0).item()
        content = spec.content_loss(vgg_params(trainer.vgg), hf, rec["hr"], t.content.layer).item()
        pixel = (hf - rec["hr"]).abs().mean().item()
    assert losses["adv"] == pytest.approx(adv, rel=1e-5)
    assert losses["content"] == pytest.approx(content, rel=1e-5)
    assert losses["pixel"] == pytest.approx(pixel, rel=1e-6)
    total = t.content.weight * content + t.gan.weight * adv + t.pixel_weight * pixel
    assert losses["g"] == pytest.approx(total, rel=1e-5)


# ------------------------------------------------------------------------------------------------
# grad_clip, weight_decay: what Adam received on the first step
# ------------------------------------------------------------------------------------------------
def first_step(tmp_path, monkeypatch, *overrides):
    cfg = tiny_config("train.max_steps=1", "deepspeed.zero_stage=0", "train.betas=[0.8,0.99]", *overrides)
    rec = StepRecorder()
    rec.install(monkeypatch)
    trainer, _, _ = run(cfg, tmp_path, resume="none")
    g_grads, d_grads = reference_grads(cfg, rec.steps[0], trainer.vgg)
    return cfg, trainer, rec.steps[0], g_grads, d_grads


def clipped(grads: dict, max_norm: float) -> dict:
    """torch.nn.utils.clip_grad_norm_ over one engine's parameters."""
    total = torch.cat([g.flatten() for g in grads.values()]).norm().item()
    coef = min(1.0, max_norm / (total + 1e-6))
    return {n: g * coef for n, g in grads.items()}


def test_grad_clip_clips_each_engines_global_norm(tmp_path, monkeypatch):
    max_norm = 1e-4
    cfg, trainer, rec, g_grads, d_grads = first_step(tmp_path, monkeypatch, f"train.grad_clip={max_norm}")
    beta1 = cfg.train.betas[0]
    for name, engine, grads in (("G", trainer.g_engine, g_grads), ("D", trainer.d_engine, d_grads)):
        norm = torch.cat([g.flatten() for g in grads.values()]).norm().item()
        assert norm > 3 * max_norm, f"{name}: gradient norm {norm:.3g} too small to see clipping"
        seen = adam_input(engine, beta1)
        assert_tensors_close(f"{name} clipped gradient", seen, clipped(grads, max_norm), rtol=1e-4)


def test_weight_decay_is_adams_l2_term(tmp_path, monkeypatch):
    """torch Adam's weight_decay: g + wd * p goes into the moments (L2, not AdamW's decoupled decay);
    and without grad_clip the gradient is untouched."""
    wd = 0.5
    cfg, trainer, rec, g_grads, d_grads = first_step(tmp_path, monkeypatch, f"train.weight_decay={wd}")
    beta1 = cfg.train.betas[0]
    for name, engine, grads, before in (("G", trainer.g_engine, g_grads, rec["g_before"]),
                                        ("D", trainer.d_engine, d_grads, rec["d_before"])):
        want = {n: grads[n] + wd * before[n] for n in grads}
        assert_tensors_close(f"{name} gradient + L2", adam_input(engine, beta1), want, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# content loss
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", ["relu1_2", "conv2_1", "pool2"])
def test_content_loss_is_the_vgg_feature_mse(layer):
    cfg = tiny_config(f"train.content.layer={layer}")
    vgg = build_vgg(cfg).double()
    g = torch.Generator().manual_seed(0)
    hf = (torch.rand(2, 3, 16, 12, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    hr = (torch.rand(2, 3, 16, 12, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    got = content_loss(vgg, hf, hr)  # the library takes the MSE in fp32
    hf_ref = hf.detach().clone().requires_grad_(True)
    want = spec.content_loss(vgg_params(vgg), hf_ref, hr.detach(), layer)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    got.backward()
    want.backward()
    assert_rel(f"d content / d HF at {layer}", hf.grad, hf_ref.grad, rtol=1e-5)
    assert hr.grad is None  # the HR features carry no gradient
    assert all(p.grad is None for p in vgg.parameters())


# ------------------------------------------------------------------------------------------------
# DALI loader, end to end
# ------------------------------------------------------------------------------------------------
def test_training_on_the_dali_cpu_pipeline(tmp_path, recorder):
    """data.loader=dali: the trainer builds its own loaders; every step trains on the batch the
    reference PIL loader gives for that position (same plan), and validation covers the val split."""
    pytest.importorskip("nvidia.dali", reason="nvidia.dali is not installed")
    from gafh_fast.data import build_loader, make_synthetic_celeba
    from gafh_fast.metrics import psnr

    root = make_synthetic_celeba(tmp_path / "faces", 20, seed=1)  # 16 train / 2 val / 2 test
    cfg = tiny_config(f"data.root={root}", "data.loader=dali", "data.num_threads=1", "data.val_batch_size=2",
                      "train.max_steps=3")
    trainer = trainer_module.Trainer(cfg, tmp_path / "run", resume="none")
    metrics = trainer.fit()
    assert type(trainer.train_loader).__name__ == "DALILoader"
    assert metrics["images"] == 2 and math.isfinite(metrics["g_psnr_rgb"])
    pil_cfg = tiny_config(f"data.root={root}", "data.loader=pil")
    reference = build_loader(pil_cfg, "train")
    reference.num_workers = 0
    reference.set_epoch(0)
    for k, (rec, ref) in enumerate(zip(recorder.steps, reference), start=1):
        losses, skipped = rec["out"].read()
        assert skipped is None and all(math.isfinite(v) for v in losses.values())
        for key in ("hr", "lr"):
            assert rec[key].shape == ref[key].shape
            db = psnr((rec[key].double() + 1) / 2, (ref[key].double() + 1) / 2)
            assert db.min() > 40, f"step {k} {key}: DALI vs PIL batch at {db.tolist()} dB"
    assert len(recorder.steps) == 3
    start = recorder.steps[0]["g_before"]
    assert any(not torch.equal(p, start[n]) for n, p in trainer.g_engine.module.named_parameters())


# ------------------------------------------------------------------------------------------------
# engines: BatchNorm statistics in the parameters' dtype
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bf16", [False, True])
def test_batchnorm_statistics_follow_the_parameter_dtype(bf16):
    """cuDNN's BatchNorm wants running statistics in the parameters' dtype (CPU accepts any mix, so
    only the dtypes show it): DeepSpeed casts parameters, engine.py asks it to cast buffers too."""
    from gafh_fast.train import build_models
    from gafh_fast.train.engine import build_engines, init_distributed

    init_distributed()
    cfg = tiny_config(f"deepspeed.bf16={str(bf16).lower()}")
    generator, discriminator, _ = build_models(cfg)
    want = torch.bfloat16 if bf16 else torch.float32
    for engine in build_engines(cfg, generator, discriminator):
        stats = [b for name, b in engine.module.named_buffers() if name.endswith(("running_mean", "running_var"))]
        assert stats and {b.dtype for b in stats} == {want}
        assert {p.dtype for p in engine.module.parameters()} == {want}


# ------------------------------------------------------------------------------------------------
# a non-finite loss on any rank makes every rank skip
# ------------------------------------------------------------------------------------------------
def _finite_on_rank(rank: int, values: list, out_dir: str) -> None:
    import torch.distributed as dist

    from gafh_fast.train.step import StepOutput, StepWindow, any_rank_nonfinite

    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=2)
    # a file store: no port to race for, and no TCP store thread to tear down at exit
    answers = [any_rank_nonfinite(torch.tensor(1.0), torch.tensor(v[rank])).tolist() for v in values]
    # the trainer's read-back: one rank asks to stop (SIGTERM), every rank learns it; then none asks
    stops = []
    for asks in ((rank == 1), False):
        window = StepWindow(torch.device("cpu"))
        out = StepOutput({"d": torch.tensor(0.5 + rank)}, {}, torch.tensor(2))
        window.add(7, out)
        stops.append(window.read(out, stop_requested=asks))
    torch.save((answers, stops), f"{out_dir}/rank{rank}.pt")
    dist.barrier()  # both ranks are past their last collective before either tears down
    dist.destroy_process_group()


def test_non_finite_loss_on_one_rank_skips_on_all(tmp_path):
    """any_rank_nonfinite's flag is the same on both ranks; so is the read-back's stop flag
    (StepWindow.read: one rank's SIGTERM stops every rank at the same step)."""
    import torch.multiprocessing as mp

    from gafh_fast.train.step import any_rank_nonfinite

    nan, inf = float("nan"), float("inf")
    assert any_rank_nonfinite(torch.tensor(2.0), torch.tensor(-1.0)).tolist() == [0.0]  # a world of one
    assert any_rank_nonfinite(torch.tensor(2.0), torch.tensor(nan)).tolist() == [1.0]
    assert any_rank_nonfinite(torch.tensor(-inf, dtype=torch.bfloat16)).tolist() == [1.0]
    values = [(1.0, 2.0), (1.0, nan), (inf, 0.5)]  # per case: rank 0's loss, rank 1's loss
    mp.spawn(_finite_on_rank, args=(values, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        answers, stops = torch.load(tmp_path / f"rank{rank}.pt")
        assert answers == [[0.0], [1.0], [1.0]], f"rank {rank}"
        assert stops == [({"d": 0.5 + rank}, [(7, "g")], True), ({"d": 0.5 + rank}, [(7, "g")], False)], f"rank {rank}"

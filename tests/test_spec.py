"""G, D and the VGG-19 features against the spec written out literally (tests/spec_reference.py).

The library's networks get random weights (every bias, BN affine and running statistic non-zero, so
no path hides behind a zero), the same tensors go to the literal forward by state-dict key, and the
outputs are compared in float64 (torch backend; the same operations in the same order, so only
rounding of the order 1e-15 separates them) or float32 against float64 (Triton backend). Every option
the config allows is covered: trunk_norm, upsample, SFM/output kernel sizes, block counts, res_scale,
the discriminator's norm, the VGG cut layer, BatchNorm in eval and training mode.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    # The Triton case runs in Triton's interpreter on CPU: it must be on before the kernels are
    # defined (tests/kernels/conftest.py does the same for that folder).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import spec_reference as spec  # noqa: E402
from gafh_fast.config import Config, DiscriminatorConfig, load_config  # noqa: E402
from gafh_fast.models import Discriminator, build_discriminator, build_generator, build_vgg  # noqa: E402

TINY_G = ("model.generator.nf=8", "model.generator.gc=4", "kernels=torch")


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Weights ~ N(0, 1/fan_in), biases and BN shifts ~ N(0, 0.1), BN scales ~ 1 + N(0, 0.2), running
    means ~ N(0, 0.1), running variances in [0.75, 1.25]: every term of the spec contributes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict(keep_vars=True).items():
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=g, dtype=torch.float64)
            if name.endswith("running_var"):
                value = 0.75 + 0.5 * torch.rand(t.shape, generator=g, dtype=torch.float64)
            elif t.dim() > 1:
                value = noise / math.sqrt(t[0].numel())
            elif name.endswith("weight"):  # a BatchNorm scale
                value = 1.0 + 0.2 * noise
            else:
                value = 0.1 * noise
            t.copy_(value.to(t.dtype))


def state64(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone().double() if v.is_floating_point() else v.clone()
            for k, v in module.state_dict().items()}


def lr_input(n=2, h=5, w=4, seed=1, dtype=torch.float64):
    """Non-square on purpose: an H/W mix-up changes the shape or the values."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, h, w, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)


def assert_same(got: torch.Tensor, want: torch.Tensor, rtol: float, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != spec {tuple(want.shape)}"
    err = (got.double() - want.double()).abs().max().item()
    scale = want.double().abs().max().item()
    assert err <= rtol * scale, f"{what}: max |library - spec| = {err:.3g} (spec max |value| {scale:.3g})"


def spec_g_kwargs(cfg: Config) -> dict:
    g = cfg.model.generator
    return dict(nf=g.nf, gc=g.gc, sfm_kernel=g.sfm_kernel, out_kernel=g.out_kernel, num_dnb=g.num_dnb,
                ridb_per_dnb=g.ridb_per_dnb, idb_per_ridb=g.idb_per_ridb, trunk_norm=g.trunk_norm,
                upsample=g.upsample)


# ------------------------------------------------------------------------------------------------
# generator
# ------------------------------------------------------------------------------------------------
G_VARIANTS = {
    # the spec's defaults (res_scale, trunk_norm, upsample, kernels 9/9) at tiny widths and depths;
    # 3 RIDBs per DNB so RIDB 1, 2 (one residual) and RIDB 3 (also the DNB's) are all there
    "defaults": ("model.generator.num_dnb=2", "model.generator.ridb_per_dnb=3", "model.generator.idb_per_ridb=2"),
    "pixel_shuffle-no_norm-k3k5": ("model.generator.num_dnb=1", "model.generator.ridb_per_dnb=1",
                                   "model.generator.idb_per_ridb=3", "model.generator.upsample=pixel_shuffle",
                                   "model.generator.trunk_norm=none", "model.generator.sfm_kernel=3",
                                   "model.generator.out_kernel=5", "model.generator.res_scale=0.5"),
    "nearest-no_norm-k5k3": ("model.generator.num_dnb=3", "model.generator.ridb_per_dnb=2",
                             "model.generator.idb_per_ridb=1", "model.generator.trunk_norm=none",
                             "model.generator.sfm_kernel=5", "model.generator.out_kernel=3",
                             "model.generator.gc=6"),
    "pixel_shuffle-batchnorm": ("model.generator.num_dnb=1", "model.generator.ridb_per_dnb=2",
                                "model.generator.idb_per_ridb=2", "model.generator.upsample=pixel_shuffle",
                                "model.generator.res_scale=0.3"),
}


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("variant", list(G_VARIANTS))
def test_generator_equals_spec(variant, training):
    cfg = load_config(None, TINY_G + G_VARIANTS[variant])
    model = build_generator(cfg).double().train(training)
    randomize_(model, seed=len(variant))
    p = state64(model)
    lr = lr_input()
    with torch.no_grad():
        got = model(lr)
        want = spec.generator(p, lr, res_scale=cfg.model.generator.res_scale, training=training,
                              **spec_g_kwargs(cfg))
    assert got.shape == (2, 3, 40, 32)
    assert (want.abs() < 0.9).float().mean() > 0.5, "tanh saturated: this comparison would see little"
    assert_same(got, want, 1e-12, f"G {variant} ({'train' if training else 'eval'})")
    for key, value in p.items():  # training-mode BN updates its running statistics like the spec's BN
        if value.is_floating_point():
            torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-12, atol=0)


def test_every_fused_call_gets_the_configured_backend(monkeypatch):
    """`kernels` reaches each fused op of the trunk. On CPU "auto" and "torch" compute the same
    thing, so only the argument shows a call that lost it: record it, then run the torch path."""
    import gafh_fast.models.generator as generator_module
    import gafh_fast.ops as ops

    calls = []

    def recording(name, real):
        def call(*args, backend="auto", **kwargs):
            calls.append((name, backend, len(args[1]) if name == "ridb" else 0))  # ridb: its IDB count
            return real(*args, backend="torch", **kwargs)
        return call

    monkeypatch.setattr(generator_module, "fused_conv3x3", recording("conv", ops.fused_conv3x3))
    monkeypatch.setattr(generator_module, "fused_ridb", recording("ridb", ops.fused_ridb))
    monkeypatch.setattr(generator_module, "fused_upconv3x3", recording("upconv", ops.fused_upconv3x3))
    monkeypatch.setattr(generator_module, "fused_out_conv", recording("out", ops.fused_out_conv))
    monkeypatch.setattr(generator_module, "fused_up_out_conv", recording("up_out", ops.fused_up_out_conv))
    # (variant, RIDB calls, IDBs per RIDB, other fused calls, their ops): defaults = BN fusion + nearest
    # up-convs (two fused_upconv3x3, then the last with the output conv: fused_up_out_conv), 2 x 3 RIDBs of
    # 2 IDBs; the other = fusion without BN (its residual fused) + pixel-shuffle up-convs (fused_conv3x3),
    # 1 RIDB of 3 IDBs, and the output conv (fused_out_conv)
    for variant, ridbs, idbs, convs, ops_called in (("defaults", 6, 2, 1 + 2 + 1, ("conv", "ridb", "up_out", "upconv")),
                                                    ("pixel_shuffle-no_norm-k3k5", 1, 3, 1 + 3 + 1, ("conv", "out", "ridb"))):
        model = build_generator(load_config(None, TINY_G + G_VARIANTS[variant] + ("kernels=triton",)))
        for kernels in ("triton", "torch"):
            if kernels == "torch":
                model.set_kernels("torch")
            calls.clear()
            with torch.no_grad():
                model(lr_input(dtype=torch.float32))
            assert sorted({c[:2] for c in calls}) == [(op, kernels) for op in ops_called], variant
            assert [c for c in calls if c[0] == "ridb"] == [("ridb", kernels, idbs)] * ridbs, variant
            assert len(calls) == ridbs + convs, variant


def test_generator_defaults_are_the_spec_constants():
    """The one place a spec constant could hide from the comparisons above: the defaults themselves."""
    g = Config().model.generator
    assert g.res_scale == spec.SPEC_RES_SCALE and g.trunk_norm == "batchnorm" and g.upsample == "nearest_conv"
    assert (g.nf, g.gc, g.sfm_kernel, g.out_kernel) == (64, 32, 9, 9)
    assert (g.num_dnb, g.ridb_per_dnb, g.idb_per_ridb) == (4, 3, 4)


def test_paper_generator_equals_spec():
    """Full width and depth (4 DNBs x 3 RIDBs x 4 IDBs, 9x9 kernels), on a small LR image."""
    cfg = load_config("configs/gafh_ridn_paper.yaml", ["kernels=torch"])
    model = build_generator(cfg).double().eval()
    randomize_(model, seed=3)
    lr = lr_input(n=1, h=4, w=3)
    with torch.no_grad():
        got = model(lr)
        want = spec.generator(state64(model), lr, **spec_g_kwargs(cfg))  # res_scale: the spec's 0.2
    assert (want.abs() < 0.9).float().mean() > 0.5
    assert_same(got, want, 1e-12, "paper G")


TRITON_VARIANTS = {
    # every fused-call kind: IDBs (the second with x != x0), RIDB 1..n-1, the last RIDB with the DNB
    # residual, fusion with BN, nearest up-convs
    "trunk": ("model.generator.num_dnb=1", "model.generator.ridb_per_dnb=2", "model.generator.idb_per_ridb=2"),
    # pixel-shuffle up-convs of 4 nf = 160 output channels: more than one output-channel tile (the
    # paper's nf 64 gives 256), and the fusion without BN (its residual fused)
    "pixel_shuffle-nf40": ("model.generator.nf=40", "model.generator.gc=8", "model.generator.num_dnb=1",
                           "model.generator.ridb_per_dnb=1", "model.generator.idb_per_ridb=1",
                           "model.generator.upsample=pixel_shuffle", "model.generator.trunk_norm=none"),
}


@pytest.mark.parametrize("variant", list(TRITON_VARIANTS))
def test_generator_triton_backend_equals_spec(variant):
    """kernels=triton (the interpreter on CPU): float32 kernels against the float64 spec, output and
    gradients, at one tiny shape per variant."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = load_config(None, TINY_G + ("kernels=triton", "model.generator.sfm_kernel=3", "model.generator.out_kernel=3")
                      + TRITON_VARIANTS[variant])
    model = build_generator(cfg).eval()
    randomize_(model, seed=5)
    params = dict(model.named_parameters())
    p = {k: v.requires_grad_(k in params) for k, v in state64(model).items()}
    model = model.to(device)
    lr = lr_input(n=1, h=2, w=3)
    got = model(lr.float().to(device))
    want = spec.generator(p, lr, **spec_g_kwargs(cfg))
    assert_same(got.cpu(), want, 1e-5, "G triton forward")
    upstream = torch.randn(want.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (got * upstream.float().to(device)).sum().backward()
    (want * upstream).sum().backward()
    for name, param in model.named_parameters():
        assert_same(param.grad.cpu(), p[name].grad, 1e-4, f"G triton d/d{name}")


# ------------------------------------------------------------------------------------------------
# discriminator
# ------------------------------------------------------------------------------------------------
def spec_d_params(model: torch.nn.Module):
    """The RaD's tensors by state-dict key: features.N (conv if 4-D weight, BN if it has running
    statistics), classifier.1 and classifier.3 (the two Linear layers)."""
    state = state64(model)
    layers: dict[int, dict] = {}
    for key, value in state.items():
        section, index, leaf = key.split(".")
        layers.setdefault((section, int(index)), {})[leaf] = value
    convs, norms = [], []
    for (section, _), t in sorted(layers.items()):
        if section != "features":
            continue
        if "running_mean" in t:
            norms[-1] = t
        else:
            convs.append(t)
            norms.append(None)
    dense = [layers[("classifier", 1)], layers[("classifier", 3)]]
    return convs, norms, dense


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("norm,hr_size", [("batchnorm", 64), ("none", 64), ("batchnorm", 32)])
def test_discriminator_equals_spec(norm, hr_size, training):
    cfg = load_config(None, ["model.discriminator.nf=4", "model.discriminator.dense=8",
                             f"model.discriminator.norm={norm}", f"data.hr_size={hr_size}"])
    model = build_discriminator(cfg).double().train(training)
    randomize_(model, seed=hr_size)
    convs, norms, dense = spec_d_params(model)
    assert [n is None for n in norms] == [True] + [norm == "none"] * 8
    x = lr_input(n=3, h=hr_size, w=hr_size, seed=4)
    with torch.no_grad():
        got = model(x)
        want = spec.discriminator(convs, norms, dense, x, nf=4, dense_width=8, training=training)
    assert got.shape == (3,)
    assert_same(got, want, 1e-12, f"D norm={norm} hr={hr_size}")
    if training and norm == "batchnorm":
        torch.testing.assert_close(model.state_dict()["features.3.running_var"], norms[1]["running_var"])


def test_discriminator_defaults_are_the_spec():
    d = Config().model.discriminator
    assert (d.nf, d.dense, d.norm) == (64, 1024, "batchnorm")
    # a 256x256 input by default: 8x8 after five stride-2 convs (512 * 8 * 8 = 32 768 with nf 64)
    small = DiscriminatorConfig(nf=2, dense=4)
    assert Discriminator(small).classifier[1].in_features == 16 * 8 * 8


# ------------------------------------------------------------------------------------------------
# VGG-19 features
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", ["conv1_1", "relu1_2", "pool1", "conv2_1", "relu3_4", "pool3",
                                   "relu4_3", "conv4_4", "relu5_4", "pool5"])
def test_vgg_features_forward_equals_spec(layer):
    """VGG19Features.forward itself: [-1, 1] -> [0, 1] -> ImageNet mean/std -> the layers up to the cut."""
    cfg = load_config(None, ["train.content.pretrained=false", f"train.content.layer={layer}"])
    vgg = build_vgg(cfg).double()
    p = {f"features.{k}": v for k, v in state64(vgg.features).items()}
    x = lr_input(n=2, h=32, w=32, seed=6)
    with torch.no_grad():
        got = vgg(x)
    # 1e-6, not 1e-12: the library keeps the ImageNet mean/std as float32 buffers (3e-8 relative)
    assert_same(got, spec.vgg19_features(p, x, layer), 1e-6, f"VGG {layer}")


def test_content_defaults_are_the_spec():
    t = Config().train
    assert (t.content.layer, t.content.weight, t.gan.weight) == ("relu4_3", 1.0, 1e-3)
    assert (t.lr_g, t.lr_d, t.betas) == (1e-4, 1e-4, (0.9, 0.999))

"""Shapes, value ranges, parameter counts and gradient flow of G, D and the VGG-19 features."""
import pytest
import torch

from gafh_fast.config import load_config
from gafh_fast.losses import content_loss, perceptual_loss, ragan_d_loss, ragan_g_loss
from gafh_fast.models import build_discriminator, build_generator, build_vgg, count_parameters


def test_paper_parameter_counts_match_spec_arithmetic():
    # Spec arithmetic (README): G = 4 165 699, D = 40 606 401 with the paper config.
    cfg = load_config("configs/gafh_ridn_paper.yaml")
    assert count_parameters(build_generator(cfg)) == 4_165_699
    assert count_parameters(build_discriminator(cfg)) == 40_606_401


def test_paper_generator_maps_32_to_256_in_range():
    cfg = load_config("configs/gafh_ridn_paper.yaml", ["kernels=torch"])
    g = build_generator(cfg).eval()
    with torch.no_grad():
        out = g(torch.rand(1, 3, 32, 32) * 2 - 1)
    assert out.shape == (1, 3, 256, 256)
    assert out.min() >= -1 and out.max() <= 1


@pytest.mark.parametrize("upsample", ["nearest_conv", "pixel_shuffle"])
@pytest.mark.parametrize("norm", ["batchnorm", "none"])
def test_tiny_generator_shapes(tiny_cfg, upsample, norm):
    tiny_cfg.model.generator.upsample = upsample
    tiny_cfg.model.generator.trunk_norm = norm
    g = build_generator(tiny_cfg)
    out = g(torch.rand(2, 3, 4, 5) * 2 - 1)
    assert out.shape == (2, 3, 32, 40)
    assert torch.all(out.abs() <= 1)
    assert (g.fusion_norm is None) == (norm == "none")


def test_pixel_shuffle_upconvs_have_4x_outputs(tiny_cfg):
    tiny_cfg.model.generator.upsample = "pixel_shuffle"
    g = build_generator(tiny_cfg)
    assert all(c.weight.shape == (32, 8, 3, 3) for c in g.upconvs)


def test_trunk_has_the_specs_convolution_count():
    # 12 RIDBs x (4 IDBs x 2 + 1) = 108 fused trunk convs (spec, "What the fused kernels cover")
    g = build_generator(load_config("configs/gafh_ridn_paper.yaml"))
    trunk = [m for m in g.mdbm.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(trunk) == 108


def test_discriminator_shapes_and_layout(tiny_cfg):
    d = build_discriminator(tiny_cfg)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    assert d(x).shape == (3,)
    convs = [m for m in d.features if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride[0] for c in convs] == [1, 2, 1, 2, 1, 2, 1, 2, 2]
    assert [c.out_channels for c in convs] == [4, 4, 8, 8, 16, 16, 32, 32, 32]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in d.features) == 8
    assert d.classifier[1].in_features == 32 * 1 * 1


def test_discriminator_without_norm(tiny_cfg):
    tiny_cfg.model.discriminator.norm = "none"
    d = build_discriminator(tiny_cfg)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in d.modules())


def test_init_is_scaled_inside_ridbs():
    cfg = load_config("configs/gafh_ridn_paper.yaml")
    g = build_generator(cfg)
    w_in = g.mdbm[0].ridbs[0].idbs[0].conv2.weight
    w_out = g.upconvs[0].weight
    # Kaiming fan_in std = sqrt(2 / fan_in); inside RIDBs scaled by 0.1
    assert w_in.std().item() == pytest.approx(0.1 * (2 / (96 * 9)) ** 0.5, rel=0.05)
    assert w_out.std().item() == pytest.approx((2 / (64 * 9)) ** 0.5, rel=0.05)
    assert torch.all(g.mdbm[0].ridbs[0].conv.bias == 0)


def test_gradients_reach_every_parameter(tiny_cfg):
    g, d, vgg = build_generator(tiny_cfg), build_discriminator(tiny_cfg), build_vgg(tiny_cfg)
    lr = torch.rand(4, 3, 4, 4) * 2 - 1
    hr = torch.rand(4, 3, 32, 32) * 2 - 1
    hf = g(lr)
    # D through L_D (fakes detached)
    loss_d = ragan_d_loss(d(hr), d(hf.detach()))
    loss_d.backward()
    for name, p in d.named_parameters():
        if name == "classifier.3.bias":
            # C(x) - mean C(x') cancels the last bias exactly: RaGAN is blind to it by construction
            assert p.grad.abs().item() < 1e-6
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, f"D.{name} got no gradient"
    assert all(p.grad is None for p in g.parameters())
    # G through the perceptual loss, with D frozen
    d.requires_grad_(False)
    loss_g = perceptual_loss(content_loss(vgg, hf, hr), ragan_g_loss(d(hr), d(hf)))
    d_grads = [p.grad.clone() for p in d.parameters()]
    loss_g.backward()
    for name, p in g.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"G.{name} got no gradient"
    assert all(torch.equal(a, p.grad) for a, p in zip(d_grads, d.parameters()))
    assert all(p.grad is None for p in vgg.parameters())


def test_state_dict_keys_do_not_depend_on_backend(tiny_cfg):
    a = build_generator(tiny_cfg)
    tiny_cfg.kernels = "auto"
    b = build_generator(tiny_cfg)
    assert list(a.state_dict()) == list(b.state_dict())

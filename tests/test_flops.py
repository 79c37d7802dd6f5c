"""The analytical FLOP counter against torch.utils.flop_counter.FlopCounterMode, and the peak table."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from gafh_fast.config import load_config
from gafh_fast.flops import (discriminator_flops, generator_flops, mfu, peak_bf16_tflops, step_flops_per_image,
                             vgg_flops)
from gafh_fast.models import build_discriminator, build_generator, build_vgg

TINY = ("model.generator.nf=8", "model.generator.gc=4", "model.generator.num_dnb=2",
        "model.generator.ridb_per_dnb=2", "model.generator.idb_per_ridb=2", "model.discriminator.nf=4",
        "model.discriminator.dense=16", "data.hr_size=64", "train.content.pretrained=false", "kernels=torch")


def counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("extra", [(), ("model.generator.upsample=pixel_shuffle", "model.generator.sfm_kernel=3"),
                                   ("train.content.layer=relu2_2",)])
def test_forward_counts_match_flop_counter(extra):
    cfg = load_config(None, TINY + extra)
    n, s = 2, cfg.data.hr_size
    G, D, V = build_generator(cfg), build_discriminator(cfg), build_vgg(cfg)
    lr, hr = torch.randn(n, 3, s // 8, s // 8), torch.randn(n, 3, s, s)
    with torch.no_grad():
        assert counted(lambda: G(lr)) == n * generator_flops(cfg.model.generator, s // 8)
        assert counted(lambda: D(hr)) == n * discriminator_flops(cfg.model.discriminator, s)
        assert counted(lambda: V(hr)) == n * vgg_flops(cfg.train.content.layer, s)


def test_forward_plus_backward_is_three_forwards():
    """With the input requiring grad, every conv/linear has an input and a weight gradient: 3x."""
    cfg = load_config(None, TINY)
    s = cfg.data.hr_size
    D = build_discriminator(cfg)
    hr = torch.randn(2, 3, s, s, requires_grad=True)
    assert counted(lambda: D(hr).sum().backward()) == 3 * 2 * discriminator_flops(cfg.model.discriminator, s)


def test_paper_sizes_and_step_total():
    cfg = load_config(None, ())  # the paper config: 32 -> 256
    g = generator_flops(cfg.model.generator, 32)
    d = discriminator_flops(cfg.model.discriminator, 256)
    v = vgg_flops("relu4_3", 256)
    parts = step_flops_per_image(cfg)
    assert parts["total"] == 3 * g + 9 * d + 3 * v
    assert step_flops_per_image(cfg, gan=False)["total"] == 3 * g


def test_peak_table_and_mfu():
    assert peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_bf16_tflops("NVIDIA H200") == 989.0
    assert peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_bf16_tflops("Tesla T4") is None and peak_bf16_tflops(None) is None
    assert mfu(10**12, 100.0, 1000.0) == pytest.approx(0.1)
    assert mfu(10**12, 100.0, None) is None


def test_gan_step_count_matches_flop_counter_on_the_steps_operations(tiny_cfg):
    """The step's own sequence (gafh_fast/train/step.py) in plain torch, counted by FlopCounterMode.

    The analytic count includes the input gradients of G's first conv and of D's first conv in D's
    step, which autograd skips (their inputs need no gradient); everything else must match exactly.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from gafh_fast.flops import conv_flops
    from gafh_fast.losses import content_loss, ragan_d_loss, ragan_g_loss
    from gafh_fast.models import build_discriminator, build_generator, build_vgg

    cfg = tiny_cfg
    G, D, V = build_generator(cfg), build_discriminator(cfg), build_vgg(cfg)
    n, s = 2, cfg.data.hr_size
    lr, hr = torch.rand(n, 3, s // 8, s // 8) * 2 - 1, torch.rand(n, 3, s, s) * 2 - 1
    with FlopCounterMode(display=False) as counter:
        hf = G(lr)
        ragan_d_loss(D(hr), D(hf.detach())).backward()  # D step
        D.requires_grad_(False)                            # G step, D frozen
        with torch.no_grad():
            c_real = D(hr)
        (content_loss(V, hf, hr) + 1e-3 * ragan_g_loss(c_real, D(hf))).backward()
    g_cfg = cfg.model.generator
    skipped = (conv_flops(3, g_cfg.nf, g_cfg.sfm_kernel, s // 8, s // 8)
               + 2 * conv_flops(3, cfg.model.discriminator.nf, 3, s, s))
    assert counter.get_total_flops() == n * (step_flops_per_image(cfg)["total"] - skipped)

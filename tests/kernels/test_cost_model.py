"""kernels/cost_model.py, the floor bench/floors.py puts next to each measured GPU row: hand-computed counts,
the generator's FLOPs against gafh_fast/flops.py, and each modelled launch order against the kernels' real
one (a measured kernel row gets its floor by that order)."""
from __future__ import annotations

import pytest
import torch

from gafh_fast.config import GeneratorConfig
from gafh_fast.flops import conv_flops, generator_flops
from gafh_fast.kernels import configs, cost_model as cm, launch
from gafh_fast.kernels.outconv import fused_out_conv_triton
from gafh_fast.kernels.upconv import up_backward, up_forward
from gafh_fast.models.generator import IDB, RIDB

from .test_conv3x3 import DEVICE


def test_one_launch_by_hand():
    """IDB conv1 forward at batch 64 (32x32, 64 -> 32 channels): 2 * 65536 * 9 * 64 * 32 FLOPs; x (64
    channels) read, h1 (32) written in bf16, its mask at 1 bit, the weight: 4.29 us at 3 TB/s, above the
    3.02 us of compute at 800 TFLOP/s. Without training (inference) no mask is written."""
    conv1 = cm.idb_launches(64)[0]
    assert conv1["flops"] == 2 * 65536 * 9 * 64 * 32 == 2_415_919_104
    assert conv1["bytes"] == 65536 * 64 * 2 + 65536 * 32 * 2 + 65536 * 32 // 8 + 9 * 64 * 32 * 2 == 12_881_920
    assert cm.floor_us([conv1], 800, 3.0) == pytest.approx(12_881_920 / 3e12 * 1e6)
    assert cm.floor_us([conv1], 800, 30.0) == pytest.approx(2_415_919_104 / 800e12 * 1e6)  # compute-bound
    inference = cm.idb_launches(64, train=False)
    assert len(inference) == 2 and inference[0]["bytes"] == conv1["bytes"] - 65536 * 32 // 8


def test_plain_conv_by_hand():
    """A 3x3 conv 8 -> 16 at 4x4, batch 2 (m = 32): each pass 2 * 32 * 9 * 8 * 16 FLOPs; forward x + y +
    w bytes, dgrad g + w + dx, wgrad g + x + dw; without dgrad, two passes."""
    rows = cm.plain_conv_launches(2, 8, 16, 3, 4)
    assert [r["flops"] for r in rows] == [73728] * 3
    x, y, w = 32 * 8 * 2, 32 * 16 * 2, 9 * 8 * 16 * 2
    assert [r["bytes"] for r in rows] == [x + y + w] * 3
    assert [r["launch"] for r in cm.plain_conv_launches(2, 8, 16, 3, 4, dgrad=False)] == ["conv fwd", "conv bwd wgrad + db"]


@pytest.mark.parametrize("dims", [
    dict(nf=64, gc=32, lr=32, n_dnb=4, n_ridb=3, n_idb=4, sfm_k=9, out_k=9, c_img=3),  # the paper's
    dict(nf=8, gc=4, lr=6, n_dnb=2, n_ridb=1, n_idb=3, sfm_k=5, out_k=3, c_img=3),
])
def test_generator_flops_are_flops_py_less_what_the_fused_path_skips(dims):
    """generator_launches' FLOPs = 3 forwards (gafh_fast/flops.py) less the SFM's input gradient (the LR
    input needs none) and 5/9 of the upsampling convs' (the sub-pixel phases do 16 taps per LR pixel, not
    9 per each of its 4 HR pixels); every launch is tagged fwd or bwd, one third of the FLOPs forward."""
    batch = 3
    g = GeneratorConfig(nf=dims["nf"], gc=dims["gc"], sfm_kernel=dims["sfm_k"], out_kernel=dims["out_k"],
                        idb_per_ridb=dims["n_idb"], ridb_per_dnb=dims["n_ridb"], num_dnb=dims["n_dnb"])
    rows = cm.generator_launches(batch, **dims)
    up = sum(conv_flops(dims["nf"], dims["nf"], 3, dims["lr"] << k, dims["lr"] << k) for k in (1, 2, 3))
    sfm_dgrad = conv_flops(dims["c_img"], dims["nf"], dims["sfm_k"], dims["lr"], dims["lr"])
    expected = batch * (3 * generator_flops(g, dims["lr"]) - sfm_dgrad - 3 * up * 5 // 9)
    assert sum(r["flops"] for r in rows) == expected
    forward = [r for r in rows if r["phase"] == "fwd"]
    assert 3 * sum(r["flops"] for r in forward) == batch * 3 * (generator_flops(g, dims["lr"]) - up * 5 // 9)
    assert {r["phase"] for r in rows} == {"fwd", "bwd"}
    assert len({r["layer"] for r in rows}) == 1 + dims["n_dnb"] * dims["n_ridb"] + 1 + 3 + 1


def _recorded(monkeypatch) -> list[str]:
    """The Triton kernels launched from now on, by function name, in order."""
    names: list[str] = []
    real = launch.KernelLauncher.launch

    def record(self, *args, **kwargs):
        names.append(self.kernel.fn.__name__)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(launch.KernelLauncher, "launch", record)
    return names


def test_idb_and_ridb_launch_orders_are_the_kernels(monkeypatch):
    names = _recorded(monkeypatch)
    torch.manual_seed(0)
    x = torch.randn(1, 8, 4, 4, device=DEVICE, requires_grad=True)
    idb = IDB(8, 4).to(DEVICE)
    idb.kernels = "triton"
    idb(x, x).sum().backward()
    assert names == [r["kernel"] for r in cm.idb_launches(1, 8, 4, 4)]
    names.clear()
    ridb = RIDB(8, 4, 2, 0.2).to(DEVICE)
    ridb.kernels = "triton"
    ridb(x, x).sum().backward()  # with the DNB residual
    assert names == [r["kernel"] for r in cm.ridb_launches(1, True, 2, 8, 4, 4)]
    assert len(names) == (2 * 2 + 1) + (4 * 2 + 2)


@pytest.mark.parametrize("gz_pass", [False, True])
def test_upsampling_launch_order_is_the_kernels_both_ways(monkeypatch, gz_pass):
    x = torch.randn(1, 8, 3, 3, device=DEVICE)
    wt = torch.randn(8, 8, 3, 3, device=DEVICE)
    names = _recorded(monkeypatch)
    y, mask, wc = up_forward(x, wt, None, 0.2, True)
    up_backward(torch.randn_like(y), x, wt, wc, mask, 0.2, False,
                dx_config=configs.up_dx_candidates(8, 8, 3, 9, act=True)[int(gz_pass)])
    assert names == [r["kernel"] for r in cm.upsample_launches(1, True, 8, 3, steps=1, gz_pass=gz_pass)]


def test_output_layer_launch_order_is_the_kernels(monkeypatch):
    x = torch.randn(1, 8, 5, 5, device=DEVICE, requires_grad=True)
    wt = torch.randn(3, 8, 9, 9, device=DEVICE, requires_grad=True)
    names = _recorded(monkeypatch)
    fused_out_conv_triton(x, wt, None).sum().backward()
    assert names == [r["kernel"] for r in cm.out_conv_launches(1, True, 8, 3, 9, 5)]

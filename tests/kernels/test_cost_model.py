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
    assert len(names) == (2 * 2 + 1) + (3 * 2 + 2)


@pytest.mark.parametrize("gz_pass", [False, True])
def test_upsampling_launch_order_is_the_kernels_both_ways(monkeypatch, gz_pass):
    x = torch.randn(1, 8, 3, 3, device=DEVICE)
    wt = torch.randn(8, 8, 3, 3, device=DEVICE)
    names = _recorded(monkeypatch)
    y, mask, wc = up_forward(x, wt, None, 0.2, True)
    up_backward(torch.randn_like(y), x, wt, wc, mask, 0.2, False,
                dx_config=configs.up_dx_candidates(8, 8, 3, 9, act=True)[int(gz_pass)])
    assert names == [r["kernel"] for r in cm.upsample_launches(1, True, 8, 3, steps=1, gz_pass=gz_pass)]


def test_last_step_with_output_layer_launch_order_is_the_kernels(monkeypatch):
    """kernels/upout.py: the step's forward, the output layer's backward (its dX with the step's mask), then
    the step's gz-ready dW and dX + fold; cost_model.up_out_launches in the same order (cuDNN's launches,
    no Triton kernel, left out)."""
    from gafh_fast.kernels.upout import fused_up_out_conv_triton

    x = torch.randn(1, 8, 2, 3, device=DEVICE, requires_grad=True)
    w_up = torch.randn(8, 8, 3, 3, device=DEVICE, requires_grad=True)
    w_out = torch.randn(3, 8, 9, 9, device=DEVICE, requires_grad=True)
    names = _recorded(monkeypatch)
    fused_up_out_conv_triton(x, w_up, None, w_out, None).sum().backward()
    owned = cm.up_out_launches(1, True, 8, 2)
    assert names == [r["kernel"] for r in owned if r.get("kernel")]
    assert len(owned) == len(names) + 1 and "kernel" not in owned[2]  # the output layer's cuDNN forward


def test_output_layer_launch_order_is_the_kernels(monkeypatch):
    x = torch.randn(1, 8, 5, 5, device=DEVICE, requires_grad=True)
    wt = torch.randn(3, 8, 9, 9, device=DEVICE, requires_grad=True)
    names = _recorded(monkeypatch)
    fused_out_conv_triton(x, wt, None).sum().backward()
    assert names == [r["kernel"] for r in cm.out_conv_launches(1, True, 8, 3, 9, 5)]


def test_output_layer_forward_by_fold_launch_order_and_bytes(monkeypatch):
    """The fold way of the output layer's forward: outconv_taps_kernel and outconv_fold_kernel per chunk of
    images, as cost_model.out_conv_forward_fold counts them (chunks of FOLD_CHUNK_BYTES // per-image columns), and
    its bytes by hand: per chunk of m pixels the GEMM reads x (m * nf) and the weight and writes m * k*k*c
    columns, which the fold reads, writing y (m * c) and reading the bias (c); bf16, 2 bytes each."""
    from gafh_fast.kernels import outconv

    paper = cm.out_conv_forward_fold(64)  # 256x256 bf16: 31.9 MB of columns per image, 8 per 256 MB chunk
    m = 8 * 256 * 256  # a chunk's pixels; nf 64, 243 columns per pixel
    assert len(paper) == 16 and sum(r["bytes"] for r in paper) == 8 * 2 * (
        (m * 64 + 243 * 64 + m * 243) + (m * 243 + 3 + m * 3))
    monkeypatch.setattr(outconv, "FOLD_CHUNK_BYTES", 2 * 3 * 9 * 25 * 2)  # two 5x5 images per chunk (bf16)
    names = _recorded(monkeypatch)
    outconv._out_forward_fold(torch.randn(5, 8, 5, 5, device=DEVICE, dtype=torch.bfloat16),
                              torch.randn(3, 8, 3, 3, device=DEVICE, dtype=torch.bfloat16), None)
    rows = cm.out_conv_forward_fold(5, nf=8, c_out=3, k=3, side=5)
    assert names == [r["kernel"] for r in rows] == ["outconv_taps_kernel", "outconv_fold_kernel"] * 3
    gemm, fold = rows[0], rows[1]
    m = 2 * 25
    assert gemm["bytes"] == (m * 8 + 27 * 8 + m * 27) * 2 and gemm["flops"] == 2 * m * 27 * 8
    assert fold["bytes"] == (m * 27 + 3 + m * 3) * 2
    assert rows[-1]["bytes"] == (25 * 27 + 3 + 25 * 3) * 2  # the last chunk: one image


def test_launch_bytes_by_hand():
    """One hand count per kind of launch the floors use (the mutation run of round 9 found byte terms no
    other test pinned). bf16 activations of m pixels: m * C * 2 bytes; masks m * C / 8; weights k*k*Cin*Cout
    * 2; fp32 partials split * taps * Cin * Cout * 4 (one chunk at these sizes)."""
    # RIDB (nf 8, gc 4, 4x4, batch 2: m = 32): act(8) = 512, act(4) = 256, bits(8) = 32, bits(4) = 16,
    # conv weight 576 elements (1152 B bf16, 2304 B fp32)
    fused = {r["launch"]: r["bytes"] for r in cm.ridb_launches(2, True, 1, 8, 4, 4, residual2=True)}
    assert fused["conv fwd"] == 3 * 512 + 512 + 1152                     # x, x0, r2 in; out
    assert {r["launch"]: r["bytes"] for r in cm.ridb_launches(2, True, 1, 8, 4, 4, residual2=False)}["conv fwd"] \
        == 2 * 512 + 512 + 1152
    assert fused["conv bwd dW + db"] == 2 * 512 + 2304                   # x, g in; partials out
    assert fused["conv bwd dX + finalize (+ gz2, sum)"] == 2 * 512 + 32 + 512 + 2304
    assert fused["IDB 0 bwd gz1 (gz2 ready)"] == 512 + 16 + 256          # gz2, mask1 in; gz1 out
    apart = {r["launch"]: r["bytes"] for r in cm.ridb_launches(2, False, 1, 8, 4, 4)}
    assert apart["conv bwd dX + finalize"] == 2 * 512 + 2304
    # upsampling 2x2 -> 4x4, nf 8, batch 2: lo 128, hi 512, bits 32; Wc 1024 elements, W 576
    up = {r["launch"]: r["bytes"] for r in cm.upsample_launches(2, True, 8, 2, steps=1, gz_pass=True)}
    assert up["2->4 bwd gz pass"] == 512 + 32 + 512
    assert up["2->4 bwd dW + db"] == 128 + 512 + 1024 * 4
    assert up["2->4 bwd dX (gz ready) + fold"] == 512 + 128 + 1024 * 4 + 576 * 2
    ready = [r["launch"] for r in cm.upsample_launches(2, True, 8, 2, steps=2, gz_ready_last=True)]
    assert "2->4 bwd finalize (fold)" in ready and "4->8 bwd finalize (fold)" not in ready  # only the last step's gz is handed in
    # output layer 3x3, 8 -> 3 at 4x4, batch 1 (m = 16): x 256, g / y 96, W 216 elements; gz padded to 4
    # channels with a 1-pixel border: 6 * 6 * 4 * 2 = 288; rows 36, rounded up to 64 in both GEMMs
    owned = {r["launch"]: r for r in cm.out_conv_launches(1, True, 8, 3, 3, 4, act_mask=True)}
    assert owned["prep: gz with zero border, weight re-laid"]["bytes"] == 2 * 96 + 288 + 2 * 216 * 2
    assert owned["dW partials (gathered gz, 32-row tiles; 64: +9 %)"]["flops"] == 2 * 16 * 64 * 8
    dx = owned["dX (gathered gz, 64-row steps) + fold"]
    assert (dx["flops"], dx["bytes"]) == (2 * 16 * 64 * 8, 288 + 36 * 8 * 2 + 256 + 16 + 36 * 8 * 4)
    real = {r["launch"]: r["bytes"] for r in cm.out_conv_launches(1, False, 8, 3, 3, 4, act_mask=True)}
    assert real["dgrad (cuDNN)"] == 96 + 256 + 16 + 216 * 2                # g, mask in; dx out; W
    fwd = cm.out_conv_forward(1, 8, 3, 3, 4)
    assert (fwd["flops"], fwd["bytes"]) == (2 * 16 * 9 * 3 * 8, 256 + 96 + 216 * 2)


def test_generator_launches_defaults_and_layers_by_hand():
    """The defaults are the paper's sizes (the CLI's --gen uses them); the fusion's BatchNorm moves 4
    activations forward and 5 backward; the output layer's dgrad reads the last step's mask."""
    paper = dict(nf=64, gc=32, lr=32, n_dnb=4, n_ridb=3, n_idb=4, sfm_k=9, out_k=9, c_img=3)
    assert cm.generator_launches(8) == cm.generator_launches(8, **paper)
    rows = {r["launch"]: r for r in cm.generator_launches(2, nf=8, gc=4, lr=2, n_dnb=1, n_ridb=1, n_idb=1,
                                                            sfm_k=3, out_k=3, c_img=3)}
    act = 2 * 2 * 2 * 8 * 2
    assert rows["fusion BatchNorm + residual fwd"]["bytes"] == 4 * act
    assert rows["fusion BatchNorm bwd"]["bytes"] == 5 * act
    assert rows["dgrad (cuDNN)"]["bytes"] == {r["launch"]: r["bytes"] for r in cm.out_conv_launches(
        2, False, 8, 3, 3, 16, act_mask=True)}["dgrad (cuDNN)"]


def test_cli_total_is_the_sum_of_floors(capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["cost_model", "--gen", "--batch", "8"])
    cm.main()
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("paper generator"))
    layers = [line for line in lines[start + 1:] if line.strip() and not line.strip().startswith("total")]
    total = float(lines[-1].split("floor")[1].split("us")[0])
    assert total == pytest.approx(cm.floor_us(cm.generator_launches(8), 800, 3.0), abs=0.01)
    assert sum(float(line.split("floor")[1].split("us")[0]) for line in layers) == pytest.approx(total, abs=0.1)

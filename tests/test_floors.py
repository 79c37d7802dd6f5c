"""bench/floors.py: the cost model's floor next to each kernels-suite row (issue 11, item 5), on hand-made rows
as the suite writes them. The model's own counts are checked in tests/kernels/test_cost_model.py, and the
generator's layer groups as a real profile names them in tests/kernels/test_bench_kernels.py."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import common  # noqa: E402
import floors  # noqa: E402

from gafh_fast.kernels import cost_model as cm  # noqa: E402

H100 = "NVIDIA H100 80GB HBM3"


def _row(name, path, batch=64, ms=1.0, card=H100, **extra):
    return dict(suite="kernels", name=name, path=path, batch=batch, ms=ms, card=card, **extra)


@pytest.mark.parametrize("card, expected", [(H100, (800.0, 3.0)), ("NVIDIA H200", (800.0, 4.3)),
                                            ("NVIDIA A100-SXM4-80GB", None), ("cpu", None), (None, None)])
def test_rates_by_card_name(card, expected):
    assert floors.rates(card) == expected


def test_workload_rows_get_the_same_floor_on_every_path():
    """idb_fwd_bwd at batch 64 on H100 rates: the sum of the six launches' floors, whatever the path
    (eager, triton, compile, a CUDA graph, the profiler's device sum); x_floor = ms / floor."""
    floor_ms = cm.floor_us(cm.idb_launches(64), 800, 3.0) / 1000
    rows = [_row("idb_fwd_bwd", p, ms=0.5) for p in ("eager", "triton", "compile", "triton (CUDA graph)")]
    rows.append(_row("idb_fwd_bwd device sum", "eager (device)", ms=0.25))
    floors.annotate(rows)
    assert all(r["floor_ms"] == pytest.approx(floor_ms) for r in rows)
    assert [r["x_floor"] for r in rows] == pytest.approx([0.5 / floor_ms] * 4 + [0.25 / floor_ms])
    assert "IDB forward + backward" in rows[0]["floor_of"] and "3 TB/s" in rows[0]["floor_of"]


def test_rows_without_a_model_or_a_known_card_are_left_alone():
    rows = [_row("idb_fwd_bwd", "eager", card="NVIDIA GeForce RTX 4090"), _row("triton configs", "triton"),
            _row("gen_fwd_bwd", "eager", batch=None), dict(_row("G fwd", "torch"), suite="model")]
    before = [dict(r) for r in rows]
    floors.annotate(rows)
    assert rows == before
    # a row without its own card takes the run's
    row = _row("idb_fwd", "eager", card=None)
    floors.annotate([row], card=H100)
    assert row["floor_ms"] == pytest.approx(cm.floor_us(cm.idb_launches(64, train=False), 800, 3.0) / 1000)


def test_kernel_rows_get_their_own_launch_in_order_the_others_none():
    """The upsampling stage's profiled kernels with the gz pass (the tuner's second way), a cuDNN kernel
    among them: each Triton kernel row gets the floor of its launch of the matching way, in launch order."""
    way = cm.upsample_launches(64, True, 64, 32, steps=1, gz_pass=True)
    names = ["upconv_combine_kernel", "upconv_fwd_kernel", "sm90_xmma_cudnn_whatever", "conv3x3_bwd_gz_kernel",
             "upconv_bwd_dw_kernel", "upconv_bwd_dx_kernel"]
    rows = [_row(f"up_fwd_bwd kernel {i}: {n}", "triton (device)", ms=0.1, kernel=n) for i, n in enumerate(names)]
    floors.annotate(rows[::-1])  # any row order: the index in the name orders them
    modelled = [r for r in rows if "floor_ms" in r]
    assert [r["kernel"] for r in modelled] == [r["kernel"] for r in way]
    assert [r["floor_ms"] for r in modelled] == pytest.approx([cm.floor_us([r], 800, 3.0) / 1000 for r in way])
    assert "floor_ms" not in rows[2]


def test_match_kernels_takes_the_way_that_fits_or_none():
    orders = [cm.upsample_launches(8, True, 64, 32, steps=1, gz_pass=g) for g in (False, True)]
    fused = [r["kernel"] for r in orders[0]]
    got = floors.match_kernels(fused, orders)
    assert [g["launch"] for g in got] == [r["launch"] for r in orders[0]]
    # profiler names that hold the kernel's name still match; an extra launch of a modelled kernel does not
    assert floors.match_kernels([f"{k}_0d1d2" for k in fused], orders) is not None
    assert floors.match_kernels(fused + ["upconv_fwd_kernel"], orders) is None
    assert floors.match_kernels(fused[:-1], orders) is None


@pytest.mark.parametrize("group, launches", [
    ("_EagerFusedRIDB (64,64,32,32)", 12 * (4 * 2 + 1)),
    ("_EagerFusedRIDBBackward (64,64,32,32)", 12 * (3 * 4 + 2)),
    ("_EagerFusedUpconv3x3 (64,64,128,128)", 2),
    ("_EagerFusedUpconv3x3Backward (64,64,128,128)", 3),  # the 64->128 step (the last is in UpOutConv)
    ("_EagerFusedUpOutConv w(3,64,9,9) in 256x256", 2 + 1),     # the last step's combine and conv, the output's
    ("_EagerFusedUpOutConvBackward (64,3,256,256)", 2 + 3),     # the step's dW, dX + fold; the output's 3
    ("_EagerFusedOutConv w(3,64,9,9) in 256x256", 1),
    ("_EagerFusedOutConvBackward (64,3,256,256)", 3),
    ("_EagerFusedConv3x3 (64,64,3,3)", 1),
    ("_EagerFusedConv3x3Backward (64,64,32,32)", 2),
    ("aten::batch_norm (64,64,32,32)", 1),
    ("CudnnBatchNormBackward0 (64,64,32,32)", 1),
    ("aten::conv2d w(64,3,9,9) in 32x32", 1),
    ("ConvolutionBackward0 w(64,3,9,9) in 32x32", 1),  # wgrad only: the LR input needs no gradient
    ("ConvolutionBackward0 w(64,96,3,3) in 32x32", 2),
    ("aten::leaky_relu (64,64,256,256)", None),
    ("autograd engine: aten::add (64,64,32,32)", None),
    ("aten::conv2d w(64,64,5,5) in 32x32", None),  # no such conv in the paper generator
])
def test_layer_groups_of_the_paper_generator(group, launches):
    got = floors.layer_launches(group, 64)
    assert (None if got is None else len(got)) == launches


def test_conv_groups_count_every_conv_with_that_label():
    """The eager path's `aten::conv2d w(32,64,3,3) in 32x32` group holds the 48 IDBs' conv1: its floor is
    48 of one; w(64,64,3,3) at 32x32 is the 12 RIDB convs and the fusion conv."""
    one = cm.plain_conv_launches(64, 64, 32, 3, 32)[0]
    (conv1,) = floors.layer_launches("aten::conv2d w(32,64,3,3) in 32x32", 64)
    assert (conv1["flops"], conv1["bytes"]) == (48 * one["flops"], 48 * one["bytes"])
    (ridb_convs,) = floors.layer_launches("aten::conv2d w(64,64,3,3) in 32x32", 64)
    assert ridb_convs["flops"] == 13 * cm.plain_conv_launches(64, 64, 64, 3, 32)[0]["flops"]


def test_layer_rows_and_markdown_carry_the_floor():
    rows = [_row("gen_fwd_bwd layer 1 (40.0%): _EagerFusedRIDBBackward (64,64,32,32)", "triton (device)", ms=8.0,
                 layer="_EagerFusedRIDBBackward (64,64,32,32)"),
            _row("gen_fwd_bwd layer other (1.0%): 9 more groups", "triton (device)", ms=0.2, layer="other")]
    floors.annotate(rows)
    want = cm.floor_us(floors.layer_launches(rows[0]["layer"], 64), 800, 3.0) / 1000
    assert rows[0]["floor_ms"] == pytest.approx(want) and rows[0]["x_floor"] == pytest.approx(8.0 / want)
    assert "floor_ms" not in rows[1]
    env = {"date": "2026-11-27T00:00:00", "device_name": H100, "commit": "0" * 40, "dirty": False,
           "command": "test", "device": "cuda"}
    normalised = [common.normalise_row(r, 989.0) for r in rows]
    line = common.markdown_rows({"env": env, "rows": normalised}).splitlines()[0]
    assert f"{8.0 / want:.1f}x its floor {want:.3f} ms" in line
    assert f"{8.0 / want:.1f}x" in common.format_table(normalised)


@pytest.mark.parametrize("workload, launches", [
    ("ridb_fwd_bwd", lambda b: cm.ridb_launches(b, True, 4, 64, 32, 32)),           # fused_ridb's, not 5 Functions'
    ("up_fwd_bwd", lambda b: cm.upsample_launches(b, True, 64, 32, steps=1)),        # 32 -> 64, gz made in dX
    ("up_out_fwd_bwd", lambda b: cm.up_out_launches(b, False, 64, 128)),            # the output layer at real K, N
    ("gen_fwd_bwd", lambda b: cm.generator_launches(b)),
])
def test_each_workload_floor_is_its_model(workload, launches):
    row = _row(workload, "eager", batch=8)
    floors.annotate([row])
    assert row["floor_ms"] == pytest.approx(cm.floor_us(launches(8), 800, 3.0) / 1000)


@pytest.mark.parametrize("workload, order", [
    ("up_fwd_bwd", cm.upsample_launches(8, True, 64, 32, steps=1)),          # the fused way (no gz pass)
    ("up_out_fwd_bwd", [r for r in cm.up_out_launches(8, True, 64, 128) if r.get("kernel")]),  # no cuDNN
    ("idb_fwd_bwd", cm.idb_launches(8, 64, 32, 32)),
])
def test_kernel_rows_of_each_profiled_workload(workload, order):
    rows = [_row(f"{workload} kernel {i}: {r['kernel']}", "triton (device)", batch=8, ms=0.1, kernel=r["kernel"])
            for i, r in enumerate(order)]
    floors.annotate(rows)
    assert [r["floor_ms"] for r in rows] == pytest.approx([cm.floor_us([r], 800, 3.0) / 1000 for r in order])


def test_kernel_rows_of_the_output_layer_by_fold():
    """With the fold forward chosen, the up_out profile has an outconv_taps_kernel and an
    outconv_fold_kernel per chunk (8 of each at batch 64) before the backward's Triton kernels: the
    second launch order matches, and each launch gets its own chunk's floor."""
    order = cm.up_out_launches(64, True, 64, 128, fold=True)
    names = [r["kernel"] for r in order]
    assert names.count("outconv_fold_kernel") == names.count("outconv_taps_kernel") == 8
    rows = [_row(f"up_out_fwd_bwd kernel {i}: {n}", "triton (device)", batch=64, ms=0.1, kernel=n)
            for i, n in enumerate(names)]
    floors.annotate(rows)
    assert [r.get("floor_ms") for r in rows] == pytest.approx([cm.floor_us([r], 800, 3.0) / 1000 for r in order])


def test_generator_convs_by_label():
    """The paper generator's convs as the eager path's profile groups them: 48 conv1, 48 conv2, 12 RIDB
    convs and the fusion conv at 32x32, one upsampling conv at each of 64, 128 and 256, the SFM and output."""
    convs = floors.generator_convs(**floors.PAPER)
    assert convs == {(64, 3, 9, 32): 1, (32, 64, 3, 32): 48, (64, 96, 3, 32): 48, (64, 64, 3, 32): 13,
                     (64, 64, 3, 64): 1, (64, 64, 3, 128): 1, (64, 64, 3, 256): 1, (3, 64, 9, 256): 1}
    (up,) = floors.layer_launches("aten::conv2d w(64,64,3,3) in 128x128", 8)
    assert up["flops"] == cm.plain_conv_launches(8, 64, 64, 3, 128)[0]["flops"]
    (conv1,) = floors.layer_launches("aten::conv2d w(32,64,3,3) in 32x32", 8)  # batch 8: not one of the sizes
    assert (conv1["flops"], conv1["bytes"]) == (48 * 2 * 8 * 1024 * 9 * 64 * 32,
                                                48 * (8 * 1024 * (64 + 32) * 2 + 9 * 64 * 32 * 2))


def test_floor_table_lists_the_rows_with_a_floor():
    data = {"env": {"device_name": H100},
            "rows": [dict(_row("idb_fwd", "eager", ms=0.1), card=None), _row("idb_fwd", "triton", ms=None),
                     _row("triton configs", "triton", ms=0.0)]}
    lines = floors.floor_table(data).splitlines()
    assert len(lines) == 3 and lines[2].startswith("| idb_fwd | eager | 64 | 0.100 | ")
    assert "floor_ms" not in data["rows"][0]  # the JSON's rows are not changed

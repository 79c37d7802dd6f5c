"""The output layer, y = tanh(convKxK(x) + b) with few output channels (kernels/outconv.py): its Triton
backward against float64 autograd.

The forward is cuDNN's conv on both backends (or on the triton backend two kernels, a GEMM onto the taps'
columns and their fold, when the tuner times them faster; both against F.conv2d below), so the backward is checked given the op's own y:
gz = g * (1 - y^2) in float64 from that y, then the conv's gradients by float64 autograd. Bounds as in
test_conv3x3.py: elementwise within rel * (the same computation on |values|), rel = 1e-5 (fp32) and
2**-7 (bf16). The scale of gz is |g| * (1 + y^2), the size of the terms 1 - y^2 is made of (near
|y| = 1 it cancels, and fp32 keeps only ~1e-7 of each term). bf16 gets twice the conv's 2**-8: gz is
rounded to bf16 before the GEMM (2**-9 of the terms; torch's bf16 tanh backward rounds it too) and the
result once more (up to 2**-8 of itself), and a gradient whose terms share a sign is as large as they.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import triton

from gafh_fast import ops
from gafh_fast.kernels import configs, conv3x3, launch, outconv
from gafh_fast.kernels.conv3x3_fwd import INTERPRETING
from gafh_fast.kernels.outconv import fused_out_conv_triton, out_backward, out_forward
from gafh_fast.ops import fused_out_conv, fused_out_conv_reference

from .test_conv3x3 import DEVICE, assert_within, nan_followed, no_tf32, to_kernel_layout  # noqa: F401
from .test_host_code import _offset_view
from .test_memory_bounds import bounds_checked  # noqa: F401

REL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7}
NAMES = ("x", "weight", "bias")


def make_out_case(c_in, c_out, k, n, h, w, *, bias=True, dtype=torch.float32, seed=0):
    """float64 masters of values representable in dtype: ({x, weight, bias}, upstream grad). The weights
    give pre-activations of about unit size, so tanh runs through its whole range."""
    gen = torch.Generator().manual_seed(seed)
    t = {"x": torch.randn(n, c_in, h, w, generator=gen),
         "weight": torch.randn(c_out, c_in, k, k, generator=gen) / (0.5 * k * c_in ** 0.5),
         "bias": torch.randn(c_out, generator=gen) if bias else None}
    grad = torch.randn(n, c_out, h, w, generator=gen)
    return {k_: v.to(dtype).double() if v is not None else None for k_, v in t.items()}, grad.to(dtype).double()


def grads_given_y(t, y, grad):
    """float64 ({name: grad}, {name: scale}) of tanh(conv) at the op's own y (see the module docstring)."""
    y64 = y.detach().double().cpu()
    out = []
    for gz, absolute in ((grad * (1 - y64 * y64), False), (grad.abs() * (1 + y64 * y64), True)):
        leaves = {k: (v.abs() if absolute else v).clone().requires_grad_(True) for k, v in t.items() if v is not None}
        z = F.conv2d(leaves["x"], leaves["weight"], leaves.get("bias"), padding=t["weight"].shape[-1] // 2)
        out.append(dict(zip(leaves, torch.autograd.grad(z, list(leaves.values()), gz))))
    return out


def assert_fp32_grads(t, y, grad, dx, dw, db):
    """out_backward's (dx, dW, db) in fp32 against float64 autograd given y, within 1e-5."""
    g_ref, g_abs = grads_given_y(t, y, grad)
    for name, got in (("x", dx), ("weight", dw), ("bias", db)):
        assert_within(f"d{name}", got, g_ref[name], g_abs[name], 1e-5)


def check_out(c_in, c_out, k, n, h, w, *, bias=True, dtype=torch.float32, layout="channels_last", seed=0,
              entry=fused_out_conv_triton):
    t, grad = make_out_case(c_in, c_out, k, n, h, w, bias=bias, dtype=dtype, seed=seed)
    leaves = {name: (to_kernel_layout(v, dtype, layout) if name != "bias" else v.to(dtype)).to(DEVICE)
              .requires_grad_(True) for name, v in t.items() if v is not None}
    y = entry(leaves["x"], leaves["weight"], leaves.get("bias"))
    assert y.dtype == dtype and y.shape == (n, c_out, h, w) and y.is_contiguous(memory_format=torch.channels_last)
    y_ref = fused_out_conv_reference(*(leaves[k_].detach() if k_ in leaves else None for k_ in NAMES))
    assert torch.equal(y, y_ref.contiguous(memory_format=torch.channels_last))  # the forward is torch's own
    grads = torch.autograd.grad(y, list(leaves.values()), grad.to(dtype).to(DEVICE))
    assert grads[1].stride() == conv3x3.dw_strides(leaves["weight"])
    g_ref, g_abs = grads_given_y(t, y, grad)
    for name, g in zip(leaves, grads):
        assert_within(f"d{name}", g, g_ref[name], g_abs[name], REL[dtype])


@pytest.mark.parametrize(
    "c_in, c_out, k, n, h, w, layout, dtype",
    [
        (8, 3, 9, 2, 5, 7, "channels_last", torch.float32),    # the paper's 9x9x3 (243 rows: 4 gathered K steps), taps mostly padding
        (64, 3, 9, 1, 4, 4, "nchw", torch.float32),            # the paper's layer, NCHW parameters as the trainer's
        (5, 1, 3, 2, 3, 4, "noncontiguous", torch.float32),    # 9 rows: one 16-deep K step, strided views
        (136, 3, 5, 1, 3, 2, "channels_last", torch.float32),  # C_in 136: two dX tiles, three dW channel tiles
        (16, 4, 7, 1, 6, 5, "nchw", torch.bfloat16),
        (64, 3, 9, 1, 3, 5, "channels_last", torch.bfloat16),
    ],
)
def test_backward_against_float64(c_in, c_out, k, n, h, w, layout, dtype):
    check_out(c_in, c_out, k, n, h, w, layout=layout, dtype=dtype)


def test_without_bias():
    check_out(8, 3, 5, 1, 4, 6, bias=False)


def test_launch_count():
    """Forward: torch's conv and tanh, no Triton launch. Backward: prep (gz with its border, the re-laid weight), dW partials, dX + fold (3)."""
    x = torch.randn(1, 8, 3, 3, device=DEVICE, requires_grad=True)
    wt = torch.randn(3, 8, 9, 9, device=DEVICE, requires_grad=True)
    b = torch.randn(3, device=DEVICE, requires_grad=True)
    launch.LAUNCHES.clear()
    y = fused_out_conv_triton(x, wt, b)
    assert sum(launch.LAUNCHES.values()) == 0
    y.sum().backward()
    assert dict(launch.LAUNCHES) == {"out_prep": 1, "out_dw": 1, "out_dx": 1}


@pytest.mark.parametrize("index", [0, 1])
@pytest.mark.parametrize("c_in, k, n, h, w, split", [
    (16, 5, 2, 16, 12, 1),   # M = 384: several pixel blocks in one chunk; 100 rows: one group of 4 tiles
    (8, 5, 3, 5, 10, 2),     # M = 150 in two chunks of 128 (the second partial: p_ok masks)
    (8, 9, 1, 9, 11, 1),     # the paper's 324 rows: three groups, the last one's 3rd tile partial, 4th empty
])
def test_each_dw_config_and_walk(index, c_in, k, n, h, w, split):
    """Both candidates of dW (one 32-row tile per program, or four sharing each x tile) and of dX (8 or 4
    warps) over several pixel blocks and chunks. x, g and y are followed in memory by NaN, so a read past
    the last pixel poisons the result."""
    m = n * h * w
    rows = k * k * 4
    t, grad = make_out_case(c_in, 3, k, n, h, w, seed=10 + index)
    x, wt, b = (t[k_].float().to(DEVICE) for k_ in NAMES)
    y = out_forward(x, wt, b)
    dx_cfg = configs.out_dx_candidates(c_in, rows, w, m)[index]
    dw_cfg = configs.out_dw_candidates(c_in, rows, w, m)[index]
    dx, dw, db = out_backward(nan_followed(grad.float().to(DEVICE)), nan_followed(x), nan_followed(y), wt, True,
                              dx_config=dx_cfg, dw_config=dw_cfg, dw_split=split)
    g_ref, g_abs = grads_given_y(t, y, grad)
    for name, got in (("x", dx), ("weight", dw), ("bias", db)):
        assert_within(f"d{name} ({dx_cfg} / {dw_cfg}, split {split})", got, g_ref[name], g_abs[name], 1e-5)


def test_grouped_dw_split_launches_as_many_programs():
    """A dW config with four row tiles per program has a quarter of the row programs, so its split grows
    (outconv._dw_chunks): at the paper's batch 64 on 132 SMs both candidates launch ~1050 programs."""
    m, rows = 64 * 256 * 256, 324
    base = configs.dw_split(m, 64, rows, 132, taps=1)
    one, four = configs.out_dw_candidates(64, rows, 256, m)
    (s1, c1), (s4, c4) = outconv._dw_chunks(m, rows, base, one, False), outconv._dw_chunks(m, rows, base, four, False)
    assert (s1, s4) == (88, 263) and (s1 - 1) * c1 < m <= s1 * c1 and (s4 - 1) * c4 < m <= s4 * c4
    assert (11 + 1) * s1 == 1056 and (3 + 1) * s4 == 1052  # row programs (+ the db program) x split
    assert outconv._dw_chunks(m, rows, 5, four, True)[0] == 5  # a caller's split is kept as given
    assert outconv._dw_chunks(4096, rows, 3, four, False)[0] == 4  # chunks of at least 1024 pixels


@pytest.mark.parametrize("groups, split", [(4, 8), (2, 4)])
def test_grouped_dw_with_its_grown_split(monkeypatch, groups, split):
    """The grouped dW on a split of its own (2 SMs said: 4 chunks for one row tile per program; 8 for
    groups of four, whose 100 rows are 1 group against 4 tiles; 4 for groups of two, 2 groups), and the dX
    fold summing that many partials: the gradients match float64 autograd. (No candidate uses groups of
    two; the kernel takes them.)"""
    monkeypatch.setattr(conv3x3, "_sms", lambda device: 2)
    t, grad = make_out_case(8, 3, 5, 2, 64, 64, seed=21)  # M = 8192: up to 8 chunks of 1024
    x, wt, b = (t[k].float().to(DEVICE) for k in NAMES)
    y = out_forward(x, wt, b)
    cfg = configs.out_dw_candidates(8, 100, 64, 8192)[1]
    cfg = triton.Config(dict(cfg.kwargs, GROUPS=groups), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    dx, dw, db = out_backward(grad.float().to(DEVICE), x, y, wt, True, dw_config=cfg)
    plan = conv3x3._PLANS[("out_dw", x.shape, 5, 4, x.dtype, x.device, True, None, conv3x3.cfg_key(cfg))]
    assert plan[2] == split and plan[4].shape[0] == split  # the split, and the partials sized for it
    assert_fp32_grads(t, y, grad, dx, dw, db)


def test_timed_choice_launches_each_candidate(monkeypatch):
    """On a GPU each new plan times its two candidates (tuning.Tuner.choose). The same path here, with a
    timer that runs the launch and says the second was faster: the forward picks the GEMM + fold, dW and
    dX launch 2 timed + 1 real, the plans keep the second candidates, and the gradients still match."""
    from gafh_fast.kernels.tuning import Tuner

    def timer(fn):
        timed.append(1)
        fn()
        return 2.0 if len(timed) % 2 else 1.0

    timed = []
    monkeypatch.setattr(conv3x3, "INTERPRETING", False)
    monkeypatch.setattr(conv3x3, "AUTOTUNE", True)
    old = conv3x3.set_tuner(Tuner(None, "Test GPU", timer))
    try:
        t, grad = make_out_case(8, 3, 5, 2, 5, 6)
        leaves = [t[k].float().to(DEVICE).requires_grad_(True) for k in NAMES]
        launch.LAUNCHES.clear()
        y = fused_out_conv_triton(*leaves)
        grads = torch.autograd.grad(y, leaves, grad.float().to(DEVICE))
        counts = dict(launch.LAUNCHES)
        chosen = {e["kernel"]: e["config"]["kwargs"] for e in conv3x3.plan_configs()}
        warps = {e["kernel"]: e["config"]["num_warps"] for e in conv3x3.plan_configs()}
    finally:
        conv3x3.set_tuner(old)
    # the fold way's two kernels: once timed, once in the forward that chose it
    assert len(timed) == 6 and counts == {"out_taps": 2, "out_fold": 2, "out_prep": 1, "out_dw": 3, "out_dx": 3}
    assert chosen == {"out_fwd": {"FOLD": True},  # the forward's two torch ways are timed too
                      "out_dw": configs.out_dw_candidates(8, 100, 6, 60)[1].kwargs,
                      "out_dx": configs.out_dx_candidates(8, 100, 6, 60)[1].kwargs}
    assert warps == {"out_fwd": 4, "out_dw": 4, "out_dx": 4}  # the second candidates: 4 warps
    torch.testing.assert_close(y, outconv._out_forward_fold(*(v.detach() for v in leaves)), rtol=0, atol=0)
    g_ref, g_abs = grads_given_y(t, y, grad)
    for name, got in zip(NAMES, grads):
        assert_within(f"d{name}", got, g_ref[name], g_abs[name], 1e-5)


@pytest.mark.parametrize("c_in, c_out, k, n, h, w, bias, layout, chunk", [
    (5, 3, 9, 3, 7, 6, True, "channels_last", 2),  # the paper's 9x9 on an image smaller than it: every pixel pads
    (8, 3, 5, 2, 5, 6, False, "nchw", 2),
    (4, 2, 3, 1, 1, 1, True, "channels_last", 2),  # 1x1 image: one tap of nine lands
    (3, 4, 3, 3, 19, 17, True, "channels_last", 1),  # 323 pixels: a full and a partial tile of 256 per image;
                                                     # C_out 4 needs no padded channel; one image per chunk
    (6, 1, 5, 2, 3, 9, True, "nchw", 1),  # one output channel (3 padded)
])
def test_forward_by_gemm_and_fold_matches_the_conv(monkeypatch, c_in, c_out, k, n, h, w, bias, layout, chunk):
    """_out_forward_fold (outconv_taps_kernel's GEMM onto every tap's columns, then outconv_fold_kernel)
    against F.conv2d + tanh in float64, `chunk` images per chunk (3 images by 2: a full chunk and a partial one): the taps'
    shifts, the borders, the bias, the tanh, the tiles and the chunking all show. fp32 I/O: within 1e-5 of
    the terms' size (|W| * |x| + |b|, tanh' <= 1) plus |y| (the tanh's own error is ~1e-7 absolute)."""
    monkeypatch.setattr(outconv, "FOLD_CHUNK_BYTES", chunk * c_out * k * k * h * w * 4)  # fp32 columns
    t, _ = make_out_case(c_in, c_out, k, n, h, w, bias=bias, seed=3)
    x = t["x"].contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t["x"]
    launch.LAUNCHES.clear()
    got = outconv._out_forward_fold(x.float().to(DEVICE), t["weight"].float().to(DEVICE),
                                    None if t["bias"] is None else t["bias"].float().to(DEVICE))
    assert launch.LAUNCHES["out_taps"] == launch.LAUNCHES["out_fold"] == -(-n // chunk)  # two launches per chunk
    ref = torch.tanh(F.conv2d(t["x"], t["weight"], t["bias"], padding=k // 2))
    scale = F.conv2d(t["x"].abs(), t["weight"].abs(), None if t["bias"] is None else t["bias"].abs(),
                     padding=k // 2) + ref.abs()
    assert got.dtype == torch.float32 and got.is_contiguous(memory_format=torch.channels_last)
    assert_within("y", got, ref, scale, 1e-5)


@pytest.mark.parametrize("weight_layout", ["channels_last", "strided"])
def test_forward_by_gemm_and_fold_reads_the_weight_through_its_strides(weight_layout):
    """The taps GEMM reads W[c, ci, a, b] through the weight's four strides (no re-laid copy): a
    channels_last weight (the trainer's DeepSpeed parameters may be either) and one that is every other
    input channel of a wider tensor."""
    t, _ = make_out_case(6, 3, 5, 2, 6, 7, seed=6)
    wt = t["weight"].float()
    if weight_layout == "channels_last":
        wt = wt.contiguous(memory_format=torch.channels_last)
    else:
        wide = torch.zeros(3, 12, 5, 5)
        wide[:, ::2] = wt
        wt = wide[:, ::2]
    got = outconv._out_forward_fold(t["x"].float().to(DEVICE), wt.to(DEVICE), t["bias"].float().to(DEVICE))
    ref = torch.tanh(F.conv2d(t["x"], t["weight"], t["bias"], padding=2))
    assert_within("y", got, ref, F.conv2d(t["x"].abs(), t["weight"].abs(), t["bias"].abs(), padding=2) + ref.abs(), 1e-5)


def test_forward_by_gemm_and_fold_in_bf16():
    """bf16 in and out (the GEMM's columns rounded to bf16 before the fold sums them in fp32): within 2**-7
    of the terms' size, the bound of the other bf16 paths (|W| * |x| + |b|, tanh' <= 1)."""
    t, _ = make_out_case(6, 3, 9, 2, 10, 11, dtype=torch.bfloat16, seed=4)
    got = outconv._out_forward_fold(*(t[k].to(torch.bfloat16).to(DEVICE) for k in NAMES))
    ref = torch.tanh(F.conv2d(t["x"], t["weight"], t["bias"], padding=4))
    scale = F.conv2d(t["x"].abs(), t["weight"].abs(), t["bias"].abs(), padding=4) + ref.abs()
    assert got.dtype == torch.bfloat16
    assert_within("y", got, ref, scale, 2.0**-7)


def test_fold_keys_each_chunks_alignment(monkeypatch):
    """x's and y's chunks start at image boundaries, which need not be 16-byte aligned (5 x 7 pixels x 3
    channels x 4 bytes = 420 bytes per image); the JIT specialises on alignment, so each chunk's launch
    keys say their own: kept kernels compiled for an aligned chunk never touch a misaligned one."""
    keys = {"out_taps": [], "out_fold": []}
    monkeypatch.setattr(launch, "STANDIN", lambda name, grid, args, constexprs, options, key: keys[name].append(key))
    monkeypatch.setattr(outconv, "FOLD_CHUNK_BYTES", 3 * 9 * 5 * 7 * 4)  # one image per chunk
    x = torch.randn(3, 3, 5, 7).contiguous(memory_format=torch.channels_last)  # x: 420 bytes per image too
    outconv._out_forward_fold(x, torch.randn(3, 3, 3, 3), torch.randn(3))
    # (x's or y's chunk, then the weight or the bias): images at 0, 420 and 840 bytes
    assert [k[1] for k in keys["out_taps"]] == [True, (False, True), (False, True)]
    assert [k[1] for k in keys["out_fold"]] == [True, (False, True), (False, True)]


def test_kept_dw_partials_need_no_clearing():
    """The dW partials are kept with their plan; the fold reads only what the dW launch rewrote.
    Poisoned with NaN between two backward passes, the second must still match."""
    t, grad = make_out_case(8, 3, 5, 2, 16, 12)   # M = 384: three chunks of 128
    x, wt, b = (t[k].float().to(DEVICE) for k in NAMES)
    g = grad.float().to(DEVICE)
    y = out_forward(x, wt, b)
    out_backward(g, x, y, wt, True, dw_split=3)
    kept = [p for key, p in conv3x3._PLANS.items() if key[0] == "out_dw" and key[1] == x.shape and key[7] == 3]
    assert len(kept) == 1 and kept[0][4].shape == (3, 100, 8) and kept[0][5].shape == (3, 4)  # 5*5 taps x 4 padded channels
    listed = conv3x3.kept_partials()
    assert any(p is kept[0][4] for p in listed) and any(p is kept[0][5] for p in listed)
    kept[0][4].fill_(float("nan"))
    kept[0][5].fill_(float("nan"))
    dx, dw, db = out_backward(g, x, y, wt, True, dw_split=3)
    assert_fp32_grads(t, y, grad, dx, dw, db)


def test_backward_is_deterministic():
    """The dW partials are summed in a fixed order (no atomics): two backward passes agree bit for bit."""
    t, grad = make_out_case(8, 3, 5, 2, 6, 7)
    x, wt, b = (t[k].float().to(DEVICE) for k in NAMES)
    y = out_forward(x, wt, b)
    first = out_backward(grad.float().to(DEVICE), x, y, wt, True, dw_split=2)
    second = out_backward(grad.float().to(DEVICE), x, y, wt, True, dw_split=2)
    assert all(torch.equal(a, b_) for a, b_ in zip(first, second))


@pytest.mark.skipif(not INTERPRETING, reason="hooks the Triton interpreter's loads and stores")
@pytest.mark.parametrize("dw_index", [0, 1])  # dW: one row tile per program, or a group of four
def test_backward_stays_in_bounds(bounds_checked, dw_index):
    """Every load and store of the three backward launches stays inside the tensors the launch passed
    (test_memory_bounds.py's hook): C_in 12 (4 masked lanes of a 16-wide channel tile), C_out 3 (gz and
    the weight rows padded to 4 channels), rows past R = 100 in the last row tile and K step, two dW
    chunks of 128 and 22 pixels with the db program. (The mutation run of round 8 had the db program
    store a lane past its partials row: no value test saw it.)"""
    t, grad = make_out_case(12, 3, 5, 3, 5, 10, seed=4)
    x, wt, b = (t[k].float().to(DEVICE) for k in NAMES)
    y = out_forward(x, wt, b)
    dw_cfg = configs.out_dw_candidates(12, 100, 10, 150)[dw_index]
    dx, dw, db = out_backward(grad.float().to(DEVICE), x, y, wt, True, dw_config=dw_cfg, dw_split=2)
    assert_fp32_grads(t, y, grad, dx, dw, db)


@pytest.mark.skipif(not INTERPRETING, reason="hooks the Triton interpreter's loads and stores")
def test_forward_fold_stays_in_bounds(bounds_checked, monkeypatch):
    """Every load and store of the fold launches stays inside the tensors passed: the taps that reach past
    an image's border (masked), the padded 4th channel (masked), a partial pixel tile (300 of 2 x 256),
    and the last chunk of one image, whose y slice ends at y's end."""
    monkeypatch.setattr(outconv, "FOLD_CHUNK_BYTES", 2 * 3 * 9 * 20 * 15 * 4)  # two images per chunk
    t, _ = make_out_case(4, 3, 3, 3, 20, 15, seed=5)
    x, wt, b = (t[k].float().to(DEVICE) for k in NAMES)
    got = outconv._out_forward_fold(x, wt, b)
    ref = torch.tanh(F.conv2d(t["x"], t["weight"], t["bias"], padding=1))
    assert_within("y", got, ref, F.conv2d(t["x"].abs(), t["weight"].abs(), t["bias"].abs(), padding=1) + ref.abs(), 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prep_pads_gz_and_relays_the_weight(dtype):
    """The prep launch: gz = g * (1 - y^2) rounded once to the I/O dtype (as torch's tanh backward rounds
    it), in an (N, H + k-1, W + k-1, 4) buffer with a zero border of k//2 pixels and a zero 4th channel;
    and the weight as dX's B operand, row (a*k + b)*4 + c = W[c, :, k-1-a, k-1-b], zero for c = 3 and
    for the rows past k*k*4 (the mutation run: gz held in fp32 for bf16 I/O passed every value test)."""
    t, grad = make_out_case(5, 3, 3, 2, 3, 4, dtype=dtype)
    x, wt, b = (t[k].to(dtype).to(DEVICE) for k in NAMES)
    y = out_forward(x, wt, b)
    g = grad.to(dtype).to(DEVICE).contiguous(memory_format=torch.channels_last)
    r_pad = -(-36 // configs.out_rows_block(36)) * configs.out_rows_block(36)   # 3*3*4 rows
    gzp, wr = outconv._prepare(g, y, wt, r_pad)
    assert (gzp.dtype, gzp.shape, wr.dtype, wr.shape) == (dtype, (2, 5, 6, 4), dtype, (r_pad, 5))
    yd, gd = y.double().cpu().permute(0, 2, 3, 1), g.double().cpu().permute(0, 2, 3, 1)
    inner = torch.zeros(2, 5, 6, 4, dtype=torch.bool)
    inner[:, 1:4, 1:5, :3] = True
    assert torch.equal(gzp.cpu()[~inner], torch.zeros((~inner).sum().item(), dtype=dtype))
    assert_within("gz", gzp.cpu()[inner], (gd * (1 - yd * yd)).flatten(), (gd.abs() * (1 + yd * yd)).flatten(),
                  1e-6 if dtype == torch.float32 else 2.0**-8)
    expect = torch.zeros(r_pad, 5, dtype=dtype)
    for a in range(3):
        for b_ in range(3):
            expect[(a * 3 + b_) * 4:(a * 3 + b_) * 4 + 3] = wt.cpu()[:, :, 2 - a, 2 - b_]
    assert torch.equal(wr.cpu(), expect)


def channels_last_at_offset(t: torch.Tensor) -> torch.Tensor:
    """t's values, channels_last, in a view 8 bytes into its buffer (not 16-byte aligned)."""
    return _offset_view(t.float().to(DEVICE).permute(0, 2, 3, 1).contiguous(), 2).permute(0, 3, 1, 2)


def test_launch_keys_hold_the_alignment_of_every_caller_tensor(monkeypatch):
    """As test_host_code.py's test for the conv: every caller tensor a backward launch reads (x, g, y, the
    weight; here each 8 bytes into its buffer) is among the tensors whose alignment went into that
    launch's key (the JIT specialises on 16-byte alignment); only buffers outconv.py allocates are left out."""
    real_aligned = outconv.aligned
    real_launch = launch.KernelLauncher.launch
    pending, launches = [], []
    monkeypatch.setattr(outconv, "aligned", lambda *ts: pending.append(ts) or real_aligned(*ts))

    def spy(self, key, grid, args, flags, config):
        launches.append((self.name, args, pending.pop() if pending else ()))
        pending.clear()
        return real_launch(self, key, grid, args, flags, config)

    monkeypatch.setattr(launch.KernelLauncher, "launch", spy)
    t, grad = make_out_case(8, 3, 3, 2, 3, 5)
    x, g = channels_last_at_offset(t["x"]), channels_last_at_offset(grad)
    wt, b = _offset_view(t["weight"].float().to(DEVICE), 2), t["bias"].float().to(DEVICE)
    y = channels_last_at_offset(out_forward(x, wt, b))
    dx, dw, db = out_backward(g, x, y, wt, True)
    caller = {a.data_ptr() for a in (x, g, y, wt)}
    assert [name for name, _, _ in launches] == ["out_prep", "out_dw", "out_dx"]
    for name, args, keyed in launches:
        received = {a.data_ptr() for a in args if isinstance(a, torch.Tensor)} & caller
        assert received <= {a.data_ptr() for a in keyed}, f"{name}: a caller tensor's alignment is not in its key"
    assert all(real_aligned(*keyed) is not True for _, args, keyed in launches if keyed)  # the offsets reached the keys
    assert_fp32_grads(t, y, grad, dx, dw, db)


def test_inference_and_empty_batch():
    t, _ = make_out_case(8, 3, 5, 1, 3, 4)
    x, wt, b = (t[k].float().to(DEVICE) for k in NAMES)
    with torch.no_grad():
        launch.LAUNCHES.clear()
        y = fused_out_conv_triton(x, wt, b)
    assert sum(launch.LAUNCHES.values()) == 0 and torch.equal(y, fused_out_conv_reference(x, wt, b))
    x0 = torch.randn(0, 8, 4, 4, device=DEVICE, requires_grad=True)
    wt0, b0 = wt.clone().requires_grad_(), b.clone().requires_grad_()
    fused_out_conv_triton(x0, wt0, b0).sum().backward()
    assert x0.grad.shape == x0.shape
    assert torch.equal(wt0.grad, torch.zeros_like(wt0)) and torch.equal(b0.grad, torch.zeros_like(b0))


def test_bad_arguments_raise_clear_errors():
    x = torch.randn(1, 8, 4, 4, device=DEVICE)
    with pytest.raises(ValueError, match="k odd"):
        fused_out_conv_triton(x, torch.randn(3, 8, 4, 4, device=DEVICE), None)
    with pytest.raises(ValueError, match="does not fit"):
        fused_out_conv_triton(x, torch.randn(3, 7, 3, 3, device=DEVICE), None)
    with pytest.raises(ValueError, match="does not fit"):  # not square (k read off the last dimension alone)
        fused_out_conv_triton(x, torch.randn(3, 8, 3, 5, device=DEVICE), None)
    with pytest.raises(ValueError, match="does not fit"):
        fused_out_conv_triton(x, torch.randn(3, 8, 3, device=DEVICE), None)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        fused_out_conv_triton(x[0], torch.randn(3, 8, 3, 3, device=DEVICE), None)
    with pytest.raises(ValueError, match="weight is torch.float64"):
        fused_out_conv_triton(x, torch.randn(3, 8, 3, 3, device=DEVICE, dtype=torch.float64), None)
    with pytest.raises(ValueError, match="bias is torch.bfloat16"):
        fused_out_conv_triton(x, torch.randn(3, 8, 3, 3, device=DEVICE), torch.randn(3, device=DEVICE).bfloat16())
    with pytest.raises(ValueError, match="kernels: torch"):
        fused_out_conv_triton(x, torch.randn(16, 8, 9, 9, device=DEVICE), None)  # 1296 rows
    with pytest.raises(ValueError, match="bias"):
        fused_out_conv_triton(x, torch.randn(3, 8, 3, 3, device=DEVICE), torch.randn(4, device=DEVICE))
    with pytest.raises(ValueError, match="float32 and bfloat16"):
        fused_out_conv_triton(x.half(), torch.randn(3, 8, 3, 3, device=DEVICE).half(), None)


# ---------------------------------------------------------------------------------------------
# The backend switch, the custom ops and torch.compile
# ---------------------------------------------------------------------------------------------
def test_ops_switch_runs_the_kernels():
    t, grad = make_out_case(8, 3, 5, 1, 3, 4)
    outs = {}
    for backend in ("triton", "torch"):
        leaves = [t[k].float().to(DEVICE).requires_grad_(True) for k in NAMES]
        launch.LAUNCHES.clear()
        y = fused_out_conv(*leaves, backend=backend)
        outs[backend] = torch.autograd.grad(y, leaves, grad.float().to(DEVICE))
        assert (launch.LAUNCHES["out_dx"] == 1) == (backend == "triton")
    for name, a, b_ in zip(NAMES, outs["triton"], outs["torch"]):
        assert_within(f"d{name}", a, b_, b_.abs().max().expand_as(b_), 1e-5)


def via_custom_op(x, weight, bias):
    """The registered op and its register_autograd backward, called eagerly (torch.compile's path)."""
    return torch.ops.gafh_fast.fused_out_conv_fwd(x, weight, bias)


def test_custom_op_autograd_path():
    check_out(12, 3, 5, 2, 3, 4, layout="nchw", entry=via_custom_op)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_opcheck_forward_and_backward_ops(dtype, layout):
    """Fakes against the real ops (shapes, strides: dW in the weight's own layout), schemas, autograd."""
    t, grad = make_out_case(5, 3, 3, 2, 3, 4, dtype=dtype)
    x = t["x"].to(dtype).to(DEVICE).contiguous(memory_format=torch.channels_last)
    wt = to_kernel_layout(t["weight"], dtype, layout).to(DEVICE)
    b = t["bias"].to(dtype).to(DEVICE)
    torch.library.opcheck(torch.ops.gafh_fast.fused_out_conv_fwd.default,
                          (x.requires_grad_(), wt.requires_grad_(), b.requires_grad_()))
    with torch.no_grad():
        y = torch.ops.gafh_fast.fused_out_conv_fwd(x, wt, b)
    torch.library.opcheck(torch.ops.gafh_fast.fused_out_conv_bwd.default,
                          (grad.to(dtype).to(DEVICE), x.detach(), y, wt.detach(), True))


def test_torch_compile_fullgraph():
    """Under torch.compile the op is one opaque node (no graph break) with the same values and grads."""
    t, grad = make_out_case(6, 3, 5, 2, 3, 4)
    compiled = torch.compile(lambda x, w, b: fused_out_conv(x, w, b, backend="triton"), fullgraph=True)
    leaves = [t[k].float().to(DEVICE).requires_grad_(True) for k in NAMES]
    y = compiled(*leaves)
    grads = torch.autograd.grad(y, leaves, grad.float().to(DEVICE))
    assert torch.equal(y, fused_out_conv_reference(*(v.detach() for v in leaves)).contiguous(
        memory_format=torch.channels_last))
    g_ref, g_abs = grads_given_y(t, y, grad)
    for name, got in zip(NAMES, grads):
        assert_within(f"d{name}", got, g_ref[name], g_abs[name], 1e-5)


def test_auto_times_both_backends_per_shape(monkeypatch):
    """kernels=auto (on CUDA; here the chooser is called directly) times triton against torch once per
    shape, forward and backward, and runs the faster."""
    t, _ = make_out_case(8, 3, 5, 1, 3, 4)
    leaves = [t[k].float().to(DEVICE).requires_grad_(True) for k in NAMES]
    timed = []
    chooser = ops.AutoChooser(timer=lambda call, device: (call(), timed.append(1), 2.0 - len(timed))[2])
    monkeypatch.setattr(ops, "AUTO", chooser)
    monkeypatch.setattr(ops, "resolve_backend", lambda backend, device: "auto")
    launch.LAUNCHES.clear()
    fused_out_conv(*leaves, backend="auto")
    ((key, decision),) = chooser.decisions.items()
    assert key[0] == "out_conv" and key[3] is True and decision == "torch" and len(timed) == 2
    assert launch.LAUNCHES["out_dx"] == 1  # the triton candidate ran its backward while timed

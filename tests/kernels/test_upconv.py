"""The fused upsampling conv (nearest x2 + conv3x3 + bias + LeakyReLU by sub-pixel phases, kernels/upconv.py)
against the float64 reference gafh_fast.ops.fused_upconv3x3_reference (F.interpolate, F.conv2d,
F.leaky_relu).

As in test_conv3x3.py: every output and gradient elementwise within rel * (the same computation on
|values|), rel = 1e-5 (fp32) and 2**-8 (bf16).

bf16 has one rounding a conv does not: the combined weights (sums of up to four weights) are rounded
once to bf16. For the forward that is a relative 2**-9 per weight (test_bfloat16_forward_any_weights:
2**-7 in all). For the backward it can also flip the sign of a pre-activation z near 0, and with it
the LeakyReLU derivative (1 vs 0.2) of that element against the float64 reference: a difference of
0.8*|g*x| in one dW term, which no relative bound holds. So the bf16 gradient tests use weights on a
coarse grid (coarse_weights), whose combinations bf16 holds exactly: there the kernels' z is the
reference's up to fp32 accumulation, and the gradients meet the conv's 2**-8.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gafh_fast import ops
from gafh_fast.kernels import configs, conv3x3, launch, upconv
from gafh_fast.kernels.conv3x3_fwd import INTERPRETING
from gafh_fast.kernels.upconv import combine_weight, fused_upconv3x3_triton, up_backward, up_forward
from gafh_fast.ops import fused_upconv3x3, fused_upconv3x3_reference

from .test_conv3x3 import DEVICE, assert_within, nan_followed, no_tf32, to_kernel_layout  # noqa: F401
from .test_memory_bounds import bounds_checked  # noqa: F401

REL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-8}
NAMES = ("x", "weight", "bias")


def coarse_weights(weight: torch.Tensor) -> torch.Tensor:
    """weight rounded to integer multiples (at most 16) of a power of two: every sum of up to four of
    them is an integer multiple of at most 64, which bf16's 8-bit significand holds exactly."""
    step = 2.0 ** (torch.ceil(torch.log2(weight.abs().max())).item() - 4)
    return torch.round(weight / step) * step


def make_up_case(c_in, c_out, n, h, w, *, bias=True, dtype=torch.float32, seed=0, coarse=None):
    """float64 masters of values representable in dtype: ({x, weight, bias}, upstream grad).
    coarse (default: for bf16): the weights on coarse_weights' grid."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(c_out, c_in, 3, 3, generator=gen) / (3 * c_in ** 0.5)
    if coarse if coarse is not None else dtype == torch.bfloat16:
        weight = coarse_weights(weight)
    t = {"x": torch.randn(n, c_in, h, w, generator=gen), "weight": weight,
         "bias": torch.randn(c_out, generator=gen) if bias else None}
    grad = torch.randn(n, c_out, 2 * h, 2 * w, generator=gen)
    return {k: v.to(dtype).double() if v is not None else None for k, v in t.items()}, grad.to(dtype).double()


def up_reference_and_scale(t, grad, slope):
    """float64 (y, {name: grad}) of the reference, and the same on |values| and |grad| (the bound scale)."""
    out = []
    for absolute in (False, True):
        leaves = {k: (v.abs() if absolute else v).clone().requires_grad_(True) for k, v in t.items() if v is not None}
        y = fused_upconv3x3_reference(leaves["x"], leaves["weight"], leaves.get("bias"), slope)
        grads = torch.autograd.grad(y, list(leaves.values()), grad.abs() if absolute else grad)
        out.append((y.detach(), dict(zip(leaves, grads))))
    return out


def check_up(c_in, c_out, n, h, w, *, slope=0.2, bias=True, dtype=torch.float32, layout="channels_last", seed=0,
             entry=fused_upconv3x3_triton):
    t, grad = make_up_case(c_in, c_out, n, h, w, bias=bias, dtype=dtype, seed=seed)
    (y_ref, g_ref), (y_abs, g_abs) = up_reference_and_scale(t, grad, slope)
    leaves = {k: (to_kernel_layout(v, dtype, layout) if k != "bias" else v.to(dtype)).to(DEVICE).requires_grad_(True)
              for k, v in t.items() if v is not None}
    y = entry(leaves["x"], leaves["weight"], leaves.get("bias"), slope)
    assert y.dtype == dtype and y.shape == (n, c_out, 2 * h, 2 * w)
    assert y.is_contiguous(memory_format=torch.channels_last)
    rel = REL[dtype]
    assert_within("y", y, y_ref, y_abs, rel)
    grads = torch.autograd.grad(y, list(leaves.values()), grad.to(dtype).to(DEVICE))
    assert grads[1].stride() == conv3x3.dw_strides(leaves["weight"])  # the weight's own layout, else channels_last
    for k, g in zip(leaves, grads):
        assert_within(f"d{k}", g, g_ref[k], g_abs[k], rel)


@pytest.mark.parametrize(
    "c_in, c_out, n, h, w, layout",
    [
        (24, 40, 2, 5, 7, "channels_last"),   # K and N not powers of two (masked channel blocks)
        (64, 64, 1, 3, 4, "nchw"),            # the generator's nf -> nf, NCHW parameters as the trainer's
        (3, 8, 2, 1, 1, "channels_last"),     # a 1x1 image: every tap but the centre phase taps is padding
        (17, 16, 1, 2, 9, "noncontiguous"),   # strided views of x and W
        (16, 136, 1, 2, 3, "channels_last"),  # C_out 136: two output-channel tiles per phase
        (136, 16, 1, 3, 2, "channels_last"),  # C_in 136: three K blocks per tap, two dX channel tiles
        (1, 24, 2, 3, 4, "channels_last"),    # C_in 1: one live channel in a 16-deep K block
        (8, 65, 1, 2, 3, "nchw"),             # C_out 65: dX's K = 64 + 1 (the mutation run: EVEN_K at C % block == 1)
    ],
)
def test_shapes_and_layouts(c_in, c_out, n, h, w, layout):
    check_up(c_in, c_out, n, h, w, layout=layout)


@pytest.mark.parametrize("slope, bias", [(None, True), (None, False), (0.2, False), (0.05, True)])
def test_activation_and_bias(slope, bias):
    check_up(12, 24, 2, 3, 5, slope=slope, bias=bias)


@pytest.mark.parametrize("c_in, c_out, layout", [(40, 24, "nchw"), (17, 16, "channels_last"), (64, 64, "nchw")])
def test_bfloat16(c_in, c_out, layout):
    check_up(c_in, c_out, 2, 3, 5, dtype=torch.bfloat16, layout=layout)


def test_bfloat16_forward_any_weights():
    """Arbitrary bf16 weights: the combined weights' rounding (2**-9 each) plus the output's, within 2**-7."""
    t, _ = make_up_case(64, 64, 2, 3, 5, dtype=torch.bfloat16, coarse=False)
    x, wt, b = (t[k].to(torch.bfloat16).to(DEVICE) for k in NAMES)
    y = fused_upconv3x3_triton(x, wt, b, 0.2)
    assert_within("y", y, fused_upconv3x3_reference(t["x"], t["weight"], t["bias"], 0.2),
                  fused_upconv3x3_reference(t["x"].abs(), t["weight"].abs(), t["bias"].abs(), 0.2), 2.0**-7)


def test_combined_weights_make_the_phase_identity():
    """The combine kernel's Wc, used by plain float64 F.conv2d as four 2x2 convs of the low-resolution
    x (one per phase, taps at rows/columns (-1, 0) for phase 0 and (0, +1) for phase 1), gives the
    reference's output pixels (2i + a, 2j + b): the identity the kernels are built on, checked apart
    from them."""
    t, _ = make_up_case(5, 6, 2, 4, 3, bias=False)
    wc = combine_weight(t["weight"].float().to(DEVICE)).cpu().double()   # (C_out, 16, C_in)
    y_ref = fused_upconv3x3_reference(t["x"], t["weight"], None, None)
    for a in range(2):
        for b in range(2):
            k = wc[:, 4 * (2 * a + b):4 * (2 * a + b) + 4].reshape(6, 2, 2, 5).permute(0, 3, 1, 2)  # (co, ci, ty, tx)
            padded = F.pad(t["x"], (1 - b, b, 1 - a, a))  # phase 0 reads offset -1, phase 1 offset +1
            got = F.conv2d(padded, k)
            assert_within(f"phase ({a}, {b})", got, y_ref[:, :, a::2, b::2],
                          fused_upconv3x3_reference(t["x"].abs(), t["weight"].abs(), None, None)[:, :, a::2, b::2], 1e-6)


@pytest.mark.parametrize("slope", [0.2, None])
def test_launch_count(slope):
    """Forward: combine + conv (2). Backward with an activation: dX (+ gz), dW + db partials, finalize
    with the fold (3); without one g is gz: dW first, then dX with the fold in extra programs (2)."""
    x = torch.randn(1, 8, 3, 3, device=DEVICE, requires_grad=True)
    wt = torch.randn(8, 8, 3, 3, device=DEVICE, requires_grad=True)
    b = torch.randn(8, device=DEVICE, requires_grad=True)
    launch.LAUNCHES.clear()
    y = fused_upconv3x3_triton(x, wt, b, slope)
    assert dict(launch.LAUNCHES) == {"up_combine": 1, "up_fwd": 1}
    launch.LAUNCHES.clear()
    y.sum().backward()
    assert dict(launch.LAUNCHES) == ({"up_dx": 1, "up_dw": 1, "up_fin": 1} if slope else {"up_dw": 1, "up_dx": 1})


def test_launch_count_with_the_gz_pass():
    """The tuner's other way (GZ_PASS): gz in a pass of its own, dW, then dX with the fold (3 launches)."""
    x = torch.randn(1, 8, 3, 3, device=DEVICE)
    wt = torch.randn(8, 8, 3, 3, device=DEVICE)
    y, mask, wc = up_forward(x, wt, None, 0.2, True)
    launch.LAUNCHES.clear()
    up_backward(torch.randn_like(y), x, wt, wc, mask, 0.2, False,
                dx_config=configs.up_dx_candidates(8, 8, 3, 9, act=True)[1])
    assert dict(launch.LAUNCHES) == {"gz": 1, "up_dw": 1, "up_dx": 1}


@pytest.mark.parametrize("index", [0, 1])
@pytest.mark.parametrize(
    "c_in, c_out, n, h, w, split",
    [
        (16, 24, 2, 16, 12, 1),   # M = 384 (FULL_P): 3 blocks of 128 in one chunk; w carries, h wraps
        (16, 16, 2, 16, 12, 2),   # two chunks (256 + 128): the second starts mid-image
        (8, 16, 1, 2, 160, 1),    # W = 160 > BLOCK_P: steps stay in a row or carry into the next
        (8, 16, 3, 5, 10, 2),     # M = 150: a partial last block (p_ok masks)
    ],
)
@pytest.mark.parametrize("slope", [0.2, None])
def test_each_config_and_dw_walk(index, c_in, c_out, n, h, w, split, slope):
    """Both heuristic candidates of the forward, dX and dW kernels (dX with an activation: gz made in its
    operand, or by the gz pass); the dW loop's (h, w, row) walk over several blocks and chunks. The input and upstream gradient are followed in memory by NaN, so a read
    past the last pixel poisons the result."""
    m = n * h * w
    fwd_cfg = configs.up_fwd_candidates(c_in, c_out, w, m)[index]
    dx_cfg = configs.up_dx_candidates(c_in, c_out, w, m, act=slope is not None)[index]  # with act: GZ_PASS = index
    dw_cfg = configs.up_dw_candidates(c_in, c_out, w, m)[index]
    t, grad = make_up_case(c_in, c_out, n, h, w, seed=10 + index)
    (y_ref, g_ref), (y_abs, g_abs) = up_reference_and_scale(t, grad, slope)
    x = nan_followed(t["x"].float().to(DEVICE))
    wt, b = t["weight"].float().to(DEVICE), t["bias"].float().to(DEVICE)
    y, mask, wc = up_forward(x, wt, b, slope, True, config=fwd_cfg)
    assert_within(f"y (config {fwd_cfg})", y, y_ref, y_abs, 1e-5)
    dx, dw, db = up_backward(nan_followed(grad.float().to(DEVICE)), x, wt, wc, mask, slope, True,
                             dx_config=dx_cfg, dw_config=dw_cfg, dw_split=split)
    for name, got in (("x", dx), ("weight", dw), ("bias", db)):
        assert_within(f"d{name} (configs {dx_cfg} / {dw_cfg}, split {split})", got, g_ref[name], g_abs[name], 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("c_in, c_out, n, h, w", [
    (8, 3, 1, 3, 5),      # C_out 3: one 4-wide channel block, 60 output pixels (one partial pixel block)
    (16, 65, 2, 2, 3),    # C_out 65: two channel blocks, 9 mask bytes per pixel
])
def test_gz_pass(dtype, c_in, c_out, n, h, w):
    """The gz pass writes g * LeakyReLU'(z) with the mask read from the forward (z > 0 exactly where the
    kernels' y > 0), rounded once; and dX, dW and db come out bit for bit as with gz made in dX's
    operand (the same operand values, the same dot order)."""
    t, grad = make_up_case(c_in, c_out, n, h, w, dtype=dtype, seed=3)
    x, wt, b = (t[k].to(dtype).to(DEVICE) for k in NAMES)
    g = grad.to(dtype).to(DEVICE).contiguous(memory_format=torch.channels_last)  # as up_backward hands it on
    y, mask, wc = up_forward(x, wt, b, 0.2, True)
    gz = torch.full_like(y, float("nan"))  # channels_last, as y
    conv3x3.launch_gz(g, mask, gz, 0.2)
    slope = torch.tensor(0.2, dtype=torch.float32, device=y.device)
    expect = (g.float() * torch.where(y.float() > 0, 1.0, slope)).to(dtype)
    assert torch.equal(gz, expect)
    fused, by_pass = (up_backward(g, x, wt, wc, mask, 0.2, True,
                                  dx_config=configs.up_dx_candidates(c_in, c_out, w, n * h * w, act=True)[i])
                      for i in (0, 1))
    for name, a, p in zip(NAMES, fused, by_pass):
        assert torch.equal(a, p), name


@pytest.mark.parametrize("untimed", [(), ("up_fwd",)])
def test_timed_tile_choice_launches_each_candidate(monkeypatch, untimed):
    """On a GPU each new plan times its two candidates: its run closure launches the kernel with
    each (tuning.Tuner.choose). The same path here, with a timer that runs the launch and then says the
    second candidate was faster: every kernel with candidates launches 2 timed + 1 real times, the plans
    keep the second candidates, and the results still match the reference. A kernel in conv3x3.UNTIMED
    is not timed: it launches once, with the heuristic's first candidate."""
    from gafh_fast.kernels.tuning import Tuner

    def timer(fn):
        timed.append(1)
        fn()
        return 2.0 if len(timed) % 2 else 1.0

    timed, gz_args = [], []
    real_launch = launch.KernelLauncher.launch

    def spy(self, key, grid, args, *rest):
        # patched on the class: undoing a patch of the instance would leave the bound method behind as an
        # instance attribute, out of reach of later tests' class-level spies (test_cost_model's)
        if self is conv3x3.GZ:
            gz_args.append(args)
        return real_launch(self, key, grid, args, *rest)

    monkeypatch.setattr(launch.KernelLauncher, "launch", spy)
    monkeypatch.setattr(conv3x3, "INTERPRETING", False)  # time candidates, as on a GPU
    monkeypatch.setattr(conv3x3, "AUTOTUNE", True)
    monkeypatch.setattr(conv3x3, "UNTIMED", frozenset(untimed))
    old = conv3x3.set_tuner(Tuner(None, "Test GPU", timer))
    try:
        t, grad = make_up_case(8, 16, 2, 5, 6)
        (y_ref, g_ref), (y_abs, g_abs) = up_reference_and_scale(t, grad, 0.2)
        leaves = [t[k].float().to(DEVICE).requires_grad_(True) for k in NAMES]
        launch.LAUNCHES.clear()
        y = fused_upconv3x3_triton(*leaves, 0.2)
        grads = torch.autograd.grad(y, leaves, grad.float().to(DEVICE))
        counts = dict(launch.LAUNCHES)
        chosen = {e["kernel"]: e["config"]["kwargs"] for e in conv3x3.plan_configs()}
    finally:
        conv3x3.set_tuner(old)
    # dX's second candidate is the gz pass: timed once, then run for real, with the fold in dX's launch
    assert len(timed) == 6 - 2 * len(untimed)
    assert counts == {"up_combine": 1, "up_fwd": 1 if untimed else 3, "up_dx": 3, "gz": 2, "up_dw": 3}
    # the timed gz pass is the real one (same tensors, M2 = 2*10*12 full-resolution pixels, C_out, the slope)
    (timed_gz, real_gz) = gz_args
    assert all(a is b for a, b in zip(timed_gz[:3], real_gz[:3])) and timed_gz[3:] == real_gz[3:] == (240, 16, 0.2)
    m = 2 * 5 * 6
    assert chosen == {"up_fwd": configs.up_fwd_candidates(8, 16, 6, m)[0 if untimed else 1].kwargs,
                      "up_dx": configs.up_dx_candidates(8, 16, 6, m, act=True)[1].kwargs,
                      "up_dw": configs.up_dw_candidates(8, 16, 6, m)[1].kwargs}
    assert_within("y", y, y_ref, y_abs, 1e-5)
    for name, got in zip(NAMES, grads):
        assert_within(f"d{name}", got, g_ref[name], g_abs[name], 1e-5)


@pytest.mark.parametrize("gz_pass", [False, True])
def test_kept_dw_partials_need_no_clearing(gz_pass):
    """The dW partials are kept with their plan; the finalize (or dX's fold programs, after the gz pass)
    reads only what the dW launch rewrote. Poisoned with NaN between two backward passes, the second
    must still match the reference."""
    t, grad = make_up_case(8, 16, 2, 10, 13)
    (_, g_ref), (_, g_abs) = up_reference_and_scale(t, grad, 0.2)
    x, wt, b = (t[k].float().to(DEVICE) for k in NAMES)
    g = grad.float().to(DEVICE)
    y, mask, wc = up_forward(x, wt, b, 0.2, True)
    dx_cfg = configs.up_dx_candidates(8, 16, 13, 2 * 10 * 13, act=True)[int(gz_pass)]
    up_backward(g, x, wt, wc, mask, 0.2, True, dx_config=dx_cfg, dw_split=3)
    kept = [p for key, p in conv3x3._PLANS.items() if key[0] == "up_dw" and key[1] == x.shape and key[6] == 3]
    assert len(kept) == 1 and kept[0][4].shape == (3, 16, 8, 16) and kept[0][5].shape == (3, 16)
    listed = conv3x3.kept_partials()  # the kept scratch of every plan, the upsampling conv's included
    assert any(t is kept[0][4] for t in listed) and any(t is kept[0][5] for t in listed)
    assert all(isinstance(t, torch.Tensor) for t in listed)
    kept[0][4].fill_(float("nan"))
    kept[0][5].fill_(float("nan"))
    dx, dw, db = up_backward(g, x, wt, wc, mask, 0.2, True, dx_config=dx_cfg, dw_split=3)
    for name, got in (("x", dx), ("weight", dw), ("bias", db)):
        assert_within(f"d{name}", got, g_ref[name], g_abs[name], 1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_fold_in_dx_with_several_channel_tiles(bias):
    """Without an activation dX folds the dW partials in extra programs of its grid's first channel tile:
    C_in 136 gives dX two channel tiles and dW 9*136*24 elements, four fold programs of 1024."""
    launch.LAUNCHES.clear()
    check_up(136, 24, 1, 3, 2, slope=None, bias=bias)
    assert launch.LAUNCHES["up_fin"] == 0 and launch.LAUNCHES["up_dx"] == 1


@pytest.mark.skipif(not INTERPRETING, reason="hooks the Triton interpreter's loads and stores")
@pytest.mark.parametrize("slope", [0.2, None])
def test_gz_pass_and_fold_stay_in_bounds(bounds_checked, slope):
    """Every load and store of the round-8 launches stays inside the tensors the launch passed
    (test_memory_bounds.py's hook): the gz pass (C_out 24: 3 mask bytes a pixel, 8 masked lanes of its
    32-wide channel block), dW by phases, and dX with the fold programs (C_in 12: 4 masked lanes of dX's channel
    tile; dW 9*12*24 = 2592 elements, three fold programs of 1024, the last one partial); without an
    activation dW and dX + fold alone. The forward runs checked as well."""
    t, grad = make_up_case(12, 24, 1, 3, 5, seed=5)
    (_, g_ref), (_, g_abs) = up_reference_and_scale(t, grad, slope)
    x, wt, b = (t[k].float().to(DEVICE) for k in NAMES)
    y, mask, wc = up_forward(x, wt, b, slope, slope is not None)
    dx_cfg = configs.up_dx_candidates(12, 24, 5, 15, act=slope is not None)[1]  # with an activation: the gz pass
    dw_cfg = configs.up_dw_candidates(12, 24, 5, 15)[1]  # dW: one program per phase and its 4 taps
    launch.LAUNCHES.clear()
    got = up_backward(grad.float().to(DEVICE), x, wt, wc, mask, slope, True, dx_config=dx_cfg, dw_config=dw_cfg)
    assert launch.LAUNCHES["up_fin"] == 0 and launch.LAUNCHES["gz"] == (slope is not None)
    for name, g in zip(NAMES, got):
        assert_within(f"d{name}", g, g_ref[name], g_abs[name], 1e-5)


@pytest.mark.parametrize("bias, split, w", [(True, 3, 24), (False, 4, 32)])
def test_dw_by_phases_on_its_grown_split(monkeypatch, bias, split, w):
    """The dW config with one program per output phase (4 taps each) has 4 programs per chunk where the
    per-tap one has 16 (+ 1 db program with a bias each), so its split grows by 17 // 5 = 3 or 16 // 4 = 4
    (upconv._up_dw_chunks; 2 SMs patched in: 1 chunk for the per-tap config), and dX's fold sums that many
    partials: the gradients match float64 autograd."""
    monkeypatch.setattr(conv3x3, "_sms", lambda device: 2)
    monkeypatch.setattr(configs, "DW_MIN_CHUNK", 128)  # chunks of 128 pixels may do here (the interpreter's time)
    t, grad = make_up_case(8, 16, 1, 16, w, bias=bias, seed=23)  # M = 384 or 512 low-resolution pixels: 3 or 4 chunks of 128
    (_, g_ref), (_, g_abs) = up_reference_and_scale(t, grad, 0.2)
    x, wt = t["x"].float().to(DEVICE), t["weight"].float().to(DEVICE)
    b = t["bias"].float().to(DEVICE) if bias else None
    y, mask, wc = up_forward(x, wt, b, 0.2, True)
    cfg = configs.up_dw_candidates(8, 16, w, 16 * w)[1]
    dx, dw, db = up_backward(grad.float().to(DEVICE), x, wt, wc, mask, 0.2, bias, dw_config=cfg)
    plan = conv3x3._PLANS[("up_dw", x.shape, grad.shape, torch.float32, x.device, bias, None, conv3x3.cfg_key(cfg))]
    assert plan[2] == split and plan[4].shape[0] == split
    for name, got in (("x", dx), ("weight", dw)) + ((("bias", db),) if bias else ()):
        assert_within(f"d{name}", got, g_ref[name], g_abs[name], 1e-5)


def test_backward_is_deterministic():
    """The dW partials are summed in a fixed order (no atomics): two backward passes agree bit for bit."""
    t, grad = make_up_case(8, 16, 2, 10, 13)
    x, wt, b = (t[k].float().to(DEVICE) for k in NAMES)
    y, mask, wc = up_forward(x, wt, b, 0.2, True)
    first = up_backward(grad.float().to(DEVICE), x, wt, wc, mask, 0.2, True, dw_split=2)
    second = up_backward(grad.float().to(DEVICE), x, wt, wc, mask, 0.2, True, dw_split=2)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_inference_forward_and_empty_batch():
    t, _ = make_up_case(8, 8, 1, 3, 4)
    x, wt, b = (t[k].float().to(DEVICE) for k in NAMES)
    with torch.no_grad():
        launch.LAUNCHES.clear()
        y = fused_upconv3x3_triton(x, wt, b, 0.2)
    assert launch.LAUNCHES["up_fwd"] == 1
    assert_within("y", y, fused_upconv3x3_reference(t["x"], t["weight"], t["bias"], 0.2),
                  fused_upconv3x3_reference(t["x"].abs(), t["weight"].abs(), t["bias"].abs(), 0.2), 1e-5)
    x0 = torch.randn(0, 8, 4, 4, device=DEVICE, requires_grad=True)
    wt0 = wt.clone().requires_grad_()
    b0 = b.clone().requires_grad_()
    y0 = fused_upconv3x3_triton(x0, wt0, b0, 0.2)
    y0.sum().backward()
    assert y0.shape == (0, 8, 8, 8) and x0.grad.shape == x0.shape
    assert torch.equal(wt0.grad, torch.zeros_like(wt0)) and torch.equal(b0.grad, torch.zeros_like(b0))


def test_bad_arguments_raise_clear_errors():
    x = torch.randn(1, 8, 4, 4, device=DEVICE)
    with pytest.raises(ValueError, match="does not fit"):
        fused_upconv3x3_triton(x, torch.randn(8, 9, 3, 3, device=DEVICE), None, 0.2)
    with pytest.raises(ValueError, match="bias"):
        fused_upconv3x3_triton(x, torch.randn(8, 8, 3, 3, device=DEVICE), torch.randn(9, device=DEVICE), 0.2)
    with pytest.raises(ValueError, match="3x3"):
        fused_upconv3x3(x, torch.randn(8, 8, 5, 5, device=DEVICE), None, backend="triton")
    y, _, wc = up_forward(x.requires_grad_(), torch.randn(8, 8, 3, 3, device=DEVICE), None, 0.2, save_mask=False)
    with pytest.raises(RuntimeError, match="saved no activation mask"):
        up_backward(torch.ones_like(y), x, torch.randn(8, 8, 3, 3, device=DEVICE), wc, torch.empty(0, dtype=torch.uint8),
                    0.2, False)


# ---------------------------------------------------------------------------------------------
# The backend switch, the custom ops and torch.compile
# ---------------------------------------------------------------------------------------------
def test_ops_switch_runs_the_kernels():
    t, _ = make_up_case(8, 8, 1, 3, 4)
    x, wt, b = (t[k].float().to(DEVICE) for k in NAMES)
    launch.LAUNCHES.clear()
    y_triton = fused_upconv3x3(x, wt, b, backend="triton")
    assert launch.LAUNCHES["up_fwd"] == 1
    y_torch = fused_upconv3x3(x, wt, b, backend="torch")
    assert_within("y", y_triton, y_torch, fused_upconv3x3_reference(x.abs(), wt.abs(), b.abs()), 1e-5)


def via_custom_op(x, weight, bias, slope):
    """The registered op and its register_autograd backward, called eagerly (torch.compile's path)."""
    return torch.ops.gafh_fast.fused_upconv3x3_fwd(x, weight, bias, slope, True)[0]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_custom_op_autograd_path(layout):
    check_up(12, 16, 2, 3, 4, layout=layout, entry=via_custom_op)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_opcheck_forward_and_backward_ops(dtype, layout):
    """Fakes against the real ops (shapes, strides: dW in the weight's own layout), schemas, autograd."""
    t, grad = make_up_case(5, 8, 2, 3, 4, dtype=dtype)
    x = t["x"].to(dtype).to(DEVICE).contiguous(memory_format=torch.channels_last)
    wt = to_kernel_layout(t["weight"], dtype, layout).to(DEVICE)
    b = t["bias"].to(dtype).to(DEVICE)
    torch.library.opcheck(torch.ops.gafh_fast.fused_upconv3x3_fwd.default,
                          (x.requires_grad_(), wt.requires_grad_(), b.requires_grad_(), 0.2, True))
    with torch.no_grad():
        _, mask, wc = torch.ops.gafh_fast.fused_upconv3x3_fwd(x, wt, b, 0.2, True)
    torch.library.opcheck(torch.ops.gafh_fast.fused_upconv3x3_bwd.default,
                          (grad.to(dtype).to(DEVICE), x.detach(), wt.detach(), wc, mask, 0.2, True))


def test_torch_compile_fullgraph():
    """Under torch.compile the op is one opaque node (no graph break) with the same values and grads."""
    t, grad = make_up_case(6, 6, 2, 3, 4)

    def two_ups(x, w, b, kernels):
        return fused_upconv3x3(fused_upconv3x3(x, w, b, backend=kernels), w, b, backend=kernels)

    grad2 = torch.randn(2, 6, 12, 16, dtype=torch.float64)
    compiled = torch.compile(two_ups, fullgraph=True)
    results = []
    for fn, kernels, dtype in ((compiled, "triton", torch.float32), (two_ups, "torch", torch.float64)):
        leaves = [t[k].to(dtype).to(DEVICE).requires_grad_(True) for k in NAMES]
        y = fn(*leaves, kernels)
        results.append((y, torch.autograd.grad(y, leaves, grad2.to(dtype).to(DEVICE))))
    (y, grads), (y_ref, grads_ref) = results
    assert_within("y", y, y_ref, torch.full_like(y_ref, y_ref.abs().max().item()), 1e-5)
    for name, g, g_ref in zip(NAMES, grads, grads_ref):
        assert_within(f"d{name}", g, g_ref, torch.full_like(g_ref, g_ref.abs().max().item()), 1e-5)


def test_auto_times_both_backends_per_shape(monkeypatch):
    """kernels=auto (on CUDA; here the chooser is called directly) times triton against torch once per
    shape and runs the faster."""
    t, _ = make_up_case(8, 8, 1, 3, 4)
    x, wt, b = (t[k].float().to(DEVICE) for k in NAMES)
    timed = []
    chooser = ops.AutoChooser(timer=lambda call, device: (call(), timed.append(1), 2.0 - len(timed))[2])
    monkeypatch.setattr(ops, "AUTO", chooser)
    monkeypatch.setattr(ops, "resolve_backend", lambda backend, device: "auto")
    launch.LAUNCHES.clear()
    y = fused_upconv3x3(x, wt, b, backend="auto")
    ((key, decision),) = chooser.decisions.items()
    assert key[0] == "upconv3x3" and decision == "torch" and len(timed) == 2  # the second timed is faster
    assert_within("y", y, fused_upconv3x3_reference(x, wt, b), fused_upconv3x3_reference(x.abs(), wt.abs(), b.abs()),
                  1e-5)

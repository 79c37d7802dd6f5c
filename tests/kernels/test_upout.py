"""The last upsampling step and the output layer as one op (kernels/upout.py): the output layer's dX epilogue
applies the step's LeakyReLU' and hands the step its gz.

Against float64 autograd of the two references, given the op's own intermediates, as test_outconv.py does
for the output layer: the step's output x3 and bit mask (upconv.py's forward, deterministic: the op runs the
same launch) and y. Then, in float64: gz_out = g (1 - y^2); the output conv's gradients at x3; gz3 = dx3 *
LeakyReLU' by the op's mask; the step's gradients (nearest x2, conv3x3) from gz3. Bounds: within rel * the
same computation on |values| (with |slope|), rel = 1e-5 (fp32) and 2**-7 (bf16: gz_out and gz3 are each
rounded once to bf16 before a GEMM, the results once more). In fp32 the op must also give the bits of the
two ops run apart (the same roundings in the same order: act_grad on the fp32 dX, then the step's dX on a
ready gz, which upconv.py's gz-pass test shows equal to making gz on the operand).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gafh_fast import ops
from gafh_fast.kernels import launch
from gafh_fast.kernels.conv3x3_fwd import INTERPRETING
from gafh_fast.kernels.outconv import fused_out_conv_triton, out_forward
from gafh_fast.kernels.upconv import fused_upconv3x3_triton, up_forward
from gafh_fast.kernels.upout import fused_up_out_conv_bwd, fused_up_out_conv_fwd, fused_up_out_conv_triton
from gafh_fast.ops import fused_up_out_conv, fused_up_out_conv_reference

from .test_conv3x3 import DEVICE, assert_within, to_kernel_layout
from .test_memory_bounds import bounds_checked  # noqa: F401

REL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7}
NAMES = ("x", "up_weight", "up_bias", "out_weight", "out_bias")
SLOPE = 0.2


def make_case(c_in, c_mid, c_out, k, n, h, w, *, bias=True, dtype=torch.float32, seed=0):
    """float64 masters of values representable in dtype, and the upstream gradient (N, c_out, 2h, 2w)."""
    gen = torch.Generator().manual_seed(seed)
    t = {"x": torch.randn(n, c_in, h, w, generator=gen),
         "up_weight": torch.randn(c_mid, c_in, 3, 3, generator=gen) / (3 * c_in ** 0.5),
         "up_bias": torch.randn(c_mid, generator=gen) * 0.1 if bias else None,
         "out_weight": torch.randn(c_out, c_mid, k, k, generator=gen) / (0.5 * k * c_mid ** 0.5),
         "out_bias": torch.randn(c_out, generator=gen) if bias else None}
    grad = torch.randn(n, c_out, 2 * h, 2 * w, generator=gen)
    return {k_: v.to(dtype).double() if v is not None else None for k_, v in t.items()}, grad.to(dtype).double()


def positive(mask: torch.Tensor, c: int) -> torch.Tensor:
    """The bit mask (N, H, W, ceil(C/8)) as (N, C, H, W) booleans: z > 0."""
    ch = torch.arange(c)
    bits = (mask.cpu().long()[..., ch // 8] >> (ch % 8)) & 1
    return bits.permute(0, 3, 1, 2).bool()


def reference_grads(t, x3, mask, y, grad, slope=SLOPE):
    """float64 ({name: grad}, {name: scale}) given the op's x3, mask and y (see the module docstring)."""
    x3_64, y64 = x3.detach().double().cpu(), y.detach().double().cpu()
    pos = positive(mask, x3.shape[1])
    out = []
    for absolute in (False, True):
        f = torch.abs if absolute else (lambda v: v)
        gz_out = grad.abs() * (1 + y64 * y64) if absolute else grad * (1 - y64 * y64)
        lo = {"x3": f(x3_64).requires_grad_(True), "out_weight": f(t["out_weight"]).requires_grad_(True)}
        if t["out_bias"] is not None:
            lo["out_bias"] = f(t["out_bias"]).requires_grad_(True)
        z = F.conv2d(lo["x3"], lo["out_weight"], lo.get("out_bias"), padding=t["out_weight"].shape[-1] // 2)
        g_out = dict(zip(lo, torch.autograd.grad(z, list(lo.values()), gz_out)))
        d_x3 = g_out.pop("x3")
        gz3 = torch.where(pos, d_x3, d_x3 * (abs(slope) if absolute else slope))
        up = {"x": f(t["x"]).requires_grad_(True), "up_weight": f(t["up_weight"]).requires_grad_(True)}
        if t["up_bias"] is not None:
            up["up_bias"] = f(t["up_bias"]).requires_grad_(True)
        u = F.conv2d(F.interpolate(up["x"], scale_factor=2, mode="nearest"), up["up_weight"], up.get("up_bias"),
                     padding=1)
        out.append({**dict(zip(up, torch.autograd.grad(u, list(up.values()), gz3))), **g_out})
    return out


def leaves_of(t, dtype, layout):
    return {name: (to_kernel_layout(v, dtype, layout) if v.dim() == 4 else v.to(dtype)).to(DEVICE).requires_grad_(True)
            for name, v in t.items() if v is not None}


def fp32_args(c_in, c_mid, c_out, k, n, h, w):
    """The op's five arguments as fp32 leaves (channels_last), and the upstream gradient."""
    t, grad = make_case(c_in, c_mid, c_out, k, n, h, w)
    leaves = leaves_of(t, torch.float32, "channels_last")
    return [leaves[name] for name in NAMES], grad.float().to(DEVICE).contiguous(memory_format=torch.channels_last)


def check(c_in, c_mid, c_out, k, n, h, w, *, bias=True, dtype=torch.float32, layout="channels_last", seed=0):
    t, grad = make_case(c_in, c_mid, c_out, k, n, h, w, bias=bias, dtype=dtype, seed=seed)
    leaves = leaves_of(t, dtype, layout)
    args = [leaves.get(name) for name in NAMES]
    y = fused_up_out_conv_triton(*args, SLOPE)
    assert y.dtype == dtype and y.shape == (n, c_out, 2 * h, 2 * w) and y.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():  # the op's own intermediates: the same launches, deterministic
        x3, mask, _ = up_forward(args[0], args[1], args[2], SLOPE, True)
        assert torch.equal(y, out_forward(x3, args[3], args[4]))
    grads = torch.autograd.grad(y, list(leaves.values()), grad.to(dtype).to(DEVICE).contiguous(
        memory_format=torch.channels_last))
    g_ref, g_abs = reference_grads(t, x3, mask, y, grad)
    for name, g in zip(leaves, grads):
        assert g.shape == leaves[name].shape
        assert_within(f"d{name}", g, g_ref[name], g_abs[name], REL[dtype])
    return leaves, grads, grad


@pytest.mark.parametrize(
    "c_in, c_mid, c_out, k, n, h, w, layout, dtype",
    [
        (8, 8, 3, 9, 2, 3, 4, "channels_last", torch.float32),    # the paper's 9x9x3 output layer, small
        (16, 12, 3, 5, 1, 3, 3, "nchw", torch.float32),           # 12 mid channels: 2 mask bytes, 4 lanes masked
        (8, 72, 3, 3, 1, 2, 3, "noncontiguous", torch.float32),   # 72: two dX channel tiles of the output layer
        (16, 16, 3, 9, 1, 3, 3, "channels_last", torch.bfloat16),
        (8, 16, 4, 7, 2, 2, 3, "nchw", torch.bfloat16),
    ],
)
def test_backward_against_float64(c_in, c_mid, c_out, k, n, h, w, layout, dtype):
    check(c_in, c_mid, c_out, k, n, h, w, layout=layout, dtype=dtype)


def test_without_biases():
    check(8, 8, 3, 5, 1, 3, 2, bias=False)


def test_fp32_bits_equal_the_two_ops_apart():
    """fp32: the same bits as fused_upconv3x3 then fused_out_conv (module docstring), for every gradient."""
    args, g = fp32_args(8, 12, 3, 5, 2, 3, 3)
    together = torch.autograd.grad(fused_up_out_conv_triton(*args, SLOPE), args, g)
    apart = torch.autograd.grad(fused_out_conv_triton(fused_upconv3x3_triton(*args[:3], SLOPE), *args[3:]), args, g)
    for name, a, b in zip(NAMES, together, apart):
        assert torch.equal(a, b), f"d{name} differs from the two ops apart"


def test_launch_count():
    """Forward: the step's combine and conv (2), then torch's conv and tanh. Backward: the output layer's
    prep, dW and dX (writing the step's gz), then the step's dW and dX + fold (5; apart 6)."""
    t, grad = make_case(8, 8, 3, 3, 1, 2, 2)
    leaves = leaves_of(t, torch.float32, "channels_last")
    launch.LAUNCHES.clear()
    y = fused_up_out_conv_triton(*[leaves[name] for name in NAMES], SLOPE)
    assert dict(launch.LAUNCHES) == {"up_combine": 1, "up_fwd": 1}
    launch.LAUNCHES.clear()
    y.backward(grad.float().to(DEVICE))
    assert dict(launch.LAUNCHES) == {"out_prep": 1, "out_dw": 1, "out_dx": 1, "up_dw": 1, "up_dx": 1}


@pytest.mark.skipif(not INTERPRETING, reason="hooks the Triton interpreter's loads and stores")
def test_backward_stays_in_bounds(bounds_checked):
    """Every load and store inside the tensors each launch was passed (test_memory_bounds.py's hook), the
    mask read of the new epilogue included: 12 mid channels (2 mask bytes a pixel, 4 masked lanes of a
    16-wide channel tile) over 3 images."""
    check(8, 12, 3, 3, 3, 2, 3, seed=3)


def test_inference_and_empty_batch(monkeypatch):
    """Without autograd: the step's forward keeps no mask (nothing will read it) and the output equals the
    two forwards; an empty batch has zero parameter gradients."""
    import gafh_fast.kernels.upout as upout

    t, _ = make_case(8, 8, 3, 5, 1, 2, 3)
    args = [t[name].float().to(DEVICE) for name in NAMES]
    saved = []
    monkeypatch.setattr(upout, "up_forward", lambda *a: saved.append(a[4]) or up_forward(*a))
    with torch.no_grad():
        launch.LAUNCHES.clear()
        y = fused_up_out_conv_triton(*args, SLOPE)
        assert saved == [False]
        assert dict(launch.LAUNCHES) == {"up_combine": 1, "up_fwd": 1}
        assert torch.equal(y, out_forward(up_forward(args[0], args[1], args[2], SLOPE, False)[0], args[3], args[4]))
    empty = [torch.randn(0, 8, 2, 3, device=DEVICE).requires_grad_(True)] + [a.clone().requires_grad_(True)
                                                                              for a in args[1:]]
    fused_up_out_conv_triton(*empty, SLOPE).sum().backward()
    assert empty[0].grad.shape == empty[0].shape
    assert all(torch.equal(a.grad, torch.zeros_like(a)) for a in empty[1:])


def test_bad_arguments_raise_clear_errors():
    x = torch.randn(1, 8, 2, 2, device=DEVICE)
    w_up, w_out = torch.randn(8, 8, 3, 3, device=DEVICE), torch.randn(3, 8, 9, 9, device=DEVICE)
    with pytest.raises(ValueError, match="fused_out_conv weight .* does not fit"):
        fused_up_out_conv_triton(x, w_up, None, torch.randn(3, 7, 9, 9, device=DEVICE), None)
    with pytest.raises(ValueError, match="fused_upconv3x3 weight"):
        fused_up_out_conv_triton(x, torch.randn(8, 7, 3, 3, device=DEVICE), None, w_out, None)
    with pytest.raises(ValueError, match="3x3 upsampling weight"):
        fused_up_out_conv(x, torch.randn(8, 8, 5, 5, device=DEVICE), None, w_out, None, backend="triton")
    with pytest.raises(ValueError, match="bias is torch.bfloat16"):
        fused_up_out_conv_triton(x, w_up, None, w_out, torch.randn(3, device=DEVICE).bfloat16())


def test_ops_switch_runs_the_kernels():
    t, _ = make_case(8, 8, 3, 3, 1, 2, 2)
    args = [t[name].float().to(DEVICE) for name in NAMES]
    launch.LAUNCHES.clear()
    y = fused_up_out_conv(*args, backend="triton")
    assert launch.LAUNCHES["up_fwd"] == 1
    launch.LAUNCHES.clear()
    y_ref = fused_up_out_conv(*args, backend="torch")
    assert not launch.LAUNCHES
    assert_within("y", y, y_ref, fused_up_out_conv_reference(args[0].abs(), *(a.abs() for a in args[1:])), 1e-5)


@pytest.mark.parametrize("dtype, bias", [(torch.float32, True), (torch.bfloat16, True), (torch.float32, False)])
def test_opcheck_forward_and_backward_ops(dtype, bias):
    """torch.library.opcheck: schemas, fakes (shapes, strides, dtypes) and autograd registration; the
    forward op with and without its mask saved (training, inference), the backward op with and without
    biases. 6 input and 8 mid channels, so a fake that confuses the two shows."""
    t, grad = make_case(6, 8, 3, 3, 1, 2, 3, dtype=dtype, bias=bias)
    leaves = leaves_of(t, dtype, "nchw")
    args = [leaves.get(name) for name in NAMES]
    torch.library.opcheck(fused_up_out_conv_fwd, (*args, SLOPE, True))
    plain = [a.detach() if a is not None else None for a in args]
    torch.library.opcheck(fused_up_out_conv_fwd, (*plain, SLOPE, False))
    with torch.no_grad():
        y, x3, mask, wc = fused_up_out_conv_fwd(*plain, SLOPE, True)
    g = grad.to(dtype).to(DEVICE).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(fused_up_out_conv_bwd, (g, plain[0], plain[1], wc, mask, x3, plain[3], y, SLOPE, bias, bias))


def test_custom_op_autograd_matches_the_function():
    """The custom ops' autograd (what torch.compile runs) gives the eager Function's bits."""
    args, g = fp32_args(8, 8, 3, 5, 1, 2, 3)
    eager = torch.autograd.grad(fused_up_out_conv_triton(*args, SLOPE), args, g)
    via_ops = torch.autograd.grad(fused_up_out_conv_fwd(*args, SLOPE, True)[0], args, g)
    assert all(torch.equal(a, b) for a, b in zip(eager, via_ops))


def test_torch_compile_fullgraph():
    args, g = fp32_args(8, 8, 3, 3, 1, 2, 2)
    compiled = torch.compile(lambda *a: fused_up_out_conv_triton(*a, SLOPE), fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(*args), args, g)
    want = torch.autograd.grad(fused_up_out_conv_triton(*args, SLOPE), args, g)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_auto_times_the_pair_and_each_layer_on_its_own(monkeypatch):
    """auto on a CUDA-less machine is torch (resolve_backend); with the device check bypassed, the op's
    decision is timed once per shape, as the other ops' (ops.AutoChooser), over four candidates: the pair
    on triton (this op), on torch, and each layer on its own backend (what two separate decisions could
    pick). A mixed choice runs that mix: the upsampling step's Triton launches, no output-layer launch."""
    timed = []
    # the third candidate (triton step, torch output) is the fastest
    chooser = ops.AutoChooser(timer=lambda call, device: (call(), timed.append(1), 0.5 if len(timed) == 3 else 1.0)[2])
    monkeypatch.setattr(ops, "AUTO", chooser)
    monkeypatch.setattr(ops, "resolve_backend", lambda backend, device: "auto")
    t, grad = make_case(8, 8, 3, 3, 1, 2, 2)
    args = [t[name].float().to(DEVICE).requires_grad_(True) for name in NAMES]
    fused_up_out_conv(*args)
    assert len(timed) == 4 and len(chooser.decisions) == 1
    ((key, choice),) = chooser.decisions.items()
    assert key[0] == "up_out_conv" and choice == "triton step, torch output"
    assert list(chooser.timings[key]) == ["triton", "torch", "triton step, torch output", "torch step, triton output"]
    launch.LAUNCHES.clear()
    y = fused_up_out_conv(*args)
    y.backward(grad.float().to(DEVICE))
    assert len(timed) == 4 and dict(launch.LAUNCHES) == {"up_combine": 1, "up_fwd": 1, "up_dx": 1, "up_dw": 1, "up_fin": 1}
    assert_within("y", y, fused_up_out_conv_reference(*[a.detach() for a in args]),
                  fused_up_out_conv_reference(*[a.detach().abs() for a in args]), 1e-5)

"""The Triton fused 3x3 conv against the torch reference (gafh_fast.ops.fused_conv3x3_reference).

Without a GPU this runs in Triton's interpreter (conftest.py), at small shapes. Every case copies the
same values into a float64 reference, runs forward, then backward with the same upstream gradient,
and compares the output and every gradient elementwise against a bound derived from the dtype:
    |kernel - ref| <= rel * bound_scale,   bound_scale = the same computation on |values|
(the sum of |terms| behind each element: the scale that rounding errors are proportional to).
rel = 1e-5 for float32 and 2**-8 for bfloat16 (one rounding of the output plus one of g*slope).
On a mismatch the helper prints where (index, values), not a bare assert.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from gafh_fast.config import load_config
from gafh_fast.kernels import fused_conv3x3_triton
from gafh_fast.kernels import configs, conv3x3, launch
from gafh_fast.kernels.conv3x3 import conv_backward, conv_forward, kernel_weight
from gafh_fast.models.generator import Generator
from gafh_fast.ops import fused_conv3x3, fused_conv3x3_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-8}
NAMES = ("x1", "x2", "weight", "bias", "residual", "residual2")


@pytest.fixture(autouse=True)
def no_tf32():
    """On a GPU, cuDNN/cuBLAS fp32 may use TF32 (the generator's 9x9 convs): not an fp32 reference.
    (Saved and restored by hand: these are properties, which pytest 9.2's monkeypatch cannot undo.)"""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def assert_within(name: str, got: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor, rel: float) -> None:
    """Elementwise |got - ref| <= rel * scale (+ a denormal guard); print the worst offenders if not."""
    got = got.detach().double().cpu()
    ref = ref.detach().double().cpu()
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    err = (got - ref).abs()
    allowed = rel * scale.detach().double().cpu() + 1e-30
    bad = ~(err <= allowed)  # NaN fails too
    if bad.any():
        ratio = (err / allowed).flatten()
        worst = ratio.topk(min(5, int(bad.sum()))).indices
        lines = [f"{name}: {int(bad.sum())} of {err.numel()} elements outside rel={rel:g} x |terms|"]
        for flat in worst.tolist():
            idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), err.shape))
            lines.append(f"  at {idx}: kernel {got[idx].item():.9g}  reference {ref[idx].item():.9g}  "
                         f"|err| {err[idx].item():.3g}  allowed {allowed[idx].item():.3g}")
        print("\n".join(lines))
        pytest.fail(lines[0])


def make_case(channels, c_out, n, h, w, *, bias=True, r1=False, r2=False, dtype=torch.float32, seed=0):
    """Random tensors (values already representable in `dtype`), as float64 masters."""
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, c, h, w, generator=gen) for c in channels]
    weight = torch.randn(c_out, sum(channels), 3, 3, generator=gen) / (3 * sum(channels) ** 0.5)
    tensors = {
        "x1": xs[0], "x2": xs[1] if len(xs) == 2 else None, "weight": weight,
        "bias": torch.randn(c_out, generator=gen) if bias else None,
        "residual": torch.randn(n, c_out, h, w, generator=gen) if r1 else None,
        "residual2": torch.randn(n, c_out, h, w, generator=gen) if r2 else None,
    }
    grad = torch.randn(n, c_out, h, w, generator=gen)
    rounded = {k: (v.to(dtype).double() if v is not None else None) for k, v in tensors.items()}
    return rounded, grad.to(dtype).double()


def reference_and_scale(tensors, grad, slope, s1, s2):
    """float64 reference (y, grads) and the same on absolute values (the bound scale)."""
    out = []
    for absolute in (False, True):
        leaves = {k: (v.abs() if absolute else v).clone().requires_grad_(True) if v is not None else None
                  for k, v in tensors.items()}
        inputs = [leaves["x1"]] + ([leaves["x2"]] if leaves["x2"] is not None else [])
        y = fused_conv3x3_reference(inputs, leaves["weight"], leaves["bias"], slope,
                                    leaves["residual"], s1, leaves["residual2"], s2)
        present = [k for k in NAMES if leaves[k] is not None]
        grads = torch.autograd.grad(y, [leaves[k] for k in present], grad.abs() if absolute else grad)
        out.append((y.detach(), dict(zip(present, grads))))
    return out


def to_kernel_layout(t: torch.Tensor, dtype, layout: str) -> torch.Tensor:
    t = t.to(dtype)
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "noncontiguous":  # a strided view: every other element of a wider tensor
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t.contiguous()  # NCHW


def via_custom_op(inputs, weight, bias, slope, residual, s1, residual2, s2):
    """The registered op and its register_autograd backward, called eagerly (torch.compile's path)."""
    y, _ = torch.ops.gafh_fast.fused_conv3x3_fwd(inputs, weight, bias, slope, residual, s1, residual2, s2, True)
    return y


def check_case(channels, c_out, n, h, w, *, slope=0.2, bias=True, r1=False, r2=False, s1=0.2, s2=0.5,
               dtype=torch.float32, layout="channels_last", seed=0, entry=fused_conv3x3_triton):
    tensors, grad = make_case(channels, c_out, n, h, w, bias=bias, r1=r1, r2=r2, dtype=dtype, seed=seed)
    (y_ref, g_ref), (y_abs, g_abs) = reference_and_scale(tensors, grad, slope, s1, s2)
    leaves = {}
    for k, v in tensors.items():
        if v is None:
            leaves[k] = None
        elif k in ("weight", "bias"):
            leaves[k] = v.to(dtype).to(DEVICE).requires_grad_(True)
        else:
            leaves[k] = to_kernel_layout(v, dtype, layout).to(DEVICE).requires_grad_(True)
    inputs = [leaves["x1"]] + ([leaves["x2"]] if leaves["x2"] is not None else [])
    y = entry(inputs, leaves["weight"], leaves["bias"], slope, leaves["residual"], s1, leaves["residual2"], s2)
    assert y.dtype == dtype
    rel = REL[dtype]
    assert_within("y", y, y_ref, y_abs, rel)
    present = [k for k in NAMES if leaves[k] is not None]
    grads = torch.autograd.grad(y, [leaves[k] for k in present], grad.to(dtype).to(DEVICE))
    for k, g in zip(present, grads):
        assert_within(f"d{k}", g, g_ref[k], g_abs[k], rel)


# ---------------------------------------------------------------------------------------------
# Shapes, layouts, activations and residuals
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "channels, c_out, n, h, w, layout",
    [
        ([3], 17, 1, 5, 7, "channels_last"),      # C_in 3, batch 1, odd H and W
        ([17], 17, 2, 4, 3, "nchw"),              # 17 channels, NCHW input
        ([40, 24], 17, 2, 3, 5, "noncontiguous"), # two inputs (40 + 24), strided views
        ([16, 8], 16, 2, 1, 1, "channels_last"),  # H = W = 1: only the centre tap sees data
        ([8], 32, 1, 1, 1, "nchw"),
        ([64, 32], 64, 1, 6, 5, "channels_last"), # the trunk's IDB conv2 channels
        ([8], 72, 1, 2, 3, "channels_last"),      # C_out 72: gz made and written in two K blocks (64 + 8)
        ([48, 40], 17, 1, 3, 2, "channels_last"), # dX has two channel tiles: only the first writes gz
        ([8], 136, 1, 2, 3, "channels_last"),     # C_out 136: two forward N tiles (128 + 8) and their mask bytes
    ],
)
def test_shapes_and_layouts(channels, c_out, n, h, w, layout):
    check_case(channels, c_out, n, h, w, r1=True, layout=layout)


@pytest.mark.parametrize("slope, r1, r2", list(itertools.product([None, 0.2], [False, True], [False, True])))
def test_activation_and_residuals(slope, r1, r2):
    channels = [8, 8] if r1 else [16]
    check_case(channels, 16, 2, 5, 3, slope=slope, r1=r1, r2=r2, seed=int(r1) + 2 * int(r2))


@pytest.mark.parametrize("slope, launches", [(None, {"fwd": 1, "dw": 1, "dx": 1}),
                                             (0.2, {"fwd": 1, "dx": 1, "dw": 1, "fin": 1})])
def test_launch_count_per_conv(slope, launches):
    """No activation: dW, then dX + finalize. With one: dX (makes gz), dW from gz, finalize."""
    x = torch.randn(1, 8, 3, 3, device=DEVICE, requires_grad=True)
    wt = torch.randn(8, 8, 3, 3, device=DEVICE, requires_grad=True)
    b = torch.randn(8, device=DEVICE, requires_grad=True)
    launch.LAUNCHES.clear()
    fused_conv3x3_triton([x], wt, b, slope, None, 1.0, None, 1.0).sum().backward()
    assert dict(launch.LAUNCHES) == launches


def test_launcher_refuses_unknown_constexprs():
    """The interpreter ignores a constexpr the kernel does not declare; the compiler refuses it."""
    with pytest.raises(TypeError, match="PRECISION"):
        conv3x3.FIN.launch(("unknown-constexpr",), (1,), (), {"PRECISION": "ieee"}, conv3x3._FIN_CONFIG)


def test_without_bias():
    check_case([8, 8], 16, 2, 4, 5, bias=False, r1=True)


def test_empty_batch():
    x = torch.randn(0, 8, 4, 4, device=DEVICE, requires_grad=True)
    wt = torch.randn(8, 8, 3, 3, device=DEVICE, requires_grad=True)
    b = torch.randn(8, device=DEVICE, requires_grad=True)
    y = fused_conv3x3_triton([x], wt, b, 0.2, None, 1.0, None, 1.0)
    y.sum().backward()
    assert y.shape == (0, 8, 4, 4) and x.grad.shape == x.shape
    assert torch.equal(wt.grad, torch.zeros_like(wt)) and torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize("channels, r1, r2", [([40, 24], True, False), ([17], True, True), ([3], False, False)])
def test_bfloat16(channels, r1, r2):
    check_case(channels, 17, 2, 5, 3, r1=r1, r2=r2, dtype=torch.bfloat16, layout="nchw")


# ---------------------------------------------------------------------------------------------
# Both heuristic candidates of every kernel (not only the first), with the dW split-K path (3 chunks)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("index", [0, 1])
@pytest.mark.parametrize("slope", [0.2, None])
def test_each_candidate_config(index, slope):
    s1, s2 = 0.2, 0.5
    c1, c2, c_out, n, h, w = 40, 24, 33, 2, 11, 13
    m = n * h * w  # 286 pixels
    fwd_cfg = configs.fwd_candidates(c1, c2, c_out, w, m)[index]
    dx_cfg = configs.dx_candidates(c_out, 0, c1 + c2, w, m)[index]
    dw_cfg = configs.dw_candidates(c1, c2, c_out, w, m)[index]
    tensors, grad = make_case([c1, c2], c_out, n, h, w, r1=True, r2=True, seed=index)
    (y_ref, g_ref), (y_abs, g_abs) = reference_and_scale(tensors, grad, slope, s1, s2)
    t = {k: v.float().to(DEVICE) for k, v in tensors.items()}
    inputs = [t["x1"], t["x2"]]
    y, mask = conv_forward(inputs, t["weight"], t["bias"], slope, t["residual"], s1, t["residual2"], s2,
                           save_mask=True, config=fwd_cfg)
    assert_within(f"y (config {fwd_cfg})", y, y_ref, y_abs, 1e-5)
    (dx1, dx2), dw, db = conv_backward(grad.float().to(DEVICE), inputs, t["weight"], kernel_weight(t["weight"]), mask,
                                       slope, s1 * s2, True, dx_config=dx_cfg, dw_config=dw_cfg, dw_split=3)
    for name, got in (("x1", dx1), ("x2", dx2), ("weight", dw), ("bias", db)):
        assert_within(f"d{name} (configs {dx_cfg} / {dw_cfg})", got, g_ref[name], g_abs[name], 1e-5)


def nan_followed(t: torch.Tensor) -> torch.Tensor:
    """t as a channels_last view at the start of a buffer one image longer, the rest NaN."""
    n, c, h, w = t.shape
    buf = torch.full((n + 1, h, w, c), float("nan"), dtype=t.dtype, device=t.device)
    buf[:n] = t.permute(0, 2, 3, 1)
    return buf[:n].permute(0, 3, 1, 2)


@pytest.mark.parametrize("index", [0, 1])
@pytest.mark.parametrize(
    "channels, c_out, n, h, w, split",
    [
        ([8, 16], 24, 2, 16, 12, 1),  # M = 384 (FULL_P): 3 blocks of 128 in one chunk; each step moves
                                      # 10 rows + 8 columns (BLOCK_P 64: 5 + 4), so w carries, h wraps
        ([16], 16, 2, 16, 12, 2),     # the same walk over two chunks (256 + 128): the second starts mid-image
        ([16], 16, 1, 4, 160, 1),     # W = 160 > BLOCK_P: steps stay in a row or carry into the next
        ([8], 16, 3, 5, 10, 2),       # M = 150, not a multiple of 128: partial last block (p_ok masks)
    ],
)
@pytest.mark.parametrize("slope", [0.2, None])
def test_dw_pixel_walk(index, channels, c_out, n, h, w, split, slope):
    """The dW loop's (h, w) walk (divided once, then advanced per block by adds and one carry/wrap)
    and its per-row edge compares, over several blocks per program, both candidates, 1-2 chunks.
    The inputs and the upstream gradient are followed in memory by NaN, so a read past pixel M
    (a row mask left out) poisons dW."""
    m = n * h * w
    dx_cfg = configs.dx_candidates(c_out, 0, sum(channels), w, m)[index]
    dw_cfg = configs.dw_candidates(channels[0], channels[1] if len(channels) == 2 else 0, c_out, w, m)[index]
    tensors, grad = make_case(channels, c_out, n, h, w, seed=10 + index)
    (_, g_ref), (_, g_abs) = reference_and_scale(tensors, grad, slope, 1.0, 1.0)
    t = {k: v.float().to(DEVICE) for k, v in tensors.items() if v is not None}
    inputs = [nan_followed(t["x1"])] + ([nan_followed(t["x2"])] if "x2" in t else [])
    _, mask = conv_forward(inputs, t["weight"], t["bias"], slope, None, 1.0, None, 1.0, save_mask=True)
    dxs, dw, db = conv_backward(nan_followed(grad.float().to(DEVICE)), inputs, t["weight"], kernel_weight(t["weight"]), mask,
                                slope, 1.0, True, dx_config=dx_cfg, dw_config=dw_cfg, dw_split=split)
    for name, got in (("weight", dw), ("bias", db), *zip(("x1", "x2"), dxs)):
        assert_within(f"d{name} (dW config {dw_cfg}, split {split})", got, g_ref[name], g_abs[name], 1e-5)


@pytest.mark.parametrize("index", [0, 1])
@pytest.mark.parametrize("c1, c2, c_out, cb, cb_out, n, h, w, split", [
    (12, 20, 24, 12, 20, 2, 9, 17, 3),  # the IDB's shape with gc > nf: masked channel tiles in both jobs; 3 chunks
    (72, 8, 72, 72, 8, 1, 5, 70, 2),    # nf 72: two input-channel tiles per job; job B 8 wide (a 16-wide tile)
    (8, 0, 16, 24, 64, 1, 4, 40, 2),    # job B wider than job A (its tiles the wide orientation, BLOCK_CO_B 64)
])
def test_dw_with_a_second_conv_in_the_same_launch(index, c1, c2, c_out, cb, cb_out, n, h, w, split):
    """Job B of the dW kernel (the IDB's dW1 beside its dW2, one launch): both convs' dW and db partials,
    summed over the chunks, against float64 autograd, for both candidates over 2-3 pixel chunks; every
    input and both gradients are followed in memory by NaN, so a read past pixel M poisons a result."""
    m = n * h * w
    gen = torch.Generator().manual_seed(20 + index)
    x1, x2, xb = (torch.randn(n, c, h, w, generator=gen) for c in (c1, c2, cb))
    gz, gzb = torch.randn(n, c_out, h, w, generator=gen), torch.randn(n, cb_out, h, w, generator=gen)
    cfg = configs.dw_candidates(c1, c2, c_out, w, m, cb, cb_out)[index]

    def dev(t):
        return nan_followed(t.float().to(DEVICE))

    dwp, dbp, s, dwpb, dbpb = conv3x3._dw_partials(dev(x1), dev(x2) if c2 else None, dev(gz), True, split, cfg,
                                                   job_b=(dev(xb), dev(gzb)))
    assert s == split
    for name, (x, g, wp, bp) in {"A": (torch.cat([x1, x2], 1), gz, dwp, dbp), "B": (xb, gzb, dwpb, dbpb)}.items():
        c_in, co = x.shape[1], g.shape[1]
        ref, scale = (torch.nn.grad.conv2d_weight(a.double(), (co, c_in, 3, 3), b.double(), padding=1)
                      for a, b in ((x, g), (x.abs(), g.abs())))
        per_tap = lambda t: t.permute(2, 3, 1, 0).reshape(9, c_in, co)  # noqa: E731  partials' (tap, ci, co)
        assert wp.shape == (split, 9, c_in, co) and bp.shape == (split, co)
        assert_within(f"dW {name} ({cfg})", wp.sum(0).cpu(), per_tap(ref), per_tap(scale), 1e-5)
        assert_within(f"db {name} ({cfg})", bp.sum(0).cpu(), g.double().sum((0, 2, 3)), g.double().abs().sum((0, 2, 3)),
                      1e-5)


# ---------------------------------------------------------------------------------------------
# The backend switch, custom-op registration and torch.compile
# ---------------------------------------------------------------------------------------------
def test_ops_switch_runs_the_kernels():
    tensors, _ = make_case([8], 8, 1, 3, 4)
    x, wt, b = (tensors[k].float().to(DEVICE) for k in ("x1", "weight", "bias"))
    y_triton = fused_conv3x3([x], wt, b, backend="triton")
    y_torch = fused_conv3x3([x], wt, b, backend="torch")
    assert y_triton.is_contiguous(memory_format=torch.channels_last)
    assert_within("y", y_triton, y_torch, fused_conv3x3_reference([x.abs()], wt.abs(), b.abs()), 1e-5)


def test_bad_arguments_raise_clear_errors():
    x = torch.randn(1, 8, 4, 4, device=DEVICE)
    with pytest.raises(ValueError, match="does not fit"):
        fused_conv3x3_triton([x], torch.randn(8, 9, 3, 3, device=DEVICE), None, 0.2, None, 1.0, None, 1.0)
    with pytest.raises(ValueError, match="one or two inputs"):
        fused_conv3x3_triton([x, x, x], torch.randn(8, 24, 3, 3, device=DEVICE), None, 0.2, None, 1.0, None, 1.0)


def _opcheck_args(requires_grad: bool):
    tensors, grad = make_case([5, 11], 7, 2, 3, 4, r1=True, r2=True)
    t = {k: v.float().to(DEVICE).requires_grad_(requires_grad) for k, v in tensors.items()}
    return t, grad.float().to(DEVICE)


@pytest.mark.parametrize("r1, r2", [(True, False), (True, True)])
def test_custom_op_autograd_path(r1, r2):
    # Eager calls use a lean autograd.Function; this checks the custom op's own autograd registration.
    check_case([8, 8], 16, 2, 4, 5, r1=r1, r2=r2, layout="nchw", entry=via_custom_op)


def test_opcheck_forward_and_backward_ops():
    t, grad = _opcheck_args(requires_grad=True)
    fwd_args = ([t["x1"], t["x2"]], t["weight"], t["bias"], 0.2, t["residual"], 0.2, t["residual2"], 0.5, True)
    torch.library.opcheck(torch.ops.gafh_fast.fused_conv3x3_fwd.default, fwd_args)
    t, grad = _opcheck_args(requires_grad=False)
    _, mask = torch.ops.gafh_fast.fused_conv3x3_fwd(
        [t["x1"], t["x2"]], t["weight"], t["bias"], 0.2, None, 1.0, None, 1.0, True)
    bwd_args = (grad, [t["x1"], t["x2"]], t["weight"], mask, 0.2, 0.1, True)
    torch.library.opcheck(torch.ops.gafh_fast.fused_conv3x3_bwd.default, bwd_args)


def test_torch_compile_fullgraph():
    tensors, grad = make_case([6], 6, 2, 4, 3, r1=True)

    def two_convs(x, w, b, r, kernels):
        h = fused_conv3x3([x], w, b, backend=kernels)
        return fused_conv3x3([x, h], torch.cat([w, w], 1), b, residual=r, res_scale=1.0, backend=kernels)

    compiled = torch.compile(two_convs, fullgraph=True)
    results = []
    for fn, kernels, dtype in ((compiled, "triton", torch.float32), (two_convs, "torch", torch.float64)):
        leaves = [tensors[k].to(dtype).to(DEVICE).requires_grad_(True) for k in ("x1", "weight", "bias", "residual")]
        y = fn(*leaves, kernels)
        results.append((y, torch.autograd.grad(y, leaves, grad.to(dtype).to(DEVICE))))
    (y, grads), (y_ref, grads_ref) = results
    scale = y_ref.abs().max()
    assert_within("y", y, y_ref, torch.full_like(y_ref, scale.item()), 1e-5)
    for name, g, g_ref in zip(("x", "weight", "bias", "residual"), grads, grads_ref):
        assert_within(f"d{name}", g, g_ref, torch.full_like(g_ref, g_ref.abs().max().item()), 1e-5)


# ---------------------------------------------------------------------------------------------
# A whole (tiny) generator: kernels=triton equals kernels=torch, forward and every parameter grad
# ---------------------------------------------------------------------------------------------
def test_whole_generator_triton_equals_torch():
    cfg = load_config(None, [
        "model.generator.nf=16", "model.generator.gc=8", "model.generator.num_dnb=1",
        "model.generator.ridb_per_dnb=2", "model.generator.idb_per_ridb=2", "data.hr_size=32",
    ])
    torch.manual_seed(0)
    g_triton = Generator(cfg.model.generator, kernels="triton").to(DEVICE)
    g_ref = Generator(cfg.model.generator, kernels="torch").to(DEVICE).double()
    assert list(g_triton.state_dict()) == list(g_ref.state_dict())
    g_ref.load_state_dict(g_triton.state_dict())  # checkpoints move between the backends
    gen = torch.Generator().manual_seed(1)
    lr = (torch.rand(2, 3, cfg.lr_size, cfg.lr_size, generator=gen) * 2 - 1).to(DEVICE)
    upstream = torch.randn(2, 3, cfg.data.hr_size, cfg.data.hr_size, generator=gen).to(DEVICE)

    # The fusion conv feeds a BatchNorm, so its bias gradient is exactly 0 and any fp32 result is
    # rounding noise on sum |dL/dz| over pixels: keep dL/dz (the BatchNorm input's grad) for that scale.
    bn_input = []

    def keep_bn_input(module, args, output):
        args[0].retain_grad()
        bn_input.append(args[0])

    g_ref.fusion_norm.register_forward_hook(keep_bn_input)

    out_triton = g_triton(lr)
    out_triton.backward(upstream)
    out_ref = g_ref(lr.double())
    out_ref.backward(upstream.double())
    # Through ~20 convs, BatchNorm and tanh, compare each tensor at the scale of its own largest entry.
    assert_within("generator output", out_triton, out_ref, torch.full_like(out_ref, out_ref.abs().max().item()), 1e-5)
    ref_params = dict(g_ref.named_parameters())
    for name, p in g_triton.named_parameters():
        g_expect = ref_params[name].grad
        assert p.grad is not None, f"{name}: no gradient through the triton backend"
        if name == "fusion.bias":
            scale = bn_input[0].grad.abs().sum((0, 2, 3))
        else:
            scale = torch.full_like(g_expect, g_expect.abs().max().item())
        assert_within(f"grad {name}", p.grad, g_expect, scale, 1e-5)

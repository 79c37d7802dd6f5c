"""The kernels' host code (kernels/conv3x3.py, op.py, launch.py, configs.py) beyond the numbers:
argument checks, the compiled-kernel launch convention, buffer placement, plans, the no-grad IDB, the
graph torch.compile sees and the custom ops' fake implementations.

Most of these guard paths that only a GPU takes (the kept CompiledKernel launch, a default device
other than the inputs', TF32/IEEE dots); each runs here with only the device or the launcher swapped.
Values are compared with the float64 reference (the helpers of test_conv3x3.py / test_idb.py).
"""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from gafh_fast.kernels import configs, conv3x3, fused_conv3x3_triton, fused_idb_triton, fused_ridb_triton, idb, launch
from gafh_fast.kernels.conv3x3_bwd import conv3x3_bwd_finalize_kernel
from gafh_fast.kernels.tuning import config_to_dict, cuda_timer

from .test_conv3x3 import DEVICE, assert_within, make_case, reference_and_scale
from .test_idb import NAMES as IDB_NAMES, idb_reference, make_idb


# ---------------------------------------------------------------------------------------------
# Argument checks (the reference would refuse these too: torch.cat needs equal N, H, W and dtypes)
# ---------------------------------------------------------------------------------------------
def test_mismatched_second_input_is_refused():
    x = torch.randn(1, 8, 4, 4, device=DEVICE)
    wt = torch.randn(8, 16, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match="input 1 has shape"):
        fused_conv3x3_triton([x, torch.randn(1, 8, 4, 5, device=DEVICE)], wt, None, 0.2, None, 1.0, None, 1.0)
    with pytest.raises(ValueError, match="input 1 is torch.bfloat16"):
        fused_conv3x3_triton([x, torch.randn(1, 8, 4, 4, device=DEVICE, dtype=torch.bfloat16)], wt, None, 0.2,
                             None, 1.0, None, 1.0)


@pytest.mark.parametrize("name", ["residual", "residual2"])
def test_residual_on_another_device_is_refused(name):
    """A residual on another device than the inputs fails up front, naming both devices (the meta device
    stands in for a second GPU: Triton would otherwise get a pointer it cannot read)."""
    x = torch.randn(1, 8, 4, 4, device=DEVICE)
    wt = torch.randn(8, 8, 3, 3, device=DEVICE)
    elsewhere = torch.empty(1, 8, 4, 4, device="meta")
    args = {"residual": (elsewhere, 1.0, None, 1.0), "residual2": (x.clone(), 1.0, elsewhere, 1.0)}[name]
    with pytest.raises(ValueError, match=f"fused_conv3x3 {name} is .* on meta; expected .* on {x.device}"):
        fused_conv3x3_triton([x], wt, None, 0.2, *args)


@pytest.mark.parametrize("missing", ["b1", "b2"])
def test_idb_without_a_bias_is_refused(missing):
    """The IDB's backward always returns both bias gradients: a missing bias must fail up front."""
    t, _ = make_idb(8, 4, 1, 3, 3, torch.float32, seed=1)
    t = {k: v.float().to(DEVICE) for k, v in t.items()}
    t[missing] = None
    with pytest.raises(ValueError, match="both conv biases"):
        fused_idb_triton(t["x"], t["x0"], t["w1"], t["b1"], t["w2"], t["b2"])


# ---------------------------------------------------------------------------------------------
# The IDB without grad (inference, validation, export): y, not h1
# ---------------------------------------------------------------------------------------------
def test_idb_without_grad_equals_reference():
    t, grad = make_idb(8, 12, 2, 3, 5, torch.float32, seed=4)
    (y_ref, _), (y_abs, _) = idb_reference(t, grad, same_x=False)
    leaves = {k: v.float().to(DEVICE).requires_grad_(True) for k, v in t.items()}
    with torch.no_grad():
        y = fused_idb_triton(*(leaves[k] for k in IDB_NAMES))
    assert not y.requires_grad
    assert_within("y (no grad)", y, y_ref, y_abs, 1e-5)


# ---------------------------------------------------------------------------------------------
# Launch path: pointer alignment in the launch key, the kept-CompiledKernel convention
# ---------------------------------------------------------------------------------------------
def test_alignment_flags():
    """The JIT specialises on 16-byte pointer alignment, so the launch key must hold it per pointer."""
    base = torch.empty(64, dtype=torch.float32, device=DEVICE)
    assert base.data_ptr() % 16 == 0  # torch's allocators align far more than 16 bytes
    assert launch.aligned(base, base[1:], base[2:], base[4:]) == (True, False, False, True)


def _offset_view(t: torch.Tensor, elements: int) -> torch.Tensor:
    """t's values in a view that starts `elements` into a fresh buffer (8 bytes for 2 fp32: DeepSpeed's case)."""
    flat = torch.empty(t.numel() + elements, dtype=t.dtype, device=t.device)
    view = flat[elements:].view(t.shape)
    view.copy_(t)
    return view


@pytest.mark.parametrize("offsets", [(0, 0, 0), (0, 2, 0), (1, 0, 3), (4, 4, 4)])
def test_aligned_is_true_only_when_every_pointer_is(offsets):
    """The launch keys' alignment part: True when all tensors are 16-byte aligned (one OR of the
    pointers), else which ones are, in order; fp32 elements at these offsets are 0, 8, 4, 12 or 16 bytes in."""
    tensors = [_offset_view(torch.zeros(8, device=DEVICE), k) for k in offsets]
    each = tuple(t.data_ptr() % 16 == 0 for t in tensors)
    assert each == tuple(k % 4 == 0 for k in offsets)  # torch's own buffers are 16-byte aligned
    assert launch.aligned(*tensors) == (True if all(each) else each)


@pytest.mark.parametrize("entry", ["idb", "conv", "conv-no-act", "ridb"])
def test_launch_keys_hold_the_alignment_of_every_caller_tensor(monkeypatch, entry):
    """Launch keys carry the 16-byte alignment of the caller's tensors (any of which may sit at an odd
    offset) and skip only the buffers conv3x3 allocates itself: every caller tensor a launch receives is
    among the tensors whose alignment went into that launch's key."""
    real_aligned, real_launch = conv3x3.aligned, launch.KernelLauncher.launch
    pending, launches = [], []
    monkeypatch.setattr(conv3x3, "aligned", lambda *ts: pending.append(ts) or real_aligned(*ts))

    def spy(self, key, grid, args, flags, config):
        launches.append((self.name, args, pending.pop() if key[1] else ()))
        return real_launch(self, key, grid, args, flags, config)

    monkeypatch.setattr(launch.KernelLauncher, "launch", spy)
    cl = dict(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(3)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE)

    if entry == "idb":
        x, x0, gy = (rand(2, 16, 3, 5).contiguous(**cl) for _ in range(3))
        w1, w2 = rand(8, 16, 3, 3).contiguous(**cl), rand(16, 24, 3, 3).contiguous(**cl)
        b1, b2 = rand(8), _offset_view(rand(16), 2)  # b2 8 bytes into a line
        leaves = [x, w1, b1, w2, b2]
        for t in leaves:
            t.requires_grad_(True)
        fused_idb_triton(x, x0, w1, b1, w2, b2, 0.2).backward(gy)
        caller = [x, x0, w1, b1, w2, b2, gy]
    elif entry == "ridb":  # gy also starts the x0 gradient's running sum in the closing conv's dX epilogue
        x0, r2, gy = (rand(2, 16, 3, 5).contiguous(**cl) for _ in range(3))
        w1, w2, w = rand(8, 16, 3, 3).contiguous(**cl), rand(16, 24, 3, 3).contiguous(**cl), rand(16, 16, 3, 3)
        b1, b2, b = rand(8), _offset_view(rand(16), 2), _offset_view(rand(16), 2)
        leaves = [x0, w1, b1, w2, b2, w, b]
        for t in leaves:
            t.requires_grad_(True)
        fused_ridb_triton(x0, [(w1, b1, w2, b2)], w, b, 0.2, r2, 0.2).backward(gy)
        caller = [x0, r2, w1, b1, w2, b2, w, b, gy]
    else:
        x1, x2, r1, r2, gy = (rand(2, 8, 3, 5).contiguous(**cl) for _ in range(5))
        # a channels_last weight 16 bytes into its buffer (aligned, at an offset); b 8 bytes in
        w, b = _offset_view(rand(8, 3, 3, 16), 4).permute(0, 3, 1, 2), _offset_view(rand(8), 2)
        for t in (x1, x2, w, b):
            t.requires_grad_(True)
        slope = None if entry == "conv-no-act" else 0.2  # without: dW reads the caller's g itself
        fused_conv3x3_triton([x1, x2], w, b, slope, r1, 0.2, r2, 0.5).backward(gy)
        caller = [x1, x2, w, b, r1, r2, gy]
    caller_ptrs = {t.data_ptr() for t in caller}
    assert len(launches) == {"idb": 6, "conv": 4, "conv-no-act": 3, "ridb": 8}[entry]
    for name, args, keyed in launches:
        received = {a.data_ptr() for a in args if isinstance(a, torch.Tensor)} & caller_ptrs
        assert received <= {t.data_ptr() for t in keyed}, f"{name}: a caller tensor's alignment is not in its key"
    flags = [real_aligned(*keyed) for _, _, keyed in launches]
    assert all(f is True or isinstance(f, tuple) and False in f for f in flags)  # True: every tensor aligned
    assert any(f is not True for f in flags)  # the offset tensors did reach a key as unaligned


@pytest.mark.parametrize("shape", [(2, 5, 3, 4), (2, 1, 3, 4), (2, 5, 1, 1), (0, 5, 3, 4), (3, 7, 1, 5), (1, 64, 32, 32)])
def test_empty_cl_is_torch_channels_last(shape):
    """The kernels' buffers (empty_strided, cheaper on the host) have exactly torch's channels_last strides,
    the degenerate sizes (C = 1, H = W = 1, N = 0) included, on the input's device and dtype."""
    like = torch.zeros(1, dtype=torch.bfloat16, device=DEVICE)
    got = conv3x3._empty_cl(*shape, like)
    ref = torch.empty(shape, memory_format=torch.channels_last)
    assert (got.shape, got.stride(), got.dtype, got.device) == (ref.shape, ref.stride(), like.dtype, like.device)
    assert got.is_contiguous(memory_format=torch.channels_last)


def test_kept_compiled_kernel_gets_every_argument_in_signature_order(monkeypatch):
    """The CUDA launch path, run with the launcher swapped: the first launch of a key compiles (here: a
    stand-in returns a fake CompiledKernel) and keeps it; later launches call it with a 3-d grid and the
    runtime arguments followed by the constexprs in the kernel's declared order (Triton >= 3.3)."""
    calls = []

    class FakeCompiled:
        def __getitem__(self, grid):
            return lambda *args: calls.append((grid, args))

    def standin(name, grid, args, constexprs, options, key):
        calls.append(("compile", name, grid, args, dict(constexprs), options))
        return FakeCompiled()

    monkeypatch.setattr(launch, "INTERPRETING", False)
    monkeypatch.setattr(launch, "STANDIN", standin)
    launcher = launch.KernelLauncher(conv3x3_bwd_finalize_kernel, "fin-under-test")  # a private cache
    args = ("dwp", "dbp", "dw", "db", 2, 3, 4, 36, 9, 1, 1.0)
    constexprs = {"BLOCK": 1024, "HAS_BIAS": True, "INTERP_BF16": False}  # not in declared order on purpose
    config = triton.Config({}, num_warps=4, num_stages=1)
    for _ in range(3):
        launcher.launch(("key",), (5,), args, constexprs, config)
    assert calls[0] == ("compile", "fin-under-test", (5, 1, 1), args, constexprs, {"num_warps": 4, "num_stages": 1})
    # conv3x3_bwd_finalize_kernel declares HAS_BIAS, INTERP_BF16, BLOCK (in that order) after its runtime args
    assert calls[1:] == [((5, 1, 1), args + (True, False, 1024))] * 2
    assert launch.LAUNCHES["fin-under-test"] == 3


def _fake_compiled_kernel(calls):
    """Triton's own CompiledKernel class, its handles and launcher faked (no GPU here): its runner's call
    of compiled.run is recorded."""
    from triton.compiler import CompiledKernel

    ck = CompiledKernel.__new__(CompiledKernel)
    ck.module = None  # no handles to unload (its __del__ reads this)
    ck._run = lambda *a: calls.append(a)  # what its `run` property returns once the handles are there
    ck.function, ck.packed_metadata, ck.name, ck.src = None, ("warps", 4), "fake", None

    def init_handles():  # the function handle exists once the module is loaded
        ck.function = 0xF00
    ck._init_handles = init_handles
    return ck


class _FakeDriver:
    """The driver's device and stream lookups: device 3 current, each device's stream 1000 + its index
    unless a test sets another."""

    def __init__(self):
        self.device, self.streams = 3, {}

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device):
        return self.streams.get(device, 1000 + device)


def test_direct_runner_makes_tritons_runner_call(monkeypatch):
    """The CUDA launch path with the driver swapped: direct_runner calls compiled.run with what Triton's
    runner passes (grid, the device's current stream, handle, metadata, every argument in order; the
    tensors as their addresses, which Triton's C launcher reads from them itself), but None for the
    launch metadata and hooks when no hook is registered; with one registered it launches through
    Triton's runner, so the hook sees the launch. The device is bound when the runner is made (the one
    the module was loaded on); the stream is looked up per launch."""
    driver = _FakeDriver()
    monkeypatch.setattr(triton.runtime.driver, "_active", driver)
    theirs, ours = [], []
    x, y = torch.zeros(3), torch.ones(5)
    args, constexprs = (x, 7, y, 0.5), (True, 64)
    _fake_compiled_kernel(theirs)[(5, 2, 1)](*args, *constexprs)
    runner = launch.direct_runner(_fake_compiled_kernel(ours), constexprs, (0, 2))
    driver.streams[3] = 1013  # a caller's stream context on the kernel's device, entered after the runner was made
    driver.device = 4  # and another device made current: the kernel's module is device 3's
    runner((5, 2, 1), args)
    (t,), (o,) = theirs, ours
    assert o == (5, 2, 1, 1013, 0xF00, ("warps", 4), None, None, None, x.data_ptr(), 7, y.data_ptr(), 0.5, True, 64)
    assert t[:3] == o[:3] and t[3] == 1003 and t[4:6] == o[4:6]
    assert t[9:] == (x, 7, y, 0.5, True, 64)  # Triton's runner hands the tensors to its C launcher
    runtime = triton.knobs.runtime
    assert launch._no_hook(t[7]) and launch._no_hook(t[8])  # Triton's empty chains: nothing is called either way
    seen = []
    hook = seen.append
    runtime.launch_enter_hook.add(hook)
    try:
        ours.clear()
        driver.device = 3
        launch.direct_runner(_fake_compiled_kernel(ours), constexprs, (0, 2))((5, 2, 1), args)
    finally:
        runtime.launch_enter_hook.remove(hook)
    (o,) = ours
    assert o[7] is runtime.launch_enter_hook and o[6] is not None and o[:6] == (*t[:3], 1013, *t[4:6])
    assert o[9:] == t[9:]  # through Triton's runner: the tensors themselves


def test_kept_kernels_launch_through_direct_runner_only_when_they_are_tritons(monkeypatch):
    """A CompiledKernel of Triton's is kept as a direct_runner (unless DIRECT_RUNNER is off, as the
    launch profile's baseline sets it), with the first launch's tensor positions passed as addresses;
    any other kept object (the stand-ins) through its runner."""
    monkeypatch.setattr(triton.runtime.driver, "_active", _FakeDriver())
    calls = []
    t = torch.zeros(2)
    launch._kept_runner(_fake_compiled_kernel(calls), (1,), (t, 2))((2, 1, 1), (t, 3))
    assert calls[-1][6:9] == (None, None, None) and calls[-1][9:] == (t.data_ptr(), 3, 1)
    monkeypatch.setattr(launch, "DIRECT_RUNNER", False)
    launch._kept_runner(_fake_compiled_kernel(calls), (1,), (t, 2))((2, 1, 1), (t, 3))
    assert calls[-1][6] is not None and calls[-1][:6] == calls[-2][:6] and calls[-1][9:] == (t, 3, 1)


@triton.jit
def _constexpr_in_the_middle(a_ptr, B: tl.constexpr, n):
    tl.store(a_ptr + tl.arange(0, B), tl.zeros((B,), dtype=tl.float32) + n)


def test_launcher_refuses_constexpr_before_runtime_arguments():
    """Direct launch passes constexprs after the runtime arguments: a kernel that interleaves them
    would be fed the wrong values, so the launcher refuses it when it is made."""
    assert launch.KernelLauncher(conv3x3_bwd_finalize_kernel, "ok")._constexpr_names == [
        "HAS_BIAS", "INTERP_BF16", "BLOCK"]
    with pytest.raises(TypeError, match="constexpr parameters must come last"):
        launch.KernelLauncher(_constexpr_in_the_middle, "bad")


def test_launchers_are_registered_by_name_one_kernel_per_name():
    """precompile and compile_check find a recorded launch's kernel by its launcher's name: every module's
    launchers are there, and a name stays bound to its kernel (a test may make the same launcher again)."""
    from gafh_fast.kernels import precompile, upconv

    assert precompile.launcher("dx") is conv3x3.DX and precompile.launcher("up_dw") is upconv.UP_DW
    again = launch.KernelLauncher(conv3x3_bwd_finalize_kernel, "registry-under-test")
    assert launch.KernelLauncher(conv3x3_bwd_finalize_kernel, "registry-under-test") is not again
    assert launch.LAUNCHERS["registry-under-test"].kernel is conv3x3_bwd_finalize_kernel
    with pytest.raises(ValueError, match="launches another kernel"):
        launch.KernelLauncher(upconv.UP_FIN.kernel, "registry-under-test")


# ---------------------------------------------------------------------------------------------
# Tuner, plans, precision flags, dW chunking
# ---------------------------------------------------------------------------------------------
def test_default_tuner_times_with_cuda_only_on_cuda():
    old = conv3x3.set_tuner(None)
    try:
        tuner = conv3x3.tuner()
        if torch.cuda.is_available():
            assert tuner.timer is cuda_timer and tuner.device_name == torch.cuda.get_device_name()
        else:  # no CUDA timer on a machine without CUDA (it would fail on the first autotune)
            assert tuner.timer is None and tuner.device_name == "cpu"
    finally:
        conv3x3.set_tuner(old)


def test_plan_configs_report_each_plan_plainly():
    """bench/kernels_suite.py prints these next to the timings: dtype names without 'torch.'."""
    old = conv3x3.set_tuner(None)  # no plans yet
    try:
        x = torch.randn(1, 5, 3, 7, device=DEVICE)
        wt = torch.randn(9, 5, 3, 3, device=DEVICE)
        fused_conv3x3_triton([x], wt, None, None, None, 1.0, None, 1.0)
        (entry,) = conv3x3.plan_configs()
    finally:
        conv3x3.set_tuner(old)
    assert entry["kernel"] == "fwd"
    assert entry["plan"].startswith("((1, 5, 3, 7), None, (9, 5, 3, 3), ") and "'float32'" in entry["plan"]
    assert "torch." not in entry["plan"] and "device" not in entry["plan"]
    assert entry["config"] == config_to_dict(configs.fwd_candidates(5, 0, 9, 7, 21)[0])


def test_fp32_launches_ask_for_ieee_dots(monkeypatch):
    """fp32 I/O is the exactness path: every fp32 launch asks for IEEE dots (conftest.py makes the
    interpreter round tf32 dots as a GPU does, so the value tests see it too; this names the flag)."""
    seen = []
    real_launch = launch.KernelLauncher.launch

    def recording(self, key, grid, args, flags, config):
        seen.append((self.name, flags.get("PRECISION")))
        return real_launch(self, key, grid, args, flags, config)

    monkeypatch.setattr(launch.KernelLauncher, "launch", recording)
    t, grad = make_idb(8, 4, 1, 3, 3, torch.float32, seed=2)
    leaves = [t[k].float().to(DEVICE).requires_grad_(True) for k in IDB_NAMES]
    fused_idb_triton(*leaves).backward(grad.float().to(DEVICE))
    assert {name for name, _ in seen} == {"fwd", "dw", "dx", "gz"}
    assert all(precision == "ieee" for name, precision in seen if name != "gz")  # the gz pass has no dot


@triton.jit
def _dot16(a_ptr, b_ptr, c_ptr, PRECISION: tl.constexpr):
    r = tl.arange(0, 16)
    a = tl.load(a_ptr + r[:, None] * 16 + r[None, :])
    b = tl.load(b_ptr + r[:, None] * 16 + r[None, :])
    tl.store(c_ptr + r[:, None] * 16 + r[None, :], tl.dot(a, b, input_precision=PRECISION))


@pytest.mark.skipif(not conv3x3.INTERPRETING, reason="checks conftest.py's interpreter emulation")
def test_tf32_is_emulated():
    """conftest.py: a tf32 dot reads its fp32 operands with 10 mantissa bits, an ieee dot in full."""
    gen = torch.Generator().manual_seed(3)
    a, b = torch.rand(16, 16, generator=gen) + 1, torch.rand(16, 16, generator=gen) + 1  # in [1, 2)
    exact = a.double() @ b.double()
    out = {}
    for precision in ("ieee", "tf32"):
        out[precision] = torch.empty(16, 16)
        _dot16[(1,)](a, b, out[precision], PRECISION=precision)
    assert ((out["ieee"].double() - exact).abs() <= 16 * 2.0**-23 * exact).all()

    def tf32(t):  # 10 mantissa bits, ties to even (t > 0 here)
        bits = t.view(torch.int32)
        return ((bits + 0xFFF + ((bits >> 13) & 1)) & -8192).view(torch.float32).double()

    assert torch.allclose(out["tf32"].double(), tf32(a) @ tf32(b), rtol=1e-6, atol=0)
    assert ((out["tf32"].double() - exact).abs() > 1e-4 * exact).any()


@pytest.mark.parametrize("sms", [0, 1, 132])
def test_dw_split_keeps_chunks_of_at_least_1024_pixels(sms):
    """The fp32 dW workspace holds one (9, C_in, C_out) slice per chunk: chunks of >= 1024 pixels keep
    it a few MB; no SMs (the interpreter) means one chunk."""
    for m in (1, 1000, 1024, 2048, 5000, 65536, 2**20):
        for c_in, c_out in ((3, 64), (64, 32), (96, 64), (256, 256)):
            split = configs.dw_split(m, c_in, c_out, sms)
            assert split >= 1
            if sms == 0:
                assert split == 1
            if split > 1:
                assert m // split >= 1024, (m, c_in, c_out, sms, split)


@pytest.mark.parametrize("asked, expect", [(None, 1), (1, 1), (2, 2), (3, 3), (8, 3)])
def test_dw_partials_never_use_more_chunks_than_asked(asked, expect):
    """Chunks are rounded up to a multiple of 128 pixels, so the chunk count can only shrink: 300
    pixels in at most 3 chunks of 128; None asks configs.dw_split (one chunk without SMs)."""
    n, c, h, w = 2, 8, 10, 15  # 300 pixels
    x = torch.randn(n, c, h, w, device=DEVICE).contiguous(memory_format=torch.channels_last)
    gz = torch.randn(n, 16, h, w, device=DEVICE).contiguous(memory_format=torch.channels_last)
    dwp, dbp, split = conv3x3._dw_partials(x, None, gz, True, asked, None)
    assert split == expect and dwp.shape == (expect, 9, c, 16) and dbp.shape == (expect, 16)
    ref = torch.nn.grad.conv2d_weight(x.double(), (16, c, 3, 3), gz.double(), padding=1)  # (co, ci, kh, kw)
    got = dwp.double().sum(0).reshape(3, 3, c, 16).permute(3, 2, 0, 1)
    scale = torch.nn.grad.conv2d_weight(x.double().abs(), (16, c, 3, 3), gz.double().abs(), padding=1)
    assert_within("dW from the partials", got, ref, scale, 1e-5)
    assert_within("db from the partials", dbp.double().sum(0), gz.double().sum((0, 2, 3)),
                  gz.double().abs().sum((0, 2, 3)), 1e-5)


# ---------------------------------------------------------------------------------------------
# Where buffers live: every allocation follows the inputs' device, never the default device
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("slope", [0.2, None])
def test_conv_buffers_follow_the_inputs_device_not_the_default(slope):
    """On a GPU a buffer made on the default device (the CPU) would hand the kernel a host pointer.
    The CPU twin: make the default device 'meta' while the inputs stay put, so a buffer allocated
    without naming the inputs' device is a meta tensor, which the launch refuses. The host functions
    are called directly: autograd runs a backward outside the caller's default-device context."""
    tensors, grad = make_case([8, 5], 12, 1, 3, 5, r1=True)
    (y_ref, g_ref), (y_abs, g_abs) = reference_and_scale(tensors, grad, slope, 0.5, 1.0)
    t = {k: v.float().to(DEVICE) for k, v in tensors.items() if v is not None}
    with torch.device("meta"):
        w_k = conv3x3.kernel_weight(t["weight"])
        y, mask = conv3x3.conv_forward([t["x1"], t["x2"]], t["weight"], t["bias"], slope, t["residual"], 0.5, None,
                                       1.0, True, w_k=w_k)
        (dx1, dx2), dw, db = conv3x3.conv_backward(grad.float().to(DEVICE), [t["x1"], t["x2"]], t["weight"], w_k,
                                                   mask, slope, 0.5, True)
    assert_within("y", y, y_ref, y_abs, 1e-5)
    for name, got in (("x1", dx1), ("x2", dx2), ("weight", dw), ("bias", db)):
        assert_within(f"d{name}", got, g_ref[name], g_abs[name], 1e-5)


def test_idb_buffers_follow_the_inputs_device_not_the_default():
    t, grad = make_idb(8, 4, 1, 3, 5, torch.float32, seed=6)
    (y_ref, g_ref), (y_abs, g_abs) = idb_reference(t, grad, same_x=False)
    x, x0, w1, b1, w2, b2 = (t[k].float().to(DEVICE) for k in IDB_NAMES)
    with torch.device("meta"):
        w1_k, w2_k = conv3x3.kernel_weight(w1), conv3x3.kernel_weight(w2)
        y, h1, mask1, mask2 = idb.idb_forward(x, x0, w1, b1, w2, b2, 0.2, True, w1_k=w1_k, w2_k=w2_k)
        grads = idb.idb_backward(grad.float().to(DEVICE), x, h1, w1, w1_k, w2, w2_k, mask1, mask2, 0.2)
    assert_within("y", y, y_ref, y_abs, 1e-5)
    for name, got in zip(("x", "w1", "b1", "w2", "b2"), grads):
        assert_within(f"d{name}", got, g_ref[name], g_abs[name], 1e-5)


# ---------------------------------------------------------------------------------------------
# torch.compile: one opaque node per conv and per IDB; the IDB ops' fake implementations
# ---------------------------------------------------------------------------------------------
def test_compile_sees_one_custom_op_per_conv_and_per_idb():
    graphs = []

    def capture(gm, example_inputs):  # a backend that keeps the graph Dynamo made and runs it as is
        graphs.append(gm)
        return gm.forward

    def conv_then_idb(x, w, b, w1, b1, w2, b2):
        h = fused_conv3x3_triton([x], w, b, 0.2, None, 1.0, None, 1.0)
        return fused_idb_triton(h, h, w1, b1, w2, b2)

    t, grad = make_idb(8, 4, 1, 3, 4, torch.float32, seed=8)
    gen = torch.Generator().manual_seed(9)
    w = (torch.randn(8, 8, 3, 3, generator=gen) / 8).to(DEVICE)
    b = torch.randn(8, generator=gen).to(DEVICE)
    args = [t["x"].float().to(DEVICE), w, b] + [t[k].float().to(DEVICE) for k in ("w1", "b1", "w2", "b2")]
    leaves = [a.clone().requires_grad_(True) for a in args]
    y = torch.compile(conv_then_idb, backend=capture, fullgraph=True)(*leaves)
    (gm,) = graphs
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert sum("fused_conv3x3_fwd" in tg for tg in targets) == 1, targets
    assert sum("fused_idb_fwd" in tg for tg in targets) == 1, targets
    ref_leaves = [a.double().requires_grad_(True) for a in args]
    from gafh_fast.ops import fused_conv3x3_reference, fused_idb_reference

    h = fused_conv3x3_reference([ref_leaves[0]], ref_leaves[1], ref_leaves[2], 0.2)
    y_ref = fused_idb_reference(h, h, *ref_leaves[3:])
    assert_within("y (compiled)", y, y_ref, torch.full_like(y_ref, y_ref.abs().max().item()), 1e-5)
    for name, g, g_ref in zip(("x", "w", "b", "w1", "b1", "w2", "b2"),
                              torch.autograd.grad(y, leaves, grad.float().to(DEVICE)),
                              torch.autograd.grad(y_ref, ref_leaves, grad.to(DEVICE))):
        assert_within(f"d{name} (compiled)", g, g_ref, torch.full_like(g_ref, g_ref.abs().max().item()), 1e-5)


def test_opcheck_idb_ops_bfloat16():
    """The IDB ops' fake implementations (what torch.compile plans with) against the real ones: shapes,
    strides and dtypes of every output, in bf16 (gradients in the parameters' dtype) with gc != nf and
    channels_last weights (the real backward returns contiguous dW)."""
    t, grad = make_idb(8, 4, 1, 3, 4, torch.bfloat16, seed=10)
    t = {k: v.to(torch.bfloat16).to(DEVICE) for k, v in t.items()}
    for k in ("w1", "w2"):
        t[k] = t[k].contiguous(memory_format=torch.channels_last)
    leaves = {k: v.clone().requires_grad_(True) for k, v in t.items()}
    torch.library.opcheck(torch.ops.gafh_fast.fused_idb_fwd.default,
                          (*(leaves[k] for k in IDB_NAMES), 0.2, True))
    _, h1, m1, m2 = torch.ops.gafh_fast.fused_idb_fwd(*(t[k] for k in IDB_NAMES), 0.2, True)
    torch.library.opcheck(torch.ops.gafh_fast.fused_idb_bwd.default,
                          (grad.to(torch.bfloat16).to(DEVICE), t["x"], h1, t["w1"], t["w2"], m1, m2, 0.2))


def test_opcheck_conv_backward_op_bfloat16():
    """fused_conv3x3_bwd's gradients come back in the weight's dtype (its fake says so), in bf16 too."""
    tensors, grad = make_case([5, 11], 7, 2, 3, 4, dtype=torch.bfloat16)
    t = {k: v.to(torch.bfloat16).to(DEVICE) for k, v in tensors.items() if v is not None}
    _, mask = torch.ops.gafh_fast.fused_conv3x3_fwd([t["x1"], t["x2"]], t["weight"], t["bias"], 0.2, None, 1.0,
                                                    None, 1.0, True)
    torch.library.opcheck(torch.ops.gafh_fast.fused_conv3x3_bwd.default,
                          (grad.to(torch.bfloat16).to(DEVICE), [t["x1"], t["x2"]], t["weight"], mask, 0.2, 0.5, True))


def test_dx_refuses_two_finalize_jobs_on_one_partials_buffer():
    """The dW partials are kept per plan (_dw_partials): two finalize jobs of one dX launch reading the same
    buffer would mean two pending dW launches shared a plan; the launch refuses rather than reduce it twice."""
    cl = dict(memory_format=torch.channels_last)
    g = torch.randn(1, 8, 2, 3, device=DEVICE).contiguous(**cl)
    w = torch.randn(8, 8, 3, 3, device=DEVICE).contiguous(**cl)

    def job(partials):
        return conv3x3.Finalize(partials, None, torch.empty(8, 8, 3, 3, device=DEVICE).contiguous(**cl), None, 1, 1.0)

    shared = torch.zeros(1, 9, 8, 8, device=DEVICE)
    with pytest.raises(RuntimeError, match="share one partials buffer"):
        conv3x3._dx((g, w, 0), (g, w, 0), torch.empty_like(g), None, None, None, 1.0, job(shared), job(shared), None)
    a, b = job(torch.zeros(1, 9, 8, 8, device=DEVICE)), job(torch.zeros(1, 9, 8, 8, device=DEVICE))
    out = torch.empty_like(g)
    conv3x3._dx((g, w, 0), (g, w, 0), out, None, None, None, 1.0, a, b, None)  # separate buffers: it runs
    assert torch.equal(a.dw, torch.zeros_like(a.dw)) and torch.equal(b.dw, torch.zeros_like(b.dw))

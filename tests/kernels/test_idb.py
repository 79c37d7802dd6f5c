"""The fused IDB (one autograd Function, 2 + 4 launches: the gz2 pass, gz1, dW2 with dW1, dx; or 2 + 3
when gz1's launch makes gz2 itself) against the float64 reference, and the launch count.

    y = x0 + LReLU(conv2([x, LReLU(conv1(x))]))          (spec: the internal dense block)
Every output and gradient (x, x0, W1, b1, W2, b2) is compared elementwise with the same bound as the
single-conv tests: |kernel - ref| <= rel * (the same computation on |values| and |grad|), with rel =
1e-5 for float32 and 2**-7 for bfloat16 (two convs deep: h1, gz2 and gz1 are each rounded to bf16
once, each rounding relative to its own |terms|, which the |values| chain bounds).
"""
from __future__ import annotations

import pytest
import torch

from gafh_fast.kernels import configs, conv3x3, fused_idb_triton, launch
from gafh_fast.kernels.precompile import PickTuner
from gafh_fast.ops import fused_conv3x3_reference

from .test_conv3x3 import DEVICE, assert_within

REL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7}
NAMES = ("x", "x0", "w1", "b1", "w2", "b2")


def make_idb(nf, gc, n, h, w, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    t = {
        "x": torch.randn(n, nf, h, w, generator=gen), "x0": torch.randn(n, nf, h, w, generator=gen),
        "w1": torch.randn(gc, nf, 3, 3, generator=gen) / (3 * nf ** 0.5), "b1": torch.randn(gc, generator=gen),
        "w2": torch.randn(nf, nf + gc, 3, 3, generator=gen) / (3 * (nf + gc) ** 0.5),
        "b2": torch.randn(nf, generator=gen),
    }
    grad = torch.randn(n, nf, h, w, generator=gen)
    return {k: v.to(dtype).double() for k, v in t.items()}, grad.to(dtype).double()


def idb_reference(t, grad, same_x):
    """float64 (y, grads) and the same on absolute values (the bound scale)."""
    out = []
    for absolute in (False, True):
        leaves = {k: (v.abs() if absolute else v).clone().requires_grad_(True) for k, v in t.items()}
        x0 = leaves["x"] if same_x else leaves["x0"]
        h1 = fused_conv3x3_reference([leaves["x"]], leaves["w1"], leaves["b1"], 0.2)
        y = fused_conv3x3_reference([leaves["x"], h1], leaves["w2"], leaves["b2"], 0.2, x0, 1.0)
        names = [k for k in NAMES if not (same_x and k == "x0")]
        grads = torch.autograd.grad(y, [leaves[k] for k in names], grad.abs() if absolute else grad)
        out.append((y.detach(), dict(zip(names, grads))))
    return out


def run_idb(nf, gc, n, h, w, dtype, weight_layout="nchw", same_x=False, seed=0):
    t, grad = make_idb(nf, gc, n, h, w, dtype, seed)
    (y_ref, g_ref), (y_abs, g_abs) = idb_reference(t, grad, same_x)
    leaves = {}
    for k, v in t.items():
        v = v.to(dtype).to(DEVICE)
        if v.dim() == 4 and (k.startswith("x") or weight_layout == "channels_last"):
            v = v.contiguous(memory_format=torch.channels_last)
        leaves[k] = v.requires_grad_(True)
    x0 = leaves["x"] if same_x else leaves["x0"]
    launch.LAUNCHES.clear()
    y = fused_idb_triton(leaves["x"], x0, leaves["w1"], leaves["b1"], leaves["w2"], leaves["b2"], 0.2)
    names = [k for k in NAMES if not (same_x and k == "x0")]
    grads = torch.autograd.grad(y, [leaves[k] for k in names], grad.to(dtype).to(DEVICE))
    launches = sum(launch.LAUNCHES.values())
    rel = REL[dtype]
    assert y.dtype == dtype
    assert_within("y", y, y_ref, y_abs, rel)
    for k, g in zip(names, grads):
        assert g.shape == leaves[k].shape and g.dtype == dtype
        assert_within(f"d{k}", g, g_ref[k], g_abs[k], rel)
    return launches


@pytest.mark.parametrize("nf, gc, n, h, w, dtype, weight_layout", [
    (16, 8, 2, 5, 7, torch.float32, "nchw"),            # odd H and W, NCHW weights (copied per call)
    (64, 32, 1, 3, 4, torch.float32, "channels_last"),  # the trunk's channels; weights read in place
    (12, 20, 2, 3, 5, torch.bfloat16, "channels_last"), # awkward channels (gc > nf), bf16
    (64, 32, 1, 4, 3, torch.bfloat16, "nchw"),
    (72, 8, 1, 2, 3, torch.float32, "channels_last"),  # nf 72: two K blocks (64 + 8) in gz1's dX
])
def test_idb_matches_float64_reference(nf, gc, n, h, w, dtype, weight_layout):
    assert run_idb(nf, gc, n, h, w, dtype, weight_layout) == 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_idb_first_block_x_is_x0(dtype):
    """A RIDB's first IDB gets x0 as both inputs: x's gradient is dx + g, summed in the dx launch's
    epilogue (in fp32, rounded once), not by autograd: the backward runs no add in torch."""
    assert run_idb(8, 16, 1, 4, 4, dtype, same_x=True, seed=3) == 6
    x = torch.randn(1, 8, 3, 3, device=DEVICE, requires_grad=True)
    params = [torch.randn(*s, device=DEVICE, requires_grad=True) for s in ((4, 8, 3, 3), (4,), (8, 12, 3, 3), (8,))]
    y = fused_idb_triton(x, x, *params)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y.backward(torch.randn_like(y))
    adds = [e.key for e in prof.key_averages() if e.key in ("aten::add", "aten::add_")]
    assert adds == [], f"the backward added gradients in torch: {adds}"


def test_idb_second_candidate_configs():
    """The other heuristic candidate of every IDB kernel, at the trunk's channel counts: gz2 made by
    gz1's launch (A_ACT, so no gz pass: 5 launches) and the second dW and dx tiles."""
    old = conv3x3.set_tuner(PickTuner(1))
    try:
        assert run_idb(64, 32, 1, 3, 5, torch.float32, "channels_last", seed=5) == 5
    finally:
        conv3x3.set_tuner(old)


class _Gz2WayTuner(PickTuner):
    """The first candidate of every kernel, and the given way of making the IDB's gz2 (GZ_PASS)."""

    def __init__(self, gz_pass: bool):
        super().__init__(0)
        self.gz_pass = gz_pass

    def choose(self, kernel, key, candidates, *_, **__):
        if kernel == "idb_gz2":
            return next(c for c in candidates if c.kwargs["GZ_PASS"] == self.gz_pass)
        return candidates[0]


@pytest.mark.parametrize("nf, gc, h, w", [(72, 8, 3, 5), (12, 20, 2, 3)])
def test_both_ways_of_making_gz2_give_the_same_bits(nf, gc, h, w):
    """The gz pass rounds gz2 as gz1's dX rounds its masked operand, and both dX launches sum the same
    products in the same order: every output and gradient is bit for bit the same either way (bf16;
    nf 72: gz2 in two K blocks of the A_ACT operand). The pass's way is the default one, which
    test_idb_matches_float64_reference checks against float64 at these shapes; so is this one, then."""
    results = []
    for gz_pass in (True, False):
        old = conv3x3.set_tuner(_Gz2WayTuner(gz_pass))
        try:
            torch.manual_seed(11)
            x = torch.randn(2, nf, h, w, device=DEVICE).bfloat16().requires_grad_(True)
            params = [torch.randn(gc, nf, 3, 3, device=DEVICE) / (3 * nf ** 0.5), torch.randn(gc, device=DEVICE),
                      torch.randn(nf, nf + gc, 3, 3, device=DEVICE) / (3 * (nf + gc) ** 0.5),
                      torch.randn(nf, device=DEVICE)]
            params = [p.bfloat16().requires_grad_(True) for p in params]
            grad = torch.randn(2, nf, h, w, device=DEVICE).bfloat16()
            launch.LAUNCHES.clear()
            y = fused_idb_triton(x, x, *params)
            grads = torch.autograd.grad(y, [x, *params], grad)
            results.append((dict(launch.LAUNCHES), y, grads))
        finally:
            conv3x3.set_tuner(old)
    (counts_pass, y_pass, g_pass), (counts_fused, y_fused, g_fused) = results
    assert counts_pass == {"fwd": 2, "gz": 1, "dx": 2, "dw": 1}
    assert counts_fused == {"fwd": 2, "dx": 2, "dw": 1}
    assert torch.equal(y_pass, y_fused)
    for a, b in zip(g_pass, g_fused):
        assert torch.equal(a, b)


def test_timed_choices_launch_each_candidate(monkeypatch):
    """On a GPU each new plan times its candidates (tuning.Tuner.choose runs each one's closure); the
    same path here, with a timer that runs the launch and then says the second candidate was faster. The
    gz2 decision times the pass (gz + a plain dX) and the A_ACT dX, and keeps A_ACT; every kernel with two
    tiles launches 2 timed + 1 real times; the results still match the float64 reference, whatever the
    timed calls left in the kept scratch."""
    from gafh_fast.kernels.tuning import Tuner

    def timer(fn):
        timed.append(1)
        fn()
        return 2.0 if len(timed) % 2 else 1.0

    timed = []
    monkeypatch.setattr(conv3x3, "INTERPRETING", False)  # time candidates, as on a GPU
    monkeypatch.setattr(conv3x3, "AUTOTUNE", True)
    old = conv3x3.set_tuner(Tuner(None, "Test GPU", timer))
    try:
        launches = run_idb(16, 8, 2, 5, 7, torch.float32, "channels_last", seed=9)
        counts = dict(launch.LAUNCHES)
        chosen = {e["kernel"]: e["config"]["kwargs"] for e in conv3x3.plan_configs()}
    finally:
        conv3x3.set_tuner(old)
    assert len(timed) == 2 * 5  # fwd conv1, fwd conv2, the gz2 way, dW2 with dW1, dx
    assert counts == {"fwd": 6, "gz": 1, "dx": 6, "dw": 3} and launches == sum(counts.values())
    assert chosen["idb_gz2"]["GZ_PASS"] is False


def test_gz2_decision_is_asked_per_shape_with_the_true_pixel_count(monkeypatch):
    """The gz2 way is decided per (nf, gc, width, M bucket, dtype): two IDBs on one input shape but with
    different gc get a decision each (a plan keyed without gc would hand the second the first's tile),
    and the candidates are asked with the call's pixel count."""
    asked, keys = [], []
    real = configs.idb_gz2_candidates
    monkeypatch.setattr(configs, "idb_gz2_candidates", lambda *a: asked.append(a) or real(*a))

    class Recorder(PickTuner):
        def choose(self, kernel, key, candidates, *rest, **kw):
            keys.append((kernel, key))
            return super().choose(kernel, key, candidates, *rest, **kw)

    old = conv3x3.set_tuner(Recorder(0))
    try:
        x = torch.randn(2, 8, 3, 5, device=DEVICE, requires_grad=True)
        for gc in (4, 12):
            params = [torch.randn(*s, device=DEVICE, requires_grad=True)
                      for s in ((gc, 8, 3, 3), (gc,), (8, 8 + gc, 3, 3), (8,))]
            fused_idb_triton(x, x, *params).sum().backward()
    finally:
        conv3x3.set_tuner(old)
    assert asked == [(8, 4, 5, 30), (8, 12, 5, 30)]
    assert [k for kernel, k in keys if kernel == "idb_gz2"] == [(8, gc, 5, configs.m_bucket(30), "torch.float32")
                                                                for gc in (4, 12)]


def test_launch_count_per_idb():
    """At most 6 Triton launches per IDB forward + backward (2 + 4: the gz2 pass, gz1, dW2 with dW1 in one
    launch, dx), 2 for a forward without grad."""
    x = torch.randn(1, 8, 3, 3, device=DEVICE, requires_grad=True)
    w1 = torch.randn(4, 8, 3, 3, device=DEVICE, requires_grad=True)
    w2 = torch.randn(8, 12, 3, 3, device=DEVICE, requires_grad=True)
    b1 = torch.randn(4, device=DEVICE, requires_grad=True)
    b2 = torch.randn(8, device=DEVICE, requires_grad=True)
    for _ in range(2):  # the second call runs from the kept plans
        launch.LAUNCHES.clear()
        y = fused_idb_triton(x, x, w1, b1, w2, b2)
        assert sum(launch.LAUNCHES.values()) == 2
        y.sum().backward()
        assert dict(launch.LAUNCHES) == {"fwd": 2, "gz": 1, "dx": 2, "dw": 1}
    launch.LAUNCHES.clear()
    with torch.no_grad():
        fused_idb_triton(x, x, w1, b1, w2, b2)
    assert dict(launch.LAUNCHES) == {"fwd": 2}


def test_idb_custom_op_autograd_path():
    """torch.compile's path: the registered fused_idb ops and their register_autograd backward."""
    t, grad = make_idb(8, 8, 2, 3, 4, torch.float32, seed=7)
    (y_ref, g_ref), (y_abs, g_abs) = idb_reference(t, grad, False)
    leaves = {k: v.float().to(DEVICE).requires_grad_(True) for k, v in t.items()}
    y = torch.ops.gafh_fast.fused_idb_fwd(leaves["x"], leaves["x0"], leaves["w1"], leaves["b1"], leaves["w2"],
                                          leaves["b2"], 0.2, True)[0]
    assert_within("y", y, y_ref, y_abs, 1e-5)
    grads = torch.autograd.grad(y, [leaves[k] for k in NAMES], grad.float().to(DEVICE))
    for k, g in zip(NAMES, grads):
        assert_within(f"d{k}", g, g_ref[k], g_abs[k], 1e-5)


def test_idb_bad_arguments_raise_clear_errors():
    x = torch.randn(1, 8, 4, 4, device=DEVICE)
    w1, b1 = torch.randn(4, 8, 3, 3, device=DEVICE), torch.randn(4, device=DEVICE)
    with pytest.raises(ValueError, match="does not fit"):
        fused_idb_triton(x, x, w1, b1, torch.randn(8, 8, 3, 3, device=DEVICE), torch.randn(8, device=DEVICE))


def test_auto_times_triton_and_torch_per_shape(monkeypatch, caplog):
    """kernels=auto's CUDA path (ops.fused_idb -> AutoChooser over the real triton and torch
    backends). Without a GPU it runs with the device swapped: CPU tensors, Triton interpreted, far
    slower, so torch must win. Either way the faster timing wins, the decision is logged once, and the
    result is the chosen backend's."""
    import logging

    from gafh_fast import ops

    monkeypatch.setattr(ops, "resolve_backend", lambda backend, device: "auto")
    # the real timer, at its smallest (2 warm-up calls, 1 timed): interpreted launches are slow
    monkeypatch.setattr(ops, "AUTO", ops.AutoChooser(lambda fn, dev: ops.median_ms_per_call(fn, dev, 1, 1)))
    t, grad = make_idb(4, 4, 1, 2, 3, torch.float32, seed=9)
    leaves = [t[k].float().to(DEVICE).requires_grad_(True) for k in NAMES]
    with caplog.at_level(logging.INFO, logger="gafh_fast"):
        y = ops.fused_idb(*leaves, backend="auto")
        ops.fused_idb(*leaves, backend="auto")
    (key, times), = ops.AUTO.timings.items()
    chosen = ops.AUTO.decisions[key]
    assert set(times) == {"triton", "torch"} and chosen == min(times, key=times.get)
    assert chosen == "torch" or DEVICE == "cuda"  # the interpreter never wins
    assert sum("kernels=auto" in r.getMessage() for r in caplog.records) == 1
    exact = chosen == "torch"  # the reference itself, else the kernels' fp32 bound
    torch.testing.assert_close(y, ops.fused_idb_reference(*leaves), rtol=0 if exact else 1e-5, atol=0 if exact else 1e-5)

"""The fused RIDB (one autograd Function: Q IDBs and the closing conv) against the float64 reference,
its launch count, and its torch.compile path (the RIDB custom ops).

    x_1 = x0;  x_{q+1} = x0 + IDB_q(x_q);  out = r2 + s2*(x0 + s*conv(x_{Q+1}))   (spec: RIDB, DNB)
Every output and gradient (x0, r2, and W1, b1, W2, b2 of every IDB, W and b of the conv) is compared
elementwise as in test_idb.py: |kernel - ref| <= rel * (the same computation on |values| and
|grad|). What the backward does differently from per-IDB Functions is in its epilogues: the running
gradient of x0 is summed in the dX launches (ADD_SUM) and each IDB's gz2 comes ready from the launch
after it (OUT_ACT), so the x0 gradient and every IDB's weights are the targets here.
"""
from __future__ import annotations

import pytest
import torch

from gafh_fast import ops
from gafh_fast.kernels import conv3x3, fused_ridb_triton, launch
from gafh_fast.kernels.precompile import PickTuner
from gafh_fast.ops import fused_ridb_reference

from .test_conv3x3 import DEVICE, assert_within

# bf16: Q IDBs and a conv deep, each rounding (h1, y, gz2, gz1, the x0 sum) relative to its own |terms|,
# which the |values| chain bounds. 2**-6, not test_idb.py's 2**-7: at 2**-7 one db2 element of the Q = 3
# bf16 case fails, for a chain of per-IDB Functions as for this Function (measured, same element).
REL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-6}


def make_ridb(nf, gc, q_n, n, h, w, r2, dtype, seed):
    """float64 masters of values representable in dtype: (tensors by name, upstream grad, names)."""
    gen = torch.Generator().manual_seed(seed)
    t = {"x0": torch.randn(n, nf, h, w, generator=gen)}
    for q in range(q_n):
        t[f"w1_{q}"] = torch.randn(gc, nf, 3, 3, generator=gen) / (3 * nf ** 0.5)
        t[f"b1_{q}"] = torch.randn(gc, generator=gen) / 4
        t[f"w2_{q}"] = torch.randn(nf, nf + gc, 3, 3, generator=gen) / (3 * (nf + gc) ** 0.5)
        t[f"b2_{q}"] = torch.randn(nf, generator=gen) / 4
    t["w"] = torch.randn(nf, nf, 3, 3, generator=gen) / (3 * nf ** 0.5)
    t["b"] = torch.randn(nf, generator=gen)
    if r2:
        t["r2"] = torch.randn(n, nf, h, w, generator=gen)
    grad = torch.randn(n, nf, h, w, generator=gen)
    return {k: v.to(dtype).double() for k, v in t.items()}, grad.to(dtype).double()


def call_ridb(fn, leaves, q_n, s=0.2, s2=0.2):
    idbs = [tuple(leaves[f"{p}_{q}"] for p in ("w1", "b1", "w2", "b2")) for q in range(q_n)]
    r2 = leaves.get("r2")
    return fn(leaves["x0"], idbs, leaves["w"], leaves["b"], s, r2, s2 if r2 is not None else 1.0, 0.2)


def ridb_reference(t, grad, q_n):
    out = []
    for absolute in (False, True):
        leaves = {k: (v.abs() if absolute else v).clone().requires_grad_(True) for k, v in t.items()}
        y = call_ridb(fused_ridb_reference, leaves, q_n)
        grads = torch.autograd.grad(y, list(leaves.values()), grad.abs() if absolute else grad)
        out.append((y.detach(), dict(zip(leaves, grads))))
    return out


def run_ridb(nf, gc, q_n, n, h, w, r2, dtype, weight_layout="channels_last", seed=0, fn=fused_ridb_triton,
             input_layout="channels_last"):
    """Compare fn with the reference; return the launches of one forward + backward. input_layout
    "nchw": x0, r2 and the upstream gradient come contiguous (the generator's first RIDB gets the
    9x9 input conv's output)."""
    t, grad = make_ridb(nf, gc, q_n, n, h, w, r2, dtype, seed)
    (y_ref, g_ref), (y_abs, g_abs) = ridb_reference(t, grad, q_n)
    leaves = {}
    for k, v in t.items():
        v = v.to(dtype).to(DEVICE)
        if v.dim() == 4 and ((k in ("x0", "r2") and input_layout == "channels_last")
                             or (k not in ("x0", "r2") and weight_layout == "channels_last")):
            v = v.contiguous(memory_format=torch.channels_last)
        if v.dim() == 4 and k not in ("x0", "r2") and weight_layout == "strided":  # every other input channel
            wide = torch.zeros(v.shape[0], 2 * v.shape[1], 3, 3, dtype=dtype, device=DEVICE)
            wide[:, ::2] = v
            v = wide[:, ::2]
        leaves[k] = v.requires_grad_(True)
    launch.LAUNCHES.clear()
    y = call_ridb(fn, leaves, q_n)
    upstream = grad.to(dtype).to(DEVICE)
    if input_layout == "channels_last":
        upstream = upstream.contiguous(memory_format=torch.channels_last)
    grads = torch.autograd.grad(y, list(leaves.values()), upstream)
    launches = sum(launch.LAUNCHES.values())
    rel = REL[dtype]
    assert y.dtype == dtype
    assert_within("y", y, y_ref, y_abs, rel)
    for k, g in zip(leaves, grads):
        assert g.shape == leaves[k].shape and g.dtype == dtype, k
        if k.startswith("w") and weight_layout != "strided" and fn is fused_ridb_triton:
            # dW in the parameter's own layout (AccumulateGrad keeps it without a copy); the custom ops
            # return contiguous dW, as their fake says
            assert g.stride() == leaves[k].stride(), (k, g.stride(), leaves[k].stride())
        assert_within(f"d{k}", g, g_ref[k], g_abs[k], rel)
    return launches


@pytest.mark.parametrize("nf, gc, q_n, n, h, w, r2, dtype, weight_layout, input_layout", [
    (16, 8, 2, 2, 5, 7, True, torch.float32, "nchw", "nchw"),  # odd H and W, NCHW everything, the DNB residual
    (12, 20, 3, 1, 3, 5, False, torch.bfloat16, "channels_last", "channels_last"),  # gc > nf, bf16
    (72, 8, 1, 1, 2, 3, True, torch.float32, "channels_last", "nchw"),  # nf 72: two K blocks (64 + 8) per dX
    (64, 32, 2, 1, 3, 4, True, torch.bfloat16, "nchw", "channels_last"),  # the trunk's channels
    (8, 8, 1, 1, 1, 1, False, torch.float32, "channels_last", "channels_last"),  # 1x1: every tap but one pads
    (8, 4, 2, 1, 3, 4, True, torch.float32, "strided", "channels_last"),  # weights neither NCHW nor CL: copied
])
def test_ridb_matches_float64_reference(nf, gc, q_n, n, h, w, r2, dtype, weight_layout, input_layout):
    launches = run_ridb(nf, gc, q_n, n, h, w, r2, dtype, weight_layout, input_layout=input_layout)
    assert launches == (2 * q_n + 1) + (3 * q_n + 2)


def test_ridb_empty_batch():
    """N = 0: an empty output and zero parameter gradients, without a launch."""
    t, grad = make_ridb(8, 4, 2, 0, 3, 4, True, torch.float32, seed=6)
    (y_ref, g_ref), _ = ridb_reference(t, grad, 2)
    leaves = {k: v.float().to(DEVICE).requires_grad_(True) for k, v in t.items()}
    launch.LAUNCHES.clear()
    y = call_ridb(fused_ridb_triton, leaves, 2)
    grads = torch.autograd.grad(y, list(leaves.values()), grad.float().to(DEVICE))
    assert y.shape == y_ref.shape and not launch.LAUNCHES
    for k, g in zip(leaves, grads):
        assert g.shape == g_ref[k].shape and torch.equal(g, g_ref[k].float().to(DEVICE)), k


def test_ridb_second_candidate_configs():
    """The other heuristic candidate of every kernel, with the running sum and the chained gz2."""
    old = conv3x3.set_tuner(PickTuner(1))
    try:
        run_ridb(64, 32, 2, 1, 3, 5, True, torch.float32, seed=5)
    finally:
        conv3x3.set_tuner(old)


@pytest.mark.parametrize("slope", ["ridb", 0.2, None])
def test_kept_dw_partials_need_no_clearing(slope):
    """The dW/db partials are kept with their plan, not allocated per call: a second backward of the same
    shape reuses them, and every element it reads it has written first, so NaN left in them by anything
    before cannot reach a gradient. "ridb": 2 IDBs (each with two dW launches pending at once) and the
    closing conv; 0.2 / None: one conv with / without its activation (finalize on its own / in dX)."""
    from .test_conv3x3 import check_case

    def run(seed):
        if slope == "ridb":
            run_ridb(16, 8, 2, 2, 3, 5, True, torch.float32, seed=seed)
        else:
            check_case([8, 4], 16, 2, 3, 5, slope=slope, r1=True, seed=seed)

    run(seed=11)  # makes the plans and their partials
    kept = conv3x3.kept_partials()
    # (split, 9, C_in, C_out) dW and (split, C_out) db partials; one split on CPU (configs.dw_split)
    expected = {(1, 9, 24, 16), (1, 9, 16, 8), (1, 9, 16, 16), (1, 16), (1, 8)} if slope == "ridb" else \
        {(1, 9, 12, 16), (1, 16)}
    assert expected <= {tuple(t.shape) for t in kept}
    for t in kept:
        t.fill_(float("nan"))
    before = {t.data_ptr() for t in kept}
    run(seed=12)
    assert {t.data_ptr() for t in conv3x3.kept_partials()} == before  # no new partials at this shape


@pytest.mark.parametrize("case", ["ridb", "idb", "conv"])
def test_kept_backward_scratch_needs_no_clearing(case):
    """The backward's gz temporaries are kept per role and shape (conv3x3._scratch_cl), not allocated per
    call: a second backward of the same shape reuses them, and every element it reads it has written
    first, so NaN left in them cannot reach a result. "ridb": 3 IDBs (IDB q reads its gz2 from one buffer
    while writing IDB q-1's into the other, so a wrong alternation reads what it just overwrote) and the
    closing conv; "idb": a standalone IDB (gz2 made from the raw gradient and the mask, and gz1); "conv":
    one conv with its activation (gz made in dX)."""
    from .test_conv3x3 import check_case
    from .test_idb import run_idb

    def run(seed):
        if case == "ridb":
            run_ridb(16, 8, 3, 2, 5, 9, True, torch.float32, seed=seed)  # 90 pixels: 2 dX tiles (a halo to read)
        elif case == "idb":
            run_idb(16, 8, 2, 3, 5, torch.float32, seed=seed)
        else:
            check_case([8, 4], 16, 2, 3, 5, slope=0.2, r1=True, seed=seed)

    conv3x3.drop_scratch()
    run(seed=11)
    kept = conv3x3.kept_scratch()
    roles = {key[0] for key in conv3x3._SCRATCH}
    assert roles == {"ridb": {"gz1", "ridb_gz2_a", "ridb_gz2_b"}, "idb": {"gz1", "gz2"}, "conv": {"gz"}}[case]
    for t in kept:
        t.fill_(float("nan"))
    before = {t.data_ptr() for t in kept}
    run(seed=12)  # compares every output and gradient with the float64 reference
    assert {t.data_ptr() for t in conv3x3.kept_scratch()} == before  # nothing new at this shape


def test_launch_count_per_ridb():
    """The paper's RIDB (4 IDBs): 9 launches forward, 14 backward (each IDB's dW2 and dW1 share a launch);
    9 for a forward without grad. No launch goes to torch: the x0 gradient's 5 terms are summed in the
    dX epilogues."""
    t, _ = make_ridb(8, 4, 4, 1, 3, 3, True, torch.float32, seed=1)
    leaves = {k: v.float().to(DEVICE).requires_grad_(True) for k, v in t.items()}
    for _ in range(2):  # the second call runs from the kept plans
        for v in leaves.values():
            v.grad = None  # (accumulating into .grad would be an add of its own)
        launch.LAUNCHES.clear()
        y = call_ridb(fused_ridb_triton, leaves, 4)
        assert dict(launch.LAUNCHES) == {"fwd": 9}
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            y.sum().backward()
        assert dict(launch.LAUNCHES) == {"fwd": 9, "dx": 9, "dw": 5}
        adds = [e.key for e in prof.key_averages() if e.key in ("aten::add", "aten::add_")]
        assert adds == [], f"the backward added gradients in torch: {adds}"
    launch.LAUNCHES.clear()
    with torch.no_grad():
        call_ridb(fused_ridb_triton, leaves, 4)
    assert dict(launch.LAUNCHES) == {"fwd": 9}


def test_ridb_custom_op_autograd_path(monkeypatch):
    """torch.compile's path: the registered fused_ridb ops (one opaque node per RIDB) and their
    register_autograd backward, run eagerly (is_compiling patched) against the reference, with NCHW
    inputs (the op makes its own channels_last copy of x0 for the backward)."""
    from gafh_fast.kernels import ridb

    monkeypatch.setattr(ridb, "_is_compiling", lambda: True)
    calls = []
    real = ridb.fused_ridb_fwd
    monkeypatch.setattr(ridb, "fused_ridb_fwd", lambda *a: calls.append(a[-1]) or real(*a))
    launches = run_ridb(8, 8, 2, 2, 3, 4, True, torch.float32, "nchw", seed=7, input_layout="nchw")
    assert calls == [True]  # the custom op ran, asked to keep the masks for the backward
    assert launches == (2 * 2 + 1) + (3 * 2 + 2)


@pytest.mark.parametrize("weights_layout", ["channels_last", "nchw"])
def test_opcheck_ridb_ops_bfloat16(weights_layout):
    """The RIDB ops' fake implementations (what torch.compile plans with) against the real ones: shapes,
    strides and dtypes of every output, in bf16, gc != nf, with the DNB residual and without, and the
    forward without masks (inference under torch.compile). NCHW weights (the trainer's): the forward
    also returns their channels_last copies, which the backward reads, and dW comes back NCHW."""
    if weights_layout == "nchw":  # the forward without masks (its tensors are all contiguous)
        t, _ = make_ridb(8, 4, 1, 1, 3, 4, False, torch.bfloat16, seed=14)
        t = {k: v.to(torch.bfloat16).to(DEVICE) for k, v in t.items()}
        params = [t[f"{p}_0"] for p in ("w1", "b1", "w2", "b2")]
        torch.library.opcheck(torch.ops.gafh_fast.fused_ridb_fwd.default,
                              (t["x0"], None, t["w"], t["b"], params, 0.2, 1.0, 0.2, False))
    # gc 12 > 8: conv1's mask has 2 bytes per pixel, conv2's (nf 8) 1. The DNB residual with channels_last
    # weights, none with NCHW ones: each case once (opcheck runs the ops ~10 times under the interpreter)
    for r2 in (weights_layout == "channels_last",):
        t, grad = make_ridb(8, 12, 2, 1, 3, 4, r2, torch.bfloat16, seed=11)
        t = {k: v.to(torch.bfloat16).to(DEVICE) for k, v in t.items()}
        for k in t:
            if t[k].dim() == 4 and (k in ("x0", "r2") or weights_layout == "channels_last"):
                t[k] = t[k].contiguous(memory_format=torch.channels_last)
        params = [t[f"{p}_{q}"] for q in range(2) for p in ("w1", "b1", "w2", "b2")]
        leaves = [v.clone().requires_grad_(True) for v in params]
        args = (t["x0"].clone().requires_grad_(True), t.get("r2"), t["w"].clone().requires_grad_(True),
                t["b"].clone().requires_grad_(True), leaves, 0.2, 0.2 if r2 else 1.0, 0.2, True)
        torch.library.opcheck(torch.ops.gafh_fast.fused_ridb_fwd.default, args)
        out = torch.ops.gafh_fast.fused_ridb_fwd(t["x0"], t.get("r2"), t["w"], t["b"], params, 0.2, 0.2, 0.2, True)
        saved, copies = out[1:1 + 4 * 2], out[1 + 4 * 2:]
        weights = [t[f"{p}_{q}"] for q in range(2) for p in ("w1", "w2")]
        assert len(copies) == (5 if weights_layout == "nchw" else 0)
        kernel_weights = copies if copies else weights + [t["w"]]
        bwd_args = (grad.to(torch.bfloat16).to(DEVICE), t["x0"], saved, t["w"], weights, kernel_weights, 0.2, 0.2, 0.2)
        torch.library.opcheck(torch.ops.gafh_fast.fused_ridb_bwd.default, bwd_args)
        dws = torch.ops.gafh_fast.fused_ridb_bwd(*bwd_args)
        for dw, weight in zip([dws[1]] + dws[3::2], [t["w"]] + weights):  # dW in the parameter's own layout
            assert dw.stride() == weight.stride()


def test_ridb_bad_arguments_raise_clear_errors():
    t, _ = make_ridb(8, 4, 1, 1, 4, 4, False, torch.float32, seed=2)
    leaves = {k: v.float().to(DEVICE) for k, v in t.items()}
    leaves["w"] = torch.randn(8, 6, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match="does not fit"):
        call_ridb(fused_ridb_triton, leaves, 1)
    leaves["w"], leaves["b"] = torch.randn(8, 8, 3, 3, device=DEVICE), None
    with pytest.raises(ValueError, match="bias"):
        call_ridb(fused_ridb_triton, leaves, 1)
    with pytest.raises(ValueError, match="at least one IDB"):
        fused_ridb_triton(leaves["x0"], [], leaves["w"], torch.zeros(8, device=DEVICE), 0.2, None, 1.0)


def test_ridb_fake_refuses_bad_arguments_at_trace_time():
    """torch.compile plans with the op's fake: a mis-shaped weight must fail there with the same clear
    error as an eager call, not later inside the compiled graph."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x0 = torch.empty(1, 8, 4, 4, device=DEVICE)
        params = [torch.empty(4, 8, 3, 3, device=DEVICE), torch.empty(4, device=DEVICE),
                  torch.empty(8, 12, 3, 3, device=DEVICE), torch.empty(8, device=DEVICE)]
        with pytest.raises(ValueError, match="does not fit"):
            torch.ops.gafh_fast.fused_ridb_fwd(x0, None, torch.empty(8, 6, 3, 3, device=DEVICE),
                                               torch.empty(8, device=DEVICE), params, 0.2, 1.0, 0.2, True)


def test_ops_fused_ridb_backends_agree():
    """gafh_fast.ops.fused_ridb: backend torch is the reference itself; backend triton matches it."""
    t, grad = make_ridb(8, 4, 2, 1, 3, 4, True, torch.float32, seed=4)
    t = {k: v.float().to(DEVICE) for k, v in t.items()}
    idbs = [tuple(t[f"{p}_{q}"] for p in ("w1", "b1", "w2", "b2")) for q in range(2)]
    args = (t["x0"], idbs, t["w"], t["b"])
    kw = dict(res_scale=0.2, residual2=t["r2"], res2_scale=0.2)
    ref = fused_ridb_reference(*args, 0.2, t["r2"], 0.2)
    torch.testing.assert_close(ops.fused_ridb(*args, **kw, backend="torch"), ref, rtol=0, atol=0)
    torch.testing.assert_close(ops.fused_ridb(*args, **kw, backend="triton"), ref, rtol=1e-5, atol=1e-5)


def test_auto_times_triton_and_torch_per_ridb_shape(monkeypatch, caplog):
    """kernels=auto's CUDA path for the RIDB (AutoChooser over both backends), the device swapped:
    CPU tensors, Triton interpreted (far slower, so torch wins), unless there is a GPU; the faster
    timing wins, logged once; the chosen backend's result.
    The chooser times each backend on fresh tensors of the call's shapes: both timed calls must get them
    in the call's order (3 IDBs, so that a misplaced slice shows in a middle one, and the DNB residual)."""
    import logging

    import gafh_fast.kernels as kernels

    monkeypatch.setattr(ops, "resolve_backend", lambda backend, device: "auto")
    monkeypatch.setattr(ops, "AUTO", ops.AutoChooser(lambda fn, dev: ops.median_ms_per_call(fn, dev, 1, 1)))
    seen = []

    def spying(fn):
        def call(x0, idbs, w, b, s, r2, s2, slope=0.2):
            seen.append((x0.shape, [tuple(t.shape for t in p) for p in idbs], w.shape, b.shape, s, r2.shape, s2))
            return fn(x0, idbs, w, b, s, r2, s2, slope)
        return call

    monkeypatch.setattr(ops, "fused_ridb_reference", spying(fused_ridb_reference))
    monkeypatch.setattr(kernels, "fused_ridb_triton", spying(fused_ridb_triton))
    t, _ = make_ridb(4, 2, 3, 1, 2, 3, True, torch.float32, seed=9)
    leaves = {k: v.float().to(DEVICE).requires_grad_(True) for k, v in t.items()}
    idbs = [tuple(leaves[f"{p}_{q}"] for p in ("w1", "b1", "w2", "b2")) for q in range(3)]
    args = (leaves["x0"], idbs, leaves["w"], leaves["b"])
    kw = dict(res_scale=0.2, residual2=leaves["r2"], res2_scale=0.5, backend="auto")
    with caplog.at_level(logging.INFO, logger="gafh_fast"):
        y = ops.fused_ridb(*args, **kw)
        ops.fused_ridb(*args, **kw)
    (key, times), = ops.AUTO.timings.items()
    chosen = ops.AUTO.decisions[key]
    assert key[0] == "ridb" and set(times) == {"triton", "torch"} and chosen == min(times, key=times.get)
    assert chosen == "torch" or DEVICE == "cuda"  # the interpreter never wins
    assert sum("kernels=auto" in r.getMessage() for r in caplog.records) == 1
    want = (t["x0"].shape, [tuple(t[f"{p}_{q}"].shape for p in ("w1", "b1", "w2", "b2")) for q in range(3)],
            t["w"].shape, t["b"].shape, 0.2, t["r2"].shape, 0.5)
    assert len(seen) > 2 and all(call == want for call in seen), seen  # timed calls of both, then the real one
    tol = 0 if chosen == "torch" else 1e-5  # the reference itself, else the kernels' fp32 bound
    torch.testing.assert_close(y, fused_ridb_reference(*args, 0.2, leaves["r2"], 0.5), rtol=tol, atol=tol)


@pytest.mark.parametrize("which", ["sum_in", "sum_out", "two_outputs"])
def test_dx_running_sum_takes_one_output_of_the_results_shape(which):
    """The dX kernel's running sum (ADD_SUM) is read and written at the result's own offsets: a sum of
    another shape, or a result split over two outputs, is refused before any launch."""
    cl = dict(memory_format=torch.channels_last)
    g = torch.randn(1, 8, 3, 3, device=DEVICE).contiguous(**cl)
    w = torch.randn(8, 8, 3, 3, device=DEVICE).contiguous(**cl)
    out = torch.empty(1, 8, 3, 3, device=DEVICE).contiguous(**cl)
    other = torch.empty(1, 4, 3, 3, device=DEVICE).contiguous(**cl)
    sums = {"sum_in": (other, out), "sum_out": (out, other), "two_outputs": (out, out)}[which]
    outs = (other, other) if which == "two_outputs" else (out, None)
    launch.LAUNCHES.clear()
    with pytest.raises(ValueError, match="running sum"):
        conv3x3._dx((g, w, 0), None, *outs, None, None, 1.0, None, None, None, add_sum=(*sums, 1.0))
    assert not launch.LAUNCHES


def test_ridb_forward_without_grad_keeps_no_mask(monkeypatch):
    """Without autograd (inference) no LeakyReLU mask is written: they are only for a backward."""
    from gafh_fast.kernels import ridb

    asked = []
    real = ridb.idb_forward
    monkeypatch.setattr(ridb, "idb_forward", lambda *a, **k: asked.append(a[7]) or real(*a, **k))
    t, _ = make_ridb(8, 4, 2, 1, 3, 4, True, torch.float32, seed=15)
    leaves = {k: v.float().to(DEVICE).requires_grad_(True) for k, v in t.items()}
    with torch.no_grad():
        call_ridb(fused_ridb_triton, leaves, 2)
    call_ridb(fused_ridb_triton, leaves, 2)
    assert asked == [False, False, True, True]  # (slope at a[6], save_mask at a[7])


@pytest.mark.parametrize("path", ["eager", "custom op"])
def test_ridb_copies_each_nchw_weight_once_per_call(monkeypatch, path):
    """NCHW weights (the trainer's) are copied to the kernels' channels_last layout once per forward, and
    the backward reuses the copies (the Function saves them; the custom op returns them to its backward):
    2Q + 1 copies per forward + backward."""
    from gafh_fast.kernels import conv3x3, ridb

    if path == "custom op":
        monkeypatch.setattr(ridb, "_is_compiling", lambda: True)

    copies = []
    real = conv3x3.kernel_weight

    def counting(weight):
        out = real(weight)
        if out is not weight:
            copies.append(tuple(weight.shape))
        return out

    monkeypatch.setattr(ridb, "kernel_weight", counting)
    monkeypatch.setattr(conv3x3, "kernel_weight", counting)
    t, grad = make_ridb(8, 4, 2, 1, 3, 4, True, torch.float32, seed=12)
    leaves = {k: v.float().to(DEVICE).requires_grad_(True) for k, v in t.items()}  # weights NCHW
    call_ridb(fused_ridb_triton, leaves, 2).backward(grad.float().to(DEVICE))
    assert sorted(copies) == sorted([(4, 8, 3, 3), (8, 12, 3, 3)] * 2 + [(8, 8, 3, 3)])


def test_ridb_buffers_follow_the_inputs_device_not_the_default():
    """On a GPU a buffer made on the default device would hand a kernel a host pointer. The CPU twin
    (as test_host_code.py's for the conv and the IDB): the default device is 'meta' while the inputs stay
    put, so a buffer allocated without naming their device is a meta tensor, which the launch refuses."""
    from gafh_fast.kernels import ridb

    t, grad = make_ridb(8, 4, 2, 1, 3, 4, True, torch.float32, seed=13)
    (y_ref, g_ref), (y_abs, g_abs) = ridb_reference(t, grad, 2)
    v = {k: x.float().to(DEVICE) for k, x in t.items()}
    idbs = [tuple(v[f"{p}_{q}"] for p in ("w1", "b1", "w2", "b2")) for q in range(2)]
    with torch.device("meta"):
        w_ks = [conv3x3.kernel_weight(x) for p in idbs for x in (p[0], p[2])] + [conv3x3.kernel_weight(v["w"])]
        y, xs, h1s, m1s, m2s = ridb.ridb_forward(v["x0"], idbs, v["w"], v["b"], 0.2, v["r2"], 0.2, 0.2, True, w_ks)
        dx0, idb_grads, dw, db = ridb.ridb_backward(grad.float().to(DEVICE), xs, h1s, m1s, m2s, idbs, v["w"], w_ks,
                                                    0.2, 0.2, 0.2)
    assert_within("y", y, y_ref, y_abs, REL[torch.float32])
    got = {"x0": dx0, "w": dw, "b": db}
    for q, grads in enumerate(idb_grads):
        got.update(zip((f"w1_{q}", f"b1_{q}", f"w2_{q}", f"b2_{q}"), grads))
    for k, g in got.items():
        assert_within(f"d{k}", g, g_ref[k], g_abs[k], REL[torch.float32])

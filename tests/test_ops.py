"""fused_conv3x3's reference semantics and the backend switch."""
import logging

import pytest
import torch

from gafh_fast import ops
from gafh_fast.ops import KernelUnavailableError, fused_conv3x3, resolve_backend


def _conv3x3_by_unfold(x, w, b):
    """An independent float64 conv: im2col with F.unfold, then a matrix product."""
    n, _, h, wd = x.shape
    cols = torch.nn.functional.unfold(x, 3, padding=1)  # (N, C*9, H*W)
    y = torch.einsum("ok,nkp->nop", w.reshape(w.shape[0], -1), cols) + b.view(1, -1, 1)
    return y.view(n, w.shape[0], h, wd)


@pytest.mark.parametrize("two_inputs", [False, True])
@pytest.mark.parametrize("slope", [None, 0.2])
@pytest.mark.parametrize("r1", [False, True])
@pytest.mark.parametrize("r2", [False, True])
def test_reference_semantics(two_inputs, slope, r1, r2):
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, 5, 7, 6, generator=g, dtype=torch.float64)]
    if two_inputs:
        xs.append(torch.randn(2, 3, 7, 6, generator=g, dtype=torch.float64))
    cin = sum(x.shape[1] for x in xs)
    w = torch.randn(4, cin, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(4, generator=g, dtype=torch.float64)
    res = torch.randn(2, 4, 7, 6, generator=g, dtype=torch.float64) if r1 else None
    res2 = torch.randn(2, 4, 7, 6, generator=g, dtype=torch.float64) if r2 else None

    got = fused_conv3x3(xs, w, b, negative_slope=slope, residual=res, res_scale=0.2,
                        residual2=res2, res2_scale=0.3, backend="torch")

    want = _conv3x3_by_unfold(torch.cat(xs, 1), w, b)
    if slope is not None:
        want = torch.where(want >= 0, want, slope * want)
    if r1:
        want = res + 0.2 * want
    if r2:
        want = res2 + 0.3 * want
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_single_tensor_input_is_accepted():
    x, w, b = torch.randn(1, 2, 4, 4), torch.randn(3, 2, 3, 3), torch.randn(3)
    torch.testing.assert_close(fused_conv3x3(x, w, b, backend="torch"), fused_conv3x3([x], w, b, backend="torch"))


def test_non_3x3_weight_is_rejected():
    with pytest.raises(ValueError, match="3x3"):
        fused_conv3x3([torch.randn(1, 2, 4, 4)], torch.randn(3, 2, 5, 5), None, backend="torch")


def test_auto_is_torch_on_cpu():
    assert resolve_backend("auto", torch.device("cpu")) == "torch"


def test_explicit_triton_on_cpu_raises_clearly(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(KernelUnavailableError, match="kernels: triton was requested"):
        resolve_backend("triton", torch.device("cpu"))


def test_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match="auto"):
        resolve_backend("cudnn", torch.device("cpu"))


def test_choice_is_logged_once(caplog, monkeypatch):
    monkeypatch.setattr(ops, "_logged_choices", set())
    with caplog.at_level(logging.INFO, logger="gafh_fast"):
        for _ in range(3):
            resolve_backend("torch", torch.device("cpu"))
    assert sum("kernels=torch -> torch" in r.getMessage() for r in caplog.records) == 1


def test_unlogged_choice_stays_out_of_the_log_and_leaves_log_once_as_it_was(caplog, monkeypatch):
    monkeypatch.setattr(ops, "_logged_choices", {("auto", "torch")})
    with caplog.at_level(logging.INFO, logger="gafh_fast"):
        with ops.unlogged_choice("torch", "torch"), ops.unlogged_choice("auto", "torch"):
            resolve_backend("torch", torch.device("cpu"))
        assert not caplog.records
        resolve_backend("torch", torch.device("cpu"))  # the run's own choice: logged once, as ever
        resolve_backend("torch", torch.device("cpu"))
    assert sum("kernels=torch -> torch" in r.getMessage() for r in caplog.records) == 1
    assert ops._logged_choices == {("auto", "torch"), ("torch", "torch")}


# ---------------------------------------------------------------------------------------------
# fused_idb and kernels=auto's timed decision (the CUDA path with the device swapped for the CPU)
# ---------------------------------------------------------------------------------------------
def _idb_tensors(requires_grad=True):
    g = torch.Generator().manual_seed(2)
    shapes = [(2, 6, 5, 4), (2, 6, 5, 4), (3, 6, 3, 3), (3,), (6, 9, 3, 3), (6,)]
    return [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_(requires_grad) for s in shapes]


def test_fused_idb_reference_semantics():
    x, x0, w1, b1, w2, b2 = _idb_tensors(False)
    h1 = _conv3x3_by_unfold(x, w1, b1)
    h1 = torch.where(h1 >= 0, h1, 0.2 * h1)
    z = _conv3x3_by_unfold(torch.cat([x, h1], 1), w2, b2)
    want = x0 + torch.where(z >= 0, z, 0.2 * z)
    torch.testing.assert_close(ops.fused_idb(x, x0, w1, b1, w2, b2, backend="torch"), want, rtol=1e-12, atol=1e-12)


def test_auto_chooser_times_each_backend_once_and_logs(caplog):
    import time

    calls = {"torch": 0, "slow": 0}

    def reference(*a):
        calls["torch"] += 1
        return ops.fused_idb_reference(*a)

    def slow(*a):  # the same maths plus 50 ms: must lose, even on a loaded machine
        calls["slow"] += 1
        time.sleep(0.05)
        return ops.fused_idb_reference(*a)

    # the real timer (median of rounds of back-to-back calls), CPU tensors
    chooser = ops.AutoChooser(lambda fn, dev: ops.median_ms_per_call(fn, dev, calls=2, rounds=3))
    tensors = _idb_tensors()
    key = ops._shape_key("idb", tensors, True, 0.2)
    with caplog.at_level(logging.INFO, logger="gafh_fast"):
        assert chooser.choose(key, {"slow": slow, "torch": reference}, tensors, True) == "torch"
        first_calls = dict(calls)
        assert chooser.choose(key, {"slow": slow, "torch": reference}, tensors, True) == "torch"
    assert calls == first_calls and first_calls["torch"] == 2 + 2 * 3  # decided once per process and shape
    assert chooser.timings[key]["slow"] > chooser.timings[key]["torch"]
    logged = [r.getMessage() for r in caplog.records if "kernels=auto" in r.getMessage()]
    assert len(logged) == 1 and "-> torch" in logged[0] and "(2, 6, 5, 4)" in logged[0]
    assert all(t.grad is None for t in tensors)  # the caller's tensors are not touched


def test_auto_chooser_keeps_the_callers_rng_stream():
    torch.manual_seed(5)
    want = torch.rand(3)
    torch.manual_seed(5)
    ops.AutoChooser().choose(("k",), {"torch": ops.fused_idb_reference}, _idb_tensors(), True)
    torch.testing.assert_close(torch.rand(3), want)

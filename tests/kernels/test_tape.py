"""The RIDB's and the IDB's host code as tapes (kernels/tape.py): recorded on a call signature's second call,
replayed after.

A replay must make the plain path's launches exactly: the same kernels, launch keys, grids, constexprs and
scalars, tensors of the same shapes, strides and dtypes in the same places, each tensor argument the same
one (an input, a fresh allocation, a kept buffer) as in the plain call. Compared here launch by launch,
and the replayed outputs and gradients bit for bit against the plain path's and within the float64
reference's bounds: the RIDB on the awkward shapes of test_ridb.py, the IDB as the kernels suite calls it.
Then what must not be taped is not: host code
that runs anything but allocations and launches, a launch argument from outside the call, a call under
another dispatch mode; and what changes a launch gets its own tape (inputs that are one tensor, a
misaligned input).
"""
from __future__ import annotations

import logging

import pytest
import torch

from gafh_fast.kernels import conv3x3, fused_ridb_triton, launch, ridb, tape
from gafh_fast.kernels.launch import KernelLauncher

from .test_conv3x3 import DEVICE, assert_within
from .test_ridb import REL, call_ridb, make_ridb, ridb_reference


def _canonical(log: list) -> list:
    """Launches with each tensor as (shape, strides, dtype, the order it first appeared in): two calls
    that pass the same tensors in the same places compare equal, whatever their addresses."""
    order: dict = {}

    def canon(a):
        if isinstance(a, torch.Tensor):
            return ("T", tuple(a.shape), a.stride(), a.dtype, order.setdefault(id(a), len(order)))
        return a
    return [(name, key, tuple(grid), tuple(canon(a) for a in args), tuple(sorted(flags.items())), str(config))
            for name, key, grid, args, flags, config in log]


@pytest.fixture
def launch_log(monkeypatch):
    """Every launch (launcher name, key, grid, args, flags, config) as KernelLauncher runs it. The tensors
    are held until the test ends, so no address is reused within one log. No compiled kernel is kept (on a
    GPU a replay would launch kept ones without this method; under the interpreter none is ever kept):
    tests/test_host_launch.py runs replays through kept kernels."""
    log: list = []
    real = KernelLauncher._launch
    monkeypatch.setattr(launch, "DIRECT_LAUNCH", False)
    for launcher in launch.LAUNCHERS.values():
        launcher.forget()

    def logged(self, key, grid, args, flags, config):
        log.append((self.name, key, grid, tuple(args), dict(flags), config))
        return real(self, key, grid, args, flags, config)

    monkeypatch.setattr(KernelLauncher, "_launch", logged)
    return log


def _leaves(t, dtype, weight_layout, input_layout):
    leaves = {}
    for k, v in t.items():
        v = v.to(dtype).to(DEVICE)
        is_input = k in ("x0", "r2")
        if v.dim() == 4 and ((is_input and input_layout == "channels_last") or
                             (not is_input and weight_layout == "channels_last")):
            v = v.contiguous(memory_format=torch.channels_last)
        leaves[k] = v.requires_grad_(True)
    return leaves


def _forward_backward(leaves, grad, q_n):
    y = call_ridb(fused_ridb_triton, leaves, q_n)
    return [y.detach(), *torch.autograd.grad(y, list(leaves.values()), grad)]


@pytest.mark.parametrize("nf, gc, q_n, n, h, w, r2, dtype, weight_layout, input_layout", [
    (16, 8, 2, 2, 5, 7, True, torch.float32, "nchw", "nchw"),  # NCHW everything (copies outside the tape)
    (12, 20, 2, 1, 3, 5, False, torch.bfloat16, "channels_last", "channels_last"),  # gc > nf, bf16, weights in place
    (16, 8, 1, 1, 2, 3, True, torch.float32, "channels_last", "nchw"),  # NCHW input, weights in place, the residual
    # (the kernels' two-K-block case, nf 72, is test_ridb.py's: a tape replays whatever launches the shape makes)
    (8, 8, 1, 1, 1, 1, False, torch.float32, "channels_last", "channels_last"),  # 1x1
])
def test_replay_makes_the_plain_paths_launches(launch_log, monkeypatch, nf, gc, q_n, n, h, w, r2, dtype,
                                               weight_layout, input_layout):
    t, grad64 = make_ridb(nf, gc, q_n, n, h, w, r2, dtype, seed=5)
    (y_ref, g_ref), (y_abs, g_abs) = ridb_reference(t, grad64, q_n)
    grad = grad64.to(dtype).to(DEVICE)
    if input_layout == "channels_last":
        grad = grad.contiguous(memory_format=torch.channels_last)
    conv3x3.drop_scratch()  # no tape of an earlier test at these shapes
    taped_calls = []
    for taped in (ridb._RIDB_FORWARD, ridb._RIDB_BACKWARD):
        monkeypatch.setattr(taped, "fn", lambda *a, fn=taped.fn: taped_calls.append(fn) or fn(*a))

    monkeypatch.setattr(tape, "USE_TAPES", False)
    plain = _forward_backward(_leaves(t, dtype, weight_layout, input_layout), grad, q_n)
    plain_log = _canonical(launch_log)
    monkeypatch.setattr(tape, "USE_TAPES", True)
    for _ in range(2):  # the signature's first call, then the recording
        _forward_backward(_leaves(t, dtype, weight_layout, input_layout), grad, q_n)
    assert set(ridb._RIDB_FORWARD.state().values()) == {2 * q_n + 1}  # taped: 2Q + 1 launches
    assert set(ridb._RIDB_BACKWARD.state().values()) == {3 * q_n + 2}
    del launch_log[:]
    del taped_calls[:]
    leaves = _leaves(t, dtype, weight_layout, input_layout)
    replayed = _forward_backward(leaves, grad, q_n)
    assert taped_calls == []  # the host code did not run: the tapes did
    assert _canonical(launch_log) == plain_log
    for name, got, want in zip(["y", *leaves], replayed, plain):
        assert torch.equal(got, want), name
        assert got.stride() == want.stride(), name
    rel = REL[dtype]
    assert_within("y", replayed[0], y_ref, y_abs, rel)
    for k, g in zip(leaves, replayed[1:]):
        assert_within(f"d{k}", g, g_ref[k], g_abs[k], rel)


@pytest.mark.parametrize("weight_layout, same_x, expand_grad", [
    ("nchw", False, False),  # the weights copied outside the tape
    ("channels_last", True, True),  # x is x0 (one tensor, two slots); the gradient of a .sum(): copied outside
])
def test_idb_replay_makes_the_plain_paths_launches(launch_log, monkeypatch, weight_layout, same_x, expand_grad):
    """The standalone IDB (kernels/op.py's tapes) the same way, as bench/kernels_suite.py's idb_fwd_bwd calls it."""
    from gafh_fast.kernels import fused_idb_triton, op

    from .test_idb import idb_reference, make_idb

    t, grad64 = make_idb(16, 8, 2, 3, 5, torch.float32, seed=7)
    if same_x:
        t["x0"] = t["x"]
    if expand_grad:  # a .sum()'s gradient: ones, all strides 0
        grad64 = torch.ones_like(grad64)
        grad = torch.ones((), dtype=torch.float32).expand(grad64.shape)
    else:
        grad = grad64.float()
    (y_ref, g_ref), (y_abs, g_abs) = idb_reference(t, grad64, same_x)
    conv3x3.drop_scratch()

    def forward_backward():
        leaves = {}
        for k, v in t.items():
            if k == "x0" and same_x:
                continue
            v = v.float().to(DEVICE)
            if v.dim() == 4 and (k in ("x", "x0") or weight_layout == "channels_last"):
                v = v.contiguous(memory_format=torch.channels_last)
            leaves[k] = v.requires_grad_(True)
        x0 = leaves["x"] if same_x else leaves["x0"]
        y = fused_idb_triton(leaves["x"], x0, leaves["w1"], leaves["b1"], leaves["w2"], leaves["b2"], 0.2)
        return leaves, [y.detach(), *torch.autograd.grad(y, list(leaves.values()), grad.to(DEVICE))]

    monkeypatch.setattr(tape, "USE_TAPES", False)
    _, plain = forward_backward()
    plain_log = _canonical(launch_log)
    monkeypatch.setattr(tape, "USE_TAPES", True)
    for _ in range(2):
        forward_backward()
    assert list(op._IDB_FORWARD.state().values()) == [2] and list(op._IDB_BACKWARD.state().values()) == [4]
    del launch_log[:]
    leaves, replayed = forward_backward()
    assert _canonical(launch_log) == plain_log
    for name, got, want in zip(["y", *leaves], replayed, plain):
        assert torch.equal(got, want) and got.stride() == want.stride(), name
    assert_within("y", replayed[0], y_ref, y_abs, 1e-5)
    for k, g in zip(leaves, replayed[1:]):
        assert_within(f"d{k}", g, g_ref[k], g_abs[k], 1e-5)


def _conv_taped(fn):
    return tape.Taped(fn, "a test's conv", conv3x3.kept_scratch)


def _small_conv():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 8, 3, 4, generator=gen).to(DEVICE).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(8, 8, 3, 3, generator=gen) / 8).to(DEVICE).contiguous(memory_format=torch.channels_last)
    b = torch.randn(8, generator=gen).to(DEVICE)
    return x, w, b


def _reference_conv(x, w, b, residual):
    return residual + torch.nn.functional.leaky_relu(torch.nn.functional.conv2d(x, w, b, padding=1), 0.2)


def test_host_code_that_fills_or_reads_an_outside_tensor_is_not_taped(caplog):
    x, w, b = _small_conv()

    def fills(inputs):
        y, _ = conv3x3.conv_forward(inputs[:1], inputs[1], inputs[2], 0.2, inputs[0], 1.0, None, 1.0, False)
        return [y, torch.zeros(2, device=y.device)]  # a fill: not an allocation

    def outside(inputs):  # w is read by the launch but is not one of the inputs
        return [conv3x3.conv_forward(inputs[:1], w, inputs[1], 0.2, inputs[0], 1.0, None, 1.0, False)[0]]

    for fn, inputs, reason in ((fills, [x, w, b], "zero"), (outside, [x, b], "neither an input")):
        taped = _conv_taped(fn)
        with caplog.at_level(logging.WARNING, logger="gafh_fast"):
            outs = [taped(("k",), inputs)[0] for _ in range(3)]
        assert list(taped.state().values()) == ["plain"]
        assert reason in caplog.text and "not taped" in caplog.text
        for y in outs:  # every call ran the plain path: correct, and each its own tensor
            torch.testing.assert_close(y, _reference_conv(x, w, b, x), rtol=1e-5, atol=1e-5)
        assert len({y.data_ptr() for y in outs}) == 3
        caplog.clear()


def test_one_tensor_twice_and_a_misaligned_input_get_their_own_tapes():
    """Slots are by identity, and launch keys hold the inputs' alignment: a call whose residual is its input
    (one tensor in two slots), then one with another residual, then one with a residual 4 bytes off a
    16-byte line, each replayed against its own recording."""
    x, w, b = _small_conv()
    taped = _conv_taped(lambda inputs: [conv3x3.conv_forward(inputs[:1], inputs[1], inputs[2], 0.2, inputs[3], 1.0,
                                                             None, 1.0, False)[0]])
    other = torch.randn_like(x)
    store = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
    shifted = store[1:].view(1, 3, 4, 8).permute(0, 3, 1, 2)  # channels_last, 4 bytes into the line
    shifted.copy_(other)
    assert shifted.is_contiguous(memory_format=torch.channels_last) and shifted.data_ptr() % 16
    for residual in (x, other, shifted):
        for _ in range(4):  # seen, recorded, replayed twice
            got = taped(("k",), [x, w, b, residual])[0]
            torch.testing.assert_close(got, _reference_conv(x, w, b, residual), rtol=1e-5, atol=1e-5)
    assert sorted(taped.state().values()) == [1, 1, 1]


def test_no_recording_under_another_dispatch_mode_and_set_tuner_forgets():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    x, w, b = _small_conv()
    taped = _conv_taped(lambda inputs: [conv3x3.conv_forward(inputs[:1], inputs[1], inputs[2], 0.2, inputs[0], 1.0,
                                                             None, 1.0, False)[0]])
    with Passthrough():
        for _ in range(3):
            taped(("k",), [x, w, b])
    assert list(taped.state().values()) == ["seen"]
    for _ in range(2):
        taped(("k",), [x, w, b])
    assert list(taped.state().values()) == [1]
    old = conv3x3.set_tuner(conv3x3.tuner())  # plans dropped: the tapes' plan ids and kept buffers with them
    conv3x3.set_tuner(old)
    assert taped.state() == {}
    assert launch.RECORDING is None

"""Every load and store of the kernels stays inside the tensors the launch passed.

A masked-off lane that is read anyway (a mask with | for &, or <= for <) changes no value when the
lane is multiplied by zero, so the value tests cannot see it; on a GPU it reads past a buffer (an
illegal address, or garbage where the mask's zero is not applied). Under the interpreter every load
and store goes through InterpreterBuilder.create_masked_load / create_masked_store with the lanes'
addresses and mask: this test wraps both and checks each active lane against the byte ranges of the
launch's tensor arguments (the interpreter reads CPU tensors in place, at the same addresses).
Shapes are awkward on purpose: pixel tiles cut by the image, channel counts that are multiples of 8
but not of the K block (the mask byte after the last one), partial channel tiles.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gafh_fast.kernels import conv3x3, launch
from gafh_fast.kernels.conv3x3_fwd import INTERPRETING

from .test_conv3x3 import check_case
from .test_idb import _Gz2WayTuner, run_idb

pytestmark = pytest.mark.skipif(not INTERPRETING, reason="hooks the Triton interpreter's loads and stores")


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    span = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + span * t.element_size()


@pytest.fixture
def bounds_checked(monkeypatch):
    import triton.runtime.interpreter as interpreter

    state = {"kernel": None, "ranges": [], "lanes": 0, "violations": []}
    real_launch = launch.KernelLauncher.launch

    def checked_launch(self, key, grid, args, flags, config):
        state["kernel"] = self.name
        state["ranges"] = [_byte_range(a) for a in args if isinstance(a, torch.Tensor) and a.numel() > 0]
        try:
            return real_launch(self, key, grid, args, flags, config)
        finally:
            state["kernel"], state["ranges"] = None, []

    def check(kind, ptrs, mask):
        if state["kernel"] is None:
            return
        addr = np.broadcast_to(ptrs.data, mask.data.shape)[mask.data].astype(np.uint64)
        size = np.uint64(ptrs.get_element_ty().primitive_bitwidth // 8)
        inside = np.zeros(addr.shape, dtype=bool)
        for lo, hi in state["ranges"]:
            inside |= (addr >= np.uint64(lo)) & (addr + size <= np.uint64(hi))
        state["lanes"] += addr.size
        if not inside.all():
            state["violations"].append(f"{state['kernel']}: {kind} of {int((~inside).sum())} lanes outside every "
                                       f"tensor (first address {int(addr[~inside][0]):#x})")

    real_load, real_store = interpreter.InterpreterBuilder.create_masked_load, \
        interpreter.InterpreterBuilder.create_masked_store

    def load(self, ptrs, mask, other, cache_policy, is_volatile):
        check("load", ptrs, mask)
        return real_load(self, ptrs, mask, other, cache_policy, is_volatile)

    def store(self, ptrs, value, mask, cache_policy):
        check("store", ptrs, mask)
        return real_store(self, ptrs, value, mask, cache_policy)

    monkeypatch.setattr(launch.KernelLauncher, "launch", checked_launch)
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_load", load)
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_store", store)
    yield state
    assert state["lanes"] > 0, "the interpreter hook saw no load or store: the check did not run"
    assert not state["violations"], "\n".join(state["violations"][:10])


def test_conv_with_activation_stays_in_bounds(bounds_checked):
    """C_out 24: the activation mask has 3 bytes per pixel and the dX K block is 32 wide, so the gz
    write's channel lanes 24..31 would reach the byte after a pixel's mask (past the end for the last)."""
    check_case([8, 5], 24, 2, 5, 7, slope=0.2, r1=True, r2=True)


def test_conv_without_activation_stays_in_bounds(bounds_checked):
    check_case([3], 17, 1, 5, 7, slope=None, r1=True)


def test_single_channel_operands_stay_in_bounds(bounds_checked):
    """One channel per input and out (16-wide channel blocks, 1 = 1 mod 16): the dW loop's channel masks
    (EVEN_C1 / EVEN_C2 / EVEN_CO false here) keep its loads inside x1, x2 and g."""
    check_case([1, 1], 1, 1, 3, 5, slope=None, r1=True)


@pytest.mark.parametrize("gz_pass", [True, False])
def test_idb_stays_in_bounds(bounds_checked, gz_pass):
    """nf 8 (one mask byte, K block 16) and gc 12 (two mask bytes, the second half used); dW2 and dW1 in
    one launch on 16-wide input-channel tiles of 8 and 12 channels; gz2 by its pass, or by gz1's launch."""
    old = conv3x3.set_tuner(_Gz2WayTuner(gz_pass))
    try:
        assert run_idb(8, 12, 2, 3, 5, torch.float32) == (6 if gz_pass else 5)
    finally:
        conv3x3.set_tuner(old)

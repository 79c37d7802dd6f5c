"""Without a GPU the kernels run in Triton's interpreter, which must be on before they are defined.

On a GPU every test but test_tuning.py::test_autotune_on_gpu takes each kernel's first heuristic
candidate without timing, so the GPU kernel-test stage (60 s) compiles one config per shape.

The interpreter ignores tl.dot's input_precision (a numpy matmul in full fp32), so a kernel that asks
for "tf32" on the fp32 exactness path would pass every CPU test. A GPU's tensor cores read fp32
operands of a tf32 dot with 10 mantissa bits; emulate that here (test_tf32_is_emulated checks it), so
the fp32 tests' 1e-5 bounds see a tf32 request on the CPU too. bf16 operands (the interpreter path
upcasts them to fp32) have 7 mantissa bits, which tf32 holds exactly: bf16 results are unchanged.
"""
import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _round_to_tf32(data: np.ndarray) -> np.ndarray:
    """fp32 -> the nearest value with 10 mantissa bits (ties to even); inf and nan unchanged."""
    bits = np.ascontiguousarray(data, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0xFFF) + ((bits >> np.uint32(13)) & np.uint32(1))) & np.uint32(0xFFFFE000)
    special = (bits & np.uint32(0x7F800000)) == np.uint32(0x7F800000)
    return np.where(special, bits, rounded).view(np.float32)


def _emulate_tf32_dots() -> None:
    import triton.language as tl
    import triton.runtime.interpreter as interpreter
    from triton._C.libtriton import ir

    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "emulates_tf32", False):
        return
    plain_dot = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if input_precision == ir.INPUT_PRECISION.TF32 and a.dtype == tl.float32 and b.dtype == tl.float32:
            a = interpreter.TensorHandle(_round_to_tf32(a.data), a.dtype)
            b = interpreter.TensorHandle(_round_to_tf32(b.data), b.dtype)
        return plain_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    create_dot.emulates_tf32 = True
    builder.create_dot = create_dot


if os.environ.get("TRITON_INTERPRET") == "1":
    _emulate_tf32_dots()


@pytest.fixture(autouse=True)
def _pinned_configs():
    from gafh_fast.kernels import conv3x3

    saved = conv3x3.AUTOTUNE
    conv3x3.AUTOTUNE = False
    yield
    conv3x3.AUTOTUNE = saved

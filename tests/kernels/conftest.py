"""Without a GPU the kernels run in Triton's interpreter, which must be on before they are defined.

On a GPU every test but test_tuning.py::test_autotune_on_gpu takes each kernel's first heuristic
candidate without timing, so the GPU kernel-test stage (60 s) compiles one config per shape."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _pinned_configs():
    from gafh_fast.kernels import conv3x3

    saved = conv3x3.AUTOTUNE
    conv3x3.AUTOTUNE = False
    yield
    conv3x3.AUTOTUNE = saved

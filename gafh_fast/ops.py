"""The one switch between the plain-PyTorch reference and the fused Triton kernels.

Every 3x3 convolution of the generator trunk calls `fused_conv3x3`. Its `torch` backend below is the
reference semantics; the `triton` backend (gafh_fast.kernels) computes the same thing in one pass.
"""
from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

log = logging.getLogger("gafh_fast")

BACKENDS = ("auto", "triton", "torch")
_logged_choices: set[tuple[str, str]] = set()


class KernelUnavailableError(RuntimeError):
    """An explicit `kernels: triton` request that this process cannot honour."""


def _triton_interpreting() -> bool:
    # Not a switch: the Triton interpreter is the only way Triton can run on CPU tensors, so this
    # tells whether a `triton` request can be honoured there (the kernel tests use it).
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_unavailable_reason(device: torch.device) -> Optional[str]:
    """None when the Triton kernels can run on `device`, else a sentence saying why not."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not importable ({e}); install triton>=3.0"
    if device.type == "cuda":
        return None
    if _triton_interpreting():
        return None
    return (
        f"tensors are on {device.type!r}; the Triton kernels need CUDA tensors "
        "(or TRITON_INTERPRET=1 set before start-up, for CPU testing only)"
    )


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map `auto | triton | torch` to the backend that will run; log each choice once per process."""
    if backend not in BACKENDS:
        raise ValueError(f"kernels backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        chosen = "triton" if device.type == "cuda" and triton_unavailable_reason(device) is None else "torch"
    elif backend == "triton":
        reason = triton_unavailable_reason(device)
        if reason is not None:
            raise KernelUnavailableError(f"kernels: triton was requested but cannot run: {reason}")
        chosen = "triton"
    else:
        chosen = "torch"
    # Logging inside a torch.compile trace is a graph break (fullgraph=True fails): log from eager calls.
    if (backend, chosen) not in _logged_choices and not torch.compiler.is_compiling():
        _logged_choices.add((backend, chosen))
        log.info("fused_conv3x3: kernels=%s -> %s backend on %s", backend, chosen, device.type)
    return chosen


def fused_conv3x3_reference(
    inputs: Sequence[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    negative_slope: Optional[float] = 0.2,
    residual: Optional[torch.Tensor] = None,
    res_scale: float = 1.0,
    residual2: Optional[torch.Tensor] = None,
    res2_scale: float = 1.0,
) -> torch.Tensor:
    """Plain PyTorch, straight from the spec's table 'What the fused kernels cover'."""
    x = inputs[0] if len(inputs) == 1 else torch.cat(list(inputs), dim=1)
    y = F.conv2d(x, weight, bias, padding=1)
    if negative_slope is not None:
        y = F.leaky_relu(y, negative_slope)
    if residual is not None:
        y = residual + res_scale * y
    if residual2 is not None:
        y = residual2 + res2_scale * y
    return y


def fused_conv3x3(
    inputs: Sequence[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    *,
    negative_slope: Optional[float] = 0.2,
    residual: Optional[torch.Tensor] = None,
    res_scale: float = 1.0,
    residual2: Optional[torch.Tensor] = None,
    res2_scale: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """y = act(conv3x3(cat(inputs, 1), weight) + bias); y = residual + res_scale*y; y = residual2 + res2_scale*y.

    inputs: one or two (N, C_i, H, W) tensors, read as if concatenated on channels (never copied by
    the triton backend). weight: (C_out, sum C_i, 3, 3). negative_slope=None: no activation.
    """
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if weight.shape[-2:] != (3, 3):
        raise ValueError(f"fused_conv3x3 takes 3x3 weights, got {tuple(weight.shape)}")
    chosen = resolve_backend(backend, inputs[0].device)
    if chosen == "torch":
        return fused_conv3x3_reference(
            inputs, weight, bias, negative_slope, residual, res_scale, residual2, res2_scale
        )
    from gafh_fast.kernels import fused_conv3x3_triton

    return fused_conv3x3_triton(
        list(inputs), weight, bias, negative_slope, residual, res_scale, residual2, res2_scale
    )

"""Fused Triton kernels for the generator trunk (installed as gafh_fast.kernels).

`fused_conv3x3_triton` is the `triton` backend of gafh_fast.ops.fused_conv3x3: concat-free
conv3x3 + bias + LeakyReLU + up to two scaled residual adds, forward and backward, as torch custom
ops (gafh_fast::fused_conv3x3_fwd / _bwd). Backend choice and logging live in gafh_fast.ops.
"""
from .op import fused_conv3x3_triton

__all__ = ["fused_conv3x3_triton"]

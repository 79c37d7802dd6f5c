"""Fused Triton kernels for the generator trunk (installed as gafh_fast.kernels).

`fused_conv3x3_triton` is the `triton` backend of gafh_fast.ops.fused_conv3x3 (concat-free conv3x3 +
bias + LeakyReLU + up to two scaled residual adds), `fused_idb_triton` that of gafh_fast.ops.fused_idb
(one internal dense block: two convs, 2 launches forward and 4 backward), `fused_ridb_triton` that of
gafh_fast.ops.fused_ridb (a whole RIDB as one autograd Function, kernels/ridb.py). All three are torch
custom ops under torch.compile. Backend choice and logging live in gafh_fast.ops.
"""
from .op import fused_conv3x3_triton, fused_idb_triton
from .ridb import fused_ridb_triton

__all__ = ["fused_conv3x3_triton", "fused_idb_triton", "fused_ridb_triton"]

"""Fused Triton kernels for the generator trunk (installed as gafh_fast.kernels).

`fused_conv3x3_triton` is the `triton` backend of gafh_fast.ops.fused_conv3x3 (concat-free conv3x3 +
bias + LeakyReLU + up to two scaled residual adds), `fused_idb_triton` that of gafh_fast.ops.fused_idb
(one internal dense block: two convs, 2 launches forward and 4 backward), `fused_ridb_triton` that of
gafh_fast.ops.fused_ridb (a whole RIDB as one autograd Function, kernels/ridb.py), `fused_upconv3x3_triton`
that of gafh_fast.ops.fused_upconv3x3 (nearest x2 + conv3x3 + LeakyReLU by sub-pixel phases,
kernels/upconv.py), `fused_out_conv_triton` that of gafh_fast.ops.fused_out_conv (the output layer,
tanh(convKxK) with few output channels: the backward in Triton, kernels/outconv.py),
`fused_up_out_conv_triton` that of gafh_fast.ops.fused_up_out_conv (the last upsampling step and the output
layer as one op, the gradient handed between them in the output layer's dX epilogue: kernels/upout.py).
All six are torch custom ops under torch.compile. Backend choice and logging live in gafh_fast.ops.
"""
import hashlib
import os

import torch

from .op import fused_conv3x3_triton, fused_idb_triton
from .ridb import fused_ridb_triton
from .outconv import fused_out_conv_triton
from .upconv import fused_upconv3x3_triton
from .upout import fused_up_out_conv_triton

__all__ = ["fused_conv3x3_triton", "fused_idb_triton", "fused_ridb_triton", "fused_upconv3x3_triton",
           "fused_out_conv_triton", "fused_up_out_conv_triton"]

# torch.compile's caches (FX graph, AOTAutograd) key a graph that calls our custom ops on the op names and
# schemas, not on the Python behind them: after a change to an op's autograd formula or fake, a warm cache
# replays a backward graph written for the old one (seen here: the RIDB backward op gained an argument and
# the cached graph called it without). The source of the files that define the ops goes into the key.
OPS_SOURCE_HASH = hashlib.sha256(b"".join(
    open(os.path.join(os.path.dirname(__file__), name), "rb").read() for name in ("op.py", "ridb.py", "upconv.py", "outconv.py",
                                                                                  "upout.py"))).hexdigest()[:16]
_TAG = f"gafh_fast-ops-{OPS_SOURCE_HASH}"
_config = getattr(torch.compiler, "config", None)  # torch < 2.6 has no cache tag (nor these caches by default)
if _config is not None and hasattr(_config, "cache_key_tag") and _TAG not in _config.cache_key_tag:
    _config.cache_key_tag = "|".join(t for t in (_config.cache_key_tag, _TAG) if t)  # the user's tag is kept

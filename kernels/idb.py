"""Host code of the fused IDB: h1 = act(conv1(x)); y = x0 + act(conv2([x, h1])), 2 launches forward and
3-4 backward, built from conv3x3.py's launches (the standalone IDB, kernels/op.py, and each IDB of a fused
RIDB, kernels/ridb.py).

Backward, in launch order:
  1. gz1 = dX2[h1's channels] * act1', from gz2 = g * act2'. In a RIDB gz2 comes ready from the launch
     before (OUT_ACT). For a standalone IDB the raw g arrives, and gz2 is made either by a pass of its own
     (conv3x3_bwd_gz_kernel) before a plain dX, or on the dX's operand at every tap (A_ACT) and written
     out: the tuner times both once per shape (_gz2_way).
  2. dW2 (over x and h1, from gz2) and dW1 (over x, from gz1) in one launch (the dW kernel's job B).
  3. dx: conv2's and conv1's shares in one implicit GEMM, plus both dW/db reductions in extra programs.
"""
from __future__ import annotations

import triton

from . import configs
from .conv3x3 import (_PLANS, Finalize, _choose, _cl, _dw_partials, _dx, _empty_cl, _grad_like,
                      _scratch_cl, conv_forward, launch_gz)


def idb_forward(x, x0, w1, b1, w2, b2, slope: float, save_mask: bool, w1_k=None, w2_k=None):
    """(y, h1, mask1, mask2)."""
    h1, mask1 = conv_forward([x], w1, b1, slope, None, 1.0, None, 1.0, save_mask, w_k=w1_k)
    y, mask2 = conv_forward([x, h1], w2, b2, slope, x0, 1.0, None, 1.0, save_mask, w_k=w2_k)
    return y, h1, mask1, mask2


def idb_grad_buffers(w1, w1_k, w2, w2_k) -> tuple:
    """(dW1, db1, dW2, db2) of one IDB: dW in the parameter's own layout (_grad_like), db in its dtype."""
    return (_grad_like(w1, w1_k), w1_k.new_empty((w1_k.shape[0],)),
            _grad_like(w2, w2_k), w2_k.new_empty((w2_k.shape[0],)))


def idb_backward_launches(g, a_mask, x, h1, w1_k, w2_k, mask1, slope: float, grads: tuple, out,
                          omask=None, add_sum=None, store_out: bool = True) -> None:
    """The IDB's backward launches into grads = idb_grad_buffers(...) and out (dL/dx): gz1, then dW2 and
    dW1 in one launch, then dx + both finalizes (3).
    g: gz2 itself (a_mask None), or the raw upstream gradient with conv2's mask a_mask; gz2 = g * act2'
    is then made either by a pass of its own before a plain gz1 launch (4 launches), or by the gz1
    launch on its operand at every tap, written out for dW (A_ACT; 3): _gz2_way times both once per
    shape. omask / add_sum / store_out: the dx launch's epilogue (_dx; a fused RIDB hands the result on
    with them, ridb.py)."""
    n, nf, h, w = x.shape
    dw1, db1, dw2, db2 = grads
    gz1 = _scratch_cl("gz1", n, h1.shape[1], h, w, x)
    if a_mask is None:
        gz2 = g  # gz1 = dX2[h1 channels] * act1'
        _dx((gz2, w2_k, nf), None, gz1, None, mask1, slope, 1.0, None, None, None)
    else:
        gz2 = _scratch_cl("gz2", n, nf, h, w, x)
        _gz1_launches(_gz2_way(g, a_mask, gz2, w2_k, gz1, mask1, slope), g, a_mask, gz2, w2_k, gz1, mask1, slope)
    dwp2, dbp2, split, dwp1, dbp1 = _dw_partials(x, h1, gz2, True, None, None, job_b=(x, gz1))
    _dx((gz2, w2_k, 0), (gz1, w1_k, 0), out, None, omask, slope, 1.0,
        Finalize(dwp2, dbp2, dw2, db2, split, 1.0), Finalize(dwp1, dbp1, dw1, db1, split, 1.0), None,
        add_sum=add_sum, store_out=store_out)


def _gz2_way(g, a_mask, gz2, w2_k, gz1, mask1, slope: float) -> triton.Config:
    """The standalone IDB's first backward step, chosen once per shape (timed on a GPU): the gz1 launch's
    tile, and GZ_PASS: gz2 made by a pass of its own (then a plain dX), or on the dX's operand (A_ACT,
    ~4x the instructions per wgmma of a plain dX in the sm_90 report; on the H200 that launch was 10.2x its
    floor, the furthest of the IDB's six: bench/RESULTS.md, D1)."""
    n, nf, h, w = g.shape
    key = ("idb_gz2", g.shape, gz1.shape[1], g.dtype, g.device)
    plan = _PLANS.get(key)
    if plan is None:
        m = n * h * w

        def run(c):
            _gz1_launches(c, g, a_mask, gz2, w2_k, gz1, mask1, slope)

        cfg = _choose("idb_gz2", (nf, gz1.shape[1], w, configs.m_bucket(m), str(g.dtype)),
                      configs.idb_gz2_candidates(nf, gz1.shape[1], w, m), run, None)
        plan = _PLANS[key] = (cfg,)  # plan_configs reports it; no launch of its own, so no plan id
    return plan[0]


def _gz1_launches(cfg: triton.Config, g, a_mask, gz2, w2_k, gz1, mask1, slope: float) -> None:
    """gz2 from g and gz1 = dX2[h1 channels] * act1', the way cfg says (_gz2_way), with cfg's tile."""
    nf = g.shape[1]
    tile, gz_pass = configs.split_gz_pass(cfg)
    if gz_pass:
        launch_gz(g, a_mask, gz2, slope)
        _dx((gz2, w2_k, nf), None, gz1, None, mask1, slope, 1.0, None, None, tile)
    else:
        _dx((g, w2_k, nf), None, gz1, None, mask1, slope, 1.0, None, None, tile, a_mask=a_mask, gz_out=gz2)


def idb_backward(grad, x, h1, w1, w1_k, w2, w2_k, mask1, mask2, slope: float, x_is_x0: bool = False):
    """(dx, dW1, db1, dW2, db2); dx0 is the upstream gradient itself (residual scale 1). x_is_x0: x and x0
    are one tensor, and dx comes back with dx0 already added (the dx launch's epilogue reads g once more,
    instead of autograd adding the two gradients in a launch of its own)."""
    x = _cl(x)
    n, nf, h, w = x.shape
    grads = idb_grad_buffers(w1, w1_k, w2, w2_k)
    dx = _empty_cl(n, nf, h, w, x)
    if n * h * w == 0:
        return (dx, *(t.zero_() for t in grads))
    g = _cl(grad)
    idb_backward_launches(g, mask2, x, h1, w1_k, w2_k, mask1, slope, grads, dx,
                          add_sum=(g, dx, 1.0) if x_is_x0 else None, store_out=not x_is_x0)
    return (dx, *grads)

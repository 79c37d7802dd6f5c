"""The fused RIDB: its 4 IDBs and its closing conv as one autograd Function (gafh_fast.ops.fused_ridb).

    x_1 = x0;  x_{q+1} = x0 + LReLU(conv2_q([x_q, LReLU(conv1_q(x_q))]))   (q = 1..Q)
    out = r2 + s2*(x0 + s*conv(x_{Q+1}))            (r2/s2: the DNB's outer residual, when given)

Why one Function per RIDB rather than one per IDB (issue 11: "one autograd Function per IDB or per
fused group"): the group's backward knows which tensor each gradient feeds next, so
  * the running gradient of x0 (it reaches every IDB's residual and the first IDB's input: Q + 2
    terms) is summed in the dX launches' epilogues (ADD_SUM), not by Q + 1 autograd adds;
  * the gradient G_{q+1} = dL/dx_{q+1} is never written as such: the launch that makes it (IDB q+1's
    dx, or the closing conv's dX) writes gz2_q = G_{q+1} * LReLU'(z2_q) straight away (OUT_ACT), so
    IDB q's first backward launch reads a ready gz2 instead of making it from g and a mask in its
    GEMM loop (the A_ACT dX, ~4x the instructions per wgmma of a plain one: bench/RESULTS.md);
  * PyTorch's autograd builds and walks one node per RIDB instead of Q + 1.
Launches: forward 2Q + 1; backward 4Q + 2 (the closing conv: dW, then dX + finalize; each IDB: gz1 dX,
dW2, dW1, dx + finalize), the same count as per-IDB Functions, without the autograd adds.
The host code of a forward and of a backward runs as a tape (tape.py): per call signature, its launches
are recorded once and then replayed, only the tensors' addresses new.
Eager calls go through the autograd Function; under torch.compile (the trainer compiles G's DNBs on
CUDA) the same host code runs as the custom ops gafh_fast::fused_ridb_fwd / fused_ridb_bwd, one opaque
node per RIDB.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .conv3x3 import (Finalize, _cl, _dw_partials, _dx, _empty_cl, _grad_like, _scratch_cl, check_args, cl_strides,
                      conv_forward, dw_strides, kept_buffers, kernel_weight, reads_in_place)
from .conv3x3_fwd import mask_shape
from .idb import idb_backward_launches, idb_forward, idb_grad_buffers
from .op import _needs_grad, check_idb_args
from .tape import Taped

# torch.compiler.is_compiling under a name of this module: the custom-op tests replace it here. Replacing
# torch.compiler's own attribute leaked into later tests: Dynamo keys its special case on the function
# object it first sees, and then refused the real one ("marked as skipped").
_is_compiling = torch.compiler.is_compiling


def _conv_weights(idbs: Sequence[tuple], w: Optional[torch.Tensor] = None) -> list:
    """The RIDB's conv weights in the order the kernel weights (w_ks) follow: w1, w2 per IDB, then w if given."""
    return [t for p in idbs for t in (p[0], p[2])] + ([w] if w is not None else [])


def ridb_forward(x0, idbs, w, b, res_scale: float, r2, res2_scale: float, slope: float, save_mask: bool,
                 w_ks: Optional[list] = None):
    """(out, xs, h1s, mask1s, mask2s): xs[q] is IDB q's input (xs[0] = x0, xs[Q] the closing conv's).
    idbs: [(w1, b1, w2, b2)] per IDB; w_ks: kernel_weight of every weight in the order w1, w2 per IDB, w.
    The launches go through a tape (tape.py): recorded on a signature's second call, replayed after."""
    q_n = len(idbs)
    x0 = _cl(x0)  # once: every IDB and the closing conv read it, and the backward's dW launches need it so
    r2 = _cl(r2) if r2 is not None else None
    w_ks = w_ks or [kernel_weight(t) for t in _conv_weights(idbs, w)]
    biases = [t for p in idbs for t in (p[1], p[3])] + [b]
    has_bias = tuple(t is not None for t in biases)
    key = (x0.shape, x0.dtype, x0.device, r2 is not None, has_bias, tuple(t.shape for t in w_ks),
           tuple(t.stride() for t in w_ks), float(res_scale), float(res2_scale), float(slope), bool(save_mask))
    inputs = [x0, *w_ks, *(t for t in biases if t is not None)] + ([r2] if r2 is not None else [])
    flat = _RIDB_FORWARD(key, inputs, q_n, has_bias, res_scale, res2_scale, slope, save_mask)
    return flat[0], [x0, *flat[1:1 + q_n]], *_split(flat[1 + q_n:], q_n, q_n, q_n)


def _ridb_forward_launches(inputs, q_n: int, has_bias: tuple, res_scale, res2_scale, slope, save_mask) -> list:
    """ridb_forward's allocations and launches: inputs [x0, w_k per conv, the biases present, r2 if any]
    -> [out, x_2 .. x_{Q+1}, h1s, mask1s, mask2s]."""
    x0, w_ks = inputs[0], inputs[1:2 * q_n + 2]
    rest = iter(inputs[2 * q_n + 2:])
    biases = [next(rest) if present else None for present in has_bias]
    r2 = next(rest, None)
    xs, h1s, m1s, m2s = [x0], [], [], []
    for q in range(q_n):
        y, h1, m1, m2 = idb_forward(xs[q], x0, w_ks[2 * q], biases[2 * q], w_ks[2 * q + 1], biases[2 * q + 1], slope,
                                    save_mask, w1_k=w_ks[2 * q], w2_k=w_ks[2 * q + 1])
        xs.append(y)
        h1s.append(h1)
        m1s.append(m1)
        m2s.append(m2)
    out, _ = conv_forward([xs[q_n]], w_ks[2 * q_n], biases[2 * q_n], None, x0, res_scale, r2, res2_scale, False,
                          w_k=w_ks[2 * q_n])
    return [out, *xs[1:], *h1s, *m1s, *m2s]


def ridb_backward(grad, xs, h1s, m1s, m2s, idbs, w, w_ks, slope: float, res_scale: float, res2_scale: float):
    """(dx0, [(dW1, db1, dW2, db2)] per IDB, dW, db); the DNB residual's gradient is `grad` itself.
    idbs: (w1, _, w2, _) per IDB (the biases are not needed); xs etc. as ridb_forward returns them.
    The launches go through a tape, as ridb_forward's."""
    g = _cl(grad)
    q_n = len(idbs)
    weights = _conv_weights(idbs, w)
    w_ks = list(w_ks)
    inputs = [g, *xs, *h1s, *m1s, *m2s, *w_ks]
    if g.numel() == 0:  # an empty batch: zero gradients, no launches (and fills, which a tape does not keep)
        flat = _ridb_backward_launches(inputs, q_n, weights, slope, res_scale, res2_scale)
    else:
        # dW comes back in each weight's dw_strides; the masks' shapes say whether the forward kept them
        key = (g.shape, g.dtype, g.device, tuple(h.shape[1] for h in h1s), tuple(m.shape for m in m1s),
               tuple(m.shape for m in m2s), tuple(t.shape for t in w_ks), tuple(t.stride() for t in w_ks),
               tuple(dw_strides(t) for t in weights), float(slope), float(res_scale), float(res2_scale))
        flat = _RIDB_BACKWARD(key, inputs, q_n, weights, slope, res_scale, res2_scale)
    idb_grads = [tuple(flat[3 + 4 * q:7 + 4 * q]) for q in range(q_n)]
    return flat[0], idb_grads, flat[1], flat[2]


def _ridb_backward_launches(inputs, q_n: int, weights: list, slope: float, res_scale: float,
                            res2_scale: float) -> list:
    """ridb_backward's allocations and launches: inputs [g, xs, h1s, mask1s, mask2s, w_ks] -> [dx0, dW, db,
    then dW1, db1, dW2, db2 per IDB]. weights (w1, w2 per IDB, w): read for dW's strides only."""
    g, xs, h1s, m1s, m2s, w_ks = _split(inputs, 1, q_n + 1, q_n, q_n, q_n, 2 * q_n + 1)
    g = g[0]
    x0 = xs[0]
    n, nf, h, wd = x0.shape
    w_k = w_ks[2 * q_n]
    dw, db = _grad_like(weights[2 * q_n], w_k), torch.empty((nf,), dtype=w_k.dtype, device=w_k.device)
    idb_grads = [idb_grad_buffers(weights[2 * q], w_ks[2 * q], weights[2 * q + 1], w_ks[2 * q + 1])
                 for q in range(q_n)]
    dx0 = _empty_cl(n, nf, h, wd, x0)
    if n * h * wd == 0:  # no launches; the gradients are zeros (ridb_backward does not tape this)
        return [dx0, dw.zero_(), db.zero_(), *(t.zero_() for grads in idb_grads for t in grads)]
    # The closing conv: out = r2 + s2*(x0 + s*conv(x)). dL/dx0 starts at s2*g; its dX G = s*s2*conv^T(g)
    # is dL/dx_{Q+1}, which the last IDB's residual also sends to x0, and whose gz2 the last IDB needs.
    scale = res_scale * res2_scale
    dwp, dbp, split = _dw_partials(xs[q_n], None, g, True, None, None)
    # IDB q reads its gz2 from one kept buffer while its dx launch writes IDB q-1's into the other
    gz2_bufs = [_scratch_cl(role, n, nf, h, wd, x0) for role in ("ridb_gz2_a", "ridb_gz2_b")]
    gz2 = gz2_bufs[0]
    _dx((g, w_k, 0), None, gz2, None, m2s[q_n - 1], slope, scale, Finalize(dwp, dbp, dw, db, split, scale), None,
        None, add_sum=(g, dx0, res2_scale))
    for q in reversed(range(q_n)):
        # gz2 is ready, so the IDB's first launch is a plain dX. G_q = dL/dx_q goes into the x0 sum and
        # (q > 0) on as the previous IDB's gz2; IDB 0's input is x0 itself, so only the sum is written.
        prev = gz2_bufs[(q_n - q) % 2] if q > 0 else None
        idb_backward_launches(gz2, None, xs[q], h1s[q], w_ks[2 * q], w_ks[2 * q + 1], m1s[q], slope, idb_grads[q],
                              prev if q > 0 else dx0, omask=m2s[q - 1] if q > 0 else None, add_sum=(dx0, dx0, 1.0),
                              store_out=q > 0)
        gz2 = prev
    return [dx0, dw, db, *(t for grads in idb_grads for t in grads)]


def _split(seq: Sequence, *sizes: int) -> list:
    """seq cut into consecutive runs of these lengths, which must use it up exactly."""
    runs, start = [], 0
    for size in sizes:
        runs.append(list(seq[start:start + size]))
        start += size
    if start != len(seq):
        raise RuntimeError(f"fused_ridb: {len(seq)} saved tensors, expected {start}")
    return runs


_RIDB_FORWARD = Taped(_ridb_forward_launches, "fused_ridb forward", kept_buffers)
_RIDB_BACKWARD = Taped(_ridb_backward_launches, "fused_ridb backward", kept_buffers)


def _group(idb_params: Sequence[torch.Tensor]) -> list[tuple]:
    """[w1, b1, w2, b2, w1, ...] -> [(w1, b1, w2, b2), ...]"""
    return [tuple(idb_params[4 * q:4 * q + 4]) for q in range(len(idb_params) // 4)]


class _EagerFusedRIDB(torch.autograd.Function):
    """One Function per RIDB: 2Q + 1 launches forward, 4Q + 2 backward (ridb_backward)."""

    @staticmethod
    def forward(ctx, x0, r2, w, b, res_scale, res2_scale, slope, *flat):
        idbs = _group(flat)
        weights = _conv_weights(idbs)
        w_ks = [kernel_weight(t) for t in _conv_weights(idbs, w)]
        out, xs, h1s, m1s, m2s = ridb_forward(x0, idbs, w, b, res_scale, r2, res2_scale, slope, True, w_ks=w_ks)
        ctx.save_for_backward(*xs, *h1s, *m1s, *m2s, w, *weights, *w_ks)
        ctx.meta = (len(idbs), r2 is not None, res_scale, res2_scale if r2 is not None else 1.0, slope)
        return out

    @staticmethod
    def backward(ctx, grad):
        q_n, has_r2, s, s2, slope = ctx.meta
        xs, h1s, m1s, m2s, (w,), weights, w_ks = _split(ctx.saved_tensors, q_n + 1, q_n, q_n, q_n, 1, 2 * q_n,
                                                        2 * q_n + 1)
        idbs = [(weights[2 * q], None, weights[2 * q + 1], None) for q in range(q_n)]
        dx0, idb_grads, dw, db = ridb_backward(grad, xs, h1s, m1s, m2s, idbs, w, w_ks, slope, s, s2)
        return (dx0, grad if has_r2 else None, dw, db, None, None, None, *(t for gs in idb_grads for t in gs))


# ------------------------------------------------------------------------------------------------
# The same as torch custom ops (torch.compile: one opaque node per RIDB, no graph break)
# ------------------------------------------------------------------------------------------------
# The weights' channels_last copies (kernel_weight) travel from the forward op to the backward op as extra
# outputs, as the eager Function saves them: the trainer's parameters are NCHW (train/layout.py), and
# copying the 2Q + 1 weights again in the backward would be 2Q + 1 more launches per RIDB.
@torch.library.custom_op("gafh_fast::fused_ridb_fwd", mutates_args=())
def fused_ridb_fwd(x0: torch.Tensor, r2: Optional[torch.Tensor], w: torch.Tensor, b: torch.Tensor,
                   idb_params: list[torch.Tensor], res_scale: float, res2_scale: float, negative_slope: float,
                   save_mask: bool) -> list[torch.Tensor]:
    """[out, x_2 .. x_{Q+1}, h1 per IDB, mask1 per IDB, mask2 per IDB, then the channels_last copy of each
    weight the kernels cannot read in place (w1, w2 per IDB, w; reads_in_place order)] (idb_params: w1,
    b1, w2, b2 per IDB); activations channels_last, masks bit-packed (empty without save_mask)."""
    idbs = _group(idb_params)
    _check_once(x0, idbs, w, b, r2)
    weights = _conv_weights(idbs, w)
    w_ks = [kernel_weight(t) for t in weights]
    out, xs, h1s, m1s, m2s = ridb_forward(x0, idbs, w, b, res_scale, r2, res2_scale, negative_slope, save_mask,
                                          w_ks=w_ks)
    return [out, *xs[1:], *h1s, *m1s, *m2s, *(k for k, t in zip(w_ks, weights) if k is not t)]


@fused_ridb_fwd.register_fake
def _(x0, r2, w, b, idb_params, res_scale, res2_scale, negative_slope, save_mask):
    idbs = _group(idb_params)
    check_ridb_args(x0, idbs, w, b, r2)
    n, nf, h, wd = x0.shape

    def act(c):
        return _empty_cl(n, c, h, wd, x0)

    def mask(c):
        return torch.empty(mask_shape(n, h, wd, c) if save_mask else (0,), dtype=torch.uint8, device=x0.device)

    copies = [torch.empty_strided(t.shape, cl_strides(*t.shape), dtype=t.dtype, device=t.device)
              for t in _conv_weights(idbs, w) if not reads_in_place(t)]
    return [act(nf), *(act(nf) for _ in idbs), *(act(p[0].shape[0]) for p in idbs),
            *(mask(p[0].shape[0]) for p in idbs), *(mask(nf) for _ in idbs), *copies]


@torch.library.custom_op("gafh_fast::fused_ridb_bwd", mutates_args=())
def fused_ridb_bwd(grad: torch.Tensor, x0: torch.Tensor, saved: list[torch.Tensor], w: torch.Tensor,
                   idb_weights: list[torch.Tensor], kernel_weights: list[torch.Tensor], res_scale: float,
                   res2_scale: float, negative_slope: float) -> list[torch.Tensor]:
    """[dx0, dW, db, then dW1, db1, dW2, db2 per IDB]; saved: fused_ridb_fwd's activations and masks
    (its outputs after out); idb_weights: w1, w2 per IDB; kernel_weights: what the kernels read for
    w1, w2 per IDB and w (the forward's copies, or the weights themselves). dW come back laid out as
    dw_strides says (the parameter's own layout when dense)."""
    q_n = len(idb_weights) // 2
    x_rest, h1s, m1s, m2s = _split(saved, q_n, q_n, q_n, q_n)
    xs = [_cl(x0), *x_rest]
    idbs = [(idb_weights[2 * q], None, idb_weights[2 * q + 1], None) for q in range(q_n)]
    w_ks = [kernel_weight(t) for t in kernel_weights]  # each is already one: no copy
    dx0, idb_grads, dw, db = ridb_backward(grad, xs, h1s, m1s, m2s, idbs, w, w_ks, negative_slope, res_scale,
                                           res2_scale)
    return [dx0, dw, db, *(t for gs in idb_grads for t in gs)]


@fused_ridb_bwd.register_fake
def _(grad, x0, saved, w, idb_weights, kernel_weights, res_scale, res2_scale, negative_slope):
    n, nf, h, wd = x0.shape

    def weight_grads(t):
        return torch.empty_strided(t.shape, dw_strides(t), dtype=t.dtype, device=t.device), t.new_empty(t.shape[0])

    return [_empty_cl(n, nf, h, wd, x0), *weight_grads(w), *(g for t in idb_weights for g in weight_grads(t))]


def _ridb_setup_context(ctx, inputs, output):
    x0, r2, w, _b, idb_params, s, s2, slope, _save = inputs
    q_n = len(idb_params) // 4
    weights = _conv_weights(_group(idb_params))
    ctx.save_for_backward(x0, w, *output[1:1 + 4 * q_n], *weights, *output[1 + 4 * q_n:])
    ctx.meta = (q_n, r2 is not None, s, s2 if r2 is not None else 1.0, slope,
                [not reads_in_place(t) for t in weights + [w]])


def _ridb_backward(ctx, grads):
    q_n, has_r2, s, s2, slope, copied = ctx.meta
    (x0, w), saved, idb_weights, copies = _split(ctx.saved_tensors, 2, 4 * q_n, 2 * q_n, sum(copied))
    copies = iter(copies)
    kernel_weights = [next(copies) if c else t for c, t in zip(copied, idb_weights + [w])]
    out = fused_ridb_bwd(grads[0], x0, saved, w, idb_weights, kernel_weights, s, s2, slope)
    return out[0], grads[0] if has_r2 else None, out[1], out[2], list(out[3:]), None, None, None, None


fused_ridb_fwd.register_autograd(_ridb_backward, setup_context=_ridb_setup_context)


def check_ridb_args(x0, idbs, w, b, r2) -> None:
    if not idbs:
        raise ValueError("fused_ridb takes at least one IDB")
    for w1, b1, w2, b2 in idbs:
        check_idb_args(x0, x0, w1, b1, w2, b2)
    check_args([x0], w, b, x0, r2)
    if b is None:
        raise ValueError("fused_ridb takes the closing conv's bias (the RIDB's nn.Conv2d has one)")


_RIDB_CHECKED: set = set()


def _check_once(x0, idbs, w, b, r2) -> None:
    """check_ridb_args once per shape (the convs' own plans check the rest on their first call)."""
    key = (x0.shape, x0.dtype, x0.device, tuple(t.shape if t is not None else None for p in idbs for t in p),
           w.shape, b is None, None if r2 is None else r2.shape)
    if key not in _RIDB_CHECKED:
        check_ridb_args(x0, idbs, w, b, r2)
        _RIDB_CHECKED.add(key)


def fused_ridb_triton(x0: torch.Tensor, idbs: Sequence[tuple], w: torch.Tensor, b: torch.Tensor, res_scale: float,
                      r2: Optional[torch.Tensor], res2_scale: float, negative_slope: float = 0.2) -> torch.Tensor:
    """The same as gafh_fast.ops.fused_ridb_reference; out comes back channels_last."""
    slope, s, s2 = float(negative_slope), float(res_scale), float(res2_scale)
    idbs = [tuple(p) for p in idbs]
    flat = [t for p in idbs for t in p]
    if _is_compiling():  # one opaque custom op per RIDB
        return fused_ridb_fwd(x0, r2, w, b, flat, s, s2, slope, _needs_grad(x0, r2, w, b, *flat))[0]
    _check_once(x0, idbs, w, b, r2)
    if _needs_grad(x0, r2, w, b, *flat):
        return _EagerFusedRIDB.apply(x0, r2, w, b, s, s2, slope, *flat)
    return ridb_forward(x0, idbs, w, b, s, r2, s2, slope, False)[0]

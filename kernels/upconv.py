"""The fused upsampling conv, y = act(conv3x3(nearest_x2(x), W) + b): host code, autograd Function and
torch custom ops (kernels and the maths: upconv_kernels.py).

Launches: forward 2 (combine the weight into the 16 phase taps, then the conv), backward 3 (dX with gz
made on the fly and written out, dW + db partials from gz, then the finalize that folds the phase taps
back onto W). When the tuner finds a gz pass of its own faster (GZ_PASS, configs.py) the backward is
gz pass, dW, then dX with the fold in extra programs, still 3; without an activation dW, dX + fold (2).
Plans, tile choice and launch keys work as in conv3x3.py (same plan table, tuner and
one-stream-per-device assumption for the kept dW partials).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton

from . import configs, conv3x3
from .configs import cdiv
from .conv3x3 import (_FIN_CONFIG, _PLAN_IDS, _PLANS, _choose, _cl, _dtype_flags, _empty_cl, _grad_like, _wstrides,
                      cfg_key, require_mask)
from .conv3x3_fwd import mask_shape
from .launch import KernelLauncher, aligned
from .op import _needs_grad
from .upconv_kernels import (upconv_bwd_dw_kernel, upconv_bwd_dx_kernel, upconv_bwd_finalize_kernel,
                             upconv_combine_kernel, upconv_fwd_kernel)

COMBINE = KernelLauncher(upconv_combine_kernel, "up_combine")
UP_FWD = KernelLauncher(upconv_fwd_kernel, "up_fwd")
UP_DX = KernelLauncher(upconv_bwd_dx_kernel, "up_dx")
UP_DW = KernelLauncher(upconv_bwd_dw_kernel, "up_dw")
UP_FIN = KernelLauncher(upconv_bwd_finalize_kernel, "up_fin")

_COMBINE_BLOCK = 1024
PHASE_TAPS = 16


def check_up_args(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    """Clear errors for what the kernels do not take (the reference would also refuse most)."""
    if x.dim() != 4:
        raise ValueError(f"fused_upconv3x3 input must be (N, C, H, W), got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"fused_upconv3x3 (triton) supports float32 and bfloat16, got {x.dtype}")
    if weight.dim() != 4 or weight.shape[1:] != (x.shape[1], 3, 3):
        raise ValueError(f"fused_upconv3x3 weight {tuple(weight.shape)} does not fit (C_out, {x.shape[1]}, 3, 3)")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"fused_upconv3x3 bias {tuple(bias.shape)} does not fit ({weight.shape[0]},)")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"fused_upconv3x3 {name} is {t.dtype} on {t.device}; the input is {x.dtype} on {x.device}")


def combine_weight(weight: torch.Tensor) -> torch.Tensor:
    """Wc (C_out, 16, C_in), contiguous: the 16 phase taps (upconv_kernels.py), summed in fp32, rounded once."""
    c_out, c_in = weight.shape[:2]
    wc = torch.empty((c_out, PHASE_TAPS, c_in), dtype=weight.dtype, device=weight.device)
    if wc.numel():
        flags = dict(INTERP_BF16=_dtype_flags(weight.dtype)["INTERP_BF16"], BLOCK=_COMBINE_BLOCK)
        key = ("up_combine", weight.shape, weight.stride(), weight.dtype, weight.device)
        COMBINE.launch((key, aligned(weight)), (cdiv(wc.numel(), _COMBINE_BLOCK), 1, 1),
                       (weight, wc, c_in, c_out, *weight.stride()), flags, _FIN_CONFIG)
    return wc


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------
def up_forward(x, weight, bias, slope: Optional[float], save_mask: bool, wc: Optional[torch.Tensor] = None,
               config: Optional[triton.Config] = None):
    """(y, mask, wc): y (N, C_out, 2H, 2W) channels_last; mask (N, 2H, 2W, ceil(C_out/8)) uint8 bits z > 0
    when save_mask and there is an activation, else empty; wc = combine_weight(weight) (made here unless
    given), which the backward reads."""
    x = _cl(x)
    key = ("up_fwd", x.shape, weight.shape, x.dtype, x.device, bias is not None, slope is not None,
           bool(save_mask and slope is not None), cfg_key(config))
    plan = _PLANS.get(key)
    if plan is None:
        check_up_args(x, weight, bias)
    wc = combine_weight(weight) if wc is None else wc
    n, c_in, h, w = x.shape
    c_out = weight.shape[0]
    save = bool(save_mask and slope is not None)
    y = _empty_cl(n, c_out, 2 * h, 2 * w, x)
    mask = torch.empty(mask_shape(n, 2 * h, 2 * w, c_out) if save else (0,), dtype=torch.uint8, device=x.device)
    m = n * h * w
    if m == 0:
        return y, mask, wc
    ptrs = (x, wc, bias if bias is not None else y, y, mask if save else y)
    scalars = (m, h, w, c_in, c_out, float(slope) if slope is not None else 0.0)
    if plan is None:
        flags = dict(HAS_BIAS=bias is not None, HAS_ACT=slope is not None, SAVE_MASK=save,
                     IDX64=4 * m * max(c_in, c_out) >= 2**31, **_dtype_flags(x.dtype))

        def run(cfg):
            _launch_fwd(key + (cfg_key(cfg),), cfg, flags, ptrs, scalars)

        cfg = _choose("up_fwd", (c_in, c_out, w, configs.m_bucket(m), str(x.dtype), tuple(flags.items())),
                      configs.up_fwd_candidates(c_in, c_out, w, m), run, config)
        plan = _PLANS[key] = (cfg, flags, next(_PLAN_IDS))
    cfg, flags, plan_id = plan
    _launch_fwd(plan_id, cfg, flags, ptrs, scalars)
    return y, mask, wc


def _launch_fwd(key, cfg, flags, ptrs, scalars):
    m, c_out = scalars[0], scalars[4]
    grid = (cdiv(m, cfg.kwargs["BLOCK_M"]), cdiv(c_out, cfg.kwargs["BLOCK_N"]), 4)
    # alignment of x and the bias (wc, y and the mask are ours)
    UP_FWD.launch((key, aligned(ptrs[0], ptrs[2])), grid, ptrs + scalars, flags, cfg)


# ------------------------------------------------------------------------------------------------
# Backward (3 launches; 2 without an activation)
# ------------------------------------------------------------------------------------------------
def _up_dx_plan(g, mask, gz, wc, dx, slope, has_bias: bool, config):
    """The dX plan (cfg, kernel config, flags, gz pass?, plan id), its way chosen (timed on a GPU) on the
    first call: with an activation, gz made in dX's operand or by a pass of its own (GZ_PASS). The timing
    runs launch dX without fold programs, the same kernel variant as the real launch."""
    n, c_out, h2, w2 = g.shape
    h, w = h2 // 2, w2 // 2
    c_in = dx.shape[1]
    m = n * h * w
    act = gz is not None
    key = ("up_dx", g.shape, c_in, g.dtype, g.device, act, has_bias, cfg_key(config))
    plan = _PLANS.get(key)
    if plan is None:
        base = dict(IDX64=4 * m * max(c_in, c_out) >= 2**31, FIN_BIAS=has_bias, FIN_BLOCK=configs.FIN_BLOCK,
                    **_dtype_flags(g.dtype))
        scalars = _dx_scalars(m, h, w, c_in, c_out, slope, None)

        def run(cfg):
            kernel_cfg, flags, gz_pass = _dx_way(cfg, base, act)
            if gz_pass:
                conv3x3.launch_gz(g, mask, gz, scalars[5])
            # no fold programs; stand-ins of the fold's pointer types (fp32 partials, dW's dtype), so this
            # compiles the variant the real launch runs (the fold's scalars are not specialised on)
            stand_in = (torch.empty(0, dtype=torch.float32, device=g.device), None, dx, None) if flags["FIN"] else None
            _launch_dx(key + (cfg_key(cfg),), kernel_cfg, flags, _dx_ptrs(g, mask, gz, wc, dx, gz_pass, stand_in),
                       scalars, 0)

        cfg = _choose("up_dx", (c_in, c_out, w, configs.m_bucket(m), str(g.dtype), act, tuple(base.items())),
                      configs.up_dx_candidates(c_in, c_out, w, m, act), run, config)
        plan = _PLANS[key] = (cfg, *_dx_way(cfg, base, act), next(_PLAN_IDS))
    return plan


def _dx_way(cfg, base: dict, act: bool):
    """(the kernel's config without GZ_PASS, its constexpr flags, whether the gz pass runs first). FIN:
    whenever dX does not make gz itself, dW can run before it and dX's extra programs fold the partials."""
    kernel_cfg, gz_pass = configs.split_gz_pass(cfg)
    gz_pass = act and gz_pass
    a_act = act and not gz_pass
    return kernel_cfg, dict(A_ACT=a_act, FIN=not a_act, **base), gz_pass


def _dx_ptrs(g, mask, gz, wc, dx, gz_pass: bool, fin: Optional[tuple]) -> tuple:
    """The dX kernel's pointers: (g or gz, mask, gz out, Wc, dx, the fold's dW partials, db partials, dW, db)."""
    if gz is not None and gz_pass:
        head = (gz, gz, gz, wc, dx)  # dX reads the ready gz; its mask and gz outputs are unused
    else:
        head = (g, mask if gz is not None else g, gz if gz is not None else g, wc, dx)
    if fin is None:
        return head + (dx,) * 4  # no fold programs in the grid: never read
    dwp, dbp, dw, db = fin[:4]
    return head + (dwp, dbp if dbp is not None else dwp, dw, db if db is not None else dw)


def _dx_scalars(m, h, w, c_in, c_out, slope, fin: Optional[tuple]) -> tuple:
    """M, H, W, C_IN, C_OUT, slope, then the fold's chunks and dW's strides (zeros without a fold)."""
    tail = (fin[4], *_wstrides(fin[2])) if fin is not None else (0, 0, 0, 0)
    return (m, h, w, c_in, c_out, float(slope) if slope is not None else 0.0) + tail


def _launch_dx(key, cfg, flags, ptrs, scalars, fold_programs: int):
    m, c_in = scalars[0], scalars[3]
    grid = (cdiv(m, cfg.kwargs["BLOCK_M"]) + fold_programs, cdiv(c_in, cfg.kwargs["BLOCK_N"]), 1)
    UP_DX.launch((key, aligned(ptrs[0])), grid, ptrs + scalars, flags, cfg)  # g is the caller's; the rest ours


def _up_dw_partials(x, gz, has_bias: bool, split: Optional[int], config):
    """(dWc partials (split, 16, C_in, C_out), db partials or None, split), kept with the plan as in
    conv3x3._dw_partials (the finalize rewrites every element it reads before the next launch)."""
    n, c_in, h, w = x.shape
    c_out = gz.shape[1]
    m = n * h * w
    key = ("up_dw", x.shape, gz.shape, gz.dtype, gz.device, has_bias, split, cfg_key(config))
    plan = _PLANS.get(key)
    if plan is None:
        base = split or configs.dw_split(m, c_in, c_out, conv3x3._sms(gz.device), taps=PHASE_TAPS)  # via the module: compile_check patches it
        candidates = [config] if config is not None else configs.up_dw_candidates(c_in, c_out, w, m)
        s_max = max(_up_dw_chunks(m, base, c, has_bias, split is not None)[0] for c in candidates)
        flags = dict(DO_BIAS=has_bias, FULL_P=m % configs.DW_CHUNK_MULTIPLE == 0,
                     IDX64=4 * m * max(c_in, c_out) >= 2**31, **_dtype_flags(gz.dtype))
        dwp = torch.empty((s_max, PHASE_TAPS, c_in, c_out), dtype=torch.float32, device=gz.device)
        dbp = torch.empty((s_max, c_out), dtype=torch.float32, device=gz.device) if has_bias else None
        ptrs = (x, gz, dwp, dbp if has_bias else dwp)

        def run(c):
            s, chunk = _up_dw_chunks(m, base, c, has_bias, split is not None)
            _launch_dw(key + (cfg_key(c),), c, flags, ptrs, (m, h, w, c_in, c_out, chunk), s)

        cfg = _choose("up_dw", (c_in, c_out, w, configs.m_bucket(m), str(gz.dtype), tuple(flags.items())),
                      configs.up_dw_candidates(c_in, c_out, w, m), run, config)
        plan = _PLANS[key] = (cfg, flags, *_up_dw_chunks(m, base, cfg, has_bias, split is not None), dwp, dbp,
                              next(_PLAN_IDS))
    cfg, flags, s, chunk, dwp, dbp, plan_id = plan
    _launch_dw(plan_id, cfg, flags, (x, gz, dwp, dbp if has_bias else dwp), (m, h, w, c_in, c_out, chunk), s)
    return dwp, dbp, s


def _up_dw_chunks(m: int, base: int, cfg, has_bias: bool, exact: bool) -> tuple[int, int]:
    """(split, chunk pixels) of a dW config: base (one program per tap, configs.dw_split; or the caller's:
    exact), grown for programs per phase (PHASES: 4 + db instead of 16 + db programs per chunk)."""
    db = int(has_bias)
    ratio = (PHASE_TAPS + db) // (4 + db) if cfg.kwargs["PHASES"] else 1
    return configs.split_chunks(m, base, 1 if exact else ratio)


def _launch_dw(key, cfg, flags, ptrs, scalars, split):
    c_in, c_out = scalars[3], scalars[4]
    co_tiles = cdiv(c_out, cfg.kwargs["BLOCK_CO"])
    taps = 4 if cfg.kwargs["PHASES"] else PHASE_TAPS  # programs per phase (4 taps each) or per tap
    rows = taps + 1 if flags["DO_BIAS"] else taps  # the last row: the db partials
    # alignment of x and gz (the caller's g for a conv without activation); the partials are ours
    UP_DW.launch((key, aligned(*ptrs[:2])), (cdiv(c_in, cfg.kwargs["BLOCK_C"]) * co_tiles, rows, split),
                 ptrs + scalars, flags, cfg)


def _up_finalize(dwp, dbp, dw, db, split) -> None:
    flags = dict(HAS_BIAS=db is not None, INTERP_BF16=_dtype_flags(dw.dtype)["INTERP_BF16"], BLOCK=configs.FIN_BLOCK)
    key = ("up_fin", dw.shape, dw.stride(), dw.dtype, dw.device, db is not None, split)
    c_out, c_in = dw.shape[:2]
    UP_FIN.launch((key, ()), (cdiv(9 * c_in * c_out, configs.FIN_BLOCK), 1, 1),
                  (dwp, dbp if dbp is not None else dwp, dw, db if db is not None else dw, split, c_in, c_out,
                   *_wstrides(dw)), flags, _FIN_CONFIG)


def up_backward(grad, x, weight, wc, mask, slope: Optional[float], has_bias: bool,
                dx_config=None, dw_config=None, dw_split: Optional[int] = None):
    """(dx, dW, db or None); dW laid out as the weight says (conv3x3.dw_strides)."""
    g = _cl(grad)
    x = _cl(x)
    n, c_in, h, w = x.shape
    c_out = weight.shape[0]
    dw = _grad_like(weight, wc)
    db = wc.new_empty((c_out,)) if has_bias else None
    dx = _empty_cl(n, c_in, h, w, x)
    if n * h * w == 0:
        return dx, dw.zero_(), db.zero_() if has_bias else None
    if slope is not None:
        require_mask(mask, 4 * n * h * w, c_out, "fused_upconv3x3")
    gz = _empty_cl(n, c_out, 2 * h, 2 * w, g) if slope is not None else None
    _, kernel_cfg, flags, gz_pass, plan_id = _up_dx_plan(g, mask, gz, wc, dx, slope, has_bias, dx_config)
    m = n * h * w
    if flags["FIN"]:  # gz ready before dX (no activation, or the gz pass): dW, then dX + the fold
        if gz_pass:
            conv3x3.launch_gz(g, mask, gz, float(slope))
        dwp, dbp, split = _up_dw_partials(x, gz if gz is not None else g, has_bias, dw_split, dw_config)
        fin = (dwp, dbp, dw, db, split)
        _launch_dx(plan_id, kernel_cfg, flags, _dx_ptrs(g, mask, gz, wc, dx, gz_pass, fin),
                   _dx_scalars(m, h, w, c_in, c_out, slope, fin), cdiv(9 * c_in * c_out, configs.FIN_BLOCK))
        return dx, dw, db
    # dX makes gz (A_ACT) and writes it for dW, then the fold on its own
    _launch_dx(plan_id, kernel_cfg, flags, _dx_ptrs(g, mask, gz, wc, dx, False, None),
               _dx_scalars(m, h, w, c_in, c_out, slope, None), 0)
    dwp, dbp, split = _up_dw_partials(x, gz, has_bias, dw_split, dw_config)
    _up_finalize(dwp, dbp, dw, db, split)
    return dx, dw, db


# ------------------------------------------------------------------------------------------------
# Custom ops (torch.compile) and the eager Function
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("gafh_fast::fused_upconv3x3_fwd", mutates_args=())
def fused_upconv3x3_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        negative_slope: Optional[float], save_mask: bool
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mask, wc), as up_forward."""
    check_up_args(x, weight, bias)
    return up_forward(x, weight, bias, negative_slope, save_mask)


@fused_upconv3x3_fwd.register_fake
def _(x, weight, bias, negative_slope, save_mask):
    check_up_args(x, weight, bias)
    n, _, h, w = x.shape
    c_out = weight.shape[0]
    save = save_mask and negative_slope is not None
    y = _empty_cl(n, c_out, 2 * h, 2 * w, x)
    mask = torch.empty(mask_shape(n, 2 * h, 2 * w, c_out) if save else (0,), dtype=torch.uint8, device=x.device)
    return y, mask, x.new_empty((c_out, PHASE_TAPS, weight.shape[1]))


@torch.library.custom_op("gafh_fast::fused_upconv3x3_bwd", mutates_args=())
def fused_upconv3x3_bwd(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, wc: torch.Tensor,
                        mask: torch.Tensor, negative_slope: Optional[float], has_bias: bool) -> list[torch.Tensor]:
    """[dx, dW, db]; db is empty when has_bias is False; dW has conv3x3.dw_strides(weight)."""
    dx, dw, db = up_backward(grad, x, weight, wc, mask, negative_slope, has_bias)
    return [dx, dw, db if db is not None else weight.new_empty(0)]


@fused_upconv3x3_bwd.register_fake
def _(grad, x, weight, wc, mask, negative_slope, has_bias):
    n, c_in, h, w = x.shape
    return [_empty_cl(n, c_in, h, w, x), _grad_like(weight, weight), weight.new_empty(weight.shape[0] if has_bias else 0)]


def _up_setup_context(ctx, inputs, output):
    x, weight, bias, slope, _save = inputs
    ctx.save_for_backward(x, weight, output[2], output[1])
    ctx.meta = (bias is not None, slope)


def _up_backward(ctx, grad_y, _g_mask, _g_wc):
    has_bias, slope = ctx.meta
    x, weight, wc, mask = ctx.saved_tensors
    dx, dw, db = fused_upconv3x3_bwd(grad_y, x, weight, wc, mask, slope, has_bias)
    return dx, dw, db if has_bias else None, None, None


fused_upconv3x3_fwd.register_autograd(_up_backward, setup_context=_up_setup_context)


class _EagerFusedUpconv3x3(torch.autograd.Function):
    """The same host code without the custom-op dispatch (see op.py)."""

    @staticmethod
    def forward(ctx, x, weight, bias, slope):
        y, mask, wc = up_forward(x, weight, bias, slope, True)
        ctx.save_for_backward(x, weight, wc, mask)
        ctx.meta = (bias is not None, slope)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        has_bias, slope = ctx.meta
        x, weight, wc, mask = ctx.saved_tensors
        dx, dw, db = up_backward(grad_y, x, weight, wc, mask, slope, has_bias)
        return dx, dw, db, None


def fused_upconv3x3_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                           negative_slope: Optional[float] = 0.2) -> torch.Tensor:
    """Same semantics as gafh_fast.ops.fused_upconv3x3_reference; y comes back channels_last."""
    slope = None if negative_slope is None else float(negative_slope)
    needs_grad = _needs_grad(x, weight, bias)
    if not torch.compiler.is_compiling():
        if needs_grad:
            return _EagerFusedUpconv3x3.apply(x, weight, bias, slope)
        return up_forward(x, weight, bias, slope, False)[0]
    return fused_upconv3x3_fwd(x, weight, bias, slope, bool(needs_grad))[0]

"""Host code of the fused conv3x3 (and the launches the IDB's host code, idb.py, is built from): per call
only allocation and launches.

Everything that depends only on the shapes (argument checks, the tile config, grids, constexpr
flags, the dW split) is worked out once per exact shape and kept in a plan; the tile config comes
from configs.py's heuristic, timed between its two candidates by tuning.Tuner on a GPU.

Launches: a conv forward is 1; its backward 2 without an activation (dW + db partials, then dX +
the dW finalize) and 3 with one (dX with gz = g*act' made on the fly and written out, then dW + db
partials from gz, then the finalize); an IDB forward is 2 and its backward 3-4 (idb.py):
    [gz2 = g * act2' in a pass of its own ->] gz1 = dX(conv2)[h1 channels] * act1' (without the pass:
    gz2 made on the fly and written out)  ->  dW(conv2) + db2 partials from gz2 and dW(conv1) + db1
    partials from gz1, one launch  ->  dx = dX(conv2)[x channels] + dX(conv1) in one GEMM, plus the
    finalize of dW1, db1, dW2, db2.
No dW loop touches a mask (see conv3x3_bwd.py for why).
Launch keys hold the 16-byte alignment (the JIT specialises on it) of the caller's tensors only:
inputs, weights, biases, residuals and upstream gradients can be views at any offset (DeepSpeed's
flat buffers put some parameters 8 bytes into a line). Every buffer this module allocates (outputs,
masks, gz, dW; the dW partials, kept with their plan) comes from torch's allocator, which aligns far
beyond 16 bytes, and the forward's outputs come back into the backward as such; reading their
pointers per launch cost ~1/4 of the launch path's host time. A steady-state launch key is the plan's
id and launch.aligned's one bit (all aligned) rather than the plan's shape tuple, which Python would
hash again at every launch.
Weights are read through their strides: a channels_last weight (ci fastest) is used in place; any
other layout is copied to channels_last once per forward call and the copy is reused by the backward.
(No cache across calls: DeepSpeed updates parameters through `.data.copy_`, which does not bump the
tensor's version counter, so a version-keyed cache would serve stale weights.)
"""
from __future__ import annotations

import itertools
from typing import Optional

import torch
import triton

from . import configs
from .configs import cdiv
from .conv3x3_bwd import conv3x3_bwd_dw_kernel, conv3x3_bwd_dx_kernel, conv3x3_bwd_finalize_kernel, conv3x3_bwd_gz_kernel
from .conv3x3_fwd import INTERPRETING, conv3x3_fwd_kernel, mask_shape
from . import tape
from .launch import LAUNCHERS, KernelLauncher, aligned
from .tuning import Tuner, config_to_dict, cuda_timer, default_cache_path

FWD = KernelLauncher(conv3x3_fwd_kernel, "fwd")
DW = KernelLauncher(conv3x3_bwd_dw_kernel, "dw")
DX = KernelLauncher(conv3x3_bwd_dx_kernel, "dx")
FIN = KernelLauncher(conv3x3_bwd_finalize_kernel, "fin")
GZ = KernelLauncher(conv3x3_bwd_gz_kernel, "gz")

# False: take each kernel's first heuristic candidate without timing (the GPU kernel tests set it for
# every test but one, so that stage stays within its time budget). Never true under the interpreter.
AUTOTUNE = not INTERPRETING
# Kernels whose tile is the heuristic's first candidate, untimed, and the only one precompiled. A cold
# start's time against the candidates' spread: on the H200 the two forward tiles (fwd, up_fwd) were
# within 1.04-1.09x of each other at batch 64 (bench/RESULTS.md, Round 13). Empty here; the kernels
# suite's third autotune probe (bench/kernels_suite.py) times a cold start with ("fwd", "up_fwd").
UNTIMED: frozenset = frozenset()
_TUNER: Optional[Tuner] = None
# Plans per exact call signature. Each holds an int id, the launch key of its steady-state launches: a
# shape key tuple hashed again for every launch costs ~1 us of host time (tuples do not cache their hash).
_PLANS: dict = {}
_PLAN_IDS = itertools.count()
_SMS: dict = {}
# Temporaries of one backward launch sequence (gz buffers), kept per (role, shape, dtype, device): see
# _scratch_cl. The paper G's backward makes 8 per RIDB; allocating them was ~96 of a step's ~570 calls
# into the allocator, each several us of host time.
_SCRATCH: dict = {}


def tuner() -> Tuner:
    global _TUNER
    if _TUNER is None:
        cuda = torch.cuda.is_available()
        _TUNER = Tuner(default_cache_path(), torch.cuda.get_device_name() if cuda else "cpu",
                       cuda_timer if cuda else None)
    return _TUNER


def set_tuner(new: Optional[Tuner]) -> Optional[Tuner]:
    """Install a tuner (tests, bench); plans made with the old one are dropped. Returns the old one."""
    global _TUNER
    old, _TUNER = _TUNER, new
    _PLANS.clear()
    drop_scratch()
    for launcher in LAUNCHERS.values():  # upconv.py's too
        launcher.forget()
    return old


def drop_scratch() -> None:
    """Forget the kept backward temporaries (_scratch_cl), and with them the tapes (tape.py) that hold them."""
    _SCRATCH.clear()
    tape.forget_all()


def plan_configs() -> list[dict]:
    """The tile config every plan of this process uses: [{kernel, plan (its shape key), config}]
    (bench/kernels_suite.py reports them next to the timings)."""
    def plain(k):
        return tuple(k) if isinstance(k, torch.Size) else str(k).replace("torch.", "") if isinstance(k, torch.dtype) else k

    return [{"kernel": key[0], "plan": repr(tuple(plain(k) for k in key[1:] if not isinstance(k, torch.device))),
             "config": config_to_dict(plan[0])} for key, plan in _PLANS.items() if plan[0] is not None]


def kept_partials() -> list[torch.Tensor]:
    """The dW/db partial buffers kept with this process's dW plans (see _dw_partials)."""
    return [t for key, plan in _PLANS.items() if key[0] in ("dw", "up_dw", "out_dw")
            for t in (*plan[4:6], *(plan[7:9] if key[0] == "dw" else ())) if t is not None]


def kept_scratch() -> list[torch.Tensor]:
    """The backward temporaries this process keeps (see _scratch_cl)."""
    return list(_SCRATCH.values())


def kept_buffers() -> list[torch.Tensor]:
    """Every buffer kept across calls: what a tape (tape.py) may hold as a constant."""
    return kept_partials() + kept_scratch()


def _sms(device: torch.device) -> int:
    """SMs of a CUDA device; 0 for the interpreter (one dW chunk)."""
    if device.type != "cuda":
        return 0
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device]


def cfg_key(cfg: Optional[triton.Config]):
    """A hashable identity of a forced config (plan keys)."""
    if cfg is None:
        return None
    return tuple(sorted(cfg.kwargs.items())), cfg.num_warps, cfg.num_stages


def _choose(kernel: str, tune_key: tuple, candidates, run, forced) -> triton.Config:
    if forced is not None:
        return forced
    if kernel in UNTIMED:
        candidates = candidates[:1]  # precompile's recording (one pass per candidate index) then sees one too
    return tuner().choose(kernel, tune_key, candidates, run, first=not AUTOTUNE or INTERPRETING)


def check_args(inputs, weight, bias, residual, residual2) -> None:
    """Clear errors for shapes/dtypes the kernels do not handle (the reference would also refuse)."""
    if len(inputs) not in (1, 2):
        raise ValueError(f"fused_conv3x3 (triton) takes one or two inputs, got {len(inputs)}")
    x0 = inputs[0]
    if x0.dim() != 4:
        raise ValueError(f"fused_conv3x3 inputs must be (N, C, H, W), got {tuple(x0.shape)}")
    if x0.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"fused_conv3x3 (triton) supports float32 and bfloat16, got {x0.dtype}")
    n, _, h, w = x0.shape
    for i, x in enumerate(inputs):
        if x.dim() != 4 or (x.shape[0], x.shape[2], x.shape[3]) != (n, h, w):
            raise ValueError(f"fused_conv3x3 input {i} has shape {tuple(x.shape)}; expected (N={n}, C, {h}, {w})")
        if x.dtype != x0.dtype or x.device != x0.device:
            raise ValueError(f"fused_conv3x3 input {i} is {x.dtype} on {x.device}; input 0 is {x0.dtype} on {x0.device}")
    c_in = sum(x.shape[1] for x in inputs)
    if weight.dim() != 4 or weight.shape[1:] != (c_in, 3, 3):
        raise ValueError(f"fused_conv3x3 weight {tuple(weight.shape)} does not fit (C_out, {c_in}, 3, 3)")
    c_out = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (c_out,):
        raise ValueError(f"fused_conv3x3 bias {tuple(bias.shape)} does not fit ({c_out},)")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != x0.dtype or t.device != x0.device):
            raise ValueError(f"fused_conv3x3 {name} is {t.dtype} on {t.device}; the inputs are {x0.dtype} on {x0.device}")
    for name, r in (("residual", residual), ("residual2", residual2)):
        if r is not None and (tuple(r.shape) != (n, c_out, h, w) or r.dtype != x0.dtype or r.device != x0.device):
            raise ValueError(f"fused_conv3x3 {name} is {tuple(r.shape)} {r.dtype} on {r.device}; "
                             f"expected {(n, c_out, h, w)} {x0.dtype} on {x0.device}")


def cl_strides(n: int, c: int, h: int, w: int) -> tuple:
    """torch's channels_last strides of an (n, c, h, w) tensor."""
    return h * w * c, 1, w * c, c


def reads_in_place(weight: torch.Tensor) -> bool:
    """Whether the kernels read this weight as it is: (kh, kw) fold into one tap stride and ci is
    contiguous (channels_last)."""
    s_co, s_ci, s_kh, s_kw = weight.stride()
    return s_ci == 1 and s_kh == 3 * s_kw


def kernel_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight as the kernels read it: itself (reads_in_place), else a fresh copy with cl_strides
    (never an alias: torch's .contiguous() returns the weight itself when a size-1 C_in already makes it
    "channels_last", and the custom ops return the copies as outputs)."""
    if reads_in_place(weight):
        return weight
    copy = torch.empty_strided(weight.shape, cl_strides(*weight.shape), dtype=weight.dtype, device=weight.device)
    return copy.copy_(weight.detach())


def dw_strides(weight: torch.Tensor) -> tuple:
    """The strides dW is written with (_grad_like; the custom ops' fakes say the same): an NCHW parameter's
    own (the trainer's: AccumulateGrad then keeps dW without a copy), else channels_last, which is a
    channels_last parameter's own and, for any other view, dense."""
    return weight.stride() if weight.is_contiguous() else cl_strides(*weight.shape)


def _wstrides(w: torch.Tensor) -> tuple[int, int, int]:
    s = w.stride()
    return s[0], s[1], s[3]  # co, ci, tap (kernel_weight guarantees s_kh == 3*s_kw)


def _dtype_flags(dtype) -> dict:
    return dict(INTERP_BF16=INTERPRETING and dtype != torch.float32,
                # fp32 I/O is the exactness path (tests, fp32 training): no silent TF32 truncation
                PRECISION="ieee" if dtype == torch.float32 else "tf32")


def _cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def require_mask(mask: torch.Tensor, m: int, c: int, op: str, flag: str = "save_mask") -> None:
    """A clear error when the forward kept no bit mask of its activation (m pixels, c channels) for the
    backward to differentiate: the forward ran with `flag` False."""
    if mask.numel() != m * cdiv(c, 8):
        raise RuntimeError(f"{op} backward: the forward saved no activation mask (it ran with {flag}=False); "
                           "cannot differentiate the LeakyReLU")


def _empty_cl(n, c, h, w, like: torch.Tensor) -> torch.Tensor:
    """Uninitialised channels_last (N, C, H, W): torch.empty(memory_format=...) costs ~1.7 us more host
    time per call than empty_strided with the same strides (measured on CPU: 3.9 vs 2.2 us)."""
    return torch.empty_strided((n, c, h, w), cl_strides(n, c, h, w), dtype=like.dtype, device=like.device)


def _scratch_cl(role: str, n, c, h, w, like: torch.Tensor) -> torch.Tensor:
    """A channels_last temporary that one backward launch sequence writes and then reads (a gz), kept per
    (role, shape, dtype, device) instead of allocated per call, as the dW partials are (_dw_partials):
    the launches that read it are queued before the next sequence's launches that write it, and one
    sequence's live temporaries have distinct roles. It never leaves the sequence (no output or saved
    tensor is one). The same assumption as the partials: one stream per device."""
    key = (role, n, c, h, w, like.dtype, like.device)
    buf = _SCRATCH.get(key)
    if buf is None:
        buf = _SCRATCH[key] = _empty_cl(n, c, h, w, like)
    return buf


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------
def conv_forward(inputs, weight, bias, slope, residual, res_scale, residual2, res2_scale, save_mask: bool,
                 w_k: Optional[torch.Tensor] = None, config: Optional[triton.Config] = None):
    """(y, mask): y (N, C_out, H, W) channels_last; mask (N, H, W, ceil(C_out/8)) uint8 bits z > 0 when
    save_mask and there is an activation, else empty. w_k: kernel_weight(weight) if the caller has it;
    config: force a tile config (tests)."""
    x1 = _cl(inputs[0])
    x2 = _cl(inputs[1]) if len(inputs) == 2 else None
    w_k = kernel_weight(weight) if w_k is None else w_k
    r1 = _cl(residual) if residual is not None else None
    r2 = _cl(residual2) if residual2 is not None else None
    save = bool(save_mask and slope is not None)
    key = ("fwd", x1.shape, None if x2 is None else x2.shape, w_k.shape, w_k.stride(), x1.dtype, x1.device,
           bias is not None, slope is not None, r1 is not None, r2 is not None, save, cfg_key(config))
    plan = _PLANS.get(key)
    if plan is None:
        check_args(inputs, weight, bias, residual, residual2)
    n, c1, h, w = x1.shape
    c_out = w_k.shape[0]
    y = _empty_cl(n, c_out, h, w, x1)
    mask = torch.empty(mask_shape(n, h, w, c_out) if save else (0,), dtype=torch.uint8, device=x1.device)
    m = n * h * w
    if m == 0:
        return y, mask
    ptrs = (x1, x2 if x2 is not None else x1, w_k, bias if bias is not None else y, r1 if r1 is not None else y,
            r2 if r2 is not None else y, y, mask if save else y)
    scalars = (m, h, w, c1, 0 if x2 is None else x2.shape[1], c_out, *_wstrides(w_k),
               float(slope) if slope is not None else 0.0, float(res_scale), float(res2_scale))
    if plan is None:
        flags = dict(HAS_BIAS=bias is not None, HAS_ACT=slope is not None, HAS_R1=r1 is not None,
                     HAS_R2=r2 is not None, SAVE_MASK=save, IDX64=max(m * max(c1, scalars[4], c_out), 1) >= 2**31,
                     **_dtype_flags(x1.dtype))

        def run(cfg):
            _launch_fwd(key + (cfg_key(cfg),), cfg, flags, ptrs, scalars, m, c_out)

        cands = configs.fwd_candidates(c1, scalars[4], c_out, w, m)
        cfg = _choose("fwd", (c1, scalars[4], c_out, w, configs.m_bucket(m), str(x1.dtype), tuple(flags.items())),
                      cands, run, config)
        plan = _PLANS[key] = (cfg, flags, next(_PLAN_IDS))
    cfg, flags, plan_id = plan
    _launch_fwd(plan_id, cfg, flags, ptrs, scalars, m, c_out)
    return y, mask


def _launch_fwd(key, cfg, flags, ptrs, scalars, m, c_out):
    grid = (cdiv(m, cfg.kwargs["BLOCK_M"]), cdiv(c_out, cfg.kwargs["BLOCK_N"]), 1)
    # alignment of x1, x2, w, bias, r1, r2 (y and the mask are ours: see the module docstring)
    FWD.launch((key, aligned(*ptrs[:6])), grid, ptrs + scalars, flags, cfg)


# ------------------------------------------------------------------------------------------------
# Backward pieces
# ------------------------------------------------------------------------------------------------
def _dw_partials(x1, x2, gz, has_bias: bool, split: Optional[int], config: Optional[triton.Config], job_b=None):
    """Launch the dW kernel on gz (activation derivative already applied): (dW partials, db partials or
    None, split), then with job_b = (x, gz) of a second conv of the same pixels and biases (the IDB's
    conv1 next to its conv2), that conv's (dW partials, db partials or None) too, from the same launch.
    The partials (fp32, a few MB: configs.dw_split) are allocated once per plan and kept with it, not
    per call: each backward launch sequence reduces them (the finalize) before the next dW launch of the
    same plan, in stream order. _dx refuses two finalize jobs on one buffer. Backward passes of one
    shape running at the same time on two CUDA streams would share them: this module assumes one
    stream per device."""
    n, c_out, h, w = gz.shape
    m = n * h * w
    c1 = x1.shape[1]
    c2 = 0 if x2 is None else x2.shape[1]
    cb, cb_out = (job_b[0].shape[1], job_b[1].shape[1]) if job_b is not None else (0, 0)
    key = ("dw", x1.shape, c2, gz.shape, gz.dtype, gz.device, has_bias, split, cfg_key(config), cb, cb_out)
    plan = _PLANS.get(key)
    if plan is None:
        s = split or configs.dw_split(m, c1 + c2, c_out, _sms(gz.device), job_b=(cb, cb_out) if cb else None)
        chunk = cdiv(cdiv(m, s), configs.DW_CHUNK_MULTIPLE) * configs.DW_CHUNK_MULTIPLE
        s = cdiv(m, chunk)
        flags = dict(DO_BIAS=has_bias, FULL_P=m % configs.DW_CHUNK_MULTIPLE == 0,
                     IDX64=m * max(c1, c2, c_out, cb, cb_out) >= 2**31, **_dtype_flags(gz.dtype))
        dwp = torch.empty((s, 9, c1 + c2, c_out), dtype=torch.float32, device=gz.device)
        dbp = torch.empty((s, c_out), dtype=torch.float32, device=gz.device) if has_bias else None
        dwpb = torch.empty((s, 9, cb, cb_out), dtype=torch.float32, device=gz.device) if cb else None
        dbpb = torch.empty((s, cb_out), dtype=torch.float32, device=gz.device) if cb and has_bias else None
        plan = [None, flags, s, chunk, dwp, dbp, next(_PLAN_IDS), dwpb, dbpb]
    cfg, flags, s, chunk, dwp, dbp, plan_id, dwpb, dbpb = plan
    xb, gzb = job_b if job_b is not None else (x1, gz)
    ptrs = (x1, x2 if x2 is not None else x1, gz, dwp, dbp if has_bias else dwp,
            xb, gzb, dwpb if dwpb is not None else dwp, dbpb if dbpb is not None else dwp)
    scalars = (m, h, w, c1, c2, c_out, cb, cb_out, chunk)
    if cfg is None:
        def run(c):
            _launch_dw(key + (cfg_key(c),), c, flags, ptrs, scalars, s)

        cands = configs.dw_candidates(c1, c2, c_out, w, m, cb, cb_out)
        plan[0] = _choose("dw", (c1, c2, c_out, w, configs.m_bucket(m), str(gz.dtype), tuple(flags.items()))
                          + ((cb, cb_out) if cb else ()), cands, run, config)
        _PLANS[key] = plan
    _launch_dw(plan_id, plan[0], flags, ptrs, scalars, s)
    if job_b is None:
        return dwp, dbp, s
    return dwp, dbp, s, dwpb, dbpb


def _launch_dw(key, cfg, flags, ptrs, scalars, split):
    c1, c2, c_out, cb, cb_out = scalars[3:8]
    bc, bco, bcob = cfg.kwargs["BLOCK_C"], cfg.kwargs["BLOCK_CO"], cfg.kwargs["BLOCK_CO_B"]
    co_tiles = cdiv(c_out, bco)
    programs = max((cdiv(c1, bc) + cdiv(c2, bc)) * co_tiles, co_tiles)
    if cb:  # job B's programs after job A's (the kernel's grid comment)
        programs += max(cdiv(cb, bc) * cdiv(cb_out, bcob), cdiv(cb_out, bcob))
    taps = 10 if flags["DO_BIAS"] else 9  # row 9: the db partials
    # alignment of x1, x2 and gz (the caller's g for a conv without activation), and job B's x and gz; the
    # partials are ours
    DW.launch((key, aligned(*ptrs[:3], *ptrs[5:7])), (programs, taps, split), ptrs + scalars, flags, cfg)


class Finalize:
    """One dW/db reduction job for the dX kernel's extra programs."""
    __slots__ = ("dwp", "dbp", "dw", "db", "split", "scale")

    def __init__(self, dwp, dbp, dw, db, split, scale):
        self.dwp, self.dbp, self.dw, self.db, self.split, self.scale = dwp, dbp, dw, db, split, scale

    def programs(self) -> int:
        """Programs that sum the partials: one per FIN_BLOCK elements of one split's (9, C_in, C_out)."""
        return cdiv(9 * self.dw.shape[1] * self.dw.shape[0], configs.FIN_BLOCK)

    def ptrs(self) -> tuple:
        """(dW partials, db partials, dW, db) as the kernels take them: an absent db is any valid pointer."""
        return (self.dwp, self.dbp if self.dbp is not None else self.dwp, self.dw,
                self.db if self.db is not None else self.dw)

    def shape_args(self) -> tuple:
        """(split, C_in, C_out, dW's co / ci / tap strides): the reduction's shape arguments."""
        return (self.split, self.dw.shape[1], self.dw.shape[0], *_wstrides(self.dw))


def _dx(src_a, src_b, out1, out2, omask, slope, scale, fin_a: Optional[Finalize], fin_b: Optional[Finalize],
        config: Optional[triton.Config], a_mask: Optional[torch.Tensor] = None, gz_out: Optional[torch.Tensor] = None,
        add_sum: Optional[tuple] = None, store_out: bool = True):
    """Launch the dX kernel. src_*: (gz, kernel weight, first weight input channel of the result);
    a_mask: source A is the raw g of a conv with this activation mask (gz made on the fly), and gz_out
    receives that gz. add_sum = (sum_in, sum_out, sum_scale): also write sum_out = sum_scale*sum_in +
    the result (before omask's activation derivative); store_out=False: out1 is not written."""
    ga, wa, base_a = src_a
    n, ca, h, w = ga.shape
    m = n * h * w
    if a_mask is not None:
        require_mask(a_mask, m, ca, "fused_conv3x3")
    n1 = out1.shape[1]
    n_tot = n1 + (out2.shape[1] if out2 is not None else 0)
    key = ("dx", ga.shape, wa.shape, wa.stride(), base_a, None if src_b is None else (src_b[1].shape,
           src_b[1].stride(), src_b[2]), n1, n_tot, omask is not None, a_mask is not None, gz_out is not None,
           ga.dtype, ga.device,
           None if fin_a is None else (fin_a.dw.shape, fin_a.dw.stride(), fin_a.db is not None, fin_a.split),
           None if fin_b is None else (fin_b.dw.shape, fin_b.dw.stride(), fin_b.db is not None, fin_b.split),
           add_sum is not None, store_out, cfg_key(config))
    plan = _PLANS.get(key)
    if plan is None:
        if add_sum is not None and (n_tot != n1 or add_sum[0].shape != out1.shape or add_sum[1].shape != out1.shape):
            raise ValueError("the dX kernel's running sum takes one output of the result's shape")
        cb = src_b[0].shape[1] if src_b is not None else 0
        flags = dict(A_ACT=a_mask is not None, WRITE_GZA=gz_out is not None, OUT_ACT=omask is not None,
                     ADD_SUM=add_sum is not None, STORE_OUT=store_out,
                     FIN_A=fin_a is not None, FA_BIAS=fin_a is not None and fin_a.db is not None,
                     FIN_B=fin_b is not None, FB_BIAS=fin_b is not None and fin_b.db is not None,
                     IDX64=m * max(ca, cb, n_tot) >= 2**31, **_dtype_flags(ga.dtype), FIN_BLOCK=configs.FIN_BLOCK)
        # the finalize's shape scalars and program counts are the plan's (its key holds the dW shapes)
        fa_shape = fin_a.shape_args() if fin_a else (0, 1, 1, 0, 0, 0)
        fb_shape = fin_b.shape_args() if fin_b else (0, 1, 1, 0, 0, 0)
        plan = [None, flags, cb, fa_shape + fb_shape, fin_a.programs() if fin_a else 0,
                fin_b.programs() if fin_b else 0, next(_PLAN_IDS)]
    cfg, flags, cb, fin_shapes, fa_n, fb_n, plan_id = plan
    if fin_a is not None and fin_b is not None and fin_a.dwp is fin_b.dwp:
        raise RuntimeError("the dX launch's two finalize jobs share one partials buffer (_dw_partials' plans)")
    gb, wb, base_b = src_b if src_b is not None else (ga, wa, 0)
    s_in, s_out, s_scale = add_sum if add_sum is not None else (ga, ga, 0.0)
    fin_ptrs = (fin_a.ptrs() if fin_a is not None else (ga,) * 4) + (fin_b.ptrs() if fin_b is not None else (ga,) * 4)
    ptrs = (ga, a_mask if a_mask is not None else ga, gz_out if gz_out is not None else ga, wa, gb, wb, out1,
            out2 if out2 is not None else out1, omask if omask is not None else ga, s_in, s_out) + fin_ptrs
    scalars_head = (m, h, w, ca, *_wstrides(wa), base_a, cb, *_wstrides(wb), base_b, n1, n_tot) + fin_shapes
    scalars_tail = (fa_n, float(slope) if slope is not None else 0.0, float(scale),
                    float(fin_a.scale) if fin_a is not None else 1.0, float(fin_b.scale) if fin_b is not None else 1.0,
                    float(s_scale))
    if cfg is None:
        def run(c):
            _launch_dx(key + (cfg_key(c),), c, flags, ptrs, scalars_head, scalars_tail, m, n_tot, fa_n, fb_n)

        cands = configs.dx_candidates(ca, cb, n_tot, w, m)
        plan[0] = _choose("dx", (ca, cb, n_tot, w, configs.m_bucket(m), str(ga.dtype), flags["OUT_ACT"],
                                 flags["A_ACT"], flags["WRITE_GZA"], flags["ADD_SUM"], flags["STORE_OUT"]),
                          cands, run, config)
        _PLANS[key] = plan
    _launch_dx(plan_id, plan[0], flags, ptrs, scalars_head, scalars_tail, m, n_tot, fa_n, fb_n)


def _launch_dx(key, cfg, flags, ptrs, head, tail, m, n_tot, fa_n, fb_n):
    n_dx = cdiv(m, cfg.kwargs["BLOCK_M"]) * cdiv(n_tot, cfg.kwargs["BLOCK_N"])
    args = ptrs + head + (n_dx,) + tail
    # alignment of the gradient sources and weights (ga, wa, gb, wb) and of the running sum's input (the
    # caller's g for a standalone IDB whose x is x0); masks, outputs and the finalize's are ours
    DX.launch((key, aligned(ptrs[0], *ptrs[3:6], ptrs[9])), (n_dx + fa_n + fb_n, 1, 1), args, flags, cfg)


def _grad_like(weight: torch.Tensor, w_k: torch.Tensor) -> torch.Tensor:
    """dW laid out as dw_strides(weight) says, on the kernel weight's device."""
    return torch.empty_strided(weight.shape, dw_strides(weight), dtype=w_k.dtype, device=w_k.device)


_FIN_CONFIG = triton.Config({}, num_warps=4, num_stages=1)  # a plain reduction: nothing to tune


def _finalize(fin: Finalize) -> None:
    """Launch the dW/db reduction on its own (a conv with an activation: its dX launch came first)."""
    flags = dict(HAS_BIAS=fin.db is not None, INTERP_BF16=_dtype_flags(fin.dw.dtype)["INTERP_BF16"],
                 BLOCK=configs.FIN_BLOCK)
    key = ("fin", fin.dw.shape, fin.dw.stride(), fin.dw.dtype, fin.dw.device, fin.db is not None, fin.split)
    FIN.launch((key, ()), (fin.programs(), 1, 1), fin.ptrs() + fin.shape_args() + (float(fin.scale),), flags,
               _FIN_CONFIG)


def launch_gz(g, mask, gz, slope: float) -> None:
    """gz = g * act'(z) over every pixel of g, one pass (conv3x3_bwd_gz_kernel); g, gz channels_last."""
    n, c_out, h, w = g.shape
    m = n * h * w
    block_c = min(64, configs.next_pow2(c_out))
    idx64 = m * c_out >= 2**31
    flags = dict(INTERP_BF16=_dtype_flags(g.dtype)["INTERP_BF16"], IDX64=idx64, BLOCK_P=configs.GZ_BLOCK_P,
                 BLOCK_C=block_c)
    grid = (cdiv(m, configs.GZ_BLOCK_P), cdiv(c_out, block_c), 1)
    # the JIT specialises C_OUT (an int: == 1, % 16) and the pointers' alignment; g is the caller's
    GZ.launch((("gz", c_out, g.dtype, g.device, idx64), aligned(g)), grid, (g, mask, gz, m, c_out, float(slope)),
              flags, _FIN_CONFIG)


# ------------------------------------------------------------------------------------------------
# Backward of one conv (2 launches, 3 with an activation)
# ------------------------------------------------------------------------------------------------
def conv_backward(grad, inputs, weight, w_k, mask, slope, scale: float, has_bias: bool,
                  dx_config=None, dw_config=None, dw_split: Optional[int] = None):
    """([dx per input], dW, db or None). w_k: the forward's kernel_weight(weight)."""
    g = _cl(grad)
    xs = [_cl(x) for x in inputs]
    n, c_out, h, w = g.shape
    dw = _grad_like(weight, w_k)
    db = torch.empty((c_out,), dtype=w_k.dtype, device=w_k.device) if has_bias else None
    dxs = [_empty_cl(*x.shape, x) for x in xs]
    if n * h * w == 0:  # an empty batch: zero parameter grads, empty input grads
        return dxs, dw.zero_(), db.zero_() if has_bias else None
    x2 = xs[1] if len(xs) == 2 else None
    dx2 = dxs[1] if x2 is not None else None
    if slope is None:  # dW + db from g itself, then dX with the finalize in the same launch
        dwp, dbp, split = _dw_partials(xs[0], x2, g, has_bias, dw_split, dw_config)
        _dx((g, w_k, 0), None, dxs[0], dx2, None, None, scale, Finalize(dwp, dbp, dw, db, split, scale), None,
            dx_config)
        return dxs, dw, db
    gz = _scratch_cl("gz", n, c_out, h, w, g)  # dX first: it makes gz on the fly and writes it for dW
    _dx((g, w_k, 0), None, dxs[0], dx2, None, slope, scale, None, None, dx_config, a_mask=mask, gz_out=gz)
    dwp, dbp, split = _dw_partials(xs[0], x2, gz, has_bias, dw_split, dw_config)
    _finalize(Finalize(dwp, dbp, dw, db, split, scale))
    return dxs, dw, db

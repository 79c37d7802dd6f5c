"""Host overhead of the fused kernels' launch path, on CPU, with a stand-in launcher.

    python bench/host_overhead.py [--batch 1] [--rounds 5] [--iters 200] [--json out.json] [--phases] [--ridb]
    python bench/host_overhead.py --ridb-ops | --up | --out | --gen | --tapes   [--rounds 5] [--iters 200] [--json out.json]

Times the Python around the kernels for one IDB forward + backward (nf 64, gc 32, 32x32, bf16,
channels_last activations) with every Triton launch replaced by a stand-in that only counts: the
autograd Function(s), argument checks, plans, allocations, weight re-layouts, grid/argument packing.
Not included: Triton's own per-launch dispatch, which needs a GPU driver; the issue measured it at
22-27 us for Autotuner.run + JITFunction.run and ~2 us for a kept CompiledKernel. The printed total
adds those per launch (JIT path for the old code, compiled path for the new) as an estimate.

Works on this tree (gafh_fast.kernels.launch.STANDIN) and on the tree before issue 11 (e86807d:
its module-level kernel objects are replaced by stand-ins), so before/after come from one script:
    PYTHONPATH=<old tree> python bench/host_overhead.py
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

JIT_US, COMPILED_US = 24.5, 2.0  # per-launch Triton dispatch (issue 11's CPU measurements), for the estimate


class _StandInKernel:
    """Old tree: stands in for a JITFunction/Autotuner: kernel[grid](*args, **kw) counts, does nothing."""

    def __init__(self, counter):
        self.counter = counter

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.counter[0] += 1
        return run


def _install_standin():
    """-> (counter list [launches], tree name)."""
    counter = [0]
    import gafh_fast.kernels as package

    if hasattr(package, "fused_idb_triton"):  # this tree (an import hook may map the old tree's names)
        from gafh_fast.kernels import launch

        class _Compiled:
            """Launched like Triton's CompiledKernel: its runner reads grid[0], grid[1] and grid[2] (ints), and
            takes the kernel's arguments, constexprs last, each a tensor where the first launch had one and
            a number where it had one, as Triton's C launcher would refuse otherwise.
            Checked on its first CHECKED_CALLS calls only: a kept kernel's first call, a tape's recording and
            its first replays, which every timing's warm-up makes. A later call repeats one of those (the
            same tape, or the same plain host code), so it only counts. Checking every call cost ~8 us a
            launch on the 2-core CPU, ~27 % of the paper G's host time here (bench/RESULTS.md, Round 13):
            the stand-in's time, not our host code's."""
            CHECKED_CALLS = 4

            def __init__(self, args, constexprs):
                self.kinds = [isinstance(a, torch.Tensor) for a in args] + [False] * len(constexprs)
                self.checks_left = self.CHECKED_CALLS

            def __getitem__(self, grid):
                def run(*args):
                    if self.checks_left:
                        self.checks_left -= 1
                        if not all(isinstance(grid[i], int) for i in range(3)):  # IndexError on a short grid, as on the GPU
                            raise TypeError(f"grid {grid!r}: three ints expected")
                        if [isinstance(a, torch.Tensor) for a in args] != self.kinds:
                            raise TypeError("the launch's arguments do not match the kernel's (count or tensor positions)")
                    counter[0] += 1
                return run

        def standin(name, grid, args, constexprs, options, key=None):  # key: trees before 38333e1 pass none
            counter[0] += 1
            return _Compiled(args, constexprs)

        launch.STANDIN = standin
        from gafh_fast.kernels import conv3x3

        conv3x3.AUTOTUNE = False  # no GPU to time on: each kernel's first heuristic candidate
        return counter, "issue-11 tree (plans + kept compiled kernels)"
    from gafh_fast.kernels import conv3x3_bwd as bwd, conv3x3_fwd as fwd

    for mod in (fwd, bwd):
        for name in list(vars(mod)):
            if name.startswith("conv3x3_") and (name.endswith("_kernel") or name.endswith("_autotuned")):
                setattr(mod, name, _StandInKernel(counter))
    return counter, "pre-issue-11 tree (two Functions per IDB, autotuned JIT launches)"


def _idb_tensors(batch: int, weight_layout: str):
    """(x, x0, w1, b1, w2, b2, gy): x and x0 apart, x0 without grad, so that autograd's own x-gradient
    add (real CPU work here) stays out."""
    fmt = dict(dtype=torch.bfloat16)
    cl = torch.channels_last
    x = torch.randn(batch, 64, 32, 32, **fmt).contiguous(memory_format=cl).requires_grad_()
    x0 = torch.randn(batch, 64, 32, 32, **fmt).contiguous(memory_format=cl)
    ws = [torch.randn(32, 64, 3, 3, **fmt), torch.randn(64, 96, 3, 3, **fmt)]
    if weight_layout == "channels_last":
        ws = [w.contiguous(memory_format=cl) for w in ws]
    w1, w2 = (w.requires_grad_() for w in ws)
    b1, b2 = torch.zeros(32, **fmt, requires_grad=True), torch.zeros(64, **fmt, requires_grad=True)
    gy = torch.randn(batch, 64, 32, 32, **fmt).contiguous(memory_format=cl)
    return x, x0, w1, b1, w2, b2, gy


def _idb_call(batch: int, weight_layout: str):
    from gafh_fast import kernels

    x, x0, w1, b1, w2, b2, gy = _idb_tensors(batch, weight_layout)
    params = [x, w1, b1, w2, b2]

    if hasattr(kernels, "fused_idb_triton"):
        def step():
            kernels.fused_idb_triton(x, x0, w1, b1, w2, b2, 0.2).backward(gy)
    else:
        def step():
            h1 = kernels.fused_conv3x3_triton([x], w1, b1, 0.2, None, 1.0, None, 1.0)
            kernels.fused_conv3x3_triton([x, h1], w2, b2, 0.2, x0, 1.0, None, 1.0).backward(gy)

    def call():
        step()
        for p in params:
            p.grad = None
    return call


def _per_round_us(fn, rounds: int, iters: int) -> list[float]:
    """Mean us per call of fn, for each of `rounds` rounds of `iters` calls."""
    per_round = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        per_round.append((time.perf_counter() - t0) * 1e6 / iters)
    return per_round


def _alternating(calls: dict, counter: list, rounds: int, iters: int) -> dict:
    """{name: (launches per call, median us, fastest round us)} of each warmed-up call; the calls alternate
    round by round, so this VM's drifting load hits all of them alike."""
    launches = {}
    for name, call in calls.items():
        for _ in range(5):
            call()
        counter[0] = 0
        call()
        launches[name] = counter[0]
    per_round = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            per_round[name] += _per_round_us(call, 1, iters)
    return {name: (launches[name], round(statistics.median(per_round[name]), 1), round(min(per_round[name]), 1))
            for name in calls}


def _median_us(fn, rounds: int, iters: int) -> float:
    return statistics.median(_per_round_us(fn, rounds, iters))


def measure(batch: int, rounds: int, iters: int) -> list[dict]:
    counter, tree = _install_standin()
    rows = []
    for layout in ("nchw", "channels_last"):
        call = _idb_call(batch, layout)
        for _ in range(5):
            call()  # plans, first launches
        counter[0] = 0
        call()
        launches = counter[0]
        per_round = _per_round_us(call, rounds, iters)
        host_us = statistics.median(per_round)
        dispatch = COMPILED_US if tree.startswith("issue-11") else JIT_US
        rows.append(dict(tree=tree, weights=layout, batch=batch, launches=launches, host_us=round(host_us, 1),
                         spread_pct=round(100 * (max(per_round) - min(per_round)) / host_us, 1),
                         est_total_us=round(host_us + launches * dispatch, 1), dispatch_us_per_launch=dispatch))
        print(f"{tree} | weights {layout:13s} | batch {batch} | {launches} launches | host {host_us:7.1f} us "
              f"(spread {rows[-1]['spread_pct']}%) | + {launches} x {dispatch} us dispatch = "
              f"{rows[-1]['est_total_us']} us per IDB fwd+bwd")
    return rows


def phases(batch: int, rounds: int, iters: int) -> dict:
    """This tree only, channels_last weights: where the host time of one IDB forward + backward goes.
    The Function's forward and autograd's backward, against the host code they call (idb.py's
    idb_forward / idb_backward) run alone; the difference is PyTorch's (autograd Function, graph,
    engine, gradient accumulation into 5 leaves)."""
    from gafh_fast import kernels
    from gafh_fast.kernels import conv3x3, idb

    _install_standin()
    x, x0, w1, b1, w2, b2, gy = _idb_tensors(batch, "channels_last")
    w1k, w2k = conv3x3.kernel_weight(w1), conv3x3.kernel_weight(w2)
    y, h1, m1, m2 = idb.idb_forward(x, x0, w1, b1, w2, b2, 0.2, True, w1k, w2k)
    out: dict = {}

    def through_autograd(part: str):
        def call():
            t0 = time.perf_counter()
            y_ = kernels.fused_idb_triton(x, x0, w1, b1, w2, b2, 0.2)
            t1 = time.perf_counter()
            y_.backward(gy)
            t2 = time.perf_counter()
            out.setdefault(part, []).append((t1 - t0) if part == "fwd" else (t2 - t1))
            for p in (x, w1, b1, w2, b2):
                p.grad = None
        return call

    for part in ("fwd", "bwd"):
        call = through_autograd(part)
        for _ in range(iters):
            call()  # plans, first launches; then the recorded rounds
        out[part] = []
        _median_us(call, rounds, iters)
    rows = {"function_forward_us": statistics.median(out["fwd"]) * 1e6,
            "autograd_backward_us": statistics.median(out["bwd"]) * 1e6,
}
    alone = {"forward": lambda: idb.idb_forward(x, x0, w1, b1, w2, b2, 0.2, True, w1k, w2k),
             "backward": lambda: idb.idb_backward(gy, x, h1, w1, w1k, w2, w2k, m1, m2, 0.2)}
    for part, fn in alone.items():
        per_round = _per_round_us(fn, rounds, iters)
        rows[f"idb_{part}_alone_us"] = statistics.median(per_round)
        # the fastest round: on a shared VM the estimator least hit by other processes (before/after pairs)
        rows[f"idb_{part}_alone_min_us"] = min(per_round)
    ours = rows["idb_forward_alone_us"] + rows["idb_backward_alone_us"]
    total = rows["function_forward_us"] + rows["autograd_backward_us"]
    rows.update(ours_us=ours, pytorch_us=total - ours, total_us=total)
    print(f"phases (channels_last weights, batch {batch}): forward {rows['function_forward_us']:.1f} us "
          f"(idb_forward alone {rows['idb_forward_alone_us']:.1f}), backward {rows['autograd_backward_us']:.1f} us "
          f"(idb_backward alone {rows['idb_backward_alone_us']:.1f}): our host code {ours:.1f} us, "
          f"PyTorch's autograd around it {total - ours:.1f} us of {total:.1f}; fastest rounds of our host code: "
          f"forward {rows['idb_forward_alone_min_us']:.1f} + backward {rows['idb_backward_alone_min_us']:.1f} us")
    return {k: round(v, 1) for k, v in rows.items()}


def _fwd_bwd_calls(paths: dict, gy, params) -> dict:
    """{name: a call of forward path(), backward with gy, then the params' grads dropped}."""
    calls = {}
    for name, fwd in paths.items():
        def call(fwd=fwd):
            fwd().backward(gy)
            for t in params:
                t.grad = None
        calls[name] = call
    return calls


def ridb_rows(rounds: int, iters: int, side: int = 8) -> list[dict]:
    """This tree only: one RIDB (4 IDBs + its conv, nf 64, gc 32, bf16, channels_last) forward +
    backward as 5 Functions (fused_idb_triton x 4 + fused_conv3x3_triton: autograd sums x0's 5 gradient
    terms with its own adds) and as one (fused_ridb_triton: the sum is in the dX epilogues). The images
    are side x side (8 by default) so that the CPU adds of the first path cost ~what their launch would
    on a GPU, not a 32x32 tensor's CPU arithmetic."""
    from gafh_fast import kernels

    counter, _ = _install_standin()
    fmt = dict(dtype=torch.bfloat16)
    cl = torch.channels_last
    x0 = torch.randn(1, 64, side, side, **fmt).contiguous(memory_format=cl).requires_grad_()
    idbs = [(torch.randn(32, 64, 3, 3, **fmt).contiguous(memory_format=cl).requires_grad_(),
             torch.zeros(32, **fmt, requires_grad=True),
             torch.randn(64, 96, 3, 3, **fmt).contiguous(memory_format=cl).requires_grad_(),
             torch.zeros(64, **fmt, requires_grad=True)) for _ in range(4)]
    w = torch.randn(64, 64, 3, 3, **fmt).contiguous(memory_format=cl).requires_grad_()
    b = torch.zeros(64, **fmt, requires_grad=True)
    gy = torch.randn(1, 64, side, side, **fmt).contiguous(memory_format=cl)
    params = [x0, w, b, *(t for p in idbs for t in p)]

    def per_idb():
        x = x0
        for p in idbs:
            x = kernels.fused_idb_triton(x, x0, *p, 0.2)
        return kernels.fused_conv3x3_triton([x], w, b, None, x0, 0.2, None, 1.0)

    def one_function():
        return kernels.fused_ridb_triton(x0, idbs, w, b, 0.2, None, 1.0, 0.2)

    paths = {"5 Functions (per IDB + conv)": per_idb, "1 Function (fused_ridb)": one_function}
    rows = []
    for name, (launches, host_us, host_min_us) in _alternating(_fwd_bwd_calls(paths, gy, params), counter, rounds,
                                                                 iters).items():
        rows.append(dict(ridb=name, side=side, launches=launches, host_us=host_us, host_min_us=host_min_us))
        print(f"RIDB fwd+bwd, {name:30s}: {launches} Triton launches, host {host_us:7.1f} us "
              f"(fastest round {host_min_us:.1f})")
    return rows


def ridb_op_rows(rounds: int, iters: int, side: int = 8) -> list[dict]:
    """One RIDB forward + backward the way torch.compile's graphs run it (the trainer compiles G's DNBs
    on CUDA): the custom ops gafh_fast::fused_ridb_fwd then fused_ridb_bwd, called as the compiled
    forward and backward call them, with NCHW weights (the trainer's: train/layout.py) and with
    channels_last ones. Their host time includes the op dispatch and the weights' channels_last copies
    (real copies on this CPU; launches on a GPU). Works on trees whose backward op takes the forward's
    weight copies (kernel_weights) and on those before, which copied the weights again."""
    from gafh_fast import kernels  # noqa: F401  registers the ops

    counter, _ = _install_standin()
    fmt = dict(dtype=torch.bfloat16)
    cl = torch.channels_last
    bwd_op = torch.ops.gafh_fast.fused_ridb_bwd.default
    takes_copies = "kernel_weights" in str(bwd_op._schema)
    rows = []
    calls = {}
    for layout in ("nchw", "channels_last"):
        def weight(*shape):
            t = torch.randn(*shape, **fmt)
            return t.contiguous(memory_format=cl) if layout == "channels_last" else t
        x0 = torch.randn(1, 64, side, side, **fmt).contiguous(memory_format=cl)
        flat = [t for _ in range(4) for t in (weight(32, 64, 3, 3), torch.zeros(32, **fmt), weight(64, 96, 3, 3),
                                              torch.zeros(64, **fmt))]
        w, b = weight(64, 64, 3, 3), torch.zeros(64, **fmt)
        gy = torch.randn_like(x0)
        weights = [flat[4 * q + k] for q in range(4) for k in (0, 2)]

        def call(x0=x0, flat=flat, w=w, b=b, gy=gy, weights=weights):
            out = torch.ops.gafh_fast.fused_ridb_fwd.default(x0, None, w, b, flat, 0.2, 1.0, 0.2, True)
            saved = out[1:17]
            if takes_copies:
                from gafh_fast.kernels.conv3x3 import reads_in_place  # trees with the copies have it

                copies = iter(out[17:])
                kernel_weights = [t if reads_in_place(t) else next(copies) for t in weights + [w]]
                bwd_op(gy, x0, saved, w, weights, kernel_weights, 0.2, 1.0, 0.2)
            else:
                bwd_op(gy, x0, saved, w, weights, 0.2, 1.0, 0.2)
        calls[layout] = call
    for name, (launches, host_us, host_min_us) in _alternating(calls, counter, rounds, iters).items():
        rows.append(dict(ridb_ops=name, side=side, launches=launches, backward_takes_copies=takes_copies,
                         host_us=host_us, host_min_us=host_min_us))
        print(f"RIDB custom ops fwd+bwd, {name} weights: {launches} Triton launches, host {host_us:7.1f} us "
              f"(fastest round {host_min_us:.1f})")
    return rows


def up_rows(rounds: int, iters: int, side: int = 8) -> list[dict]:
    """This tree only: one upsampling stage (nearest x2 -> conv nf -> nf -> LeakyReLU, bf16, channels_last,
    NCHW weights as the trainer's) forward + backward, the way the generator ran it before Round 7
    (F.interpolate + fused_conv3x3_triton: 4 Triton launches, torch's interpolate and its backward) and
    now (fused_upconv3x3_triton: 5 Triton launches). side x side input (8 by default), so that the CPU
    interpolate costs ~what its launch would on a GPU."""
    import torch.nn.functional as F

    from gafh_fast import kernels

    counter, _ = _install_standin()
    fmt = dict(dtype=torch.bfloat16)
    x = torch.randn(1, 64, side, side, **fmt).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(64, 64, 3, 3, **fmt).requires_grad_()
    b = torch.zeros(64, **fmt, requires_grad=True)
    gy = torch.randn(1, 64, 2 * side, 2 * side, **fmt).contiguous(memory_format=torch.channels_last)

    def before():
        up = F.interpolate(x, scale_factor=2, mode="nearest")
        return kernels.fused_conv3x3_triton([up], w, b, 0.2, None, 1.0, None, 1.0)

    def after():
        return kernels.fused_upconv3x3_triton(x, w, b, 0.2)

    paths = {"interpolate + fused_conv3x3 (before)": before, "fused_upconv3x3 (phases)": after}
    rows = []
    for name, (launches, host_us, host_min_us) in _alternating(_fwd_bwd_calls(paths, gy, (x, w, b)), counter, rounds,
                                                                 iters).items():
        rows.append(dict(up=name, side=side, launches=launches, host_us=host_us, host_min_us=host_min_us))
        print(f"upsampling stage fwd+bwd, {name:38s}: {launches} Triton launches, host {host_us:7.1f} us "
              f"(fastest round {host_min_us:.1f})")
    return rows


def out_rows(rounds: int, iters: int, side: int = 2) -> list[dict]:
    """This tree only: the output layer (tanh(conv 9x9, 64 -> 3), bf16, channels_last input, NCHW weight)
    forward + backward in plain torch (conv2d + tanh: no Triton launch; on a GPU 5 launches: conv, tanh,
    their backwards) and through fused_out_conv_triton (the same forward, 3 Triton launches backward);
    then the generator's pair, the last upsampling step with it, through fused_up_out_conv_triton (2 + 5).
    2x2 images by default: the CPU conv then costs little next to the host code."""
    import torch.nn.functional as F

    from gafh_fast import kernels

    counter, _ = _install_standin()
    fmt = dict(dtype=torch.bfloat16)
    x = torch.randn(1, 64, side, side, **fmt).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(3, 64, 9, 9, **fmt).requires_grad_()
    b = torch.zeros(3, **fmt, requires_grad=True)
    gy = torch.randn(1, 3, side, side, **fmt).contiguous(memory_format=torch.channels_last)
    x_lo = torch.randn(1, 64, side // 2, side // 2, **fmt).contiguous(memory_format=torch.channels_last).requires_grad_()
    w_up = torch.randn(64, 64, 3, 3, **fmt).requires_grad_()
    b_up = torch.zeros(64, **fmt, requires_grad=True)
    paths = {"torch (conv2d + tanh)": lambda: torch.tanh(F.conv2d(x, w, b, padding=4)),
             "fused_out_conv (Triton backward)": lambda: kernels.fused_out_conv_triton(x, w, b),
             "fused_up_out_conv (with the last step)": lambda: kernels.fused_up_out_conv_triton(x_lo, w_up, b_up, w, b)}
    rows = []
    calls = _fwd_bwd_calls(paths, gy, (x, w, b, x_lo, w_up, b_up))
    for name, (launches, host_us, host_min_us) in _alternating(calls, counter, rounds, iters).items():
        rows.append(dict(out=name, side=side, launches=launches, host_us=host_us, host_min_us=host_min_us))
        print(f"output layer fwd+bwd, {name:38s}: {launches} Triton launches, host {host_us:7.1f} us "
              f"(fastest round {host_min_us:.1f}; the torch path's CPU conv included)")
    return rows


def gen_rows(rounds: int, iters: int, lr: int = 2) -> list[dict]:
    """This tree only: the whole paper generator (4 DNBs x 3 RIDBs x 4 IDBs, nf 64, gc 32, bf16, channels_last)
    forward + backward at lr x lr input (2x2 by default: 16x16 output), once with kernels=torch (every op
    runs on this CPU; at these sizes their arithmetic is small next to PyTorch's per-op cost, which is what
    an eager step pays per layer on a GPU before any kernel) and once with kernels=triton through the
    stand-in launcher (our host code and the launches' count; the ops that stay torch's, the SFM and
    output convs, the BatchNorm and tanh, run on this CPU as on the eager path). The device check of the
    triton backend is lifted for this, as the stand-in makes the CUDA-only launch a count.
    Estimate for a GPU host: each path's time plus COMPILED_US per Triton launch; the eager path's CUDA
    launches are not counted (a lower bound)."""
    import gafh_fast.ops as ops
    from gafh_fast.config import load_config
    from gafh_fast.models.generator import Generator

    counter, _ = _install_standin()
    ops.triton_unavailable_reason = lambda device: None  # the stand-in launches: no CUDA needed (this tool only)
    cfg = load_config(None)  # the paper generator (it takes any input size)
    fmt = dict(dtype=torch.bfloat16)
    x = torch.rand(1, 3, lr, lr, **fmt).contiguous(memory_format=torch.channels_last)
    gy = torch.randn(1, 3, 8 * lr, 8 * lr, **fmt).contiguous(memory_format=torch.channels_last)
    models = {kernels: Generator(cfg.model.generator, kernels=kernels).to(**fmt).to(memory_format=torch.channels_last)
              for kernels in ("torch", "triton")}
    paths = {"kernels=torch (eager)": lambda: models["torch"](x),
             "kernels=triton (stand-in launches)": lambda: models["triton"](x)}
    params = [p for m in models.values() for p in m.parameters()]
    rows = []
    for name, (launches, host_us, host_min_us) in _alternating(_fwd_bwd_calls(paths, gy, params), counter, rounds,
                                                                 iters).items():
        estimate = host_us + launches * COMPILED_US
        rows.append(dict(gen=name, lr=lr, launches=launches, host_us=host_us, host_min_us=host_min_us,
                         estimate_us=round(estimate, 1)))
        print(f"paper generator fwd+bwd at {lr}x{lr}, {name:36s}: {launches} Triton launches, host "
              f"{host_us / 1000:7.2f} ms (fastest round {host_min_us / 1000:.2f}; + {COMPILED_US:g} us per launch: "
              f"{estimate / 1000:.2f} ms)")
    return rows


def tape_rows(rounds: int, iters: int, lr: int = 2) -> list[dict]:
    """This tree only: the host code of the IDB (bench/kernels_suite.py's idb_fwd_bwd call: x is x0, the
    gradient of a .sum()), one RIDB (side 8) and the paper generator (lr x lr input), each forward +
    backward through the tapes (kernels/tape.py: every call after a signature's second replays its
    launches) and through the plain host code (tape.USE_TAPES off), alternating round by round."""
    import gafh_fast.ops as ops
    from gafh_fast import kernels
    from gafh_fast.config import load_config
    from gafh_fast.kernels import tape
    from gafh_fast.models.generator import Generator

    counter, _ = _install_standin()
    ops.triton_unavailable_reason = lambda device: None  # the stand-in launches: no CUDA needed (this tool only)
    fmt = dict(dtype=torch.bfloat16)
    cl = torch.channels_last
    x, _x0, w1, b1, w2, b2, _gy = _idb_tensors(1, "channels_last")
    gen = Generator(load_config(None).model.generator, kernels="triton").to(**fmt).to(memory_format=cl)
    lr_img = torch.rand(1, 3, lr, lr, **fmt).contiguous(memory_format=cl)
    gy = torch.randn(1, 3, 8 * lr, 8 * lr, **fmt).contiguous(memory_format=cl)
    ridb_x0 = torch.randn(1, 64, 8, 8, **fmt).contiguous(memory_format=cl).requires_grad_()
    ridb = gen.mdbm[0].ridbs[0]
    workloads = {
        "IDB (x is x0, .sum() gradient)": (lambda: kernels.fused_idb_triton(x, x, w1, b1, w2, b2, 0.2).sum().backward(),
                                           [x, w1, b1, w2, b2]),
        "RIDB (8x8)": (lambda: ridb(ridb_x0).sum().backward(), [ridb_x0, *ridb.parameters()]),
        f"paper generator ({lr}x{lr})": (lambda: gen(lr_img).backward(gy), list(gen.parameters())),
    }
    calls = {}
    for name, (step, params) in workloads.items():
        for use in (True, False):
            def call(step=step, params=params, use=use):
                tape.USE_TAPES = use
                step()
                for p in params:
                    p.grad = None
            calls[(name, use)] = call
    try:
        timed = _alternating(calls, counter, rounds, iters)
    finally:
        tape.USE_TAPES = True
    recorded = {t.name: sorted(n for n in t.state().values() if isinstance(n, int)) for t in tape.TAPED}
    rows = []
    for name in workloads:
        (launches, taped_us, taped_min), (_, plain_us, plain_min) = timed[(name, True)], timed[(name, False)]
        rows.append(dict(tapes=name, launches=launches, taped_us=taped_us, plain_us=plain_us, taped_min_us=taped_min,
                         plain_min_us=plain_min, taped_over_plain=round(taped_us / plain_us, 3),
                         recorded_launches=recorded))
        print(f"{name:32s}: {launches} Triton launches, host {taped_us:8.1f} us through the tapes, {plain_us:8.1f} us "
              f"plain ({taped_us / plain_us:.2f}x; fastest rounds {taped_min:.1f} / {plain_min:.1f})")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=1,
                        help="small by default: CPU-side tensor work (the old path's gradient adds) stays small")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--json")
    parser.add_argument("--phases", action="store_true",
                        help="also split this tree's time: our host code vs PyTorch's autograd around it")
    parser.add_argument("--ridb", action="store_true",
                        help="also time one RIDB as 5 Functions against the one fused_ridb Function")
    parser.add_argument("--ridb-ops", action="store_true",
                        help="only time one RIDB through its custom ops (torch.compile's path), NCHW and "
                             "channels_last weights")
    parser.add_argument("--up", action="store_true",
                        help="only time one upsampling stage: interpolate + conv against fused_upconv3x3")
    parser.add_argument("--out", action="store_true",
                        help="only time the output layer: conv2d + tanh against fused_out_conv")
    parser.add_argument("--gen", action="store_true",
                        help="only time the whole paper generator at 2x2 input: kernels=torch against kernels=triton")
    parser.add_argument("--tapes", action="store_true",
                        help="only time the IDB, a RIDB and the generator through the tapes against the plain host code")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.ridb_ops or args.up or args.out or args.gen or args.tapes:
        rows = (ridb_op_rows(args.rounds, args.iters) if args.ridb_ops else up_rows(args.rounds, args.iters)
                if args.up else out_rows(args.rounds, args.iters) if args.out else tape_rows(args.rounds, args.iters)
                if args.tapes else gen_rows(args.rounds, args.iters))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return
    rows = measure(args.batch, args.rounds, args.iters)
    if args.ridb:
        rows.append({"ridb": ridb_rows(args.rounds, args.iters)})
    if args.phases:
        rows.append({"phases": phases(args.batch, args.rounds, args.iters)})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

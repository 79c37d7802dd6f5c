"""The one switch between the plain-PyTorch reference and the fused Triton kernels.

Every 3x3 convolution of the generator trunk calls `fused_conv3x3`, every internal dense block
`fused_idb` (its two convs in one autograd Function), every RIDB `fused_ridb` (its IDBs and closing
conv in one autograd Function), every nearest-x2 upsampling step with its conv `fused_upconv3x3`,
the output layer (conv + tanh) `fused_out_conv`, and the last upsampling step with the output layer
`fused_up_out_conv`.
Their `torch` backend below is the reference semantics; the `triton` backend (gafh_fast.kernels)
computes the same thing in fewer passes.

`auto`: torch on CPU. On CUDA, per op shape (and whether a backward follows), the faster of triton
and torch, timed once per process like cudnn.benchmark (AutoChooser below), each decision logged.
Under torch.compile an undecided shape takes torch (timing inside a trace is impossible).
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Callable, Optional, Sequence

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
        # on CUDA the choice is per op shape, timed (AutoChooser); "auto" tells the caller to ask it
        chosen = "auto" if device.type == "cuda" and triton_unavailable_reason(device) is None else "torch"
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
        log.info("fused_conv3x3: kernels=%s -> %s backend on %s%s", backend, chosen, device.type,
                 " (per shape: the faster of triton and torch, timed once)" if chosen == "auto" else "")
    return chosen


@contextlib.contextmanager
def unlogged_choice(backend: str, chosen: str):
    """resolve_backend(backend) -> chosen is not logged inside (a throwaway model's choice, e.g. the
    precompile twins' kernels=triton in a run configured otherwise), and the log-once state is left
    as it was, so the run's own choice still logs once."""
    key = (backend, chosen)
    had = key in _logged_choices
    _logged_choices.add(key)
    try:
        yield
    finally:
        if not had:
            _logged_choices.discard(key)


def wants_precompile(backend: str, device: torch.device) -> bool:
    """Whether a model on `device` with kernels=`backend` launches compiled Triton kernels, which
    gafh_fast.models.generator.precompile_kernels then compiles up front: CUDA, and `auto` (its timed
    decision runs the Triton path of every shape) or `triton`. Never under the interpreter."""
    return device.type == "cuda" and resolve_backend(backend, device) != "torch"


def median_ms_per_call(fn: Callable[[], None], device: torch.device, calls: int = 5, rounds: int = 3) -> float:
    """Median over rounds of the mean ms per call of `calls` back-to-back calls, the device drained
    before and after (host and device time both count: in eager mode either can bound a call)."""
    fn()  # warm-up: compilation, autotuning, cudnn.benchmark search happen here
    fn()
    times = []
    for _ in range(rounds):
        _drain(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        _drain(device)
        times.append((time.perf_counter() - t0) * 1e3 / calls)
    return sorted(times)[len(times) // 2]


def _drain(device: torch.device) -> None:
    if device.type == "cuda":  # the only device-specific line of the timed decision
        torch.cuda.synchronize(device)


class AutoChooser:
    """The faster backend per (op, shape) key, timed once per process on fresh random tensors of that
    shape (a private generator: the caller's RNG stream is untouched), each decision logged."""

    def __init__(self, timer: Callable[[Callable[[], None], torch.device], float] = median_ms_per_call):
        self.timer = timer
        self.decisions: dict[tuple, str] = {}
        self.timings: dict[tuple, dict[str, float]] = {}

    def choose(self, key: tuple, impls: dict[str, Callable], args: Sequence, needs_grad: bool) -> str:
        hit = self.decisions.get(key)
        if hit is not None:
            return hit
        if torch.compiler.is_compiling():
            return "torch"
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        gen = torch.Generator(device=device).manual_seed(0)
        fresh = [torch.randn(a.shape, generator=gen, device=device, dtype=a.dtype).to(
                 memory_format=torch.channels_last if a.dim() == 4 and a.is_contiguous(
                     memory_format=torch.channels_last) else torch.contiguous_format)
                 if isinstance(a, torch.Tensor) else a for a in args]
        times = {}
        for name, impl in impls.items():
            def call(impl=impl):
                leaves = [a.detach().requires_grad_(needs_grad) if isinstance(a, torch.Tensor) else a for a in fresh]
                with torch.set_grad_enabled(needs_grad):
                    out = impl(*leaves)
                    if needs_grad:
                        out.backward(torch.ones_like(out))
            times[name] = float(self.timer(call, device))
        chosen = min(times, key=times.__getitem__)
        self.decisions[key] = chosen
        self.timings[key] = times
        log.info("kernels=auto %s: %s -> %s", key, ", ".join(f"{k} {v:.4f} ms" for k, v in times.items()), chosen)
        return chosen


AUTO = AutoChooser()


def _shape_key(op: str, tensors, needs_grad: bool, *extra) -> tuple:
    return (op, tuple(None if t is None else tuple(t.shape) for t in tensors),
            str(tensors[0].dtype).replace("torch.", ""), needs_grad, *extra)


def _needs_grad(tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


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
    if chosen == "auto":
        from gafh_fast.kernels import fused_conv3x3_triton

        n_in = len(inputs)

        def run(*a, triton_path):
            xs, rest = list(a[:n_in]), a[n_in:]
            impl = fused_conv3x3_triton if triton_path else fused_conv3x3_reference
            return impl(xs, rest[0], rest[1], negative_slope, rest[2], res_scale, rest[3], res2_scale)

        tensors = (*inputs, weight, bias, residual, residual2)
        key = _shape_key("conv3x3", tensors, _needs_grad(tensors), negative_slope is None, res_scale, res2_scale)
        chosen = AUTO.choose(key, {"triton": lambda *a: run(*a, triton_path=True),
                                   "torch": lambda *a: run(*a, triton_path=False)}, tensors, key[3])
    if chosen == "torch":
        return fused_conv3x3_reference(
            inputs, weight, bias, negative_slope, residual, res_scale, residual2, res2_scale
        )
    from gafh_fast.kernels import fused_conv3x3_triton

    return fused_conv3x3_triton(
        list(inputs), weight, bias, negative_slope, residual, res_scale, residual2, res2_scale
    )


def fused_idb_reference(x, x0, w1, b1, w2, b2, negative_slope: float = 0.2) -> torch.Tensor:
    """The internal dense block as two reference convs (spec: h1 = LReLU(conv(x)); x0 + LReLU(conv([x, h1])))."""
    h1 = fused_conv3x3_reference([x], w1, b1, negative_slope)
    return fused_conv3x3_reference([x, h1], w2, b2, negative_slope, x0, 1.0)


def fused_idb(x: torch.Tensor, x0: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
              b2: Optional[torch.Tensor], *, negative_slope: float = 0.2, backend: str = "auto") -> torch.Tensor:
    """y = x0 + LReLU(conv3x3([x, LReLU(conv3x3(x, w1) + b1)], w2) + b2): one IDB, one op.

    The triton backend runs it as one autograd Function (2 launches forward, 4 backward)."""
    chosen = resolve_backend(backend, x.device)
    if chosen == "auto":
        from gafh_fast.kernels import fused_idb_triton

        tensors = (x, x0, w1, b1, w2, b2)
        key = _shape_key("idb", tensors, _needs_grad(tensors), negative_slope)
        chosen = AUTO.choose(key, {"triton": lambda *a: fused_idb_triton(*a, negative_slope),
                                   "torch": lambda *a: fused_idb_reference(*a, negative_slope)}, tensors, key[3])
    if chosen == "torch":
        return fused_idb_reference(x, x0, w1, b1, w2, b2, negative_slope)
    from gafh_fast.kernels import fused_idb_triton

    return fused_idb_triton(x, x0, w1, b1, w2, b2, negative_slope)


def fused_ridb_reference(x0, idbs, weight, bias, res_scale: float, residual2=None, res2_scale: float = 1.0,
                         negative_slope: float = 0.2) -> torch.Tensor:
    """A RIDB from the spec: x = x0; x = IDB_q(x) + x0 for each q; r2 + s2*(x0 + s*conv(x))."""
    x = x0
    for w1, b1, w2, b2 in idbs:
        x = fused_idb_reference(x, x0, w1, b1, w2, b2, negative_slope)
    return fused_conv3x3_reference([x], weight, bias, None, x0, res_scale, residual2, res2_scale)


def fused_ridb(x0: torch.Tensor, idbs: Sequence[tuple], weight: torch.Tensor, bias: Optional[torch.Tensor], *,
               res_scale: float, residual2: Optional[torch.Tensor] = None, res2_scale: float = 1.0,
               negative_slope: float = 0.2, backend: str = "auto") -> torch.Tensor:
    """One RIDB: its IDBs (idbs: [(w1, b1, w2, b2)] each) and its closing conv with the residual x0
    (res_scale) and optionally the DNB's residual2 (res2_scale), as one op.

    The triton backend runs it as one autograd Function whose backward hands each gradient straight to
    the launch that needs it next (gafh_fast/kernels/ridb.py)."""
    chosen = resolve_backend(backend, x0.device)
    idbs = [tuple(p) for p in idbs]
    if chosen == "auto":
        from gafh_fast.kernels import fused_ridb_triton

        n_idb = len(idbs)

        def split(a):  # the flat argument list AutoChooser hands back -> fused_ridb's arguments
            return a[0], [tuple(a[4 + 4 * q:8 + 4 * q]) for q in range(n_idb)], a[1], a[2], a[3]

        def run_triton(*a):
            x, ps, w, b, r2 = split(a)
            return fused_ridb_triton(x, ps, w, b, res_scale, r2, res2_scale, negative_slope)

        def run_torch(*a):
            x, ps, w, b, r2 = split(a)
            return fused_ridb_reference(x, ps, w, b, res_scale, r2, res2_scale, negative_slope)

        tensors = (x0, weight, bias, residual2, *(t for p in idbs for t in p))
        key = _shape_key("ridb", tensors, _needs_grad(tensors), negative_slope, res_scale, res2_scale)
        chosen = AUTO.choose(key, {"triton": run_triton, "torch": run_torch}, tensors, key[3])
    if chosen == "torch":
        return fused_ridb_reference(x0, idbs, weight, bias, res_scale, residual2, res2_scale, negative_slope)
    from gafh_fast.kernels import fused_ridb_triton

    return fused_ridb_triton(x0, idbs, weight, bias, res_scale, residual2, res2_scale, negative_slope)


def fused_upconv3x3_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                              negative_slope: Optional[float] = 0.2) -> torch.Tensor:
    """The spec's upsampling step in plain PyTorch: nearest x2, then conv3x3 (+ bias) and LeakyReLU."""
    return fused_conv3x3_reference([F.interpolate(x, scale_factor=2, mode="nearest")], weight, bias, negative_slope)


def fused_upconv3x3(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], *,
                    negative_slope: Optional[float] = 0.2, backend: str = "auto") -> torch.Tensor:
    """y = act(conv3x3(nearest_x2(x), weight) + bias): (N, C, H, W) -> (N, C_out, 2H, 2W).

    The triton backend never materialises the upsampled tensor: each of the four output phases is a 2x2
    conv of x with combined weights (4/9 of the FLOPs; gafh_fast/kernels/upconv_kernels.py)."""
    if weight.shape[-2:] != (3, 3):
        raise ValueError(f"fused_upconv3x3 takes 3x3 weights, got {tuple(weight.shape)}")
    chosen = resolve_backend(backend, x.device)
    if chosen == "auto":
        from gafh_fast.kernels import fused_upconv3x3_triton

        tensors = (x, weight, bias)
        key = _shape_key("upconv3x3", tensors, _needs_grad(tensors), negative_slope)
        chosen = AUTO.choose(key, {"triton": lambda *a: fused_upconv3x3_triton(*a, negative_slope),
                                   "torch": lambda *a: fused_upconv3x3_reference(*a, negative_slope)},
                             tensors, key[3])
    if chosen == "torch":
        return fused_upconv3x3_reference(x, weight, bias, negative_slope)
    from gafh_fast.kernels import fused_upconv3x3_triton

    return fused_upconv3x3_triton(x, weight, bias, negative_slope)


def fused_out_conv_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The generator's output layer in plain PyTorch: tanh(conv k x k, 'same' padding, + bias)."""
    return torch.tanh(F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2))


def fused_out_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], *,
                   backend: str = "auto") -> torch.Tensor:
    """y = tanh(conv(x, weight) + bias) for an odd k x k weight with few output channels (the
    generator's 64 -> 3, 9x9 output layer).

    The triton backend's forward is cuDNN's conv, or a GEMM + a Triton fold when the tuner times it
    faster (gafh_fast/kernels/outconv.py), and its backward is three Triton launches that gather the
    3-channel gradient over the flattened (tap, output channel) index (gafh_fast/kernels/outconv_kernels.py)."""
    chosen = resolve_backend(backend, x.device)
    if chosen == "auto":
        from gafh_fast.kernels import fused_out_conv_triton

        tensors = (x, weight, bias)
        key = _shape_key("out_conv", tensors, _needs_grad(tensors))
        chosen = AUTO.choose(key, {"triton": fused_out_conv_triton, "torch": fused_out_conv_reference},
                             tensors, key[3])
    if chosen == "torch":
        return fused_out_conv_reference(x, weight, bias)
    from gafh_fast.kernels import fused_out_conv_triton

    return fused_out_conv_triton(x, weight, bias)


def fused_up_out_conv_reference(x: torch.Tensor, up_weight: torch.Tensor, up_bias: Optional[torch.Tensor],
                                out_weight: torch.Tensor, out_bias: Optional[torch.Tensor],
                                negative_slope: Optional[float] = 0.2) -> torch.Tensor:
    """The generator's last upsampling step, then its output layer, in plain PyTorch (the two references)."""
    return fused_out_conv_reference(fused_upconv3x3_reference(x, up_weight, up_bias, negative_slope),
                                    out_weight, out_bias)


def fused_up_out_conv(x: torch.Tensor, up_weight: torch.Tensor, up_bias: Optional[torch.Tensor],
                      out_weight: torch.Tensor, out_bias: Optional[torch.Tensor], *,
                      negative_slope: Optional[float] = 0.2, backend: str = "auto") -> torch.Tensor:
    """fused_out_conv(fused_upconv3x3(x, up_weight, up_bias), out_weight, out_bias) as one op: the
    generator's last upsampling step and its output layer, (N, C, H, W) -> (N, C_out, 2H, 2W).

    The triton backend hands the gradient from one to the other in the output layer's dX epilogue, which
    applies the step's LeakyReLU' and writes its gz once (gafh_fast/kernels/upout.py). `auto` also times
    each layer on its own backend (triton step and torch output, and the other way round)."""
    if up_weight.shape[-2:] != (3, 3):
        raise ValueError(f"fused_up_out_conv takes a 3x3 upsampling weight, got {tuple(up_weight.shape)}")
    chosen = resolve_backend(backend, x.device)
    if chosen == "auto":
        from gafh_fast.kernels import fused_out_conv_triton, fused_up_out_conv_triton, fused_upconv3x3_triton

        tensors = (x, up_weight, up_bias, out_weight, out_bias)
        key = _shape_key("up_out_conv", tensors, _needs_grad(tensors), negative_slope)
        # besides the pair on one backend, each layer on its own: what the two ops' own decisions could pick
        mixed = {
            "triton step, torch output": lambda x, uw, ub, ow, ob: fused_out_conv_reference(
                fused_upconv3x3_triton(x, uw, ub, negative_slope), ow, ob),
            "torch step, triton output": lambda x, uw, ub, ow, ob: fused_out_conv_triton(
                fused_upconv3x3_reference(x, uw, ub, negative_slope), ow, ob),
        }
        chosen = AUTO.choose(key, {"triton": lambda *a: fused_up_out_conv_triton(*a, negative_slope),
                                   "torch": lambda *a: fused_up_out_conv_reference(*a, negative_slope), **mixed},
                             tensors, key[3])
        if chosen in mixed:
            return mixed[chosen](*tensors)
    if chosen == "torch":
        return fused_up_out_conv_reference(x, up_weight, up_bias, out_weight, out_bias, negative_slope)
    from gafh_fast.kernels import fused_up_out_conv_triton

    return fused_up_out_conv_triton(x, up_weight, up_bias, out_weight, out_bias, negative_slope)

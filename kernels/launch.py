"""Launching a Triton kernel with as little Python as possible once its config is known.

`JITFunction.run` re-binds the arguments, recomputes the specialisation key and looks up its cache on
every call (the issue measured 22-27 us with the autotuner on top); the CompiledKernel it returns can
be launched directly (~2 us). A KernelLauncher keeps that CompiledKernel per launch key. The key must
pin everything the JIT specialises on: the host code builds it from the exact channel counts (the
shape arguments M/H/W are do_not_specialize), dtypes, constexpr flags, the config, and whether each
pointer is 16-byte aligned; the device index is added here.

Raw launch paths:
  * CUDA: the first launch of a key goes through kernel[grid](...) (compiles or loads from Triton's
    disk cache) and keeps the CompiledKernel; later launches call it with every argument in signature
    order (constexprs included: the launch convention of Triton >= 3.3), through `direct_runner`: the
    call Triton's own runner makes, with its per-launch Python (a closure, the driver's device lookup,
    launch metadata for hooks nobody registered) done once per key instead, and the tensors passed as
    addresses (the C launcher then skips its per-pointer driver query).
  * Interpreter: every launch goes through kernel[grid](...) (there is no compiled kernel).
  * STANDIN (bench/host_overhead.py): a callable that replaces both, so the host path can be timed
    on a machine without a GPU.
LAUNCHES counts launches per kernel name (the launch-count test reads it).
"""
from __future__ import annotations

import inspect
from collections import Counter
from typing import Any, Callable, Optional

import torch
import triton
import triton.language as tl
from torch.utils._python_dispatch import _disable_current_modes

from .conv3x3_fwd import INTERPRETING

LAUNCHES: Counter = Counter()
# Every KernelLauncher by name (precompile and compile_check find a recorded launch's kernel here).
LAUNCHERS: dict[str, "KernelLauncher"] = {}
# bench/host_overhead.py and precompile.record set this to a callable(name, grid, args, constexprs, options,
# key) -> compiled-like (or None: keep nothing)
STANDIN: Optional[Callable] = None
# tape.py sets a list while it records a call: each launch appends (launcher, key, grid, args, flags, config)
# and runs outside the recording's dispatch mode (the interpreter runs torch ops on the arguments).
RECORDING: Optional[list] = None

_MIN_DIRECT = (3, 3)  # CompiledKernel[grid](*all args) is the convention from Triton 3.3 on


def _triton_version() -> tuple[int, int]:
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


DIRECT_LAUNCH = _triton_version() >= _MIN_DIRECT
# Kept CompiledKernels launch through direct_runner (True) or Triton's runner, compiled[grid](...) (False).
# Read when a key's kernel is kept: bench/launch_profile.py flips it (and forgets the kept kernels) to
# time both on one GPU.
DIRECT_RUNNER = True


def _is_constexpr(annotation) -> bool:
    return annotation is tl.constexpr or (isinstance(annotation, str) and "constexpr" in annotation)


def _no_hook(hook) -> bool:
    """Triton >= 3.4 keeps launch hooks in a HookChain (empty unless proton or a user added one)."""
    return hook is None or (type(hook).__name__ == "HookChain" and not hook.calls)


def direct_runner(compiled, constexprs: tuple, pointer_args: tuple = ()) -> Callable:
    """-> launch(grid, args): compiled[grid](*args, *constexprs), with Triton's per-launch Python hoisted.

    Triton's runner (CompiledKernel.__getitem__, the same in 3.3 to 3.9) makes a closure per launch,
    asks the driver for the current device and its stream, and builds launch metadata for the launch
    hooks, then calls compiled.run(gx, gy, gz, stream, function, packed_metadata, launch_metadata,
    enter_hook, exit_hook, *args). Here the handles are bound once, and so is the device: the one
    current now, which _init_handles loaded the kernel's module on (its function handle is that
    device's). Its current stream is looked up per launch (a caller's torch.cuda.stream context holds).
    With no hook registered the metadata and hooks are None, which the launcher skips as it skips empty
    chains. With a hook registered (proton, a user's) the launch goes through Triton's runner, so it sees it.
    pointer_args: the positions of the tensor arguments, passed as their data_ptr() ints. Triton's C
    launcher takes an int as the address itself; for a tensor it calls data_ptr() and then asks the
    driver whether the address is device memory (cuPointerGetAttribute, once per pointer per launch),
    a check the ops' argument validation already made once per shape.
    tests/kernels/test_host_code.py checks the call against Triton's runner's."""
    compiled._init_handles()
    run, function, packed = compiled.run, compiled.function, compiled.packed_metadata
    driver = triton.runtime.driver.active
    device, current_stream = driver.get_current_device(), driver.get_current_stream
    runtime = triton.knobs.runtime

    def launch(grid, args):
        if _no_hook(runtime.launch_enter_hook) and _no_hook(runtime.launch_exit_hook):
            if pointer_args:
                args = list(args)
                for i in pointer_args:
                    args[i] = args[i].data_ptr()
            run(grid[0], grid[1], grid[2], current_stream(device), function, packed, None, None, None,
                *args, *constexprs)
        else:
            compiled[grid](*args, *constexprs)
    return launch


def _kept_runner(compiled, constexprs: tuple, args: tuple) -> Callable:
    """launch(grid, args) for a kept kernel: direct_runner for Triton's own CompiledKernel (args: the
    first launch's, whose tensor positions every launch of the key shares), else (the stand-ins of
    bench/host_overhead.py and the tests) its runner."""
    if DIRECT_RUNNER and hasattr(triton, "knobs") and isinstance(compiled, triton.compiler.CompiledKernel):
        return direct_runner(compiled, constexprs, tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor)))
    return lambda grid, args: compiled[grid](*args, *constexprs)


class KernelLauncher:
    """One per JIT kernel. launch(key, grid, args, flags, config)."""

    def __init__(self, kernel, name: str):
        if name in LAUNCHERS and LAUNCHERS[name].kernel is not kernel:
            raise ValueError(f"a KernelLauncher named {name!r} launches another kernel already")
        self.kernel = kernel
        self.name = name
        self._compiled: dict[Any, Callable] = {}  # launch key -> launch(grid, args) of its kept kernel
        sig = inspect.signature(kernel.fn).parameters  # JITFunction and InterpretedFunction both have .fn
        params = list(sig)
        self._constexpr_names = [n for n, p in sig.items() if _is_constexpr(p.annotation)]
        n_rt = len(params) - len(self._constexpr_names)
        if params[n_rt:] != self._constexpr_names:
            raise TypeError(f"{name}: constexpr parameters must come last (direct launch passes them in order)")
        LAUNCHERS[name] = self

    def launch(self, key, grid: tuple, args: tuple, flags: dict, config: triton.Config) -> None:
        """args: the runtime arguments in signature order; flags + config.kwargs: the constexprs (merged
        only when the key has no kept kernel yet)."""
        if RECORDING is not None:
            RECORDING.append((self, key, grid, tuple(args), flags, config))
            with _disable_current_modes():
                self._launch(key, grid, args, flags, config)
            return
        self._launch(key, grid, args, flags, config)

    def _launch(self, key, grid: tuple, args, flags: dict, config: triton.Config) -> None:
        LAUNCHES[self.name] += 1
        # A CompiledKernel's runner reads grid[0], grid[1] and grid[2] (Triton 3.3 to 3.9); kernel[grid]
        # pads a shorter grid itself. A 1-d grid crashed the first H100 run of this path.
        if len(grid) != 3:
            grid = (*grid, *(1,) * (3 - len(grid)))
        kept = self._compiled.get(key)
        if kept is not None:
            kept(grid, args)
            return
        constexprs = {**flags, **config.kwargs}
        unknown = set(constexprs) - set(self._constexpr_names)
        if unknown:  # the interpreter would ignore them; the compiler refuses: fail the same on CPU
            raise TypeError(f"{self.name}: unknown constexpr arguments {sorted(unknown)}")
        options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
        if STANDIN is not None:
            compiled = STANDIN(self.name, grid, args, constexprs, options, key)
        else:
            compiled = self.kernel[grid](*args, **constexprs, **options)
        if compiled is not None and (DIRECT_LAUNCH or STANDIN is not None) and not INTERPRETING:
            self._compiled[key] = _kept_runner(compiled, tuple(constexprs[n] for n in self._constexpr_names), args)

    def forget(self) -> None:
        """Drop the kept compiled kernels (the host-overhead bench's cold measurement)."""
        self._compiled.clear()


def aligned(*tensors):
    """The 16-byte alignment of these tensors' data pointers (the JIT specialises on it), as a launch key
    part: True when every one is aligned (the common case, one OR of the pointers), else a tuple saying
    which is."""
    ptrs = 0
    for t in tensors:
        ptrs |= t.data_ptr()
    if not ptrs & 15:
        return True
    return tuple(t.data_ptr() % 16 == 0 for t in tensors)

"""A host function's launches, recorded once per call signature and replayed after (the host path of the
RIDB, kernels/ridb.py, and of the standalone IDB, kernels/op.py).

Why: in steady state a RIDB forward + backward is 23 launches and ~36 allocations whose grids, launch keys,
constexprs and scalar arguments depend only on the shapes; only the tensors' addresses change from call to
call. The host code that works them out on every call (plan lookups by shape keys, the scalar tuples, grids,
alignment keys, three Python layers per launch) is as long as the allocations and the launches themselves.
The triton generator is host-bound on the H200's host at batch 8 (22.9 ms of wall time around 4.1 ms of
device time) and close to it at batch 64 (calls D1-D3, bench/RESULTS.md).

A Tape keeps one call's launches: per launch its KernelLauncher, launch key, grid, constexprs and runtime
arguments, each tensor argument replaced by a slot. A slot is one of the call's input tensors, a tensor the
call allocated (allocated again per replay from its recorded shape, strides, dtype and device), or a
buffer kept across calls (the dW partials and gz scratch of conv3x3.py: the same tensor every call). The
outputs are slots too. A replay is then the allocations and the launches through the same KernelLauncher
(so launch counts, kept compiled kernels and the interpreter path are what the plain call would use).

The contract of a taped function: given its key, it only allocates and launches. The key is the caller's:
it must hold everything the launches depend on besides tensor addresses (shapes, strides, dtypes, device,
flags, float scalars); `Taped` adds the 16-byte alignment of the inputs and which inputs are one tensor.
The recording checks the rest: a TorchDispatchMode sees every aten op the host code runs (the launches are
run outside it), and any op but an allocation (a copy, a fill, a view) leaves the signature untaped, as
does a tensor argument that is none of the three kinds; either is logged once, and that signature then
always takes the plain path (the same kernels: only the host code around them differs).
launch.RECORDING is one global: one host thread at a time runs these ops (the kept dW partials and gz
scratch assume the same, one stream per device).
Recording happens on a signature's second call, when every plan it needs already exists (the first one
may time tile configs, whose trial launches are not the call's); set_tuner() drops every tape with the
plans. tests/kernels/test_tape.py compares every replayed launch with the plain path's, argument by
argument, and the outputs bit for bit, under the interpreter; tests/test_host_launch.py runs the replays
through kept compiled kernels (the stand-in launcher).
Measured on the 2-core CPU with the stand-in launcher (`python bench/host_overhead.py --tapes`): the
paper generator's host time per forward + backward 0.68-0.69x of the plain path's, a RIDB's 0.63-0.65x,
the IDB's 0.82-0.88x (bench/RESULTS.md, Round 13). Not measured on a GPU yet (bench/launch_profile.py).
"""
from __future__ import annotations

import logging
import operator
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_in_torch_dispatch_mode

from . import launch
from .launch import aligned

log = logging.getLogger("gafh_fast")

_aten = torch.ops.aten
# What a taped function may run besides launches: allocations, and the detach torch adds to a factory
# call's result under a dispatch mode.
_ALLOCATIONS = frozenset({_aten.empty_strided.default, _aten.empty.memory_format, _aten.new_empty.default,
                          _aten.new_empty_strided.default, _aten.empty_like.default, _aten.detach.default})
_SEEN = object()  # a signature called once: the next call records
_PLAIN = object()  # a signature that cannot be taped: always the plain path
TAPED: list["Taped"] = []  # every Taped function (forget_all)
USE_TAPES = True  # tests flip it to run the plain path for comparison


class _AllocationsOnly(TorchDispatchMode):
    """Records the storage address of every allocation, and the name of any other op."""

    def __init__(self):
        super().__init__()
        self.allocated: set[int] = set()
        self.other: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func not in _ALLOCATIONS:
            self.other.append(str(func))
        elif isinstance(out, torch.Tensor) and out.numel():
            self.allocated.add(out.untyped_storage().data_ptr())
        return out


class _NotTapeable(Exception):
    """Why a recorded call cannot be replayed (logged; its signature then takes the plain path)."""


class Tape:
    """One recorded call. A replay's pool is [the call's inputs, its fresh allocations, the tape's constants
    (scalar arguments and kept buffers)]; each launch's arguments and the outputs are picked from it by
    one itemgetter each."""
    __slots__ = ("allocs", "consts", "launches", "outputs")

    def __init__(self, inputs: list, recorded: list, outputs: list, allocated: set, kept: list):
        n_in = len(inputs)
        in_slot: dict[int, int] = {}
        for i, t in enumerate(inputs):
            in_slot.setdefault(id(t), i)
        kept_ids = {id(t) for t in kept}
        fresh: dict[int, int] = {}  # id of a tensor the call allocated -> its index among the allocations
        self.allocs: list[tuple] = []
        consts: dict = {}  # id of a kept buffer, or (type, value) of a scalar -> its index among the constants
        self.consts: list = []

        def slot(a) -> tuple:
            """(kind, index): ("in", i) the call's input i, ("new", j) its allocation j, ("const", k) constant k."""
            if not isinstance(a, torch.Tensor) or id(a) in kept_ids:
                key = id(a) if isinstance(a, torch.Tensor) else (type(a), repr(a))  # repr: -0.0 is not 0.0
                if key not in consts:
                    consts[key] = len(self.consts)
                    self.consts.append(a)
                return "const", consts[key]
            if id(a) in in_slot:
                return "in", in_slot[id(a)]
            if id(a) not in fresh:
                # (a view the call made went through an aten view op, which the recording refuses)
                if a.numel() and a.untyped_storage().data_ptr() not in allocated:
                    raise _NotTapeable(f"a tensor argument {tuple(a.shape)} {a.dtype} is neither an input, nor "
                                       "allocated by the call, nor a kept buffer")
                fresh[id(a)] = len(self.allocs)
                self.allocs.append((tuple(a.shape), a.stride(), a.dtype, a.device))
            return "new", fresh[id(a)]

        picks = [(launcher, key, (*grid, *(1,) * (3 - len(grid))), [slot(a) for a in args], flags, config)
                 for launcher, key, grid, args, flags, config in recorded]
        out_slots = [slot(t) for t in outputs]
        base = {"in": 0, "new": n_in, "const": n_in + len(self.allocs)}  # the pool's three parts

        def getter(slots: list) -> Callable[[list], tuple]:
            return _getter([base[kind] + i for kind, i in slots])

        self.launches = [(launcher, key, grid, getter(slots), flags, config)
                         for launcher, key, grid, slots, flags, config in picks]
        self.outputs = getter(out_slots)

    def replay(self, inputs: list) -> tuple:
        pool = [*inputs, *(torch.empty_strided(shape, stride, dtype=dtype, device=device)
                           for shape, stride, dtype, device in self.allocs), *self.consts]
        if launch.RECORDING is not None:  # another call is being recorded: let the launcher see each launch
            for launcher, key, grid, args, flags, config in self.launches:
                launcher.launch(key, grid, args(pool), flags, config)
            return self.outputs(pool)
        counts = launch.LAUNCHES
        for launcher, key, grid, args, flags, config in self.launches:
            kept = launcher._compiled.get(key)  # KernelLauncher.launch's steady state, without its two calls
            if kept is None:
                launcher._launch(key, grid, args(pool), flags, config)
            else:
                counts[launcher.name] += 1
                kept(grid, args(pool))
        return self.outputs(pool)


def _getter(indices: list) -> Callable[[list], tuple]:
    """pool -> the tuple of these items (operator.itemgetter, which returns a lone item bare)."""
    if len(indices) == 1:
        i = indices[0]
        return lambda pool: (pool[i],)
    return operator.itemgetter(*indices) if indices else (lambda pool: ())


class Taped:
    """fn(inputs: list of tensors, *consts) -> list of tensors, recorded per key (its second call) and
    replayed after. kept: () -> the buffers fn may use across calls (their identity is recorded)."""

    def __init__(self, fn: Callable, name: str, kept: Callable[[], list]):
        self.fn, self.name, self.kept = fn, name, kept
        self.tapes: dict = {}
        TAPED.append(self)

    def __call__(self, key: tuple, inputs: list, *consts) -> list:
        # which inputs are one tensor (slots are by identity: None, all distinct, is the common case) and
        # their alignment (the launch keys hold it)
        aliases = None
        if len(set(map(id, inputs))) != len(inputs):
            first: dict = {}
            aliases = tuple(first.setdefault(id(t), i) for i, t in enumerate(inputs))
        key = (key, aliases, aligned(*inputs))
        tape = self.tapes.get(key)
        if tape.__class__ is Tape and USE_TAPES:
            return tape.replay(inputs)
        if not USE_TAPES:
            return self.fn(inputs, *consts)
        if tape is None:
            self.tapes[key] = _SEEN
            return self.fn(inputs, *consts)
        # another dispatch mode's ops are not ours to judge; a call inside another's recording is part of that one
        if tape is _PLAIN or is_in_torch_dispatch_mode() or launch.RECORDING is not None:
            return self.fn(inputs, *consts)
        return self._record(key, inputs, consts)

    def _record(self, key, inputs, consts) -> list:
        recorded: list = []
        mode = _AllocationsOnly()
        launch.RECORDING = recorded
        try:
            with mode:
                outputs = self.fn(inputs, *consts)
        finally:
            launch.RECORDING = None
        try:
            if mode.other:
                raise _NotTapeable(f"it runs {sorted(set(mode.other))} besides allocations and launches")
            self.tapes[key] = Tape(inputs, recorded, outputs, mode.allocated, self.kept())
        except _NotTapeable as e:
            self.tapes[key] = _PLAIN
            log.warning("%s: the host code of this call signature is not taped (%s); it takes the plain path",
                        self.name, e)
        return outputs

    def state(self) -> dict:
        """{key: 'seen' | 'plain' | n launches}: what each signature takes (tests, the host bench)."""
        return {k: "seen" if v is _SEEN else "plain" if v is _PLAIN else len(v.launches) for k, v in self.tapes.items()}


def forget_all() -> None:
    """Drop every tape (conv3x3.set_tuner: the plans and kept buffers they hold go with the tuner)."""
    for taped in TAPED:
        taped.tapes.clear()


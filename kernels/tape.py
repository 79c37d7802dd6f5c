"""A host function's launches, recorded once per call signature and replayed after (the RIDB's host path).

Why: in steady state a RIDB forward + backward is 27 launches and ~36 allocations whose grids, launch keys,
constexprs and scalar arguments depend only on the shapes; only the tensors' addresses change from call to
call. The host code that works them out on every call (plan lookups by shape keys, the scalar tuples, grids,
alignment keys, three Python layers per launch) took ~4.5 us per launch on the 2-core CPU, as much as the
allocations and the launch itself (bench/RESULTS.md, Round 12). On the GPU's host that is doubled, and the
triton generator is host-bound there at batch 8 and through its RIDB forwards at batch 64 (calls D1-D3).

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
Recording happens on a signature's second call, when every plan it needs already exists (the first one
may time tile configs, whose trial launches are not the call's); set_tuner() drops every tape with the
plans. tests/kernels/test_tape.py compares every replayed launch with the plain path's, argument by
argument, on the interpreter and on the stand-in launcher.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

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
    pass


class Tape:
    """One recorded call: allocations, launches with slotted tensor arguments, outputs."""
    __slots__ = ("n_in", "allocs", "launches", "outputs")

    def __init__(self, inputs: list, recorded: list, outputs: list, allocated: set, kept: list):
        self.n_in = len(inputs)
        in_slot = {}
        for i, t in enumerate(inputs):
            in_slot.setdefault(id(t), i)
        kept_ids = {id(t) for t in kept}
        fresh: dict[int, int] = {}  # id of an allocated tensor -> its slot
        self.allocs: list[tuple] = []

        def slot(t: torch.Tensor):
            """int: a slot of the replay's pool (inputs, then allocations); a tensor: a kept buffer."""
            if id(t) in in_slot:
                return in_slot[id(t)]
            if id(t) in kept_ids:
                return t
            if id(t) not in fresh:
                plain = t._base is None and t.storage_offset() == 0
                if not plain or (t.numel() and t.untyped_storage().data_ptr() not in allocated):
                    raise _NotTapeable(f"a tensor argument {tuple(t.shape)} {t.dtype} is neither an input, nor "
                                       "allocated by the call, nor a kept buffer")
                fresh[id(t)] = self.n_in + len(self.allocs)
                self.allocs.append((tuple(t.shape), t.stride(), t.dtype, t.device))
            return fresh[id(t)]

        self.launches = []
        for launcher, key, grid, args, flags, config in recorded:
            template, subs = list(args), []
            for pos, a in enumerate(args):
                if isinstance(a, torch.Tensor):
                    s = slot(a)
                    if isinstance(s, int):
                        subs.append((pos, s))
                        template[pos] = None  # filled per replay; the recorded call's tensor is not kept alive
                    else:
                        template[pos] = s
            self.launches.append((launcher, key, grid, template, tuple(subs), flags, config))
        self.outputs = [slot(t) for t in outputs]

    def replay(self, inputs: list) -> list:
        pool = list(inputs)
        for shape, stride, dtype, device in self.allocs:
            pool.append(torch.empty_strided(shape, stride, dtype=dtype, device=device))
        for launcher, key, grid, template, subs, flags, config in self.launches:
            args = template.copy()
            for pos, s in subs:
                args[pos] = pool[s]
            launcher.launch(key, grid, args, flags, config)
        return [pool[s] if isinstance(s, int) else s for s in self.outputs]


class Taped:
    """fn(inputs: list of tensors, *consts) -> list of tensors, recorded per key (its second call) and
    replayed after. kept: () -> the buffers fn may use across calls (their identity is recorded)."""

    def __init__(self, fn: Callable, name: str, kept: Callable[[], list]):
        self.fn, self.name, self.kept = fn, name, kept
        self.tapes: dict = {}
        TAPED.append(self)

    def __call__(self, key: tuple, inputs: list, *consts) -> list:
        first: dict = {}
        # which inputs are one tensor (slots are by identity) and their alignment (the launch keys hold it)
        key = (key, tuple(first.setdefault(id(t), i) for i, t in enumerate(inputs)), aligned(*inputs))
        tape = self.tapes.get(key)
        if tape.__class__ is Tape and USE_TAPES:
            return tape.replay(inputs)
        if not USE_TAPES:
            return self.fn(inputs, *consts)
        if tape is None:
            self.tapes[key] = _SEEN
            return self.fn(inputs, *consts)
        if tape is _PLAIN or is_in_torch_dispatch_mode():  # another mode's ops are not ours to judge
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


def recorded_launches(taped: Taped) -> Optional[list]:
    """The launches of taped's one recorded signature (tests)."""
    tapes = [t for t in taped.tapes.values() if t.__class__ is Tape]
    return tapes[0].launches if len(tapes) == 1 else None

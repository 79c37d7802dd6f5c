"""torch.compile of the training step: `train.compile` (enabled auto|on|off, parts, cuda_graphs).

What is compiled, and how: a region's `forward` is replaced, on the instance, by its torch.compile.
The module object stays (its parameters, buffers, hooks), so state-dict keys never gain an
`_orig_mod.` prefix and checkpoints and exports are those of the eager modules; its hooks stay
eager, outside the graph. Not `module.compile()`, which compiles `_call_impl` with the hooks, and
not DeepSpeed's `engine.compile()` (in 0.19.8 that is `module.compile()` of the engine's module):
it traces DeepSpeed's forward pre-hook (`_forward_prologue`) into the graph. With DeepSpeed's
throughput timer on, that hook calls time.time(), a graph break (fullgraph fails); with the timer
off (train/engine.py) it traces, but the graph then depends on whatever DeepSpeed's hooks read.
Compiling D's forward keeps the hooks eager, whatever DeepSpeed puts in them.
  - `d`: the discriminator. ZeRO 1/2 hook gradients, which stay eager. One graph per grad
    signature: D step (parameters trainable), C(x_r) under no_grad and C(G(z)) with D frozen in
    the G step.
  - `vgg`: the frozen content-loss features (outside the engines); two graphs (no_grad target, and
    the features of G's output with a backward).
  - `g`: regional: each of G's repeated blocks (the DNBs) compiled on its own, so the paper's four
    share one compiled graph. The fused Triton convs are torch custom ops (kernels/op.py), one opaque
    node each, and every region is compiled with fullgraph=True, so a graph break is an error, not a
    silent split. G's top level (the 9x9 convs, BatchNorm, upsampling) stays eager: its pointwise
    work sits between convolutions that inductor cannot fuse into.
  All with dynamic=False (the training shapes are fixed) and the inductor backend.

kernels=auto times triton against torch per shape on first use, which a trace cannot do (an
undecided shape traces the torch path), so the trainer runs its first iteration eagerly and compiles
before the second (`TrainCompiler.before_step`). Validation runs eagerly (`eager()`): its shapes
differ from training's and it is not what img/s measures.

CUDA graphs (`cuda_graphs`, mode="reduce-overhead"): none by default. The step's host logic sits
between the modules (DeepSpeed's backward and optimizer step, ZeRO's per-parameter gradient hooks,
D's requires_grad toggles, the NaN check), so only a part's own forward/backward can be a graph.
Of those, D and G hand their gradients to DeepSpeed's hooks and BatchNorm updates running stats in
place: untested under graphs. VGG can be graphed, but at batch 64 its kernels are large and the
launches it saves are a fraction of a millisecond per step. Each part can be opted in, e.g.
`train.compile.cuda_graphs=[vgg]`; on CPU the same call runs without graphs (inductor skips them).

Compile time: torch's compile callbacks (dynamo's frame compiles, the lazy backward compiles, CUDA
graph recording) are timed and booked to the part that was running (`CompileClock`); the trainer
logs them and leaves a step that compiled out of img/s.
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Callable, Optional

import torch

from gafh_fast.config import CompileConfig

PART_NAMES = {"g": "G blocks (DNB)", "d": "D", "vgg": "VGG"}


def use_compile(setting, device: torch.device) -> bool:
    """`auto` compiles on CUDA only: on CPU the eager step is what the tests compare against."""
    if setting == "auto":
        return device.type == "cuda"
    return bool(setting)


class CompileClock:
    """Seconds spent compiling, per part, from torch's compile start/end callbacks.

    Dynamo reports each frame compile with a compile id; the backward of that graph is compiled
    lazily at its first backward (and CUDA graphs recorded at the first replays) under the same id,
    so those are booked to the part whose forward compiled it."""

    def __init__(self):
        self.current_part: Optional[str] = None   # set while a compiled part's call runs
        self.pending: dict[str, float] = defaultdict(float)   # since the last take()
        self.graphs: dict[str, int] = defaultdict(int)         # dynamo compiles per part, ever
        self._part_of: dict[str, str] = {}
        self._started: Optional[float] = None

    def register(self) -> None:
        """Idempotent; again after torch._dynamo.reset(), which clears every callback."""
        handler = torch._dynamo.callback_handler
        if self._start not in handler.start_callbacks:
            handler.register_start_callback(self._start)
            handler.register_end_callback(self._end)

    def _start(self, args=None) -> None:
        self._started = time.perf_counter()

    def _end(self, args=None) -> None:
        if self._started is None:
            return
        seconds, self._started = time.perf_counter() - self._started, None
        compile_id = str(getattr(args, "compile_id", ""))
        trigger = getattr(getattr(args, "callback_trigger", None), "name", "DYNAMO")
        if trigger == "DYNAMO":
            part = self.current_part or "other"
            self._part_of[compile_id] = part
            self.graphs[part] += 1
        else:  # LAZY_BACKWARD, CUDAGRAPH_RECORDING: the part that compiled this id's forward
            part = self._part_of.get(compile_id, self.current_part or "other")
        self.pending[part] += seconds

    def take(self) -> dict[str, float]:
        """Compile seconds per part since the last call (empty when nothing compiled)."""
        out, self.pending = dict(self.pending), defaultdict(float)
        return out


CLOCK = CompileClock()


class _Labelled:
    """A region's compiled forward, set on the instance: tells the clock which part is running."""

    def __init__(self, part: str, compiled: Callable):
        self.part, self.compiled = part, compiled

    def __deepcopy__(self, memo):
        # a copy would keep calling the original module's forward: refuse instead of training the wrong weights
        raise RuntimeError(f"a compiled {PART_NAMES.get(self.part, self.part)} region cannot be deep-copied; "
                           "copy the module before gafh_fast.train.compile compiles it (the EMA copy is made first)")

    def __call__(self, *args, **kwargs):
        previous, CLOCK.current_part = CLOCK.current_part, self.part
        try:
            return self.compiled(*args, **kwargs)
        finally:
            CLOCK.current_part = previous


def compile_region(module: torch.nn.Module, part: str, kwargs: dict) -> None:
    """module.forward <- torch.compile(module.forward), in place (see the module docstring)."""
    if isinstance(module.__dict__.get("forward"), _Labelled):
        raise RuntimeError(f"{PART_NAMES.get(part, part)}: region compiled twice")
    module.forward = _Labelled(part, torch.compile(module.forward, backend="inductor", **kwargs))


def compile_kwargs(part: str, settings: CompileConfig) -> dict:
    kwargs = {"fullgraph": True, "dynamic": False}
    if part in settings.cuda_graphs:
        kwargs["mode"] = "reduce-overhead"
    return kwargs


def generator_regions(generator: torch.nn.Module) -> list[torch.nn.Module]:
    """G's repeated blocks: the DNBs of the multi-level dense block module."""
    return list(generator.mdbm)


def compile_parts(settings: CompileConfig, g_engine, d_engine, vgg: torch.nn.Module) -> list[str]:
    """Compile the configured parts in place (lazily: the first call of each compiles); returns one
    line per part saying how."""
    lines = []
    for part in settings.parts:
        kwargs = compile_kwargs(part, settings)
        how = f"mode={kwargs.get('mode', 'default')}, fullgraph, static shapes"
        if part == "d":
            compile_region(d_engine.module, part, kwargs)
            lines.append(f"D: its forward, inside DeepSpeed's hooks ({how})")
        elif part == "vgg":
            compile_region(vgg, part, kwargs)
            lines.append(f"VGG: its forward ({how})")
        else:
            regions = generator_regions(g_engine.module)
            for region in regions:
                compile_region(region, part, kwargs)
            lines.append(f"G: {len(regions)} DNB regions compiled in place, top level eager ({how})")
    return lines


class TrainCompiler:
    """The trainer's side: compile before the second iteration, report compile seconds per step."""

    def __init__(self, settings: CompileConfig, device: torch.device):
        self.settings = settings
        self.enabled = use_compile(settings.enabled, device) and bool(settings.parts)
        self.compiled = False
        self._iterations = 0
        if self.enabled:
            CLOCK.register()
            CLOCK.take()  # compiles before this trainer (other code in the process) are not ours

    def describe(self) -> str:
        if not self.enabled:
            return f"torch.compile off (train.compile.enabled={self.settings.enabled})"
        return (f"torch.compile of {', '.join(PART_NAMES[p] for p in self.settings.parts)} from the second "
                f"iteration on (the first runs eagerly for kernels=auto); CUDA graphs: "
                f"{', '.join(PART_NAMES[p] for p in self.settings.cuda_graphs) or 'none'}")

    def before_step(self, g_engine, d_engine, vgg) -> list[str]:
        """Call before every iteration. Returns the lines to log when it compiled just now."""
        self._iterations += 1
        if not self.enabled:
            return []
        if self.settings.cuda_graphs:
            # cudagraph trees: a new iteration starts, earlier graph outputs may be overwritten now
            torch.compiler.cudagraph_mark_step_begin()
        if self.compiled or self._iterations < 2:
            return []
        self.compiled = True
        CLOCK.register()
        return compile_parts(self.settings, g_engine, d_engine, vgg)

    def take_seconds(self) -> dict[str, float]:
        """Compile seconds per part spent since the last call ({} when compile is off or nothing compiled)."""
        return CLOCK.take() if self.enabled else {}

    def summary(self, seconds: dict[str, float]) -> str:
        parts = ", ".join(f"{PART_NAMES.get(p, p)} {s:.1f} s" for p, s in sorted(seconds.items()))
        graphs = ", ".join(f"{PART_NAMES.get(p, p)} {n}" for p, n in sorted(CLOCK.graphs.items()))
        return f"torch.compile: {sum(seconds.values()):.1f} s compiling ({parts}); graphs so far: {graphs}"


@contextlib.contextmanager
def eager():
    """Run compiled modules eagerly inside (validation: other shapes, no backward, not timed)."""
    with torch.compiler.set_stance("force_eager"):
        yield

"""torch.profiler parsing for the kernels suite: where a workload's device time goes, per kernel (an IDB or an
upsampling stage: kernel_rows) and per layer (the whole generator, whose hundreds of kernels per call make
per-kernel rows unreadable: layer_rows). On CPU (the plumbing check in CI) the same code runs with the
operators' CPU time standing for the device's.

Per layer: on CUDA the profiler links each kernel, memcpy and memset to the CPU operator that launched it by its
correlation id (FunctionEvent.kernels), on the forward thread and on autograd's backward thread alike. A
kernel's group is its launching operator's top-level operator on that thread: the op the Python code
called (aten::conv2d, aten::leaky_relu, _EagerFusedRIDB: an autograd Function's apply is recorded under
its class name) or, in the backward, the autograd node the engine ran (ConvolutionBackward0,
_EagerFusedRIDBBackward), the engine's per-node wrapper peeled off. So a conv's bias add and a fused op's
weight copies count to their layer. The group's shapes tell layers apart: a conv's weight and input size,
from the op or the first conv op beneath it (`w(3,64,9,9) in 256x256` is the output conv; the backward's
comes from aten::convolution_backward's arguments), else the op's first tensor input. Work the engine does
between nodes (summing the gradients of a tensor used twice, casting a gradient) is `autograd engine:
<op>`. A kernel no operator claims is `unattributed: <kernel>`: no time is dropped, so the groups add up
to the profile's device sum. On CPU there are no kernels: each operator's self CPU time stands for its
kernels and goes through the same grouping.
"""
from __future__ import annotations

import statistics
from collections import Counter

import torch

ENGINE = "autograd::engine::evaluate_function: "  # the engine's wrapper around each node it runs
# (input, weight) argument positions of the ops whose shapes name a conv layer
CONV_ARGS = {"aten::conv2d": (0, 1), "aten::convolution": (0, 1), "aten::_convolution": (0, 1),
             "aten::cudnn_convolution": (0, 1), "aten::convolution_backward": (1, 2)}
TOP = 15       # groups with a row of their own; the rest are summed into one `other` row
ITERS = 3      # profiled calls per path (the generator at batch 64 is 40-70 ms a call on an H100)
OTHER = "other"


def profiled_events(fn, device: torch.device, iters: int, record_shapes: bool = False):
    """prof.events() of `iters` calls of fn under torch.profiler: CPU operators, and on CUDA the device
    kernels. One unprofiled call first, so nothing first-call-only (compile, autotune, allocator growth)
    is inside the profile."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    fn()
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=record_shapes) as prof:
        for _ in range(iters):
            fn()
        if cuda:
            torch.cuda.synchronize()
    return prof.events()


def kernel_sequence(events: list[tuple[float, float, str]], iters: int) -> tuple[list[dict], bool]:
    """(start_us, duration_us, name) of `iters` identical calls -> per kernel of one call: index, name,
    median us over the calls; True when the calls matched launch by launch. Otherwise (a call launched
    something the others did not) one entry per kernel name with its mean us per call, and False."""
    events = sorted(events)
    n = len(events) // iters if iters else 0
    calls = [events[i * n:(i + 1) * n] for i in range(iters)] if n else []
    if n and len(events) == n * iters and all([e[2] for e in c] == [e[2] for e in calls[0]] for c in calls):
        return [{"index": i, "name": calls[0][i][2], "us": statistics.median(c[i][1] for c in calls)}
                for i in range(n)], True
    by_name: dict[str, float] = {}
    for _, us, name in events:
        by_name[name] = by_name.get(name, 0.0) + us / max(iters, 1)
    return [{"index": i, "name": k, "us": v} for i, (k, v) in enumerate(by_name.items())], False


def profile_kernels(fn, device: torch.device, iters: int = ITERS) -> tuple[list[dict], bool]:
    """kernel_sequence of `iters` calls of fn under torch.profiler: on CUDA the device kernels (and
    memcpy/memset); on CPU (the plumbing check) the top-level operators."""
    from torch.autograd import DeviceType

    events = profiled_events(fn, device, iters)
    if device.type == "cuda":
        picked = [e for e in events if e.device_type == DeviceType.CUDA]
    else:
        picked = [e for e in events if e.device_type == DeviceType.CPU and e.cpu_parent is None]
    return kernel_sequence([(e.time_range.start, e.time_range.elapsed_us(), e.name) for e in picked], iters)


def kernel_rows(calls: dict, workload: str, batch: int, card: str, wall_ms: dict, device: torch.device) -> list[dict]:
    """Per-kernel device times of one call of `workload` on the triton path, and the device sum per call
    of each path in calls (path -> one call from a clean state) next to its wall time (wall_ms[path],
    from the timed rows): wall >> device sum means host-bound."""
    rows = []
    for path, fresh_call in calls.items():
        seq, matched = profile_kernels(fresh_call, device)
        total_ms = sum(k["us"] for k in seq) / 1000
        base = {"suite": "kernels", "batch": batch, "card": card}
        if path == "triton":
            for k in seq:
                rows.append(dict(base, name=f"{workload} kernel {k['index']}: {k['name']}", path="triton (device)",
                                 ms=k["us"] / 1000, kernel=k["name"],
                                 note="torch.profiler device time per call" + ("" if matched else
                                      "; calls differed launch by launch: mean per kernel name")))
        wall = wall_ms.get(path)
        rows.append(dict(base, name=f"{workload} device sum", path=f"{path} (device)", ms=total_ms,
                         kernels_per_call=len(seq),
                         note=f"{len(seq)} device kernels per call{wall_note(total_ms, wall)}"))
        print(f"{workload} {path:8s} batch {batch:4d}: device sum {total_ms:.3f} ms over {len(seq)} kernels"
              + (f" (wall {wall:.3f} ms)" if wall else ""))
    return rows


# ---- per layer ------------------------------------------------------------------------------------
def _dims(shape) -> str:
    return "(" + ",".join(str(d) for d in shape) + ")"


def _conv_label(op):
    pos = CONV_ARGS.get(op.name)
    shapes = op.input_shapes or []
    if pos is None or len(shapes) <= max(pos) or len(shapes[pos[1]]) != 4 or len(shapes[pos[0]]) < 2:
        return None
    x, w = shapes[pos[0]], shapes[pos[1]]
    return f"w{_dims(w)} in {x[-2]}x{x[-1]}"


def shape_label(op) -> str:
    """A conv's weight and input size, from op or the first conv op beneath it (depth first); else op's
    first tensor input shape; else nothing."""
    stack = [op]
    while stack:
        e = stack.pop()
        label = _conv_label(e)
        if label:
            return label
        stack.extend(reversed(e.cpu_children or []))
    first = next((s for s in (op.input_shapes or []) if s and all(isinstance(d, int) for d in s)), None)
    return _dims(first) if first else ""


def layer_key(op, labels: dict) -> str:
    """The group of the work op does: its top-level operator on its thread, below the engine's wrapper,
    with shape_label (memoised per top-level op in labels)."""
    top, wrapper = op, None
    while top.cpu_parent is not None:
        if top.cpu_parent.name.startswith(ENGINE):
            wrapper = top.cpu_parent
            break
        top = top.cpu_parent
    if top.name.startswith(ENGINE):  # the wrapper's own time (CPU only: it launches nothing itself)
        return "autograd engine"
    if id(top) not in labels:
        labels[id(top)] = shape_label(top)
    key = f"{top.name} {labels[id(top)]}".rstrip()
    if wrapper is not None and top.name != wrapper.name[len(ENGINE):]:
        key = f"autograd engine: {key}"  # not the node: the engine's own work after it
    return key


def unclaimed(device: list[tuple[str, float]], claimed: list[tuple[str, str, float]]) -> list[tuple[str, str, float]]:
    """Device time that no operator claimed: device holds (kernel, us) of every device event, claimed
    (group, kernel, us) of those an operator launched. Per kernel name, the events left over become
    ("unattributed: <kernel>", kernel, their mean us) each."""
    left_us, left_n = Counter(), Counter()
    for name, us in device:
        left_us[name] += us
        left_n[name] += 1
    for _, name, us in claimed:
        left_us[name] -= us
        left_n[name] -= 1
    return [(f"unattributed: {name}", name, left_us[name] / n) for name, n in left_n.items() if n > 0
            for _ in range(n)]


def launch_records(events, cuda: bool) -> list[tuple[str, str, float]]:
    """(group, kernel, us) for every device kernel of a profile (CUDA: each CPU operator's linked kernels,
    then the unclaimed ones); on CPU (group, operator, self CPU us) for every operator."""
    from torch.autograd import DeviceType

    ops = [e for e in events if e.device_type == DeviceType.CPU and not e.is_async]
    labels: dict = {}
    if cuda:
        # a legacy-profiler event's "kernel" is its own CUDA-event time, not a kernel: it would count twice
        claimed = [(layer_key(e, labels), k.name, k.duration) for e in ops if not getattr(e, "is_legacy", False)
                   for k in e.kernels]
        device = [(e.name, e.time_range.elapsed_us()) for e in events if e.device_type == DeviceType.CUDA]
    else:
        claimed = [(layer_key(e, labels), e.name, e.self_cpu_time_total) for e in ops]
        device = [(e.name, e.self_cpu_time_total) for e in ops]
    return claimed + unclaimed(device, claimed)


def group_by_layer(records: list[tuple[str, str, float]], iters: int, top: int = TOP) -> tuple[list[dict], float]:
    """(group, kernel, us) of `iters` calls -> (groups, total us per call). groups: the `top` longest, then
    one `other` group holding the rest (when there is a rest); each a dict of group, us and kernels per
    call, share of the total, members (the groups it holds) and top_kernels [(kernel, us per call)], its
    3 longest kernels by name. Ties in time are ordered by name."""
    us, n, by_kernel = Counter(), Counter(), {}
    for key, kernel, t in records:
        us[key] += t
        n[key] += 1
        by_kernel.setdefault(key, Counter())[kernel] += t
    total = sum(us.values()) / iters
    ranked = sorted(us, key=lambda k: (-us[k], k))

    def group(name, keys):
        kernels = sum((by_kernel[k] for k in keys), Counter())
        longest = sorted(kernels.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
        t = sum(us[k] for k in keys) / iters
        return {"group": name, "us": t, "share": t / total if total else 0.0,
                "kernels": sum(n[k] for k in keys) / iters, "members": keys,
                "top_kernels": [(k, v / iters) for k, v in longest]}

    groups = [group(k, [k]) for k in ranked[:top]]
    if len(ranked) > top:
        groups.append(group(OTHER, ranked[top:]))
    return groups, total


def wall_note(total_ms: float, wall) -> str:
    """How much of a timed row's wall time per call the device sum leaves: host time and gaps."""
    return f"; wall {wall:.3f} ms: {max(0.0, 1 - total_ms / wall):.0%} of it not device time" if wall else ""


def layer_rows(calls: dict, workload: str, batch: int, card: str, wall_ms: dict, device: torch.device,
               iters: int = ITERS, top: int = TOP) -> list[dict]:
    """Rows of the per-layer device time of `workload` for each path in calls (path -> a callable doing
    one call from a clean state): a `layer N (share): group` row per group (ms and kernels per call),
    then the `device sum` row next to the path's wall time (wall_ms[path], from the timed rows)."""
    cuda = device.type == "cuda"
    unit = "device kernels" if cuda else "operators (CPU self time: no device)"
    base = {"suite": "kernels", "batch": batch, "card": card}
    rows = []
    for path, fn in calls.items():
        groups, total_us = group_by_layer(launch_records(profiled_events(fn, device, iters, True), cuda), iters, top)
        print(f"{workload} {path:8s} batch {batch:4d}: per layer, {iters} profiled calls")
        for rank, g in enumerate(groups, start=1):
            label = f"{len(g['members'])} more groups" if g["group"] == OTHER else g["group"]
            longest = ", ".join(f"{k[:80]} {v / 1000:.3f} ms" for k, v in g["top_kernels"])
            rows.append(dict(base, name=f"{workload} layer {OTHER if g['group'] == OTHER else rank} "
                                        f"({g['share']:.1%}): {label}",
                             path=f"{path} (device)", ms=g["us"] / 1000, share=g["share"], layer=g["group"],
                             layers=g["members"], kernels_per_call=g["kernels"], top_kernels=g["top_kernels"],
                             note=f"torch.profiler, per call: {g['share']:.1%} of the device sum, {g['kernels']:.4g} "
                                  f"{unit}; longest: {longest}"))
            print(f"  {g['share']:6.1%} {g['us'] / 1000:9.3f} ms {g['kernels']:7.1f} per call  {label}")
        total_ms, wall = total_us / 1000, wall_ms.get(path)
        count, n_groups = sum(g["kernels"] for g in groups), sum(len(g["members"]) for g in groups)
        rows.append(dict(base, name=f"{workload} device sum", path=f"{path} (device)", ms=total_ms,
                         kernels_per_call=count, layer_groups=n_groups,
                         note=f"{count:.4g} {unit} per call in {n_groups} layer groups "
                              f"(the `{workload} layer` rows){wall_note(total_ms, wall)}"))
        print(f"  device sum {total_ms:.3f} ms" + (f" (wall {wall:.3f} ms)" if wall else ""))
    return rows

"""The floor next to each measured kernels-suite row (issue 11, item 5): kernels/cost_model.py's FLOP and byte
model of the row's work, at the card's rates, so a GPU run says at once how far each row is from the time
no version beats.

    python bench/floors.py BENCH.json      # a table of every row with a floor (old JSONs too)

throughput.py calls annotate() on every run's rows: a row gets `floor_ms` (the sum over the work's launches
of max(FLOPs / rate, bytes / bandwidth)), `x_floor` (its ms over that) and `floor_of` (what was modelled).
The floor of a workload is the same for every path (eager, triton, compile, CUDA graph, device sum): it
is the work's, as the fused decomposition does it (the upsampling's 4/9 of the FLOPs, the output layer at
its real K and N), so eager rows measure how far cuDNN is from it too. A Triton kernel's row (`<workload>
kernel i: <kernel>`) gets its own launch's floor: the i-th launch of a kernel name in the row's order is the
i-th launch of that kernel in the model's launch order, matched only when the measured launches of the
model's kernels are exactly the model's (otherwise, e.g. the tuner took the other way of the upsampling
dX, the way that does match is used, and with none, no kernel row gets a floor).
Cards without rates here get no floor (a floor on a guessed card would mislead).
"""
from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # gafh_fast importable from a source tree

from gafh_fast.kernels import cost_model as cm  # noqa: E402

# (dense bf16 TFLOP/s, TB/s) a floor assumes, by card name (first match wins). The H100's are issue 11's
# (800 TFLOP/s of its 989 peak, 3 TB/s of its 3.35); the H200 has the same SMs and 4.8 TB/s of HBM3e, of
# which the same 90 % is 4.3.
RATES = (("H200", (800.0, 4.3)), ("H100", (800.0, 3.0)))
NF, GC, LR = 64, 32, 32  # the kernels suite's shapes (bench/kernels_suite.py)
# the paper generator's sizes (configs/gafh_ridn_paper.yaml), as cost_model.generator_launches takes them
PAPER = dict(nf=NF, gc=GC, lr=LR, n_dnb=4, n_ridb=3, n_idb=4, sfm_k=9, out_k=9, c_img=3)


def rates(card: str | None):
    """(TFLOP/s, TB/s) for a card name, or None when this table does not know the card."""
    name = (card or "").upper()
    return next((r for key, r in RATES if key in name), None)


def workload_launches(workload: str, batch: int) -> tuple[list[dict], str] | None:
    """The model's launches of one kernels-suite workload at `batch`, and what they model; None for a
    workload the model does not cover."""
    if workload == "idb_fwd":
        return cm.idb_launches(batch, NF, GC, LR, train=False), "IDB forward, no masks"
    if workload == "idb_fwd_bwd":
        return cm.idb_launches(batch, NF, GC, LR), "IDB forward + backward"
    if workload == "ridb_fwd_bwd":
        return cm.ridb_launches(batch, True, 4, NF, GC, LR), "RIDB forward + backward, fused_ridb's launches"
    if workload == "up_fwd_bwd":
        return cm.upsample_launches(batch, True, NF, LR, steps=1), "upsampling 32->64 by sub-pixel phases"
    if workload == "up_out_fwd_bwd":
        return cm.up_out_launches(batch, False, NF, 4 * LR), "last upsampling step + output layer (real K and N)"
    if workload == "gen_fwd_bwd":
        return cm.generator_launches(batch, **PAPER), "generator, cost_model.generator_launches"
    return None


def triton_launch_orders(workload: str, batch: int) -> list[list[dict]]:
    """The launch orders the triton path may take for a profiled workload (the tuner picks the
    upsampling dX's way, the IDB's way of making gz2 and the output layer's forward per shape); each
    launch names its Triton kernel."""
    if workload == "idb_fwd_bwd":
        return [cm.idb_launches(batch, NF, GC, LR, gz_pass=g) for g in (True, False)]
    if workload == "up_fwd_bwd":
        return [cm.upsample_launches(batch, True, NF, LR, steps=1, gz_pass=g) for g in (False, True)]
    if workload == "up_out_fwd_bwd":  # the output layer's forward: cuDNN's (no Triton kernel) or GEMM + fold
        return [cm.up_out_launches(batch, True, NF, 4 * LR, fold=f) for f in (False, True)]
    return []


KERNEL_ROW = re.compile(r"^(?P<workload>\w+) kernel (?P<index>\d+): ")
CONV_LABEL = re.compile(r"^w\((\d+),(\d+),(\d+),(\d+)\) in (\d+)x(\d+)$")
SHAPE_LABEL = re.compile(r"^\((\d+),(\d+),(\d+),(\d+)\)$")


def generator_convs(nf: int, gc: int, lr: int, n_dnb: int, n_ridb: int, n_idb: int, sfm_k: int, out_k: int,
                    c_img: int) -> Counter:
    """(c_out, c_in, k, input side) -> how many convs of the paper generator have it, as the eager path runs
    them (bench/device_profile.py groups a layer's calls by that label: the 48 IDBs' conv1 are one group)."""
    convs = Counter({(nf, c_img, sfm_k, lr): 1, (gc, nf, 3, lr): n_dnb * n_ridb * n_idb,
                     (nf, nf + gc, 3, lr): n_dnb * n_ridb * n_idb, (nf, nf, 3, lr): n_dnb * n_ridb + 1})
    for k in range(1, 4):  # the upsampling convs, at the upsampled size
        convs[(nf, nf, 3, lr << k)] += 1
    convs[(c_img, nf, out_k, 8 * lr)] += 1
    return convs


def layer_launches(group: str, batch: int, dims: dict | None = None) -> list[dict] | None:
    """The model's launches of one `gen_fwd_bwd layer` group (an operator and its label, as
    device_profile.layer_key makes them): the fused ops' groups from cost_model.generator_launches, cuDNN's
    conv groups (forward: aten::conv2d; backward: ConvolutionBackward0) at their real K and N times the
    generator's convs with that label. None for the groups the model does not cover (torch's elementwise
    ops, the autograd engine's work, `other`). dims: the generator's sizes (PAPER by default)."""
    dims = dims or PAPER
    op, _, label = group.partition(" ")
    conv = CONV_LABEL.match(label)
    if op in ("aten::conv2d", "ConvolutionBackward0") and conv:
        c_out, c_in, k, _, h, w = map(int, conv.groups())
        count = generator_convs(**dims)[(c_out, c_in, k, h)]
        if not count or h != w:
            return None
        phase = "fwd" if op == "aten::conv2d" else "bwd"
        one = [r for r in cm.plain_conv_launches(batch, c_in, c_out, k, h, dgrad=c_in != dims["c_img"])
               if ("fwd" in r["launch"].split()) == (phase == "fwd")]
        return [dict(r, flops=r["flops"] * count, bytes=r["bytes"] * count) for r in one]
    phase = "bwd" if op.endswith("Backward") or op.endswith("Backward0") else "fwd"
    base = op[:-len("Backward")] if op.endswith("Backward") else op
    shape = SHAPE_LABEL.match(label)
    side = int(shape.group(3)) if shape else None
    layer = {"_EagerFusedRIDB": lambda name, launch: name.startswith("DNB"),
             "_EagerFusedOutConv": lambda name, launch: name == "output",
             "_EagerFusedConv3x3": lambda name, launch: launch.startswith("fusion conv"),  # the paper G's only one
             "aten::batch_norm": lambda name, launch: launch.startswith("fusion BatchNorm")}.get(base)
    if base in ("NativeBatchNormBackward0", "CudnnBatchNormBackward0"):
        layer, phase = (lambda name, launch: launch.startswith("fusion BatchNorm")), "bwd"
    if base == "_EagerFusedUpOutConv":  # the last upsampling step and the output layer (kernels/upout.py)
        last = f"upsampling {dims['lr'] * 4}->{dims['lr'] * 8}"
        layer = lambda name, launch: name in (last, "output")  # noqa: E731
    if base == "_EagerFusedUpconv3x3" and side:  # the forward's input is the stage's; the backward's g twice it
        low = side if phase == "fwd" else side // 2
        layer = lambda name, launch: name == f"upsampling {low}->{2 * low}"  # noqa: E731
    if layer is None:
        return None
    picked = [r for r in cm.generator_launches(batch, **dims)
              if layer(r["layer"], r["launch"]) and r["phase"] == phase]
    return picked or None


def _known(name: str, names: set[str]) -> str | None:
    """The model's kernel that a profiler kernel name is: the same name, else the longest one in it."""
    if name in names:
        return name
    inside = [n for n in names if n in name]
    return max(inside, key=len) if inside else None


def match_kernels(measured: list[str], orders: list[list[dict]]) -> list[dict | None] | None:
    """measured: the kernel names of one call, in launch order. Returns per measured kernel its launch
    in the first order whose Triton launches are exactly the measured ones of those kernels (others,
    cuDNN's or torch's, get None), or None when no order matches."""
    names = {r["kernel"] for order in orders for r in order if r.get("kernel")}
    known = [_known(k, names) for k in measured]
    for order in orders:
        triton = [r for r in order if r.get("kernel")]
        if Counter(k for k in known if k) != Counter(r["kernel"] for r in triton):
            continue
        queues = {}
        for r in triton:
            queues.setdefault(r["kernel"], []).append(r)
        return [queues[k].pop(0) if k else None for k in known]
    return None


def annotate(rows: list[dict], card: str | None = None) -> list[dict]:
    """Add floor_ms, x_floor and floor_of to every kernels-suite row with a model, in place (card: the
    device name when a row has none). Rows already annotated are recomputed; others are left alone."""
    kernel_rows: dict[tuple, list[tuple[int, dict]]] = {}
    for row in rows:
        if row.get("suite") != "kernels" or not row.get("batch"):
            continue
        rate = rates(row.get("card") or card)
        if rate is None:
            continue
        name = str(row.get("name") or "")
        hit = KERNEL_ROW.match(name)
        if hit and str(row.get("path", "")).startswith("triton"):
            kernel_rows.setdefault((hit["workload"], row["batch"], rate), []).append((int(hit["index"]), row))
            continue
        if name.startswith("gen_fwd_bwd layer ") and row.get("layer"):
            launches = layer_launches(row["layer"], int(row["batch"]))
            if launches:
                _set(row, launches, rate, f"{len(launches)} launches of the generator's {row['layer']}")
            continue
        workload = name[:-len(" device sum")] if name.endswith(" device sum") else name
        model = workload_launches(workload, int(row["batch"]))
        if model is not None:
            _set(row, model[0], rate, model[1])
    for (workload, batch, rate), indexed in kernel_rows.items():
        indexed.sort(key=lambda t: t[0])
        launches = match_kernels([r.get("kernel") or KERNEL_ROW.sub("", r["name"]) for _, r in indexed],
                                 triton_launch_orders(workload, int(batch)))
        for (_, row), launch in zip(indexed, launches or []):
            if launch is not None:
                _set(row, [launch], rate, launch["launch"])
    return rows


def _set(row: dict, launches: list[dict], rate, what: str) -> None:
    floor_ms = cm.floor_us(launches, *rate) / 1000
    row["floor_ms"] = floor_ms
    row["floor_of"] = f"{what} ({rate[0]:g} TFLOP/s, {rate[1]:g} TB/s)"
    ms = row.get("ms")
    row["x_floor"] = ms / floor_ms if isinstance(ms, (int, float)) and ms > 0 and floor_ms > 0 else None


def floor_table(data: dict) -> str:
    """A markdown table of the rows of a bench JSON that have a floor."""
    rows = annotate([dict(r) for r in data["rows"]], data.get("env", {}).get("device_name"))
    lines = ["| name | path | batch | ms | floor ms | x floor | floor of |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("floor_ms") is None or not r.get("ms"):
            continue
        lines.append(f"| {r['name']} | {r.get('path') or ''} | {r['batch']} | {r['ms']:.3f} | {r['floor_ms']:.3f} | "
                     f"{r['x_floor']:.1f}x | {r['floor_of']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/floors.py BENCH.json")
    print(floor_table(json.loads(Path(sys.argv[1]).read_text())))

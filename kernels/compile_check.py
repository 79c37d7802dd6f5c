"""Static report of the conv3x3 kernels compiled for sm_90 (H100), without a GPU.

    python -m gafh_fast.kernels.compile_check [--batch 64] [--dtype bf16] [--json out.json]

It runs the real host path (an IDB forward + backward, nf 64, gc 32, 32x32; the RIDB's last conv with
two residuals; the first upsampling step, nearest x2 + conv nf -> nf + LeakyReLU from 32x32 to 64x64
(upconv.py: its five kernels); a fused RIDB of 2 IDBs,
whose rows are only the kernel variants the others do not launch) with a stand-in launcher that
records every launch (arguments, constexprs, grid, options), once per tile candidate of the heuristic.
Each launch is specialised exactly as the JIT would (Triton's own binder on a cuda:90 target) and
compiled; per kernel and config it prints:
registers, spills, shared memory, SASS instructions per wgmma (HGMMA) in the main loop, wgmma waits
with 0 pending inside loops (a serialised wgmma pipeline), ptxas warnings, and waves on 132 SMs (at
the occupancy the registers and shared memory allow).
Exit status 1 on a C7515 warning ("wgmma serialized") or on a loop with HGMMA that also waits for 0
pending wgmma groups (each iteration drains the tensor-core pipeline before the next can issue). Uses ptxas/nvdisasm from the Triton wheel (backends/nvidia/bin).
Not a test: speed is only measured on a GPU (bench/kernels_suite.py).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from collections import Counter
from typing import Optional

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from . import conv3x3, launch
from .conv3x3_fwd import INTERPRETING, mask_shape
from .precompile import record

SMS = 132
REGS_PER_SM = 65536
SMEM_PER_SM = 228 * 1024
_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def record_launches(batch: int, dtype: torch.dtype, candidate: int) -> list[dict]:
    """Every launch of one IDB forward + backward, one two-residual conv forward + backward, one
    upsampling step (upconv.py) forward + backward, one fused RIDB (2 IDBs) forward + backward, the
    output layer's backward (outconv.py: 64 -> 3, 9x9 at 256x256), the fold of its forward's GEMM + fold
    way (recorded on one image, whose GEMM this CPU runs; the grid is scaled to a chunk of `batch`'s) and
    the backward of the last upsampling step with the output layer (upout.py: the output layer's dX making
    the step's gz, then the step's dW and dX + fold at 128 -> 256)."""
    from .op import fused_conv3x3_triton, fused_idb_triton
    from .outconv import FOLD_CHUNK_BYTES, _out_forward_fold, out_backward
    from .ridb import fused_ridb_triton
    from .upconv import PHASE_TAPS, fused_upconv3x3_triton
    from .upout import up_out_backward

    nf, gc, s = 64, 32, 32
    fmt = dict(dtype=dtype)
    cl = torch.channels_last
    x = torch.randn(batch, nf, s, s, **fmt).contiguous(memory_format=cl).requires_grad_()
    w1 = torch.randn(gc, nf, 3, 3, **fmt).contiguous(memory_format=cl).requires_grad_()
    w2 = torch.randn(nf, nf + gc, 3, 3, **fmt).contiguous(memory_format=cl).requires_grad_()
    w3 = torch.randn(nf, nf, 3, 3, **fmt).contiguous(memory_format=cl).requires_grad_()
    b1, b2, b3 = (torch.zeros(c, **fmt, requires_grad=True) for c in (gc, nf, nf))
    g_up = torch.randn(batch, nf, 2 * s, 2 * s, **fmt)  # the upsampling step's upstream gradient
    hr = 8 * s  # the output layer's tensors: never read here (nothing runs), so left uninitialised
    x_out = torch.empty(batch, nf, hr, hr, **fmt).contiguous(memory_format=cl)
    y_out, g_out = (torch.empty(batch, 3, hr, hr, **fmt).contiguous(memory_format=cl) for _ in range(2))
    w_out, b_out = torch.empty(3, nf, 9, 9, **fmt), torch.zeros(3, **fmt)
    fold_images = min(batch, max(1, FOLD_CHUNK_BYTES // (3 * 9 * 9 * hr * hr * x_out.element_size())))
    x_last = torch.empty(batch, nf, hr // 2, hr // 2, **fmt).contiguous(memory_format=cl)  # the last step's input
    wc_last = torch.empty(nf, PHASE_TAPS, nf, **fmt)
    mask_last = torch.empty(mask_shape(batch, hr, hr, nf), dtype=torch.uint8)
    workloads = [
        ("idb", lambda: fused_idb_triton(x, x, w1, b1, w2, b2, 0.2).backward(torch.ones_like(x))),
        ("ridb_conv", lambda: fused_conv3x3_triton([x], w3, b3, None, x, 0.2, x, 0.2).backward(torch.ones_like(x))),
        ("up_conv", lambda: fused_upconv3x3_triton(x, w3, b3, 0.2).backward(g_up)),
        ("ridb", lambda: fused_ridb_triton(x, [(w1, b1, w2, b2)] * 2, w3, b3, 0.2, x, 0.2).backward(torch.ones_like(x))),
        ("out_conv", lambda: out_backward(g_out, x_out, y_out, w_out, True)),
        ("out_fwd", lambda: _out_forward_fold(x_out[:1], w_out, b_out)),
        ("up_out", lambda: up_out_backward(g_out, x_last, w3, wc_last, mask_last, x_out, w_out, y_out, 0.2, True, True)),
    ]
    old_sms = conv3x3._sms
    conv3x3._sms = lambda device: SMS  # the dW split the H100 would get
    records = []
    try:
        for label, run in workloads:
            for rec in record(run, picks=[candidate]):
                if label == "out_fwd":  # one image recorded: a chunk's programs
                    rec = dict(rec, grid=(rec["grid"][0] * fold_images, *rec["grid"][1:]))
                records.append(dict(rec, label=label))
    finally:
        conv3x3._sms = old_sms
    return records


def compile_record(rec: dict, arch: int):
    """triton.compile of one recorded launch, specialised by Triton's own binder for cuda:arch."""
    kernel = launch.LAUNCHERS[rec["name"]].kernel
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    n_rt = len(rec["args"])
    kwargs = {**rec["constexprs"], **rec["options"]}
    bound, specialization, _ = binder(*rec["args"], **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, {})
    assert len(signature) >= n_rt
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def _run_tool(name: str, args: list[str], data: bytes | str, suffix: str) -> subprocess.CompletedProcess:
    with tempfile.NamedTemporaryFile("wb", suffix=suffix, delete=False) as f:
        f.write(data.encode() if isinstance(data, str) else data)
    try:
        return subprocess.run([os.path.join(_BIN, name), *args, f.name], capture_output=True, text=True)
    finally:
        os.unlink(f.name)


def ptxas_report(ptx: str, arch: int) -> dict:
    for exe in ("ptxas-blackwell", "ptxas"):  # the plain one may predate the PTX version Triton emits
        out = _run_tool(exe, ["-v", f"--gpu-name=sm_{arch}a", "-o", os.devnull], ptx, ".ptx")
        if out.returncode == 0:
            break
    text = out.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill_st = re.search(r"(\d+) bytes spill stores", text)
    spill_ld = re.search(r"(\d+) bytes spill loads", text)
    warnings = [line.split(":", 1)[-1].strip()[:160] for line in text.splitlines()
                if "warning" in line.lower() or "Performance Loss" in line]  # C7515 comes as an "info" line
    return dict(registers=int(regs.group(1)) if regs else None,
                spill_bytes=(int(spill_st.group(1)) + int(spill_ld.group(1))) if spill_st and spill_ld else None,
                ptxas_warnings=warnings, ptxas_ok=out.returncode == 0)


_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")


def opcode_counts(body: list[str]) -> dict[str, int]:
    """Opcode (no modifiers, no predicate) -> count, most frequent first: where a loop's issue slots go."""
    counts = Counter(re.sub(r"^@!?U?P\w+\s+", "", ins).split()[0].split(".")[0] for ins in body)
    return dict(counts.most_common())


def sass_loops(sass: str) -> list[dict]:
    """Loops in nvdisasm output (a BRA back to an earlier label); per loop with HGMMA (wgmma) or HMMA
    (mma.sync, which Triton emits for tiles under 64 rows): instructions, HGMMA and HMMA counts, 0-pending
    wgmma waits (WARPGROUP.DEPBAR.LE gsb0, 0x0)."""
    labels, insns = {}, []
    for line in sass.splitlines():
        m = _LABEL.match(line)
        if m:
            labels[m.group(1)] = len(insns)
            continue
        m = _INSN.search(line)
        if m:
            insns.append(m.group(2).strip())
    loops = []
    for i, ins in enumerate(insns):
        m = re.search(r"\bBRA\b.*?(\.L_x_\d+)", ins)
        if m and labels.get(m.group(1), i + 1) <= i:
            body = insns[labels[m.group(1)]:i + 1]
            hgmma = sum("HGMMA" in b for b in body)
            hmma = sum(b.split()[0].startswith("HMMA") for b in body)
            # a retry block placed after EXIT (an mbarrier try-wait of a TMA pipeline) branches back into
            # the loop: that "back branch" spans the epilogue, whose final 0-pending wait is not in a loop
            if (hgmma or hmma) and not any(b.split()[0] == "EXIT" for b in body):
                waits0 = sum(re.search(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*0x0\b", b) is not None for b in body)
                loops.append(dict(instructions=len(body), hgmma=hgmma, hmma=hmma, waits_0=waits0,
                                  opcodes=opcode_counts(body)))
    return loops


def analyze(compiled, arch: int, programs: int, num_warps: int) -> dict:
    rep = ptxas_report(compiled.asm["ptx"], arch)
    sass = _run_tool("nvdisasm", ["-c"], compiled.asm["cubin"], ".cubin").stdout
    loops = sass_loops(sass)
    main = max((lp for lp in loops if lp["hgmma"]), key=lambda lp: lp["hgmma"], default=None)
    main_hmma = max((lp for lp in loops if lp["hmma"]), key=lambda lp: lp["hmma"], default=None)
    smem = compiled.metadata.shared
    threads = 32 * num_warps
    by_regs = REGS_PER_SM // max(1, (rep["registers"] or 0) * threads) if rep["registers"] else 1
    by_smem = SMEM_PER_SM // smem if smem else 32
    ctas = max(1, min(by_regs, by_smem, 32))
    serialized = any(lp["waits_0"] > 0 for lp in loops)  # a wgmma group drained inside the loop
    c7515 = any("C7515" in w for w in rep["ptxas_warnings"])
    return dict(**rep, shared_bytes=smem, hgmma_total=sass.count("HGMMA"),
                main_loop_opcodes=(main or main_hmma or {}).get("opcodes"),
                loops_with_hgmma=sum(lp["hgmma"] > 0 for lp in loops),
                sass_per_wgmma=round(main["instructions"] / main["hgmma"], 1) if main else None,
                # an mma.sync loop: per HMMA (16x8x16; a 64x64x16 wgmma is 32 of them)
                sass_per_hmma=round(main_hmma["instructions"] / main_hmma["hmma"], 1) if main_hmma else None,
                waits_0_in_loops=sum(lp["waits_0"] for lp in loops), programs=programs, ctas_per_sm=ctas,
                waves=round(programs / (SMS * ctas), 2), fail=serialized or c7515,
                why=("C7515 " if c7515 else "") + ("serialized-wgmma-loop" if serialized else ""))


def _config_label(rec: dict) -> str:
    keep = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_K1", "BLOCK_K2", "BLOCK_KA", "BLOCK_KB", "BLOCK_R", "BLOCK_C",
            "BLOCK_CO", "BLOCK_P")
    c = rec["constexprs"]
    warps = rec["options"]["num_warps"]
    return " ".join(f"{k[6:]}={c[k]}" for k in keep if k in c and not (k.endswith(("K2", "KB")) and
                    c.get(k.replace("BLOCK_", "") + "_STEPS", 1) == 0)) + (
                        f" G={c['GROUPS']}" if c.get("GROUPS", 1) > 1 else "") + (" phases" if c.get("PHASES") else "") + (
                        f" st={rec['options']['num_stages']}") + (
                        f" w={warps}" if warps != 4 else "")


def report(arch: int, dtype: torch.dtype, batch: int, opcodes: bool = False) -> list[dict]:
    rows, seen, variants = [], set(), set()
    for candidate in (0, 1):
        for i, rec in enumerate(record_launches(batch, dtype, candidate)):
            role = f"{rec['label']}#{i}:{rec['name']}"
            cfg = _config_label(rec)
            # the RIDB's launches repeat the IDB's and the conv's kernels: report only the variants that
            # are its own (the dX epilogues that chain gz2 and sum the x0 gradient)
            variant = (rec["name"], tuple(sorted(rec["constexprs"].items())), tuple(sorted(rec["options"].items())))
            if (role, cfg) in seen or (rec["label"] == "ridb" and variant in variants):
                continue
            seen.add((role, cfg))
            variants.add(variant)
            programs = rec["grid"][0] * (rec["grid"][1] if len(rec["grid"]) > 1 else 1) * \
                (rec["grid"][2] if len(rec["grid"]) > 2 else 1)
            try:
                compiled = compile_record(rec, arch)
                row = analyze(compiled, arch, programs, rec["options"]["num_warps"])
            except Exception as e:  # report every config, then fail
                row = dict(fail=True, why=f"compile error {e!r}"[:300])
            rows.append(dict(role=role, config=cfg, **row))
            print(_format(rows[-1]), flush=True)
            if opcodes and rows[-1].get("main_loop_opcodes"):
                print("     main loop: " + " ".join(f"{k} {v}" for k, v in rows[-1]["main_loop_opcodes"].items()))
    return rows


def _format(r: dict) -> str:
    if "registers" not in r:
        return f"FAIL {r['role']:18s} {r['config']:38s} {r['why']}"
    warn = "; ".join(r["ptxas_warnings"])[:120]
    return (f"{'FAIL' if r['fail'] else 'ok  '} {r['role']:18s} {r['config']:38s} regs {r['registers']:3d} "
            f"spill {r['spill_bytes']} smem {r['shared_bytes']:6d} sass/wgmma {r['sass_per_wgmma']} "
            + (f"sass/hmma {r['sass_per_hmma']} " if r.get("sass_per_hmma") else "")
            + f"wait0-in-loop {r['waits_0_in_loops']} hgmma {r['hgmma_total']} programs {r['programs']} "
            f"waves {r['waves']} ({r['ctas_per_sm']}/SM) {r['why']} {warn}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10: 90 H100/H200")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--json", help="write the rows here too")
    parser.add_argument("--opcodes", action="store_true", help="also print each main loop's SASS opcode counts")
    args = parser.parse_args(argv)
    if INTERPRETING:
        raise SystemExit("unset TRITON_INTERPRET: the interpreter replaces the compiler")
    rows = report(args.arch, torch.bfloat16 if args.dtype == "bf16" else torch.float32, args.batch, args.opcodes)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    failed = [r for r in rows if r["fail"]]
    print(f"{len(rows)} kernel/config rows, {len(failed)} failing")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

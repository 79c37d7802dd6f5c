"""Compile every autotune config of the conv3x3 kernels for an NVIDIA target, without a GPU.

    python -m gafh_fast.kernels.compile_check [--arch 90] [--dtype bf16]

For machines with no GPU: it catches type and dot-shape errors that the interpreter lets through and
prints, per config, shared memory, whether tl.dot became wgmma/mma, how many loads were pipelined
(async copies) and, when the bundled ptxas accepts the PTX, registers and spills. It specialises the
channel counts and pointers as 16-divisible, as the JIT does for the trunk's 32/64/96 channels.
Not a test: speed is only measured on a GPU (bench/kernels_suite.py).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import conv3x3_bwd as bwd
from . import conv3x3_fwd as fwd

_DIVISIBLE = ("C1", "C2", "C_OUT", "C_I", "C_IN_TOTAL", "c_base", "CHUNK")


def _signature(kernel, types: list[str], constexprs: dict) -> tuple[dict, dict]:
    sig = dict(zip(kernel.arg_names, types))
    sig.update({k: "constexpr" for k in constexprs})
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
             if n.endswith("_ptr") or n in _DIVISIBLE}
    return sig, attrs


def _ptxas_info(ptx: str, arch: int) -> str:
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for name in ("ptxas-blackwell", "ptxas"):
        exe = os.path.join(bin_dir, name)
        if not os.path.exists(exe):
            continue
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(ptx)
        gpu = f"sm_{arch}a" if arch in (90, 100) else f"sm_{arch}"
        out = subprocess.run([exe, "-v", f"--gpu-name={gpu}", f.name, "-o", os.devnull], capture_output=True, text=True)
        os.unlink(f.name)
        if out.returncode == 0:
            return " ".join(line.split("info    : ")[-1].strip() for line in out.stderr.splitlines()
                            if "registers" in line or "spill" in line or "Performance" in line)
    return "(no ptxas accepted the PTX)"


def check(arch: int, dtype: str) -> int:
    if fwd.INTERPRETING:
        raise SystemExit("unset TRITON_INTERPRET: the interpreter replaces the compiler")
    target = GPUTarget("cuda", arch, 32)
    prec = "ieee" if dtype == "fp32" else "tf32"
    p = f"*{dtype}"
    jobs = [
        (fwd.conv3x3_fwd_kernel, fwd.FWD_CONFIGS, [p] * 7 + ["*u8"] + ["i32"] * 6 + ["fp32"] * 3,
         dict(HAS_BIAS=True, HAS_ACT=True, HAS_R1=True, HAS_R2=True, SAVE_MASK=True, INTERP_BF16=False, PRECISION=prec)),
        (bwd.conv3x3_bwd_dx_kernel, bwd.DX_CONFIGS, [p, "*u8", p, p] + ["i32"] * 7 + ["fp32"] * 2,
         dict(HAS_ACT=True, INTERP_BF16=False, PRECISION=prec)),
        (bwd.conv3x3_bwd_dw_kernel, bwd.DW_CONFIGS, [p, p, p, "*u8", "*fp32", "*fp32"] + ["i32"] * 7 + ["fp32"] * 2,
         dict(HAS_ACT=True, DO_BIAS=True, INTERP_BF16=False, PRECISION=prec)),
        (bwd.conv3x3_bwd_finalize_kernel, [triton.Config({"BLOCK": bwd.FINALIZE_BLOCK}, num_warps=4, num_stages=1)],
         ["*fp32", "*fp32", p, p] + ["i32"] * 3, dict(HAS_BIAS=True, INTERP_BF16=False)),
    ]
    failures = 0
    for kernel, configs, types, flags in jobs:
        for cfg in configs:
            constexprs = {**flags, **cfg.kwargs}
            sig, attrs = _signature(kernel, types, constexprs)
            label = f"{kernel.__name__:24s} {dtype} {cfg.kwargs} warps={cfg.num_warps} stages={cfg.num_stages}"
            try:
                compiled = triton.compile(ASTSource(kernel, sig, constexprs=constexprs, attrs=attrs), target=target,
                                          options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
            except Exception as e:  # report every config, then fail
                failures += 1
                print(f"FAIL {label}: {e!r}"[:2000])
                continue
            ptx, ttgir = compiled.asm["ptx"], compiled.asm["ttgir"]
            dot = "wgmma" if "wgmma" in ptx else ("mma" if "mma.sync" in ptx else "fma")
            print(f"ok   {label}: shared {compiled.metadata.shared} B, dot={dot}, "
                  f"async copies {ttgir.count('async_copy_global_to_local')}; {_ptxas_info(ptx, arch)}")
    return failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10: 80 A100, 90 H100/H200")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    args = parser.parse_args()
    raise SystemExit(1 if check(args.arch, args.dtype) else 0)


if __name__ == "__main__":
    main()

"""Hallucinate 256x256 faces from 32x32 ones, sharded over ranks; or evaluate against HR faces.

    torchrun --nproc_per_node 8 launch/infer.py --weights run/generator.safetensors --input faces/ --output out/
    torchrun --nproc_per_node 8 launch/infer.py --weights W --input-hr celeba/ --split test --output eval/
    python launch/infer.py ...            (one process, no torchrun)

Exit codes: 0 every input done; 2 usage / config / weights error (nothing processed); 3 finished but
some inputs failed (OUTPUT/manifest.jsonl says which and why). Under torchrun, torchrun itself exits 1
whenever a worker exits non-zero and prints each worker's code ("exitcode : 3") in its report.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

# torch-free at import: the decode worker processes are spawned, and spawning re-imports this script
from gafh_fast.inference.inputs import PIL_DEFAULT_MAX_PIXELS, InferenceUsageError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, required=True, help="generator .safetensors (export.save_generator)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", type=Path, help="folder of faces (recursive) or a text file of paths")
    src.add_argument("--input-hr", type=Path, help="evaluate: dataset root of HR faces (downsampled per the spec)")
    p.add_argument("--output", type=Path, required=True, help="results mirror input paths; manifest.jsonl here")
    ev = p.add_argument_group("evaluation (--input-hr)")
    ev.add_argument("--split", choices=("train", "val", "test"), default="test")
    ev.add_argument("--layout", choices=("celeba_aligned", "celeba_wild", "folder"),
                    help="default: the weights file's data.layout")
    ev.add_argument("--split-scheme", choices=("official", "paper", "all"),
                    help="default: the weights file's data.split")
    p.add_argument("--batch-size", type=int, default=256, help="per rank (default 256)")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--kernels", choices=("auto", "triton", "torch"), default="auto")
    p.add_argument("--compile", choices=("auto", "on", "off"), nargs="?", const="on", default="auto",
                   help="torch.compile reduce-overhead (CUDA graphs on GPU) on the fixed padded batch; "
                        "auto (default): on for CUDA, off on CPU; a bare --compile means on")
    p.add_argument("--decoder", choices=("auto", "dali", "pil"), default="auto",
                   help="auto: DALI on the GPU when nvidia.dali and CUDA are there, else PIL worker processes")
    p.add_argument("--decode-workers", "--decode-threads", dest="decode_workers", type=int, default=None,
                   help="PIL decode processes (DALI: its threads); default: an eighth of this rank's cores")
    p.add_argument("--write-workers", "--write-threads", dest="write_workers", type=int, default=None,
                   help="PNG / npy writer threads (the encoder releases the GIL); default: the other cores")
    p.add_argument("--format", choices=("png", "npy", "none"), default="png",
                   help="npy: one uint8 (256, 256, 3) array per image; none: write nothing (evaluation only)")
    p.add_argument("--png-compress-level", type=int, choices=range(10), default=1, metavar="0-9")
    p.add_argument("--max-pixels", type=int, default=PIL_DEFAULT_MAX_PIXELS,
                   help="inputs with more pixels are rejected as decompression bombs (0: no limit)")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="redo outputs that already exist")
    p.add_argument("--device", help="default: cuda:LOCAL_RANK if CUDA is available, else cpu")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s")
    from gafh_fast.inference.runner import EXIT_USAGE, InferenceOptions, run_inference

    try:
        return run_inference(InferenceOptions(**vars(args))).exit_code
    except InferenceUsageError as e:
        logging.getLogger("gafh_fast").error("%s", e)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())

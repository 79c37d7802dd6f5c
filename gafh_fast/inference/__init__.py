"""Sharded, large-batch hallucination of 32x32 faces and evaluation against HR (issues 6, 13).

    inputs.py       listing (folder / path list), rank sharding, output names, 8-bit LR decoding, resume
                    check, the decoders the worker processes run (no torch)
    decode.py       PIL decoding in a pool of worker processes ahead of the model, into pinned memory on CUDA
    dali_decode.py  the GPU decoder (nvidia.dali), same batches; LR inference only
    outputs.py      atomic PNG (libpng via imagecodecs, GIL released) / .npy writing in threads, manifest
    evaluate.py     PSNR / SSIM of G and bicubic, gathered over ranks, the table beside the paper's
    runner.py       distributed set-up, the model (compiled on CUDA, fixed padded batch), the loop, the summary

Entry point: launch/infer.py (`torchrun --nproc_per_node N launch/infer.py --weights W --input DIR --output OUT`).
The names below load runner.py (and torch) on first use: a decode worker process imports
gafh_fast.inference.inputs, which must not pay for torch.
"""
from importlib import import_module

_EXPORTS = {"InferenceUsageError": "inputs", "InferenceOptions": "runner", "InferenceSummary": "runner",
            "run_inference": "runner", "EXIT_OK": "runner", "EXIT_USAGE": "runner", "EXIT_SOME_FAILED": "runner"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)

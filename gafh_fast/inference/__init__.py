"""Sharded, large-batch hallucination of 32x32 faces and evaluation against HR (issue 6).

    inputs.py       listing (folder / path list), rank sharding, output names, 8-bit LR decoding, resume check
    decode.py       PIL thread-pool decoding ahead of the model, into pinned memory on CUDA
    dali_decode.py  the GPU decoder (nvidia.dali), same batches; LR inference only
    outputs.py      atomic PNG / .npy writing in a background pool, manifest parts and merge
    evaluate.py     PSNR / SSIM of G and bicubic, gathered over ranks, the table beside the paper's
    runner.py       distributed set-up, the model, the loop, the summary

Entry point: launch/infer.py (`torchrun --nproc_per_node N launch/infer.py --weights W --input DIR --output OUT`).
"""
from gafh_fast.inference.inputs import InferenceUsageError
from gafh_fast.inference.runner import (EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, InferenceOptions, InferenceSummary,
                                        run_inference)

__all__ = ["InferenceOptions", "InferenceSummary", "InferenceUsageError", "run_inference",
           "EXIT_OK", "EXIT_USAGE", "EXIT_SOME_FAILED"]

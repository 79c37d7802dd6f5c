"""`train.deterministic: true`: every setting that bitwise reproducibility of a run needs, in one place.

What decides the bits of a training step (measured on the CPU here, issue 14; tests/test_train.py has
the experiments): the seeds, the data order, and the order of each floating-point reduction. On CPU
the last one depends on the intra-op thread count: oneDNN and ATen split the conv/linear backward
reductions (weight gradients, over batch and pixels) by thread, so 1 and 2 threads give gradients
that differ in the last bits, and Adam turns that into visible weight differences within a few
steps where a gradient is ~0. The thread count a process gets is not a property of the run: it
follows the launcher (torchrun sets OMP_NUM_THREADS=1 when it starts several processes per node, the
deepspeed launcher sets it only with --bind_cores_to_rank), the CPU affinity the process was started
with, and the machine. Deterministic mode therefore pins it to 1 on CPU. Memory alignment, heap
contents, PYTHONHASHSEED and DataLoader timing were ruled out by experiment (see the test module).

On CUDA it turns on the deterministic cuDNN/cuBLAS algorithms (cuBLAS needs its workspace config
before its first handle) and turns cudnn.benchmark off; that costs speed, so it stays an option.
"""
from __future__ import annotations

import os

import torch

CPU_THREADS = 1


def make_deterministic(device: torch.device) -> str:
    """Apply the settings before any model is built; returns the one line the trainer logs."""
    settings = ["torch.use_deterministic_algorithms(True)"]
    if device.type == "cuda":
        # cuBLAS reads this when it creates its handle; without it deterministic mode raises at the first matmul
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        settings += [f"CUBLAS_WORKSPACE_CONFIG={os.environ['CUBLAS_WORKSPACE_CONFIG']}",
                     "cudnn.deterministic=True", "cudnn.benchmark=False"]
    else:
        previous = torch.get_num_threads()
        torch.set_num_threads(CPU_THREADS)
        settings.append(f"CPU intra-op threads {previous} -> {CPU_THREADS} (reduction order depends on it)")
    torch.use_deterministic_algorithms(True)
    return "deterministic: " + ", ".join(settings)

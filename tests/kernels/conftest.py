"""Without a GPU the kernels run in Triton's interpreter, which must be on before they are defined."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

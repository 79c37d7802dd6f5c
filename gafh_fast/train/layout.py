"""Where the trainer's memory-layout decision lives: `train.channels_last: auto | true | false`.

Only activations change layout. Parameters stay in the default contiguous format on every device:
DeepSpeed 0.19.8 broadcasts each parameter as `p.data.view(torch.uint8)`, which needs
stride(-1) == 1 (a channels_last (O, I, 3, 3) weight has stride(-1) == I), ZeRO-1/2 replace
`p.data` with plain views of their flat buffers anyway, and cuDNN and the fused kernels take
contiguous weights. A channels_last input makes every conv after it produce channels_last output,
so converting the batch once is enough.
"""
from __future__ import annotations

import torch


def use_channels_last(setting, device: torch.device) -> bool:
    """`auto` means channels_last on CUDA (cuDNN and the fused kernels are fastest in it), not elsewhere."""
    if setting == "auto":
        return device.type == "cuda"
    return bool(setting)


def to_activation_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A 4-d activation in the chosen layout (a no-op when it already is)."""
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

"""VGG-19 feature extractor for the content loss, with our own layer table.

torchvision cannot be installed beside the CPU torch wheel here and is not needed: the table below
reproduces torchvision's `vgg19().features` indices, so its state dict (`features.N.weight`) loads.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

log = logging.getLogger("gafh_fast")

VGG19_FILENAME = "vgg19-dcbb9e9d.pth"
VGG19_URL = "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"
_CHANNELS = ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512))


def _layer_table() -> dict[str, tuple[int, str, int, int]]:
    """name -> (index in torchvision's features, kind, c_in, c_out)."""
    table, index, c_in = {}, 0, 3
    for block, widths in enumerate(_CHANNELS, start=1):
        for j, c_out in enumerate(widths, start=1):
            table[f"conv{block}_{j}"] = (index, "conv", c_in, c_out)
            table[f"relu{block}_{j}"] = (index + 1, "relu", c_out, c_out)
            index += 2
            c_in = c_out
        table[f"pool{block}"] = (index, "pool", c_in, c_in)
        index += 1
    return table


VGG19_LAYERS = _layer_table()  # conv1_1 -> 0, relu1_1 -> 1, ..., relu4_3 -> 24, ..., relu5_4 -> 35
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def vgg19_candidate_paths(weights: Optional[str]) -> list[Path]:
    """Where the spec says to look: the configured path, then $TORCH_HOME/hub/checkpoints/."""
    paths = []
    if weights:
        paths.append(Path(weights).expanduser())
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch"
    )
    paths.append(Path(torch_home) / "hub" / "checkpoints" / VGG19_FILENAME)
    return paths


def find_vgg19_weights(weights: Optional[str]) -> Path:
    """The first existing candidate path, or FileNotFoundError saying where it looked and what to do."""
    tried = vgg19_candidate_paths(weights)
    path = next((p for p in tried if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(
            "VGG-19 weights not found; looked at: " + ", ".join(str(p) for p in tried)
            + f". Download {VGG19_URL} on a machine with internet and put it at one of those paths "
            "(or set train.content.weights), or set train.content.pretrained: false for random weights."
        )
    return path


def check_torchvision_state(state: dict, layer: str, source: str = "<state dict>") -> None:
    """ValueError unless `state` holds torchvision's `features.N.weight/bias` of every conv up to `layer`."""
    last = VGG19_LAYERS[layer][0]
    problems = []
    for index, kind, c_in, c_out in VGG19_LAYERS.values():
        if kind != "conv" or index > last:
            continue
        for key, shape in ((f"features.{index}.weight", (c_out, c_in, 3, 3)), (f"features.{index}.bias", (c_out,))):
            if key not in state:
                problems.append(f"missing {key}")
            elif tuple(state[key].shape) != shape:
                problems.append(f"{key} has shape {tuple(state[key].shape)}, expected {shape}")
    if problems:
        raise ValueError(f"{source} is not a torchvision VGG-19 state dict: " + "; ".join(problems[:4]))


class VGG19Features(nn.Module):
    """Input (N, 3, H, W) in [-1, 1] -> the features of `layer` (ImageNet-normalised input)."""

    def __init__(self, layer: str = "relu4_3", weights: Optional[str] = None, pretrained: bool = True):
        super().__init__()
        if layer not in VGG19_LAYERS:
            raise ValueError(f"unknown VGG-19 layer {layer!r}; expected one of {', '.join(VGG19_LAYERS)}")
        self.layer = layer
        last = VGG19_LAYERS[layer][0]
        modules: list[nn.Module] = []
        for name, (index, kind, c_in, c_out) in VGG19_LAYERS.items():
            if index > last:
                break
            if kind == "conv":
                modules.append(nn.Conv2d(c_in, c_out, 3, padding=1))
            elif kind == "relu":
                modules.append(nn.ReLU(inplace=False))
            else:
                modules.append(nn.MaxPool2d(2, 2))
        self.features = nn.Sequential(*modules)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if pretrained:
            self.load_torchvision_weights(weights)
        else:
            log.warning("VGG19Features: pretrained=false, the content loss uses RANDOM VGG-19 weights "
                        "(fine for tests and the demo, meaningless for real training)")
        self.requires_grad_(False)
        self.eval()

    def load_torchvision_weights(self, weights: Optional[str]) -> Path:
        path = find_vgg19_weights(weights)
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.load_state_dict_torchvision(state, source=str(path))
        log.info("VGG19Features: loaded %s up to %s", path, self.layer)
        return path

    def load_state_dict_torchvision(self, state: dict, source: str = "<state dict>") -> None:
        """Load the `features.N.*` entries this cut needs; extra layers/classifier keys are ignored."""
        check_torchvision_state(state, self.layer, source)
        self.features.load_state_dict({key: state[f"features.{key}"] for key in self.features.state_dict()})

    def train(self, mode: bool = True) -> "VGG19Features":
        return super().train(False)  # always eval: a frozen feature extractor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x + 1.0) * 0.5  # [-1, 1] -> [0, 1]
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return self.features(x)

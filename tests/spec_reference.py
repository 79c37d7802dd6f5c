"""The spec's G, D and VGG-19 features, written out literally from ../shared/spec/GAFH_RIDN.md.

Plain F.conv2d / F.leaky_relu / F.interpolate / F.batch_norm on a dict of tensors keyed by the
library's state-dict names (the only thing shared with gafh_fast.models: that dict is the contract
between a checkpoint and the network). Nothing here imports gafh_fast.models, so a bug in the
library's networks cannot be mirrored on this side. The constants are the spec's, written again.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LRELU_SLOPE = 0.2                        # LReLU = LeakyReLU(0.2)
SPEC_RES_SCALE = 0.2                     # alpha of the RIDB and DNB residuals
BN_MOMENTUM, BN_EPS = 0.1, 1e-5          # torch's BatchNorm2d defaults (the spec names no others)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's vgg19 ("E"): channels per conv, "M" = 2x2 max pool
VGG19_E = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
           512, 512, 512, 512, "M")
# RaD convs 1..9: (output channels as a multiple of nf, stride); BN after every conv but the first
RAD_LAYOUT = ((1, 1), (1, 2), (2, 1), (2, 2), (4, 1), (4, 2), (8, 1), (8, 2), (8, 2))


def lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, LRELU_SLOPE)


def conv(p: dict, name: str, x: torch.Tensor, c_in: int, c_out: int, k: int = 3, stride: int = 1) -> torch.Tensor:
    """Conv(c_in -> c_out, k) with bias, "same" padding (k odd); p holds `name.weight`, `name.bias`,
    which must have the spec's shapes."""
    w, b = p[f"{name}.weight"], p[f"{name}.bias"]
    assert tuple(w.shape) == (c_out, c_in, k, k) and tuple(b.shape) == (c_out,), (
        f"{name}: weight {tuple(w.shape)}, bias {tuple(b.shape)}; the spec says Conv({c_in} -> {c_out}, k={k})")
    return F.conv2d(x, w, b, stride=stride, padding=k // 2)


def batch_norm(p: dict, name: str, x: torch.Tensor, training: bool) -> torch.Tensor:
    """BN with the running statistics in p (updated in place in training mode, as nn.BatchNorm2d does)."""
    return F.batch_norm(x, p[f"{name}.running_mean"], p[f"{name}.running_var"], p[f"{name}.weight"],
                        p[f"{name}.bias"], training=training, momentum=BN_MOMENTUM, eps=BN_EPS)


def generator(p: dict, lr: torch.Tensor, *, nf: int, gc: int, sfm_kernel: int, out_kernel: int, num_dnb: int,
              ridb_per_dnb: int, idb_per_ridb: int, trunk_norm: str, upsample: str,
              res_scale: float = SPEC_RES_SCALE, training: bool = False) -> torch.Tensor:
    """G: LR (N, 3, h, w) in [-1, 1] -> HF (N, 3, 8h, 8w), table "Generator G" row by row."""
    f_sfm = conv(p, "sfm", lr, 3, nf, sfm_kernel)               # SFM: Conv(3 -> nf, k=9)
    z = f_sfm
    for d in range(num_dnb):                                     # MDBM: DNB_4(... DNB_1(F_SFM))
        x = z
        for r in range(ridb_per_dnb):                            # DNB: z + a * RIDB_3(RIDB_2(RIDB_1(z)))
            ridb = f"mdbm.{d}.ridbs.{r}"
            x0 = x
            h = x0
            for q in range(idb_per_ridb):                        # RIDB: x = IDB_q(x) + x0
                idb = f"{ridb}.idbs.{q}"
                h1 = lrelu(conv(p, f"{idb}.conv1", h, nf, gc))   # IDB: h1 = LReLU(Conv(nf -> gc)(x))
                h2 = lrelu(conv(p, f"{idb}.conv2", torch.cat([h, h1], dim=1), nf + gc, nf))  # LReLU(Conv([x, h1]))
                h = h2 + x0
            x = x0 + res_scale * conv(p, f"{ridb}.conv", h, nf, nf)  # RIDB(x0) = x0 + a * Conv(x)
        z = z + res_scale * x
    fused = conv(p, "fusion", z, nf, nf)                         # fusion: BN(Conv(F_MDBM)) + F_SFM
    if trunk_norm == "batchnorm":
        fused = batch_norm(p, "fusion_norm", fused, training)
    x = fused + f_sfm
    for i in range(3):                                           # UM: 3 x [x2 -> Conv -> LReLU]
        if upsample == "nearest_conv":
            x = lrelu(conv(p, f"upconvs.{i}", F.interpolate(x, scale_factor=2, mode="nearest"), nf, nf))
        else:                                                    # pixel_shuffle: Conv(nf -> 4nf) -> shuffle
            x = lrelu(F.pixel_shuffle(conv(p, f"upconvs.{i}", x, nf, 4 * nf), 2))
    return torch.tanh(conv(p, "out", x, nf, 3, out_kernel))      # output: tanh(Conv(nf -> 3, k=9))


def discriminator(convs: list[dict], norms: list[dict | None], dense: list[dict], x: torch.Tensor, *, nf: int,
                  dense_width: int, training: bool = False) -> torch.Tensor:
    """RaD: C(x), a logit per image (N,). convs[i] / norms[i]: {"weight", "bias", ...} of conv i+1 and
    the BN after it (None: conv 1, or norm none); dense: the two Linear layers."""
    assert len(convs) == len(norms) == len(RAD_LAYOUT)
    c_in = 3
    for (mult, stride), c, n in zip(RAD_LAYOUT, convs, norms):
        x = conv({"c.weight": c["weight"], "c.bias": c["bias"]}, "c", x, c_in, nf * mult, 3, stride)
        c_in = nf * mult
        if n is not None:
            x = F.batch_norm(x, n["running_mean"], n["running_var"], n["weight"], n["bias"], training=training,
                             momentum=BN_MOMENTUM, eps=BN_EPS)
        x = lrelu(x)
    x = x.flatten(1)                                                       # flatten (C, H, W)
    assert tuple(dense[0]["weight"].shape) == (dense_width, x.shape[1]) and tuple(dense[1]["weight"].shape) == (1, dense_width)
    x = lrelu(F.linear(x, dense[0]["weight"], dense[0]["bias"]))          # Linear -> LReLU
    return F.linear(x, dense[1]["weight"], dense[1]["bias"])[:, 0]        # -> Linear(-> 1)


def vgg19_features(p: dict, x: torch.Tensor, layer: str) -> torch.Tensor:
    """phi(x) at `layer` (conv{b}_{j} | relu{b}_{j} | pool{b}); x in [-1, 1] -> [0, 1] -> ImageNet mean/std.
    p holds torchvision's keys, `features.{index}.weight`."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    x = ((x + 1) / 2 - mean) / std
    index, block, j, c_in = 0, 1, 1, 3
    for width in VGG19_E:
        if width == "M":
            x = F.max_pool2d(x, kernel_size=2, stride=2)
            if layer == f"pool{block}":
                return x
            index, block, j = index + 1, block + 1, 1
            continue
        x = conv(p, f"features.{index}", x, c_in, width)
        c_in = width
        if layer == f"conv{block}_{j}":
            return x
        x = F.relu(x)
        if layer == f"relu{block}_{j}":
            return x
        index, j = index + 2, j + 1
    raise ValueError(f"not a VGG-19 layer: {layer}")


def content_loss(p: dict, hf: torch.Tensor, hr: torch.Tensor, layer: str) -> torch.Tensor:
    """L_content = mean over elements of (phi(I_HR) - phi(I_HF))^2."""
    return ((vgg19_features(p, hr, layer) - vgg19_features(p, hf, layer)) ** 2).mean()


def ragan_loss(c_real: torch.Tensor, c_fake: torch.Tensor, real_target: int) -> torch.Tensor:
    """L_D (real_target 1) or L_G (real_target 0) on one batch of logits:
    BCE(C(x_r) - mean C(x_f), t) + BCE(C(x_f) - mean C(x_r), 1 - t), BCE with logits written out as
    softplus: BCE(x, 1) = softplus(-x), BCE(x, 0) = softplus(x), each a mean over the batch."""
    def bce(x, target):
        return F.softplus(-x).mean() if target == 1 else F.softplus(x).mean()

    return bce(c_real - c_fake.mean(), real_target) + bce(c_fake - c_real.mean(), 1 - real_target)

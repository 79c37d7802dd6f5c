"""GAFH-RIDN generator in plain PyTorch, exactly as ../shared/spec/GAFH_RIDN.md (section Generator G).

Every RIDB (its IDBs and its closing conv) goes through `gafh_fast.ops.fused_ridb` (one fused op),
the other trunk 3x3 convs through `gafh_fast.ops.fused_conv3x3`; an IDB on its own (IDB.forward) is
`gafh_fast.ops.fused_idb`, each nearest-x2 upsampling step and its conv `gafh_fast.ops.fused_upconv3x3`,
the output conv and its tanh `gafh_fast.ops.fused_out_conv`, or with nearest-x2 upsampling the last step
and the output conv together `gafh_fast.ops.fused_up_out_conv` (the gradient handed between them). The
SFM conv (3 -> nf at the input size) is nn.Conv2d's own. The `nn.Conv2d` modules only hold parameters, so the state-dict keys are the same whichever backend runs.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F

from gafh_fast.config import GeneratorConfig
from gafh_fast.ops import (fused_conv3x3, fused_idb, fused_out_conv, fused_ridb, fused_up_out_conv, fused_upconv3x3,
                           unlogged_choice)


def _kaiming_(module: nn.Module, scale: float) -> None:
    """Kaiming-normal (fan_in) scaled by `scale`, zero bias: ESRGAN's default_init_weights."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in")
            m.weight.data.mul_(scale)
            if m.bias is not None:
                m.bias.data.zero_()


def _conv_params(conv: nn.Conv2d) -> tuple:
    """(weight, bias) as registered. Read from the module's dicts: nn.Module.__getattr__ is a Python call per
    attribute, and the paper G's 48 IDBs made ~490 of them per forward (~7 % of its host time with the
    fused kernels, bench/RESULTS.md Round 12)."""
    params = conv._parameters
    return params["weight"], params["bias"]


class IDB(nn.Module):
    """Internal dense block: h1 = LReLU(conv(x)); h2 = LReLU(conv([x, h1])); returns h2 + x0."""

    def __init__(self, nf: int, gc: int):
        super().__init__()
        self.conv1 = nn.Conv2d(nf, gc, 3, padding=1)
        self.conv2 = nn.Conv2d(nf + gc, nf, 3, padding=1)
        self.kernels = "torch"

    def forward(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        # h1 = LReLU(conv1(x)) (N, gc, H, W); out = x0 + LReLU(conv2([x, h1])) (N, nf, H, W): the RIDB
        # input x0 is added after every internal block (spec: r1 = x0, s1 = 1)
        return fused_idb(x, x0, self.conv1.weight, self.conv1.bias, self.conv2.weight, self.conv2.bias,
                         backend=self.kernels)


class RIDB(nn.Module):
    """x = x0; x = IDB_q(x) + x0 for each q; RIDB(x0) = x0 + s * conv(x)  [+ the DNB's outer add]."""

    def __init__(self, nf: int, gc: int, num_idb: int, res_scale: float):
        super().__init__()
        self.idbs = nn.ModuleList(IDB(nf, gc) for _ in range(num_idb))
        self.conv = nn.Conv2d(nf, nf, 3, padding=1)
        self.res_scale = res_scale
        self.kernels = "torch"

    def forward(self, x0: torch.Tensor, dnb_input: torch.Tensor | None = None) -> torch.Tensor:
        # One op for the whole block (its IDBs, then conv -> scale -> add x0). The last RIDB of a DNB
        # also carries the DNB's residual: z + s * RIDB_out (r2 = z, s2 = s).
        idbs = [(*_conv_params(m._modules["conv1"]), *_conv_params(m._modules["conv2"])) for m in self.idbs]
        return fused_ridb(
            x0, idbs, self.conv.weight, self.conv.bias, res_scale=self.res_scale,
            residual2=dnb_input, res2_scale=self.res_scale if dnb_input is not None else 1.0,
            backend=self.kernels,
        )


class DNB(nn.Module):
    """Dense nested block: DNB(z) = z + s * RIDB_n(...RIDB_1(z))."""

    def __init__(self, nf: int, gc: int, num_ridb: int, num_idb: int, res_scale: float):
        super().__init__()
        self.ridbs = nn.ModuleList(RIDB(nf, gc, num_idb, res_scale) for _ in range(num_ridb))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = z
        for i, ridb in enumerate(self.ridbs):
            last = i == len(self.ridbs) - 1
            x = ridb(x, dnb_input=z if last else None)
        return x


class Generator(nn.Module):
    """LR (N, 3, h, w) in [-1, 1] -> HF (N, 3, 8h, 8w) in [-1, 1]."""

    def __init__(self, cfg: GeneratorConfig, kernels: str = "auto"):
        super().__init__()
        nf, gc = cfg.nf, cfg.gc
        self.cfg = cfg
        self.sfm = nn.Conv2d(3, nf, cfg.sfm_kernel, padding=cfg.sfm_kernel // 2)
        self.mdbm = nn.ModuleList(
            DNB(nf, gc, cfg.ridb_per_dnb, cfg.idb_per_ridb, cfg.res_scale) for _ in range(cfg.num_dnb)
        )
        self.fusion = nn.Conv2d(nf, nf, 3, padding=1)
        self.fusion_norm = nn.BatchNorm2d(nf) if cfg.trunk_norm == "batchnorm" else None
        up_out = nf * 4 if cfg.upsample == "pixel_shuffle" else nf
        self.upconvs = nn.ModuleList(nn.Conv2d(nf, up_out, 3, padding=1) for _ in range(3))
        self.out = nn.Conv2d(nf, 3, cfg.out_kernel, padding=cfg.out_kernel // 2)

        _kaiming_(self, 1.0)
        _kaiming_(self.mdbm, cfg.init_scale)
        self.set_kernels(kernels)

    def set_kernels(self, kernels: str) -> None:
        """Select the backend of every fused_conv3x3 call (`auto | triton | torch`)."""
        self.kernels = kernels
        for m in self.modules():
            if hasattr(m, "kernels") and m is not self:
                m.kernels = kernels

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        sfm = self.sfm(lr)  # (N, nf, h, w)
        x = sfm
        for dnb in self.mdbm:
            x = dnb(x)
        if self.fusion_norm is not None:
            x = fused_conv3x3([x], self.fusion.weight, self.fusion.bias, negative_slope=None, backend=self.kernels)
            x = self.fusion_norm(x) + sfm
        else:
            x = fused_conv3x3(
                [x], self.fusion.weight, self.fusion.bias, negative_slope=None,
                residual=sfm, backend=self.kernels,
            )
        for i, conv in enumerate(self.upconvs):
            if self.cfg.upsample == "nearest_conv" and i == len(self.upconvs) - 1:
                # the last step and the output layer as one op, whose backward hands the step its gz
                return fused_up_out_conv(x, conv.weight, conv.bias, self.out.weight, self.out.bias,
                                         backend=self.kernels)  # (N, 3, 8h, 8w)
            if self.cfg.upsample == "nearest_conv":  # nearest x2 -> conv -> LeakyReLU, as one op
                x = fused_upconv3x3(x, conv.weight, conv.bias, backend=self.kernels)
            else:
                # LeakyReLU is elementwise, so it commutes with the pixel shuffle permutation.
                x = F.pixel_shuffle(fused_conv3x3([x], conv.weight, conv.bias, backend=self.kernels), 2)
        return fused_out_conv(x, self.out.weight, self.out.bias, backend=self.kernels)  # tanh(conv): (N, 3, 8h, 8w)


def _empty_like_placed(live: torch.Tensor) -> torch.Tensor:
    """Uninitialised, with live's shape, strides, dtype, device and address modulo 16 bytes (DeepSpeed
    makes parameters views into one flat buffer, so a bias can start mid-way in a 16-byte line)."""
    offset = (live.data_ptr() % 16) // live.element_size()
    span = 1 + sum((n - 1) * st for n, st in zip(live.shape, live.stride())) if live.numel() else 0
    base = torch.empty(offset + span, dtype=live.dtype, device=live.device)  # allocators align >= 16 bytes
    return base.as_strided(live.shape, live.stride(), offset)


def _kernel_twin(generator: Generator) -> Generator:
    """A throwaway Generator of the same config whose every parameter and buffer is placed as the live
    one's (_empty_like_placed; values uninitialised): the kernels specialise on strides and alignment."""
    twin = Generator(generator.cfg, kernels="triton")
    for mine, live in zip(itertools.chain(twin.parameters(), twin.buffers()),
                          itertools.chain(generator.parameters(), generator.buffers())):
        mine.data = _empty_like_placed(live)
    return twin


def precompile_kernels(passes, lr_size: int, *, workers=None):
    """Compile, in parallel and before the first step, every fused Triton kernel variant these passes
    will launch. passes: (generator, batch, train) triples: a training forward + backward (train) or an
    inference forward, on (batch, 3, lr_size, lr_size) inputs in the generator's dtype. Returns
    gafh_fast.kernels.precompile's report.

    The passes run on throwaway twins (_kernel_twin), so the live models' weights, gradients and
    BatchNorm statistics are untouched; their fused ops only record their launches. What the kernels
    specialise on is the twins' (channel counts, dtypes, strides, alignment): the fused ops hand them
    channels_last activations whatever layout the model's input has, and the values, the module's
    train/eval mode and the upstream gradient change no launch.

    With nearest-x2 upsampling and `kernels: auto`, a training pass also records the last step and the
    output layer as two ops: auto times them apart against fused_up_out_conv (gafh_fast.ops), and what it
    times would otherwise compile inside the first step (`kernels: triton` never runs them apart)."""
    from gafh_fast.kernels.precompile import precompile

    twins = [(_kernel_twin(g), batch, train, g.kernels == "auto") for g, batch, train in passes]

    def run() -> None:
        for twin, batch, train, auto in twins:
            like = next(twin.parameters())
            lr = torch.zeros(batch, 3, lr_size, lr_size, dtype=like.dtype, device=like.device)
            with torch.set_grad_enabled(train):
                y = twin(lr)
            if train:
                y.float().mean().backward()
            if train and auto and twin.cfg.upsample == "nearest_conv":
                last = twin.upconvs[-1]
                x = torch.zeros(batch, last.in_channels, 4 * lr_size, 4 * lr_size, dtype=like.dtype, device=like.device,
                                requires_grad=True).contiguous(memory_format=torch.channels_last)
                up = fused_upconv3x3(x, last.weight, last.bias, backend="triton")
                fused_out_conv(up, twin.out.weight, twin.out.bias, backend="triton").float().mean().backward()

    with unlogged_choice("triton", "triton"):  # the twins' backend is not the run's: keep it out of the log
        return precompile(run, workers)


def precompile_node_first(passes, lr_size: int, local_rank: int, world: int) -> str:
    """precompile_line for a process group: per node, local rank 0 compiles first on all cores while
    the node's other ranks wait at a barrier; they then load every kernel from Triton's on-disk cache,
    which the node's processes share (each rank compiling everything on its share of the cores would
    take the node's ranks times longer). Every rank calls exactly one barrier."""
    first = local_rank == 0
    if world > 1 and not first:
        torch.distributed.barrier()
    line = precompile_line(passes, lr_size, workers=None if first else 1)
    if world > 1 and first:
        torch.distributed.barrier()
    return line


def precompile_line(passes, lr_size: int, **kwargs) -> str:
    """precompile_kernels(...) for a log line. A failure becomes a warning line, not an exception:
    compiling up front only saves time, and each kernel still compiles (and fails loudly, if it must)
    on its first launch."""
    try:
        return precompile_kernels(passes, lr_size, **kwargs).line()
    except Exception as e:  # noqa: BLE001  the run goes on; the log says what happened
        return f"WARNING: Triton kernel precompile failed ({type(e).__name__}: {e}); kernels compile on first use"


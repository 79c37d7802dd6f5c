"""G's repeated block (a DNB) compiled as the trainer compiles it (gafh_fast.train.compile.compile_region:
inductor, fullgraph=True, static shapes) with the fused Triton ops inside: the RIDB custom ops of
kernels/ridb.py trace as opaque nodes (no graph break: fullgraph would raise), run their kernels, and the block's output
and every gradient match the float64 torch reference within rel 1e-5 of each tensor's largest entry (the
bound of test_conv3x3.py's whole-generator test).

kernels=auto: on CUDA the first call of each shape times triton against torch (gafh_fast.ops.AutoChooser),
which a trace cannot do; the trainer therefore runs its first iteration eagerly and compiles afterwards.
Here that order runs on CPU with the device swapped: `auto` is kept as `auto` (on CPU it means torch), and
the chooser's timer says "equal", so it takes triton (the first candidate). The compiled block must then
run the Triton kernels it decided on, not the torch path an undecided trace takes. (kernels=triton traces
the same custom ops without the chooser; test_conv3x3.py::test_torch_compile_fullgraph covers that call.)
"""
from __future__ import annotations

import copy

import torch

import gafh_fast.kernels.ridb as ridb
import gafh_fast.ops as ops
from gafh_fast.config import load_config
from gafh_fast.models.generator import Generator
from gafh_fast.train.compile import compile_kwargs, compile_region

from .test_conv3x3 import DEVICE, assert_within

CONFIG = ("model.generator.nf=16", "model.generator.gc=8", "model.generator.num_dnb=1",
          "model.generator.ridb_per_dnb=2", "model.generator.idb_per_ridb=2", "data.hr_size=32")


def test_compiled_dnb_region_runs_the_fused_ops_fullgraph_after_auto_decided(monkeypatch):
    cfg = load_config(None, CONFIG)
    torch.manual_seed(0)
    generator = Generator(cfg.model.generator, kernels="auto").to(DEVICE)
    reference = copy.deepcopy(generator).double()
    reference.set_kernels("torch")
    block, ref_block = generator.mdbm[0], reference.mdbm[0]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, cfg.lr_size, cfg.lr_size, generator=gen).to(DEVICE)
    upstream = torch.randn(x.shape, generator=gen).to(DEVICE)

    # the CUDA meaning of auto, on CPU; decided eagerly first, as the trainer's first iteration does
    resolve = ops.resolve_backend
    monkeypatch.setattr(ops, "resolve_backend", lambda b, d: "auto" if b == "auto" else resolve(b, d))
    monkeypatch.setattr(ops, "AUTO", ops.AutoChooser(timer=lambda call, device: 1.0))
    block(x.clone().requires_grad_()).backward(upstream)
    block.zero_grad(set_to_none=True)
    assert set(ops.AUTO.decisions.values()) == {"triton"}, ops.AUTO.decisions

    compile_region(block, "g", compile_kwargs("g", cfg.train.compile))
    ref_leaf = x.double().requires_grad_()
    y_ref = ref_block(ref_leaf)
    y_ref.backward(upstream.double())
    ref_params = dict(ref_block.named_parameters())
    real_ridb_forward = ridb.ridb_forward
    breaks_before = sum(torch._dynamo.utils.counters["graph_break"].values())
    # Three compiled steps: each RIDB signature's eager call above was its first, the first step records its
    # tapes (kernels/tape.py), the next two replay them inside the custom ops
    for step in range(3):
        launches = []
        monkeypatch.setattr(ridb, "ridb_forward",
                            lambda *a, **k: launches.append(len(a[1])) or real_ridb_forward(*a, **k))
        block.zero_grad(set_to_none=True)
        leaf = x.clone().requires_grad_()
        y = block(leaf)
        y.backward(upstream)
        assert launches == [2, 2], f"step {step}: fused RIDB forwards (their IDB counts) in the compiled block: {launches}"
        assert sum(torch._dynamo.utils.counters["graph_break"].values()) == breaks_before

        assert_within("block output", y, y_ref, torch.full_like(y_ref, y_ref.abs().max().item()), 1e-5)
        assert_within("grad x", leaf.grad, ref_leaf.grad,
                      torch.full_like(ref_leaf.grad, ref_leaf.grad.abs().max().item()), 1e-5)
        for name, p in block.named_parameters():
            want = ref_params[name].grad
            assert p.grad is not None, f"{name}: no gradient through the compiled block"
            assert_within(f"grad {name}", p.grad, want, torch.full_like(want, want.abs().max().item()), 1e-5)
    # the block's two RIDB signatures (the DNB residual on its last RIDB or not), forward and backward, taped
    for taped, launches_per_call in ((ridb._RIDB_FORWARD, 2 * 2 + 1), (ridb._RIDB_BACKWARD, 3 * 2 + 2)):
        ours = [n for key, n in taped.state().items() if key[0][0] == x.shape and key[0][1] == x.dtype]
        assert ours == [launches_per_call] * 2, (taped.name, ours)


def test_compile_caches_are_keyed_on_the_ops_source():
    """torch.compile's caches key a graph on our custom ops' names and schemas, not on their autograd
    formulas or fakes; importing the kernels adds the hash of the files that define the ops to the cache
    key tag, so that a changed op is never served a graph traced for the old one (see kernels/__init__.py)."""
    import hashlib
    import os

    import gafh_fast.kernels as kernels

    here = os.path.dirname(kernels.__file__)
    files = ("op.py", "ridb.py", "upconv.py", "outconv.py", "upout.py")  # every file that defines a custom op
    digest = hashlib.sha256(b"".join(open(os.path.join(here, f), "rb").read() for f in files))
    assert kernels.OPS_SOURCE_HASH == digest.hexdigest()[:16]
    assert f"gafh_fast-ops-{kernels.OPS_SOURCE_HASH}" in torch.compiler.config.cache_key_tag.split("|")

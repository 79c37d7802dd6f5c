"""Test helper: the GAN step's gradients recomputed in plain PyTorch at a given state, with per-element
rounding bounds derived from the sums that produce them, and a replay of torch Adam.

A weight gradient is a sum of m products x * delta (conv: over batch and output pixels, per use of the
weight; linear: over the batch). Two runs that compute the same gradient with different batch splits
(N ranks of B vs one process of N*B) or different kernels add the same terms in another order. Each
order is within gamma_m * S of the exact sum, S = sum |x * delta| (Higham, Accuracy and Stability of
Numerical Algorithms, 2nd ed., eq. 4.4), so the two differ by at most 2 gamma_m * S. The terms
themselves differ too: x and delta come out of sums of at most K products each (K: the largest fan-in or
fan-out of a conv/linear in the step, 576 for VGG's conv1_2), and the relativistic mean's backward adds
its 4 terms in another order. So the bound per element is 2 gamma_T * S with T = m + 2K + 4: first
order, one sum deep. (A worst-case bound through every layer multiplies the |W| norms of all layers,
~1e13 here, and would pass anything; measured differences stay below 1 % of this one.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from gafh_fast.losses import content_loss, pixel_loss, ragan_d_loss, ragan_g_loss

U32 = 2.0 ** -24  # unit roundoff of fp32


def gamma(n: torch.Tensor) -> torch.Tensor:
    return n * U32 / (1 - n * U32)


class TermSums(TorchFunctionMode):
    """While active, every conv2d/linear whose weight needs a gradient also accumulates, in float64, per
    weight and bias element the sum of |terms| of its gradient (S) and their count (m), and the
    largest reduction length any conv/linear forward or input-gradient uses (K)."""

    def __init__(self):
        super().__init__()
        self.S: dict[torch.Tensor, torch.Tensor] = {}
        self.m: dict[torch.Tensor, int] = {}
        self.K = 0

    def _add(self, p: torch.Tensor, s: torch.Tensor, m: int) -> None:
        self.S[p] = self.S.get(p, 0) + s
        self.m[p] = self.m.get(p, 0) + m

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func not in (F.conv2d, F.linear):
            return out
        w = args[1]
        self.K = max(self.K, w[0].numel(), w[:, 0].numel())  # forward and input-gradient reduction lengths
        if not w.requires_grad:
            return out
        x = args[0].detach()
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        conv = {k: (args[i] if len(args) > i else kwargs.get(k, d))
                for i, (k, d) in enumerate((("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1)), start=3)}

        def hook(grad):
            with torch.no_grad():
                g, xa = grad.detach().abs().double(), x.abs().double()
                if func is F.conv2d:
                    sw, sb, m = (torch.nn.grad.conv2d_weight(xa, w.shape, g, **conv), g.sum((0, 2, 3)),
                                 g.shape[0] * g.shape[2] * g.shape[3])
                else:
                    g2, x2 = g.reshape(-1, g.shape[-1]), xa.reshape(-1, xa.shape[-1])
                    sw, sb, m = g2.t() @ x2, g2.sum(0), g2.shape[0]
                self._add(w, sw, m)
                if bias is not None:
                    self._add(bias, sb, m)

        out.register_hook(hook)
        return out

    def flat(self, module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(S, m) per element of module.parameters(), flattened; zeros where nothing was recorded."""
        S = [self.S[p].flatten() if p in self.S else torch.zeros(p.numel(), dtype=torch.float64)
             for p in module.parameters()]
        m = [torch.full((p.numel(),), float(self.m.get(p, 0)), dtype=torch.float64) for p in module.parameters()]
        return torch.cat(S), torch.cat(m)


def load_flat(module: torch.nn.Module, flat: torch.Tensor) -> None:
    """Set module.parameters() from a flat vector (the order of flat_params / DeepSpeed's flat buffers)."""
    i = 0
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(flat[i:i + p.numel()].view_as(p))
            i += p.numel()
    assert i == flat.numel(), f"{flat.numel()} values for {i} parameters"


def _flat_grad(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in module.parameters()])


def gan_step_gradients(cfg, G, D, vgg, hr, lr, *, g_state, d_state, d_after, global_mean=None) -> dict:
    """The trainer's GAN step (gafh_fast/train/step.py) written plainly, from a given state and without
    optimizer: D's gradient at (g_state, d_state), then G's gradient with D at d_after (the D that G's
    step sees, after D's update). Returns flat gradients, their bounds' ingredients and the losses."""
    t = cfg.train
    global_mean = t.gan.global_mean if global_mean is None else global_mean
    load_flat(G, g_state)
    load_flat(D, d_state)
    G.zero_grad(set_to_none=True)
    D.zero_grad(set_to_none=True)
    sums = TermSums()
    with sums:
        hf = G(lr)
        c_real, c_fake = D(hr), D(hf.detach())
        loss_d = ragan_d_loss(c_real, c_fake, global_mean=global_mean)
        loss_d.backward()
        grad_d = _flat_grad(D)
        load_flat(D, d_after)
        D.requires_grad_(False)
        with torch.no_grad():
            c_real_g = D(hr)
        c_fake_g = D(hf)
        l_content = content_loss(vgg, hf, hr)
        l_adv = ragan_g_loss(c_real_g, c_fake_g, global_mean=global_mean)
        loss_g = t.content.weight * l_content + t.gan.weight * l_adv
        if t.pixel_weight:
            loss_g = loss_g + t.pixel_weight * pixel_loss(hf, hr)
        loss_g.backward()
        D.requires_grad_(True)
    S_d, m_d = sums.flat(D)
    S_g, m_g = sums.flat(G)
    return {"grad_d": grad_d, "grad_g": _flat_grad(G), "S_d": S_d, "m_d": m_d, "S_g": S_g, "m_g": m_g, "K": sums.K,
            "logits": (c_real.detach(), c_fake.detach()), "logits_g": (c_real_g, c_fake_g.detach()),
            "losses": {"d": loss_d.item(), "g": loss_g.item(), "content": l_content.item(), "adv": l_adv.item()}}


def pixel_step_gradients(G, hr, lr, *, g_state) -> dict:
    """The PSNR pre-training step (L1 only) from a given state."""
    load_flat(G, g_state)
    G.zero_grad(set_to_none=True)
    sums = TermSums()
    with sums:
        loss = pixel_loss(G(lr), hr)
        loss.backward()
    S, m = sums.flat(G)
    return {"grad_g": _flat_grad(G), "S_g": S, "m_g": m, "K": sums.K, "losses": {"pixel": loss.item()}}


def gradient_bound(S: torch.Tensor, m: torch.Tensor, K: int) -> torch.Tensor:
    """2 gamma_T S with T = m + 2K + 4 (module docstring)."""
    return 2 * gamma(m + 2 * K + 4) * S


def assert_within(name: str, got: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor) -> float:
    """Per element |got - ref| <= bound; returns the largest |got - ref| / bound (for reporting)."""
    err = (got.double() - ref.double()).abs()
    bad = ~(err <= bound)  # NaN fails too
    if bad.any():
        i = int(torch.where(bad, err - bound, torch.zeros_like(err)).argmax())
        raise AssertionError(f"{name}: {int(bad.sum())}/{err.numel()} elements outside their rounding bound; worst at "
                             f"{i}: got {got[i].item():.9g}, ref {ref[i].item():.9g}, bound {bound[i].item():.3g}")
    ratio = torch.where(bound > 0, err / bound, torch.zeros_like(err))
    return ratio.max().item()


def replay_adam(before: list[dict], grads: torch.Tensor, hparams: dict) -> list[dict]:
    """torch Adam's step replayed on copies of the recorded parameters and Adam state, with the recorded
    flat gradient: what the trainer's optimizer must have produced, bit for bit."""
    after, i = [], 0
    for entry in before:
        p = entry["param"].clone().requires_grad_(True)
        p.grad = grads[i:i + p.numel()].view_as(p).to(p.dtype).clone()
        i += p.numel()
        opt = torch.optim.Adam([p], **hparams)
        if "step" in entry:
            opt.state[p] = {k: v.clone() for k, v in entry.items() if k != "param"}
        opt.step()
        after.append({"param": p.detach(), **{k: v for k, v in opt.state[p].items()}})
    assert i == grads.numel(), f"{grads.numel()} gradient values for {i} parameters"
    return after

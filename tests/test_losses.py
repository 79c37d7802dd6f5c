"""The RaGAN losses against the spec's formulas, computed by hand for fixed logits."""
import math

import pytest
import torch

import spec_reference as spec
from gafh_fast.losses import perceptual_loss, pixel_loss, ragan_d_loss, ragan_g_loss

C_REAL = [1.0, -0.5, 2.0]
C_FAKE = [0.3, 0.1, -1.0]


def _softplus(x):  # BCE(x, 1) = log(1 + e^-x) = softplus(-x);  BCE(x, 0) = softplus(x)
    return math.log1p(math.exp(x))


def _hand(target_real: int):
    mean_r, mean_f = sum(C_REAL) / 3, sum(C_FAKE) / 3
    rel_r = [c - mean_f for c in C_REAL]
    rel_f = [c - mean_r for c in C_FAKE]
    bce = lambda x, t: _softplus(-x) if t == 1 else _softplus(x)
    return (sum(bce(x, target_real) for x in rel_r) / 3
            + sum(bce(x, 1 - target_real) for x in rel_f) / 3)


def test_ragan_d_loss_by_hand():
    got = ragan_d_loss(torch.tensor(C_REAL), torch.tensor(C_FAKE)).item()
    assert got == pytest.approx(_hand(target_real=1), rel=1e-6)


def test_ragan_g_loss_by_hand():
    got = ragan_g_loss(torch.tensor(C_REAL), torch.tensor(C_FAKE)).item()
    assert got == pytest.approx(_hand(target_real=0), rel=1e-6)


def test_ragan_losses_are_symmetric_under_swapping_real_and_fake():
    r, f = torch.tensor(C_REAL), torch.tensor(C_FAKE)
    assert ragan_g_loss(r, f).item() == pytest.approx(ragan_d_loss(f, r).item(), rel=1e-6)


def test_global_mean_without_process_group_is_the_local_mean():
    r, f = torch.tensor(C_REAL), torch.tensor(C_FAKE)
    assert ragan_d_loss(r, f, global_mean=True).item() == pytest.approx(ragan_d_loss(r, f).item())


def test_perceptual_and_pixel_losses():
    assert perceptual_loss(torch.tensor(2.0), torch.tensor(3.0), alpha=1.0, beta=1e-3).item() == pytest.approx(2.003)
    assert perceptual_loss(torch.tensor(2.0), torch.tensor(3.0)).item() == pytest.approx(2.003)  # spec: alpha 1, beta 1e-3
    assert perceptual_loss(torch.tensor(2.0), torch.tensor(3.0), alpha=0.5, beta=0.1).item() == pytest.approx(1.3)
    a = torch.tensor([[0.0, 1.0], [-1.0, 0.5]])
    b = torch.tensor([[0.5, 1.0], [1.0, 0.0]])
    assert pixel_loss(a, b).item() == pytest.approx((0.5 + 0 + 2 + 0.5) / 4)


# ------------------------------------------------------------------------------------------------
# global_mean across two ranks (gloo, two spawned processes)
# ------------------------------------------------------------------------------------------------
def _ragan_on_rank(rank: int, c_real: torch.Tensor, c_fake: torch.Tensor, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=2)
    # a file store: no port to race for, and no TCP store thread to tear down at exit
    n = c_real.shape[0] // 2
    mine = slice(rank * n, (rank + 1) * n)
    result = {}
    for name, fn in (("d", ragan_d_loss), ("g", ragan_g_loss)):
        r, f = c_real[mine].clone().requires_grad_(True), c_fake[mine].clone().requires_grad_(True)
        loss = fn(r, f, global_mean=True)
        loss.backward()
        result[name] = (loss.detach(), r.grad, f.grad)
    torch.save(result, f"{out_dir}/rank{rank}.pt")
    dist.barrier()  # both ranks are past their last collective before either tears down
    dist.destroy_process_group()


def test_global_mean_gathers_over_ranks_loss_and_gradient(tmp_path):
    """Two ranks with global_mean: the mean of their losses is the spec's loss on the whole batch, and
    their gradients (averaged as data parallelism does) are its gradient. The ranks' logits have
    different means, so the local-mean loss is far off (checked, so a missing gather cannot pass)."""
    import torch.multiprocessing as mp

    c_real = torch.tensor([1.0, -0.5, 2.0, 3.0, 2.5, 4.0], dtype=torch.float64)   # rank 1's are larger
    c_fake = torch.tensor([0.3, 0.1, -1.0, -2.0, -3.0, -2.5], dtype=torch.float64)
    mp.spawn(_ragan_on_rank, args=(c_real, c_fake, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for name, target_real in (("d", 1), ("g", 0)):
        r, f = c_real.clone().requires_grad_(True), c_fake.clone().requires_grad_(True)
        whole = spec.ragan_loss(r, f, target_real)
        whole.backward()
        mean_loss = (ranks[0][name][0] + ranks[1][name][0]) / 2
        assert mean_loss.item() == pytest.approx(whole.item(), rel=1e-12), f"L_{name}"
        one_process = (ragan_d_loss if name == "d" else ragan_g_loss)(c_real, c_fake, global_mean=True)
        assert one_process.item() == pytest.approx(whole.item(), rel=1e-12)  # this process: a world of one
        local = [spec.ragan_loss(c_real[s], c_fake[s], target_real) for s in (slice(0, 3), slice(3, 6))]
        assert abs((local[0] + local[1]).item() / 2 - whole.item()) > 0.1  # local means would be far off
        for i, (what, grad) in enumerate((("real", r.grad), ("fake", f.grad)), start=1):
            got = torch.cat([ranks[0][name][i], ranks[1][name][i]]) / 2  # data-parallel averaging
            torch.testing.assert_close(got, grad, rtol=1e-12, atol=1e-15, msg=f"dL_{name}/dC({what})")

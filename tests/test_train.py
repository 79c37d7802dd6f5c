"""The DeepSpeed GAN trainer against plain PyTorch, across world sizes, kills, signals and bad batches.

CPU only: DS_ACCELERATOR=cpu, gloo, the tiny model of tests/train_runner.py. Subprocess runs are shared
by several assertions through module-scoped fixtures to keep the file within its time budget.

Why two processes of the same fp32 CPU run could differ (issue 14), and what makes them equal
--------------------------------------------------------------------------------------------------
Cause: the intra-op thread count. oneDNN and ATen split a reduction (a conv's weight gradient over
batch and pixels, BatchNorm's batch statistics) across threads, so the count decides the order of the
additions. Experiment: the same 2-step tiny run in two fresh processes with OMP_NUM_THREADS=1 and 2,
every forward output, gradient (tensor hooks), weight and Adam state recorded in order: the forwards
agree bit for bit; the first tensor that differs is D's conv weight gradient features.10.weight in the
first backward (1793 of 2304 elements, up to 1.5e-11); with D's BatchNorm on, already the forward
output of its last BatchNorm. Adam moves a weight whose gradient is ~0 by up to lr * sign(noise), so
last-bit differences become visible within a few steps. A process's thread count is not a property of
the run: torchrun (nproc_per_node > 1) sets OMP_NUM_THREADS=1, the deepspeed launcher leaves every core
to each rank (2 here), plain python takes the CPU affinity it inherits (taskset -c 0: 1 thread).
Ruled out, each by experiment on this 2-core AMD EPYC: PYTHONHASHSEED (random in every run; 16 fresh
4-step runs with every tensor recorded and 12 full/killed/resumed triples of the old resume test, 6 of
them under pytest, at equal thread counts: all bitwise equal); uninitialised memory (freed blocks
of 16 B..32 MB filled with NaN, or 1e30, before each step, backward and optimizer step: bitwise
equal); memory alignment (weights and inputs at
offsets of 0..16 floats from a 64-byte boundary: equal); DataLoader timing (none here, and the data
order is seeded per epoch); gloo order (two 2-rank runs are bitwise equal). The issue's one-in-four
drift did not reproduce at equal thread counts here; the thread count is the one input found that
changes the bits.
Fix: `train.deterministic: true` (gafh_fast/train/determinism.py) pins the CPU intra-op threads to 1
before anything is built and logs it, next to torch.use_deterministic_algorithms and, on CUDA, the
cuDNN/cuBLAS settings. The twin runs below are started with OMP_NUM_THREADS 2, 1 and 2, so they are
bitwise equal because of the pin (without it test (a) fails at step 1).
Batch composition is a separate effect: ATen runs a conv with batch 1 through its own im2col+GEMM
path and a batch >= 2 through oneDNN, so an image's output can differ in the last bit with the batch
it is in (relevant to inference sharding; training batches have a fixed size).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from grad_bounds import assert_within, gamma, gan_step_gradients, gradient_bound  # noqa: E402
from grad_bounds import pixel_step_gradients, replay_adam  # noqa: E402
from train_runner import SyntheticLoader, build_test_models, flat_params, make_batch, run, tiny_config  # noqa: E402
from train_runner import jsonl, val_batches  # noqa: E402

from gafh_fast.export import load_generator  # noqa: E402
from gafh_fast.losses import content_loss, ragan_d_loss, ragan_g_loss  # noqa: E402
from gafh_fast.metrics import bicubic_upsample, psnr, ssim  # noqa: E402
from gafh_fast.train import Trainer, TrainingAborted, build_models  # noqa: E402
from gafh_fast.train.checkpoint import WorldSizeMismatch, check_world_size, resolve_resume  # noqa: E402
from gafh_fast.train.determinism import make_deterministic  # noqa: E402
from gafh_fast.train.optim import adam_impl_flags  # noqa: E402
from gafh_fast.train.preflight import UsageError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RUNNER = str(Path(__file__).parent / "train_runner.py")
STEPS = 3


def clean_env() -> dict:
    """The pytest process may hold a one-rank process group; children must not inherit its rendezvous."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["DS_ACCELERATOR"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def sh(cmd: list[str], timeout: int = 240, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env={**clean_env(), **env}, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def trace(run_dir: Path, rank: int = 0) -> dict:
    return torch.load(run_dir / f"trace_rank{rank}.pt", weights_only=False)


def assert_close(name: str, got: torch.Tensor, ref: torch.Tensor, rtol: float, atol: float = 0.0) -> None:
    err = (got - ref).abs()
    bound = atol + rtol * ref.abs()
    bad = ~(err <= bound)  # NaN fails too
    if bad.any():
        i = int((err - bound).argmax())
        raise AssertionError(f"{name}: {int(bad.sum())}/{err.numel()} elements off; worst at {i}: "
                             f"got {got[i].item():.8g}, ref {ref[i].item():.8g} (bound {bound[i].item():.3g})")


# ------------------------------------------------------------------------------------------------
# (a) world size 1 against a plain-PyTorch reference loop
# ------------------------------------------------------------------------------------------------
def reference_loop(cfg, steps: int):
    """The spec's training step written plainly: torch.optim.Adam, D first on detached fakes, then G
    with D frozen. Same seed, same build order, same batches as the trainer."""
    G, D, vgg = build_models(cfg)
    t = cfg.train
    impl = adam_impl_flags(t.adam_impl)  # fused and for-loop Adam differ in the last bit, which Adam amplifies
    opt_g = torch.optim.Adam(G.parameters(), lr=t.lr_g, betas=t.betas, **impl)
    opt_d = torch.optim.Adam(D.parameters(), lr=t.lr_d, betas=t.betas, **impl)
    losses, batches = [], iter(SyntheticLoader(cfg))
    for _ in range(steps):
        batch = next(batches)
        hr, lr = batch["hr"], batch["lr"]
        hf = G(lr)
        loss_d = ragan_d_loss(D(hr), D(hf.detach()))
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()
        D.requires_grad_(False)
        with torch.no_grad():
            c_real = D(hr)
        loss_g = t.content.weight * content_loss(vgg, hf, hr) + t.gan.weight * ragan_g_loss(c_real, D(hf))
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
        D.requires_grad_(True)
        losses.append((loss_d.item(), loss_g.item()))
    return G, D, losses


@pytest.mark.parametrize("zero_stage", [0, 1, 2])
def test_a_fp32_trainer_equals_plain_pytorch(tmp_path, zero_stage):
    """One rank: each step's gradients are the plain step's at the same state bit for bit, and each
    optimizer state is torch Adam's step on them bit for bit (ZeRO's flat buffers change nothing);
    free-running, the plain loop with torch Adam stays within 1e-5."""
    cfg = tiny_config(f"train.max_steps={STEPS}", f"deepspeed.zero_stage={zero_stage}")
    trainer, _, tr = run(cfg, tmp_path, resume="none")
    G, D, vgg = build_test_models(cfg)
    n = {"g": tr["g"][0].numel(), "d": tr["d"][0].numel()}
    for i in range(STEPS):
        batch = make_batch(cfg, 0, i, cfg.data.batch_size)
        ref = gan_step_gradients(cfg, G, D, vgg, batch["hr"], batch["lr"], g_state=state_before(tr, "g", i),
                                 d_state=state_before(tr, "d", i), d_after=tr["d"][i])
        for key in ("g", "d"):
            assert torch.equal(tr["grad_" + key][i][:n[key]], ref["grad_" + key]), f"step {i + 1}: {key} gradient"
            assert_adam_step(f"{key.upper()} step {i + 1}", state_before(tr, "opt_state_" + key, i),
                             tr["grad_" + key][i], tr["hparams_" + key][i], tr["opt_state_" + key][i])
        assert tr["losses"][i] == ref["losses"], f"step {i + 1} losses"
    G, D, ref_losses = reference_loop(cfg, STEPS)
    for step, (losses, (ref_d, ref_g)) in enumerate(zip(tr["losses"], ref_losses), start=1):
        assert losses["d"] == pytest.approx(ref_d, rel=1e-5), f"step {step} L_D"
        assert losses["g"] == pytest.approx(ref_g, rel=1e-5), f"step {step} L_G"
    assert_close("G", flat_params(trainer.g_engine.module), flat_params(G), rtol=1e-5, atol=1e-8)
    assert_close("D", flat_params(trainer.d_engine.module), flat_params(D), rtol=1e-5, atol=1e-8)


def state_before(tr: dict, key: str, i: int):
    """What the trace held before step i (0-based): the run's start, or after the previous step."""
    return tr["start"][key] if i == 0 else tr[key][i - 1]


def assert_adam_step(name: str, before: list[dict], grad: torch.Tensor, hparams: dict, after: list[dict]) -> None:
    """The optimizer state after a step (DeepSpeed's fp32 master weights, Adam's moments and step count) is
    torch Adam's step from the state before with the gradient it was handed, bit for bit."""
    for j, (want, got) in enumerate(zip(replay_adam(before, grad, hparams), after)):
        assert want.keys() == got.keys(), f"{name}: parameter {j} holds {sorted(got)}, Adam's step makes {sorted(want)}"
        for key in want:
            assert torch.equal(want[key], got[key]), f"{name}: {key} of parameter {j} is not Adam's step on its gradient"


def master_weights(entries: list[dict], n: int) -> torch.Tensor:
    return torch.cat([e["param"].flatten().float() for e in entries])[:n]  # [:n]: ZeRO pads its flat buffers


NO_NORM = ("model.discriminator.norm=none", "model.generator.trunk_norm=none")


def test_a_bf16_trainer_update_is_adam_of_its_gradient_and_its_losses_match_fp32(tmp_path):
    """The bf16 trainer against fp32, step by step from its own state (teacher forcing), D's logits
    depending on the input (tests/train_runner.py: input_dependent_d).

    Update, per element: the fp32 master weights and Adam moments after each step are torch Adam's
    step on the gradient the optimizer was handed, bit for bit, and the bf16 weights the model runs
    with are those master weights rounded to bf16, bit for bit; so each visible update is the fp32
    update to within the bf16 rounding of the weights before and after it. Removing a step fails here.
    Why not the bf16 update against the fp32 run's update element by element: Adam's first steps move
    each weight by ~lr * sign(g), and bf16 arithmetic flips the sign of gradients up to ~25 % of the sum
    of their |terms| (measured at step 1: 256 of 28037 D elements, 67 of 5691 G elements), so those move
    2 lr apart whatever the rounding of the update.

    Losses: the fp32 step at the bf16 weights computes L_D, the content loss and L_adv within 4 bf16
    roundings (4 * 2^-8 relative; measured <= 1.1 * 2^-8). The input-dependent D makes L_adv sensitive
    to its arguments: swapped, L_adv moves by ~60 %.
    BatchNorm is off: on D's 2x2 feature maps with 2 images its bf16 statistics make gradients that
    point elsewhere (cosine 0.2 to fp32 in plain PyTorch), a property of bf16, not of the trainer."""
    cfg = tiny_config(f"train.max_steps={STEPS}", "deepspeed.bf16=true", *NO_NORM)
    trainer, _, tr = run(cfg, tmp_path, resume="none", d_init="input_dependent")
    assert next(trainer.g_engine.module.parameters()).dtype == torch.bfloat16
    cfg32 = tiny_config(f"train.max_steps={STEPS}", *NO_NORM)
    G, D, vgg = build_test_models(cfg32, "input_dependent")
    n = {"g": tr["g"][0].numel(), "d": tr["d"][0].numel()}
    assert len(tr["grad_g"]) == len(tr["grad_d"]) == STEPS, "each optimizer steps once per iteration"
    for i in range(STEPS):
        batch = make_batch(cfg, 0, i, cfg.data.batch_size)
        ref = gan_step_gradients(cfg32, G, D, vgg, batch["hr"], batch["lr"], g_state=state_before(tr, "g", i),
                                 d_state=state_before(tr, "d", i), d_after=tr["d"][i])
        for key in ("d", "content", "adv"):
            assert tr["losses"][i][key] == pytest.approx(ref["losses"][key], rel=4 * 2**-8), f"step {i + 1} {key}"
        for key in ("g", "d"):
            assert_adam_step(f"{key.upper()} step {i + 1}", state_before(tr, "opt_state_" + key, i),
                             tr["grad_" + key][i], tr["hparams_" + key][i], tr["opt_state_" + key][i])
            assert torch.equal(tr[key][i], master_weights(tr["opt_state_" + key][i], n[key]).bfloat16().float())


def test_gradient_accumulation_equals_one_step_on_the_concatenated_batch(tmp_path):
    """gradient_accumulation_steps=2 under ZeRO-2, micro-batches of 2: iterations 1 and 3 only
    accumulate (weights unchanged), 2 and 4 step, each with the gradient of the concatenated batch of 4.
    Iterations 1-2 are the L1 pre-training stage, where that is one step on the batch of 4 exactly
    (within the rounding bound of tests/grad_bounds.py). Iterations 3-4 are GAN steps, where two
    things differ from a batch of 4 by design: RaGAN's relativistic mean is taken per micro-batch,
    and G's second micro-batch sees D after D's step (D steps first in each iteration)."""
    cfg = tiny_config("train.max_steps=4", "deepspeed.gradient_accumulation_steps=2", "deepspeed.zero_stage=2",
                      "train.pretrain_steps=2", *NO_NORM)
    _, _, tr = run(cfg, tmp_path, resume="none", d_init="input_dependent")
    G, D, vgg = build_test_models(cfg, "input_dependent")
    n = {"g": tr["g"][0].numel(), "d": tr["d"][0].numel()}
    mb = [make_batch(cfg, 0, i, cfg.data.batch_size) for i in range(4)]
    cat = {k: torch.cat([mb[0][k], mb[1][k]]) for k in ("hr", "lr")}
    assert len(tr["grad_g"]) == 2 and len(tr["grad_d"]) == 1  # G steps at 2 and 4, D at 4 (no D in pre-training)
    assert torch.equal(tr["g"][0], tr["start"]["g"]) and torch.equal(tr["g"][2], tr["g"][1])
    assert torch.equal(tr["d"][2], tr["start"]["d"])

    ref = pixel_step_gradients(G, cat["hr"], cat["lr"], g_state=tr["start"]["g"])
    assert_within("G gradient, pre-training", tr["grad_g"][0][:n["g"]], ref["grad_g"],
                  gradient_bound(ref["S_g"], ref["m_g"] + 1, ref["K"]))
    assert_adam_step("G step 2", tr["start"]["opt_state_g"], tr["grad_g"][0], tr["hparams_g"][0], tr["opt_state_g"][1])

    g2, d2, d4 = tr["g"][1], tr["d"][1], tr["d"][3]
    parts = [gan_step_gradients(cfg, G, D, vgg, b["hr"], b["lr"], g_state=g2, d_state=d2, d_after=d_after)
             for b, d_after in ((mb[2], d2), (mb[3], d4))]
    for key in ("d", "g"):  # DeepSpeed scales each micro-batch's loss by 1/2
        want = (parts[0]["grad_" + key] + parts[1]["grad_" + key]) / 2
        S, m = (parts[0]["S_" + key] + parts[1]["S_" + key]) / 2, parts[0]["m_" + key] + parts[1]["m_" + key] + 1
        assert_within(f"{key.upper()} gradient, GAN", tr["grad_" + key][-1][:n[key]], want,
                      gradient_bound(S, m, max(p["K"] for p in parts)))
    assert_adam_step("G step 4", tr["opt_state_g"][1], tr["grad_g"][1], tr["hparams_g"][1], tr["opt_state_g"][3])
    assert_adam_step("D step 4", tr["start"]["opt_state_d"], tr["grad_d"][0], tr["hparams_d"][0], tr["opt_state_d"][3])


# ------------------------------------------------------------------------------------------------
# (e) NaN skip, NaN abort, (f) validation
# ------------------------------------------------------------------------------------------------
def test_e_nan_batch_is_skipped_and_logged_f_validation_writes_metrics_and_grid(tmp_path):
    cfg = tiny_config("train.max_steps=4", "val.every=2")
    trainer, metrics, tr = run(cfg, tmp_path, resume="none", nan_at=1)  # the 2nd batch holds a NaN
    assert tr["skipped"] == [None, "d", None, None]
    records = jsonl(tmp_path)
    skips = [r for r in records if r["kind"] == "nan_skip"]
    assert [(r["step"], r["loss"]) for r in skips] == [(2, "d")]
    assert any("non-finite d loss" in r.get("message", "") for r in records)
    # a skipped step leaves both engines exactly as they were
    assert torch.equal(tr["g"][1], tr["g"][0]) and torch.equal(tr["d"][1], tr["d"][0])
    assert not torch.equal(tr["g"][2], tr["g"][1])

    vals = [r for r in records if r["kind"] == "val"]
    assert [r["step"] for r in vals] == [2, 4]
    # the final validation, recomputed here from the exported generator and the metrics functions
    G, _ = load_generator(tmp_path / "generator.safetensors")
    batch = val_batches(cfg)[0]
    hr01 = (batch["hr"] + 1) / 2
    with torch.no_grad():
        hf01 = ((G(batch["lr"]) + 1) / 2).clamp(0, 1)
    bic01 = ((bicubic_upsample(batch["lr"]) + 1) / 2).clamp(0, 1)
    cb = cfg.val.crop_border
    expect = {"g_psnr_rgb": psnr(hf01, hr01), "g_ssim_rgb": ssim(hf01, hr01),
              "g_psnr_y": psnr(hf01, hr01, channel="y", crop_border=cb),
              "bicubic_psnr_rgb": psnr(bic01, hr01), "bicubic_ssim_y": ssim(bic01, hr01, channel="y", crop_border=cb)}
    for key, value in expect.items():
        assert vals[-1][key] == pytest.approx(value.mean().item(), rel=1e-6), key
    assert vals[-1]["images"] == 4 and metrics["g_psnr_rgb"] == vals[-1]["g_psnr_rgb"]
    grid = Image.open(tmp_path / "val" / "grid_step_00000004.png")
    s = cfg.data.hr_size
    assert grid.size == (4 * s, cfg.val.grid_images * s)  # LR | bicubic | HF | HR per face
    # the HR column is the HR image, rounded to 8 bits
    hr_tile = torch.from_numpy(np.asarray(grid)[:s, 3 * s:4 * s].astype(np.float64))  # (s, s, 3)
    assert torch.allclose(hr_tile.permute(2, 0, 1) / 255, hr01[0].double(), atol=0.5 / 255 + 1e-6)


def test_e_consecutive_nans_abort(tmp_path):
    cfg = tiny_config("train.max_steps=6", "train.max_nan_skips=2")
    with pytest.raises(TrainingAborted, match="2 consecutive steps had a non-finite loss"):
        run(cfg, tmp_path, resume="none", nan_from=1)


# ------------------------------------------------------------------------------------------------
# Two identical 2-rank runs, one of them killed with kill -9 and resumed (issue 14 (a), (b)); the
# uninterrupted one against one process on the concatenated batch (issue 14 (c)); (d) SIGTERM
# ------------------------------------------------------------------------------------------------
TWIN = ["train.gan.global_mean=true", *NO_NORM, "train.max_steps=6", "train.checkpoint_every=2",
        "train.deterministic=true", "train.ema_decay=0.9", "train.lr_schedule=cosine", "train.warmup_steps=2",
        "--input-dependent-d"]
TRACED = ("g", "d", "opt_g", "opt_d", "ema", "rng", "rng_draws", "grad_g", "grad_d")


def free_port() -> int:
    """A port for this launch's rendezvous (a fixed one collides with anyone else's test run here)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed2(run_dir: Path, *args: str, threads: int) -> subprocess.CompletedProcess:
    """A 2-rank run of TWIN, each rank started with OMP_NUM_THREADS=threads (train.deterministic pins it)."""
    return sh(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), RUNNER, str(run_dir), *args, *TWIN],
              timeout=400, OMP_NUM_THREADS=str(threads))


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """A: 6 steps on 2 ranks. B: the same run killed with kill -9 on both ranks at step 5 (after the
    step-4 checkpoint), then resumed. Every step of both records weights, optimizer state, gradients.
    Each launch gets another OMP_NUM_THREADS (module docstring: the pin makes them equal)."""
    root = tmp_path_factory.mktemp("twins")
    runs = {"A": deepspeed2(root / "A", threads=2), "B killed": deepspeed2(root / "B", "--kill-at", "5", threads=1)}
    # a checkpoint caught mid-write: files but no completion marker; resume must not pick it
    partial = root / "B" / "checkpoints" / "step_00000006"
    (partial / "generator").mkdir(parents=True)
    (partial / "trainer_state.pt").write_bytes(b"truncated")
    runs["B resumed"] = deepspeed2(root / "B", "--resume", "auto", threads=2)
    return root, runs


def test_a_two_identical_2rank_runs_are_bitwise_equal(twins):
    """Separate processes, same config and data: every step's weights, fp32 master weights, Adam
    moments, gradients, EMA, RNG and losses bit for bit, on both ranks (A against B before its kill)."""
    root, runs = twins
    assert runs["A"].returncode == 0, runs["A"].stdout[-3000:] + runs["A"].stderr[-3000:]
    assert runs["B killed"].returncode != 0  # SIGKILL: no trace, no final checkpoint
    logged = [r.get("message", "") for r in jsonl(root / "A")]
    assert "deterministic: torch.use_deterministic_algorithms(True), CPU intra-op threads 2 -> 1" in " ".join(logged)
    for rank in (0, 1):
        a = trace(root / "A", rank)
        b = torch.load(root / "B" / f"partial_trace_rank{rank}.pt", weights_only=False)
        assert a["step"] == [1, 2, 3, 4, 5, 6] and b["step"][:4] == [1, 2, 3, 4]
        for i in range(4):
            for key in TRACED:
                assert torch.equal(a[key][i], b[key][i]), f"rank {rank} step {i + 1}: {key} differs between A and B"
            assert a["losses"][i] == b["losses"][i]


def test_b_kill9_then_resume_equals_uninterrupted_bitwise(twins):
    root, runs = twins
    assert runs["B resumed"].returncode == 0, runs["B resumed"].stdout[-3000:] + runs["B resumed"].stderr[-3000:]
    assert "resumed from" in runs["B resumed"].stdout + runs["B resumed"].stderr
    for rank in (0, 1):
        a, b = trace(root / "A", rank), trace(root / "B", rank)
        assert b["step"] == [5, 6]  # restarted after the step-4 checkpoint, not the partial step-6 one
        start = b["start"]  # the state restored from the checkpoint ...
        assert start["ema"].numel() > 0
        for key in ("g", "d", "opt_g", "opt_d", "rng"):  # ... is A's after step 4
            assert torch.equal(start[key], a[key][3]), f"rank {rank}: restored {key} differs from A's step-4 state"
        assert torch.equal(start["ema"], a["ema"][4]), "restored EMA"  # the EMA is updated after the step returns
        for i in range(2):  # steps 5 and 6 (cosine LR: a schedule not restored would change them)
            for key in TRACED:
                assert torch.equal(b[key][i], a[key][4 + i]), f"rank {rank} step {5 + i}: {key} differs from A's"
            assert b["losses"][i] == a["losses"][4 + i] and b["batch"][i] == a["batch"][4 + i]
        for key in ("opt_state_g", "opt_state_d"):  # at the end: master weights, Adam moments and step count
            for got, want in zip(b[key][-1], a[key][-1]):
                assert all(torch.equal(got[k], want[k]) for k in want), f"rank {rank}: final {key}"
    from safetensors.torch import load_file
    exported = [load_file(str(root / name / "generator.safetensors")) for name in ("A", "B")]
    assert exported[0].keys() == exported[1].keys()
    assert all(torch.equal(exported[0][k], exported[1][k]) for k in exported[0])  # the EMA generator
    done = sorted(p.name for p in (root / "B" / "checkpoints").iterdir() if (p / "COMPLETE").exists())
    assert done == ["step_00000002", "step_00000004", "step_00000006"]  # keep_checkpoints = 3
    assert (root / "B" / "checkpoints" / "latest").read_text().strip() == "step_00000006"


def test_c_world2_equals_one_process_on_the_concatenated_batch(twins):
    """Data-parallel gradient averaging + the gathered relativistic mean = one process on the batch of
    both ranks, step by step from A's own state (teacher forcing: the trajectories themselves part
    within a few steps, because Adam moves weights with ~zero gradient by ~lr * sign(rounding noise)).

    Per step and engine: the gradient A's optimizer was handed (both ranks' ZeRO partitions) equals the
    one-process gradient on the concatenated batch within the rounding bound of tests/grad_bounds.py,
    derived from the sums that make it; each rank's optimizer state is Adam's step on its partition of
    that gradient, bit for bit; both ranks hold the same weights. The local and gathered relativistic
    means differ (D's logits depend on the input), and the test checks itself: local means would put
    most gradient elements outside their bound."""
    root, runs = twins
    assert runs["A"].returncode == 0
    cfg = tiny_config(*(o for o in TWIN if "=" in o))
    r = [trace(root / "A", rank) for rank in (0, 1)]
    G, D, vgg = build_test_models(cfg, "input_dependent")
    n = {"g": r[0]["g"][0].numel(), "d": r[0]["d"][0].numel()}
    worst = 0.0
    for i in range(6):
        for key in ("g", "d"):
            assert torch.equal(r[0][key][i], r[1][key][i]), f"step {i + 1}: {key} differs across ranks"
            for rank in (0, 1):
                assert_adam_step(f"rank {rank} {key} step {i + 1}", state_before(r[rank], "opt_state_" + key, i),
                                 r[rank]["grad_" + key][i], r[rank]["hparams_" + key][i], r[rank]["opt_state_" + key][i])
        batch = make_batch(cfg, i // 4, i % 4, 2 * cfg.data.batch_size)  # SyntheticLoader: 4 batches an epoch
        ref = gan_step_gradients(cfg, G, D, vgg, batch["hr"], batch["lr"], g_state=state_before(r[0], "g", i),
                                 d_state=state_before(r[0], "d", i), d_after=r[0]["d"][i])
        for key in ("d", "g"):
            got = torch.cat([r[0]["grad_" + key][i], r[1]["grad_" + key][i]])[:n[key]]  # rank 0's partition first
            worst = max(worst, assert_within(f"{key.upper()} gradient step {i + 1}", got, ref["grad_" + key],
                                             gradient_bound(ref["S_" + key], ref["m_" + key], ref["K"])))
        for key in ("d", "content", "adv"):  # a mean of 2 rank means against one mean of 4
            mean = (r[0]["losses"][i][key] + r[1]["losses"][i][key]) / 2
            assert mean == pytest.approx(ref["losses"][key], rel=2 * float(gamma(torch.tensor(2.0 * ref["K"] + 8)))), key
        c_real, c_fake = ref["logits"]
        for rank in (0, 1):
            local = r[rank]["logits"][i]
            assert torch.allclose(local[0], c_real[2 * rank:2 * rank + 2], rtol=1e-5, atol=1e-6)  # rank r's slice
            for x, c in zip(local, (c_real, c_fake)):
                # ~1e4 times the rounding of a mean of 4 logits of ~0.3 (the smallest seen is 9e-3)
                assert abs(x.mean() - c.mean()) > 1e-3, f"step {i + 1}: local and global means hardly differ"
    print(f"largest gradient difference: {worst:.3g} of its bound")
    # self-check on step 1: each rank with its local means only, averaged
    batch = make_batch(cfg, 0, 0, 2 * cfg.data.batch_size)
    ref = gan_step_gradients(cfg, G, D, vgg, batch["hr"], batch["lr"], g_state=r[0]["start"]["g"],
                             d_state=r[0]["start"]["d"], d_after=r[0]["d"][0])
    halves = [gan_step_gradients(cfg, G, D, vgg, batch["hr"][h], batch["lr"][h], g_state=r[0]["start"]["g"],
                                 d_state=r[0]["start"]["d"], d_after=r[0]["d"][0]) for h in (slice(0, 2), slice(2, 4))]
    local = (halves[0]["grad_d"] + halves[1]["grad_d"]) / 2
    outside = (local - ref["grad_d"]).abs() > gradient_bound(ref["S_d"], ref["m_d"], ref["K"])
    assert outside.float().mean() > 0.5, "local relativistic means would pass this test"


def test_resume_on_another_world_size_is_refused_up_front(twins, tmp_path):
    """A 2-rank checkpoint on 1 rank (this process), and a 1-rank one on 2: one line, before anything is built."""
    root, _ = twins
    cfg = tiny_config(*(o for o in TWIN if "=" in o and "deterministic" not in o))  # no thread pin in pytest
    with pytest.raises(WorldSizeMismatch, match=r"written by 2 rank\(s\) and this run has 1") as refused:
        Trainer(cfg, root / "A", resume="auto", train_loader=SyntheticLoader(cfg), val_loader=val_batches(cfg))
    assert "\n" not in str(refused.value) and isinstance(refused.value, UsageError)  # launch/train.py: exit 2
    run(tiny_config("train.max_steps=1"), tmp_path, resume="none")  # a 1-rank checkpoint
    check_world_size(resolve_resume("auto", tmp_path), 1)
    with pytest.raises(WorldSizeMismatch, match=r"written by 1 rank\(s\) and this run has 2"):
        check_world_size(resolve_resume("auto", tmp_path), 2)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_deterministic_mode_sets_what_each_device_needs(device, monkeypatch):
    """make_deterministic on each device type (its CUDA branch only sets flags, so it runs here too);
    the pytest process's settings are restored afterwards."""
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    torch.set_num_threads(2)
    try:
        line = make_deterministic(torch.device(device))
        assert torch.are_deterministic_algorithms_enabled() and line.startswith("deterministic: ")
        if device == "cuda":
            assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and torch.get_num_threads() == 2
            assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        else:
            assert torch.get_num_threads() == 1 and "CPU intra-op threads 2 -> 1" in line
            assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2:]


def test_d_sigterm_finishes_the_step_saves_and_exits_0(tmp_path):
    result = sh([sys.executable, RUNNER, str(tmp_path), "--sigterm-at", "2", "train.max_steps=50"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert trace(tmp_path)["final_step"] == 2
    assert (tmp_path / "checkpoints" / "step_00000002" / "COMPLETE").is_file()
    assert (tmp_path / "generator.safetensors").is_file()
    assert any(r.get("message", "").startswith("stopped by signal at step 2") for r in jsonl(tmp_path))


# ------------------------------------------------------------------------------------------------
# (g) launch/train.py as 2 nodes x 1 rank under torchrun on loopback, with the real data loader
# ------------------------------------------------------------------------------------------------
def test_g_two_torchrun_nodes_on_loopback_keep_params_identical(tmp_path):
    from train_runner import TINY

    from gafh_fast.data import make_synthetic_celeba

    root = make_synthetic_celeba(tmp_path / "faces", 40)  # 32 train / 4 val / 4 test
    run_dir, port = tmp_path / "run", free_port()
    args = ["--config", str(REPO / "configs" / "demo.yaml"), "--run-dir", str(run_dir), *TINY,
            f"data.root={root}", "data.loader=pil", "data.val_batch_size=2", "train.max_steps=4",
            "train.checkpoint_every=2", "train.pretrain_steps=0", "train.ema_decay=0.0"]
    nodes = [subprocess.Popen(["torchrun", "--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1",
                               "--master_addr", "127.0.0.1", "--master_port", str(port),
                               str(REPO / "launch" / "train.py"), *args],
                              env=clean_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    for rank, (node, out) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, f"node {rank}:\n{out[-4000:]}"
    messages = [r.get("message", "") for r in jsonl(run_dir)]
    checks = [m for m in messages if "parameters identical on all 2 ranks" in m]
    assert [m.split(";")[0].rsplit("/", 1)[-1] for m in checks] == ["step_00000002", "step_00000004"]
    assert (run_dir / "generator.safetensors").is_file()
    assert any(r["kind"] == "val" and r["images"] == 4 for r in jsonl(run_dir))

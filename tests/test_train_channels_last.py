"""The trainer's CUDA layout, run on CPU: `train.channels_last=true` (what `auto` picks on CUDA).

The first H100 run (2026-11-26, e86807d) died in `deepspeed.initialize` -> `_broadcast_model` ->
`p.data.view(torch.uint8)`: "self.stride(-1) must be 1 to view BFloat16 as Byte". The trainer had put
G, D and VGG's *weights* in channels_last, on CUDA only, so no CPU test ever built engines around
them. Here the same sequence runs on CPU with only the device swapped: model preparation -> engines
-> D and G steps -> validation -> checkpoint -> resume -> export, in bf16 with ZeRO 1 and 2, in one
process and on 2 ranks under the deepspeed launcher.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from train_runner import SyntheticLoader, flat_params, tiny_config, val_batches  # noqa: E402

from gafh_fast.export import load_generator  # noqa: E402
from gafh_fast.train import Trainer  # noqa: E402
from gafh_fast.train.layout import use_channels_last  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RUNNER = str(Path(__file__).parent / "train_runner.py")
CUDA_PATH = ("deepspeed.bf16=true", "train.channels_last=true", "train.checkpoint_every=2", "val.every=2")


def first_conv(module: torch.nn.Module) -> torch.nn.Conv2d:
    return next(m for m in module.modules() if isinstance(m, torch.nn.Conv2d))


def train(cfg, run_dir: Path, resume: str) -> tuple[Trainer, dict]:
    """A Trainer on the deterministic in-memory batches; returns it and the layout each network's first
    conv saw ({"G": [bool, ...], ...}: was its input channels_last?)."""
    trainer = Trainer(cfg, run_dir, resume=resume, train_loader=SyntheticLoader(cfg), val_loader=val_batches(cfg))
    seen: dict[str, list[bool]] = {"G": [], "D": [], "VGG": []}
    for name, module in (("G", trainer.g_engine.module), ("D", trainer.d_engine.module), ("VGG", trainer.vgg)):
        first_conv(module).register_forward_pre_hook(
            lambda _m, args, name=name: seen[name].append(args[0].is_contiguous(memory_format=torch.channels_last)))
    trainer.fit()
    return trainer, seen


def assert_parameters_contiguous(*modules: torch.nn.Module) -> None:
    for module in modules:
        for name, p in module.named_parameters():
            assert p.is_contiguous(), f"{name} is not contiguous (stride {p.stride()}): parameters never change layout"


def test_auto_means_cuda_only():
    assert use_channels_last("auto", torch.device("cuda", 0)) is True
    assert use_channels_last("auto", torch.device("cpu")) is False
    assert use_channels_last(True, torch.device("cpu")) is True
    assert use_channels_last(False, torch.device("cuda", 0)) is False


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_cuda_layout_trains_checkpoints_resumes_and_exports_in_bf16(tmp_path, zero_stage):
    cfg = tiny_config(*CUDA_PATH, f"deepspeed.zero_stage={zero_stage}", "train.max_steps=2")
    trainer, seen = train(cfg, tmp_path, resume="none")
    assert trainer.channels_last
    # every forward of every network took channels_last activations, and no weight changed layout
    assert all(seen["G"]) and all(seen["D"]) and all(seen["VGG"]) and len(seen["D"]) >= 3, seen
    assert_parameters_contiguous(trainer.g_engine.module, trainer.d_engine.module, trainer.vgg)
    assert (tmp_path / "checkpoints" / "step_00000002" / "COMPLETE").exists()
    assert any((tmp_path / "val").glob("grid_step_00000002.png"))

    resumed, _ = train(tiny_config(*CUDA_PATH, f"deepspeed.zero_stage={zero_stage}", "train.max_steps=3"),
                       tmp_path, resume="auto")
    assert (resumed.start_step, resumed.step) == (2, 3)
    exported, _ = load_generator(tmp_path / "generator.safetensors")
    # the export is G's bf16 weights as fp32, bit for bit
    assert torch.equal(flat_params(exported), flat_params(resumed.g_engine.module))


def test_channels_last_changes_layout_not_results(tmp_path):
    """fp32: the first step's losses agree to fp32 rounding in either layout (a layout bug, e.g. a
    permuted view read as NCHW, changes them by orders of magnitude more). Later steps only within
    1e-3: where a gradient is ~0, Adam turns the layouts' different rounding into moves of up to lr
    (seen: 1.4e-5 relative in L_D at step 2), which says nothing about the layout."""
    losses = {}
    for flag in ("true", "false"):
        cfg = tiny_config(f"train.channels_last={flag}", "train.max_steps=3")
        _, seen = train(cfg, tmp_path / flag, resume="none")
        assert seen["G"] and all(v == (flag == "true") for name in seen for v in seen[name]), seen
        records = [json.loads(line) for line in (tmp_path / flag / "metrics.jsonl").read_text().splitlines()]
        losses[flag] = [(r["loss_d"], r["loss_g"]) for r in records if r["kind"] == "train"]
    assert len(losses["true"]) == 3
    for step, (got, ref) in enumerate(zip(losses["true"], losses["false"]), start=1):
        assert got == pytest.approx(ref, rel=1e-6 if step == 1 else 1e-3), f"step {step}: channels_last {got} vs NCHW {ref}"


def test_cuda_layout_on_two_ranks_resumes(tmp_path):
    """bf16 ZeRO-2 on 2 ranks under the deepspeed launcher, checkpoint at step 2, resume to step 3."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    run_dir = tmp_path / "ws2"
    for steps, port in ((2, "29531"), (3, "29532")):
        result = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", port, RUNNER, str(run_dir),
                                 *CUDA_PATH, "deepspeed.zero_stage=2", f"train.max_steps={steps}"],
                                env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        # DeepSpeed's CPU all-reduce buffers (69 MB a rank) are unlinked at init: nothing left in /dev/shm
        assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))
    traces = [torch.load(run_dir / f"trace_rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [t["final_step"] for t in traces] == [3, 3]
    assert traces[0]["step"] == [3], "the second launch must resume at step 2 and run one step"
    assert torch.equal(traces[0]["g"][-1], traces[1]["g"][-1]) and torch.equal(traces[0]["d"][-1], traces[1]["d"][-1])
    exported, _ = load_generator(run_dir / "generator.safetensors")
    assert torch.equal(flat_params(exported), traces[0]["g"][-1])


@pytest.mark.parametrize("ema", [0.999, 0.0])
def test_cuda_precompile_call_on_cpu(tmp_path, monkeypatch, ema):
    """On CUDA (kernels auto or triton) the trainer compiles every fused Triton variant of G's step and of
    validation before step 1 (gafh_fast/models/generator.py precompile_kernels). Here the device check
    says yes and the compile is swapped for a spy that checks its passes and the throwaway twins' layouts."""
    import gafh_fast.models.generator as generator_module
    from gafh_fast.models.generator import _kernel_twin
    from gafh_fast.train import trainer as trainer_module

    calls, misplaced = [], []

    class Report:
        def line(self):
            return "precompile spy report"

    def spy(passes, lr_size, *, workers):
        for g, _batch, _train in passes:  # the twin the real call builds matches the live model exactly
            twin = _kernel_twin(g)
            for mine, live in zip([*twin.parameters(), *twin.buffers()], [*g.parameters(), *g.buffers()]):
                assert (mine.shape, mine.stride(), mine.dtype, mine.device, mine.data_ptr() % 16) == \
                    (live.shape, live.stride(), live.dtype, live.device, live.data_ptr() % 16)
                misplaced.extend([live.data_ptr() % 16] if live.data_ptr() % 16 else [])
        calls.append((list(passes), lr_size, workers))
        return Report()

    monkeypatch.setattr(trainer_module, "wants_precompile", lambda backend, device: backend != "torch")
    monkeypatch.setattr(generator_module, "precompile_kernels", spy)  # what the trainer's precompile_line calls
    cfg = tiny_config(*CUDA_PATH, "kernels=auto", f"train.ema_decay={ema}", "train.max_steps=1")
    trainer = Trainer(cfg, tmp_path, resume="none", train_loader=SyntheticLoader(cfg), val_loader=val_batches(cfg))
    assert len(calls) == 1
    # DeepSpeed's flat bf16 buffer puts some parameters off 16-byte lines; the twins copy that
    assert misplaced, "expected DeepSpeed to place some parameter off a 16-byte line"
    passes, lr_size, workers = calls[0]
    (g, g_batch, g_train), (v, v_batch, v_train) = passes
    assert g is trainer.g_engine.module and (g_batch, g_train) == (cfg.data.batch_size, True)
    assert next(g.parameters()).dtype == torch.bfloat16
    assert v is trainer.eval_generator and (v_batch, v_train) == (cfg.data.val_batch_size, False)
    assert v is (trainer.ema.module if ema else trainer.g_engine.module)
    assert lr_size == cfg.data.hr_size // 8 and workers is None  # rank 0: every core
    assert "precompile spy report" in (tmp_path / "metrics.jsonl").read_text()  # an info record
    # kernels=torch: nothing to compile
    calls.clear()
    Trainer(tiny_config(*CUDA_PATH, "kernels=torch"), tmp_path / "torch", resume="none",
            train_loader=SyntheticLoader(cfg), val_loader=val_batches(cfg))
    assert not calls

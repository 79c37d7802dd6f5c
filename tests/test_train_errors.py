"""launch/train.py's usage errors: config, data-root and weights problems are found before any model or
engine is built, printed as one line without a traceback on rank 0 only, with exit code 2."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DEMO = ("--config", "configs/demo.yaml", "train.max_steps=1", "val.every=0", "data.loader=pil")


def launch(tmp_path: Path, *args: str, launcher: tuple[str, ...] = (sys.executable,)) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", TORCH_HOME=str(tmp_path / "torch_home"),
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    return subprocess.run([*launcher, "launch/train.py", "--run-dir", str(tmp_path / "run"), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def assert_one_line_usage_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    # nothing was built: the model constructors and DeepSpeed's engine log nothing before the check
    assert "VGG19Features" not in proc.stderr and "DeepSpeed info" not in proc.stdout + proc.stderr


def test_unknown_config_key_names_key_and_file(tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text((REPO / "configs/demo.yaml").read_text().replace("  max_steps: 1200", "  max_step: 1200"))
    proc = launch(tmp_path, "--config", str(config))
    assert_one_line_usage_error(proc, "unknown key 'train.max_step'", str(config))


def test_missing_data_root(tmp_path):
    proc = launch(tmp_path, *DEMO, f"data.root={tmp_path / 'no_such_dir'}")
    assert_one_line_usage_error(proc, "data.root=", "no_such_dir", "is not a directory")


def test_data_root_without_the_layouts_files(tmp_path):
    (tmp_path / "celeba" / "img_align_celeba").mkdir(parents=True)
    proc = launch(tmp_path, *DEMO, f"data.root={tmp_path / 'celeba'}")
    assert_one_line_usage_error(proc, "list_eval_partition.txt")


def test_missing_vgg_weights(tmp_path):
    proc = launch(tmp_path, *DEMO, "train.content.pretrained=true")
    assert_one_line_usage_error(proc, "VGG-19 weights not found", str(tmp_path / "torch_home"))


@pytest.mark.parametrize("content", ["garbage", "wrong_network"])
def test_unusable_vgg_weights(tmp_path, content):
    path = tmp_path / "vgg.pth"
    if content == "garbage":
        path.write_bytes(b"not a torch file at all")
    else:  # a real state dict, of something else: conv1_1 with 32 instead of 64 channels
        torch.save({"features.0.weight": torch.zeros(32, 3, 3, 3), "features.0.bias": torch.zeros(32)}, path)
    proc = launch(tmp_path, *DEMO, "train.content.pretrained=true", f"train.content.weights={path}")
    needle = "features.0.weight has shape (32, 3, 3, 3), expected (64, 3, 3, 3)" if content == "wrong_network" else str(path)
    assert_one_line_usage_error(proc, needle)


def test_two_ranks_print_once(tmp_path):
    proc = launch(tmp_path, *DEMO, f"data.root={tmp_path / 'no_such_dir'}",
                  launcher=("deepspeed", "--num_gpus", "2", "--master_port", "29541"))
    # each rank exits 2 and the deepspeed launcher passes the code on; only rank 0 prints
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "error: data.root=" in line]
    assert len(errors) == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout


def test_an_exception_in_a_step_ends_the_process_with_pil_workers(tmp_path):
    """The PIL loader's workers ignore SIGTERM (so the launcher's signal cannot kill them before the
    ranks save); an exception in the loop must still end the process instead of hanging at exit."""
    script = (
        "import sys, gafh_fast.train.trainer as t\n"
        "from gafh_fast.config import load_config\n"
        "def boom(*a, **k): raise RuntimeError('injected failure in train_step')\n"
        "t.train_step = boom\n"
        "cfg = load_config('configs/demo.yaml', ['data.loader=pil', 'data.synthetic_count=40', 'val.every=0',\n"
        "                  'data.batch_size=2', 'train.max_steps=3'])\n"
        f"t.Trainer(cfg, {str(tmp_path / 'run')!r}, resume='none').fit()\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=180)  # the bug: a hang until this timeout
    assert proc.returncode == 1 and "injected failure in train_step" in proc.stderr, proc.stderr[-3000:]

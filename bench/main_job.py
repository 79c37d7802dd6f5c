"""The main job end to end, as a user runs it (bench/gpu_suite.sh's `main-job` stage, the first after install).

    python bench/main_job.py --work DIR [--device cuda|cpu] [--json PART.json] [--note NOTE.txt]
                             [--config configs/gafh_ridn_paper.yaml] [--steps 30] [--more-steps 5] [--batch 64]
                             [--faces 640] [--loader auto|dali|pil] [--kernels auto|triton|torch]
                             [SECTION.KEY=VALUE ...]

1. `faces` generated faces (gafh_fast.data.synthetic) in DIR/faces-N, kept for a rerun on a warm machine;
2. `deepspeed --num_gpus 1 launch/train.py`: the config with bf16, ZeRO 1 and a random VGG at batch `batch` for
   `steps` steps, which ends with a checkpoint, a validation and the export (DIR/run/generator.safetensors);
3. the same command with `--resume auto` and `steps + more_steps` as the last step;
4. `torchrun --nproc_per_node 1 launch/infer.py` on the export: evaluation on the test split, PNGs written.
Extra SECTION.KEY=VALUE arguments go to both training commands after ours (the CPU test makes the model tiny).
--kernels sets the config's `kernels` and infer.py's --kernels alike (default: the config's and infer's own).
Both launchers run as modules of this interpreter (`-m deepspeed.launcher.runner`, `-m torch.distributed.run`):
the same programs as the `deepspeed` and `torchrun` scripts, without trusting which python those scripts name.

Every step is checked (exit code, COMPLETE checkpoints at both last steps, the validation record, the export,
the resumed run starting where the first stopped, every test image `ok` in the manifest). The trainer's own
img/s and MFU are read from its metrics.jsonl: the last `train` record of the first run, whose window is the
last third of its steps (warm-up and autotuning fall in the earlier windows). Writes the `main-job` part of
bench.json (--json) and the line the suite's summary shows (--note). Exit 0 only when every check passed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

REPO = common.REPO_ROOT
SUITE = "main-job"


class CheckFailed(Exception):
    """One step of the job did not do what it must; the message says which and why."""


class StageTimeout(BaseException):
    """SIGTERM from the stage's `timeout`; a BaseException so that no `except Exception` on the way swallows it."""


def _free_port() -> int:
    # the CPU test shares its machine with other runs; a fixed 29500 could meet another launcher's
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command(args, run_dir: Path, faces: Path, loader: str, last_step: int, resume: str) -> list[str]:
    overrides = [f"data.root={faces}", f"data.loader={loader}", f"data.batch_size={args.batch}",
                 "deepspeed.bf16=true", "deepspeed.zero_stage=1", "train.content.pretrained=false",
                 f"train.max_steps={last_step}", f"train.checkpoint_every={args.steps}",
                 f"train.log_every={max(1, args.steps // 3)}", f"val.every={args.steps}",
                 *([f"kernels={args.kernels}"] if args.kernels else []), *args.overrides]
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port",
            str(_free_port()), "launch/train.py", "--config", args.config, "--run-dir", str(run_dir),
            "--resume", resume, *overrides]


def infer_command(args, run_dir: Path, faces: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
            "launch/infer.py", "--weights", str(run_dir / "generator.safetensors"), "--input-hr", str(faces),
            "--split", "test", "--output", str(out), "--no-progress",
            *(["--kernels", args.kernels] if args.kernels else [])]


def run(cmd: list[str], env: dict, what: str, capture: bool = False) -> str:
    print(f"\n--- {what}: {' '.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE if capture else None,
                          stderr=subprocess.STDOUT if capture else None)
    if capture:
        print(proc.stdout, end="", flush=True)
    if proc.returncode != 0:
        raise CheckFailed(f"{what} exited with {proc.returncode}")
    return proc.stdout or ""


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise CheckFailed(f"the trainer wrote no {path}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_checkpoint(run_dir: Path, step: int) -> None:
    tag = run_dir / "checkpoints" / f"step_{step:08d}"
    if not (tag / "COMPLETE").is_file():
        raise CheckFailed(f"no complete checkpoint at step {step} ({tag}/COMPLETE missing)")


def train_numbers(recs: list[dict], last_step: int) -> dict:
    """The last train record at or before `last_step`: the trainer's own img/s, TFLOP/s, MFU and ms per step."""
    train = [r for r in recs if r.get("kind") == "train" and r["step"] <= last_step]
    if not train:
        raise CheckFailed(f"metrics.jsonl has no train record up to step {last_step}")
    last = train[-1]
    first = train[-2]["step"] + 1 if len(train) > 1 else 1
    return {"img_s": last["img_s"], "tflops": last.get("tflops_per_gpu"), "mfu": last.get("mfu"),
            "ms": last.get("ms_step"), "window": (first, last["step"])}


def test_split_size(faces: Path) -> int:
    return sum(1 for line in (faces / "list_eval_partition.txt").read_text().splitlines() if line.split()[1] == "2")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--json", type=Path)
    p.add_argument("--note", type=Path)
    p.add_argument("--config", default="configs/gafh_ridn_paper.yaml")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--more-steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--faces", type=int, default=640, help="80/10/10 split: 512 train (8 batches of 64), 64 val, 64 test")
    p.add_argument("--loader", choices=("auto", "dali", "pil"), default="auto",
                   help="auto: dali when nvidia.dali imports, else pil (the note says which)")
    p.add_argument("--kernels", choices=("auto", "triton", "torch"))
    p.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE")
    args = p.parse_args(argv)

    # a stage timeout's SIGTERM: still write the row and the note, naming the step that was cut
    def on_term(signum, frame):
        raise StageTimeout(f"stopped by SIGTERM (the stage timeout) during {state['doing']}")

    state = {"doing": "setup"}
    signal.signal(signal.SIGTERM, on_term)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"  # the launcher and the trainer pick gloo and the CPU accelerator
    loader = args.loader
    if loader == "auto":
        try:
            import nvidia.dali  # noqa: F401
            loader = "dali"
        except ImportError:
            loader = "pil"
    run_dir, last = args.work / "run", args.steps + args.more_steps
    rows, note, failed = [], "", None
    t_start = time.perf_counter()
    try:
        state["doing"] = "generating faces"
        faces = args.work / f"faces-{args.faces}"
        if not (faces / ".complete").is_file():
            from gafh_fast.data.synthetic import make_synthetic_celeba

            make_synthetic_celeba(faces, args.faces, seed=0)
            (faces / ".complete").write_text("")
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)  # a rerun starts fresh, then resumes itself

        state["doing"] = f"training steps 1-{args.steps}"
        run(train_command(args, run_dir, faces, loader, args.steps, "none"), env, "train")
        recs = records(run_dir)
        check_checkpoint(run_dir, args.steps)
        if not any(r.get("kind") == "val" and r["step"] == args.steps for r in recs):
            raise CheckFailed(f"no validation record at step {args.steps} in metrics.jsonl")
        if not (run_dir / "generator.safetensors").is_file():
            raise CheckFailed("no exported generator.safetensors in the run dir")
        numbers = train_numbers(recs, args.steps)

        state["doing"] = f"resumed training steps {args.steps + 1}-{last}"
        run(train_command(args, run_dir, faces, loader, last, "auto"), env, "train --resume auto")
        # resumed, not restarted: a restart would log records (train, val) at steps up to args.steps again
        new = [r for r in records(run_dir)[len(recs):] if "step" in r]
        if not new or min(r["step"] for r in new) <= args.steps:
            raise CheckFailed(f"the --resume auto run did not continue from step {args.steps}: its records have "
                              f"steps {sorted({r['step'] for r in new})}")
        check_checkpoint(run_dir, last)

        state["doing"] = "inference on the export"
        out = run(infer_command(args, run_dir, faces, args.work / "infer"), env, "infer", capture=True)
        manifest = [json.loads(line) for line in (args.work / "infer" / "manifest.jsonl").read_text().splitlines()]
        ok, expected = sum(r["status"] == "ok" for r in manifest), test_split_size(faces)
        if ok != expected:
            raise CheckFailed(f"inference: {ok} of {expected} test images ok (see {args.work}/infer/manifest.jsonl)")
        rate = re.search(r"= ([0-9.]+) img/s", out)
        infer_img_s = float(rate.group(1)) if rate else None

        val = [r for r in records(run_dir) if r.get("kind") == "val"][-1]
        mfu = f"{100 * numbers['mfu']:.1f}%" if numbers["mfu"] is not None else "n/a"
        first, step = numbers["window"]
        note = (f"train {numbers['img_s']:.1f} img/s, MFU {mfu} (steps {first}-{step}, batch {args.batch}, "
                f"loader {loader}); resumed {args.steps}->{last}; val G {val['g_psnr_rgb']:.2f} dB vs bicubic "
                f"{val['bicubic_psnr_rgb']:.2f}; infer {ok}/{expected} ok"
                + (f", {infer_img_s:.1f} img/s" if infer_img_s else ""))
        rows.append(common.make_row(SUITE, "train: deepspeed launch/train.py", path="bf16 ZeRO-1, 1 rank",
                                    batch=args.batch, ms=numbers["ms"], img_s=numbers["img_s"],
                                    tflops=numbers["tflops"], mfu=numbers["mfu"],
                                    note=f"the trainer's metrics.jsonl, steps {first}-{step} of {args.steps}; "
                                         f"{args.config}, loader {loader}, random VGG; resumed to {last}"))
        rows.append(common.make_row(SUITE, "infer: torchrun launch/infer.py", path="evaluation, PNGs",
                                    img_s=infer_img_s, note=f"{ok} test images, wall clock of the whole run"))
    except (CheckFailed, StageTimeout) as e:
        failed = str(e)
        note = f"FAILED: {failed}"
        rows.append(common.error_row(SUITE, "main job", failed))
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    note += f" [{time.perf_counter() - t_start:.0f}s]"
    print(f"\nmain job: {note}", flush=True)
    if args.note:
        args.note.parent.mkdir(parents=True, exist_ok=True)
        args.note.write_text(note + "\n")
    if args.json:  # after the children: the environment lookup touches CUDA, they had the GPU to themselves
        common.write_json(str(args.json), common.env_info(torch.device(args.device)), rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

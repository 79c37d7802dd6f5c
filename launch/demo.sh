#!/usr/bin/env bash
# The README demo: train a small x8 GAFH-RIDN on generated faces (configs/demo.yaml) and print its
# validation PSNR against bicubic. All GPUs when there are any; otherwise 2 CPU ranks over gloo.
# Extra arguments go to launch/train.py, e.g. `launch/demo.sh --run-dir /tmp/demo train.max_steps=100`.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import gafh_fast, deepspeed" 2>/dev/null; then
    echo "demo: installing gafh_fast (pip install -e .) -- install the torch build for your machine first"
    python -m pip install --quiet -e .
fi
# `python -m deepspeed.launcher.runner` is the `deepspeed` command run by the interpreter checked above, so
# the ranks get the environment that has gafh_fast even when another `deepspeed` comes first on PATH.
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    exec python -m deepspeed.launcher.runner launch/train.py --config configs/demo.yaml deepspeed.bf16=true "$@"
fi
echo "demo: no GPU found; running 2 CPU ranks (DS_ACCELERATOR=cpu, gloo)"
export DS_ACCELERATOR=cpu
exec python -m deepspeed.launcher.runner --num_gpus 2 launch/train.py --config configs/demo.yaml "$@"

#!/usr/bin/env bash
# Everything a session with a GPU runs, in ONE device call of under 10 minutes (see bench/README.md):
#   1. install the carried wheels (wheels/*.whl; DALI from dali_parts/ when every part is there) and the
#      project itself, editable, with no registry;
#   2. main-job: the product as a user runs it (bench/main_job.py): `deepspeed launch/train.py` on the
#      paper's config (generated faces, batch 64, bf16, ZeRO 1, random VGG) for 30 steps with a checkpoint,
#      a validation and the export, `--resume auto` for 5 more, then `torchrun launch/infer.py` on the
#      export; its summary line has the trainer's own img/s and MFU;
#   3. the kernel correctness tests on the GPU (tests/kernels, real Triton, no interpreter), then the
#      real-size bf16 checks (tests/test_bench.py -k gpu_real_size: batch 64, 32x32, nf 64, gc 32);
#   4. every bench suite, each in its own process and under its own timeout, so one hang costs one
#      suite; their rows and main-job's are merged into $OUT/bench.json; after the train suite, a profile
#      of the trainer's GAN step (bench/profile_step.py: $OUT/profile/profile_top.md, profile.json, trace);
#   5. a summary: one line per stage (ok / FAILED / TIMEOUT / NOT RUN, seconds, what it found), then the table.
# The log is $OUT/gpu_suite.log. Stages are cut to what is left of GPU_SUITE_BUDGET_S (default 540 s,
# under the device call's 600 s), so the summary and the JSON always get written.
#
# Knobs (environment):
#   GPU_SUITE_STAGES="model data"  only these stages (a second call for what the first did not finish; the
#                                  environment and install always run). Keys: main-job kernel-tests
#                                  real-size kernels-b64 launch-profile train-b64 profile infer-b256
#                                  kernels-b8-256 model data (launch-profile: bench/launch_profile.py, its
#                                  rows in $OUT/launch.json and cProfile report in $OUT/launch_top.txt)
#   GPU_SUITE_CAPS="main-job=200"  replace stages' timeouts (seconds), by key
#   GPU_SUITE_DEVICE=cuda|cpu      the device of the bench suites and the main job (default cuda)
#   GPU_TEST_WORKERS=8             pytest-xdist workers of the GPU kernel-test stage (capped at nproc)
#   GPU_SUITE_SMOKE=1              plumbing only: no install, no main job, no GPU tests, smoke sizes
#                                  (GPU_SUITE_DEVICE=cpu GPU_SUITE_SMOKE=1 OUT=/tmp/gs bench/gpu_suite.sh)
#   MAIN_JOB_ARGS="--steps 4 ..."  more arguments to bench/main_job.py (tests/test_gpu_suite.py runs a
#                                  tiny model on CPU this way)
#   PYTHON, OUT, GPU_SUITE_TMP     the interpreter (python3), the results ($PWD/gpu_suite_out; at most 8
#                                  files come back from a device call), scratch (/tmp/gafh_gpu_suite)
# The device machine's copy of the tree has no .git: pass the commit as GAFH_GIT_COMMIT=<hash> and
# GAFH_GIT_DIRTY=0|1 (bench/README.md) so that the JSON says what was measured; they win over any
# repository that git finds in a folder above the tree.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_suite_out}"
DEVICE="${GPU_SUITE_DEVICE:-cuda}"
BUDGET_S="${GPU_SUITE_BUDGET_S:-540}"
SMOKE_FLAG=""
[[ "${GPU_SUITE_SMOKE:-0}" == 1 ]] && SMOKE_FLAG="--smoke"
PY="${PYTHON:-python3}"
SCRATCH="${GPU_SUITE_TMP:-/tmp/gafh_gpu_suite}"
PARTS="$SCRATCH/parts"   # per-stage JSON; only their merge goes to $OUT
NOTES="$SCRATCH/notes"   # NOTES/KEY.txt: one line that stage KEY adds to its summary line
mkdir -p "$OUT" "$PARTS" "$NOTES"
rm -f "$PARTS"/*.json "$NOTES"/*.txt
export PYTHONUNBUFFERED=1
# No registry on the device machine: a pip that setuptools or a build starts by itself inherits this and
# fails at once, instead of retrying the network for minutes.
export PIP_NO_INDEX=1

START=$(date +%s)
SUMMARY=()
FAILED=0

# stage NAME KEY CAP 'COMMAND': run COMMAND (a bash string; the functions below are exported to it) under
# `timeout min(CAP, budget left)` (GPU_SUITE_CAPS may replace CAP), and record the outcome and NOTES/KEY.txt.
stage() {
    local name=$1 key=$2 cap=$3 cmd=$4 kv left t t0 rc msg note=""
    for kv in ${GPU_SUITE_CAPS:-}; do
        [[ "${kv%%=*}" == "$key" ]] && cap=${kv#*=}
    done
    left=$(( BUDGET_S - ($(date +%s) - START) ))
    if (( left < 15 )); then
        SUMMARY+=("$(printf '%-22s %s' "$name" "NOT RUN: the ${BUDGET_S}s budget is spent")")
        FAILED=1
        return
    fi
    t=$(( cap < left ? cap : left ))
    echo
    echo "=== $name (timeout ${t}s, $(date -u +%H:%M:%S) UTC) ==="
    t0=$(date +%s)
    timeout --signal=TERM --kill-after=10 "$t" bash -c "$cmd"
    rc=$?
    case $rc in
        0) msg="ok" ;;
        124|137) msg="TIMEOUT at ${t}s" ;;
        *) msg="FAILED (exit $rc)" ;;
    esac
    (( rc == 0 )) || FAILED=1
    [[ -s "$NOTES/$key.txt" ]] && note="  $(head -n 1 "$NOTES/$key.txt")"
    SUMMARY+=("$(printf '%-22s %-20s %4ss' "$name" "$msg" $(( $(date +%s) - t0 )))$note")
}

install_all() {
    shopt -s nullglob
    local wheels=(wheels/*.whl) dali rc where
    # DALI travels as one tar split into parts over several calls (bench/README.md, bench/dali_parts.sh)
    dali=$(bench/dali_parts.sh unpack "$SCRATCH/dali_wheels")
    rc=$?
    case $rc in
        0) mapfile -t -O "${#wheels[@]}" wheels <<< "$dali"
           echo "DALI: $(grep -c . <<< "$dali") wheels from dali_parts/" | tee "$NOTES/install.txt" ;;
        3) echo "no dali_parts/ carried: DALI is not installed (the data suite's DALI rows say so)" ;;
        *) echo "DALI NOT installed: dali_parts/ is incomplete or corrupt (see above)" | tee "$NOTES/install.txt" ;;
    esac
    if (( ${#wheels[@]} )); then
        "$PY" -m pip install --quiet --no-index --no-deps --no-cache-dir "${wheels[@]}" || return 1
    else
        echo "no wheels/*.whl carried: deepspeed must already be on the image (the main job needs it)"
    fi
    "$PY" -m pip install --quiet --no-index --no-deps --no-build-isolation -e . || return 1
    "$PY" -c 'import importlib.metadata as m
for name in ("torch", "triton", "deepspeed", "nvidia-dali-cuda130", "gafh-fast"):
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        print(name, "not installed")' || return 1
    # the package and its Triton kernels import from the root (where the tree comes first) and from elsewhere
    for where in "$PWD" /; do
        (cd "$where" && "$PY" -c "import gafh_fast.kernels as k; print('from $where:', k.__file__)") || return 1
    done
}

run_suite() {  # run_suite PART SUITE [ARGS...]: one suite in its own process, its JSON at $PARTS/PART.json
    local part=$1 suite=$2
    shift 2
    # shellcheck disable=SC2086  # SMOKE_FLAG is empty or one word
    "$PY" bench/throughput.py --suite "$suite" --device "$DEVICE" $SMOKE_FLAG "$@" --json "$PARTS/$part.json"
}

main_job() {  # bench/main_job.py, its metrics.jsonl kept in $OUT whatever the outcome
    local rc
    # shellcheck disable=SC2086  # MAIN_JOB_ARGS is a list of words
    "$PY" bench/main_job.py --work "$SCRATCH/main_job" --device "$DEVICE" --json "$PARTS/main-job.json" \
        --note "$NOTES/main-job.txt" ${MAIN_JOB_ARGS:-}
    rc=$?
    cp "$SCRATCH/main_job/run/metrics.jsonl" "$OUT/main_job_metrics.jsonl" 2>/dev/null
    return $rc
}
profile_step() {  # bench/profile_step.py: top-40 kernels, device busy/idle, trace, into $OUT/profile/
    local batch=64
    [[ -n "$SMOKE_FLAG" ]] && batch=2
    # shellcheck disable=SC2086  # SMOKE_FLAG is empty or one word
    "$PY" bench/profile_step.py --device "$DEVICE" --batch "$batch" --steps 3 $SMOKE_FLAG --out "$OUT/profile" || return 1
    "$PY" -c 'import json, sys; r = json.load(open(sys.argv[1])); s, c = r["split"], r["sync_check"]
print("wall %.1f ms/step, device busy %.1f%%, host %.1f ms, host syncs %s" % (s["wall_ms_per_step"], s["busy_pct"],
      s["host_ms_per_step"], "not checked" if c["syncs"] is None else "%d in %d steps" % (c["syncs"], c["steps"])))' \
        "$OUT/profile/profile.json" > "$NOTES/profile.txt"
}
kernel_tests() {  # tests/kernels on the GPU (real Triton): in parallel when pytest-xdist was carried
    # Compiling each kernel variant costs seconds of CPU and the 62 tests need dozens of variants: serially
    # they took 80 s for the first 23 on an H100 (call C). Compiles are CPU work, so N pytest workers on the
    # host's cores divide the stage; all share the one GPU (tiny shapes) and Triton's on-disk cache.
    local workers="${GPU_TEST_WORKERS:-8}" cores
    cores=$(nproc)
    (( workers > cores )) && workers=$cores
    if "$PY" -c 'import xdist' 2>/dev/null && (( workers > 1 )); then
        echo "kernel tests: $workers pytest-xdist workers on $cores cores" | tee "$NOTES/kernel-tests.txt"
        env -u TRITON_INTERPRET "$PY" -m pytest tests/kernels -q -x -rs -p no:cacheprovider -n "$workers"
    else  # said in the log and the summary: the 60 s goal assumes the workers
        echo "kernel tests: SERIAL (pytest-xdist not installed: carry its wheel, bench/README.md)" \
            | tee "$NOTES/kernel-tests.txt"
        env -u TRITON_INTERPRET "$PY" -m pytest tests/kernels -q -x -rs -p no:cacheprovider
    fi
}
export -f install_all run_suite main_job profile_step kernel_tests
export PY DEVICE PARTS NOTES SCRATCH OUT SMOKE_FLAG

selected() {  # selected KEY: true when GPU_SUITE_STAGES is unset/empty or names KEY
    [[ -z "${GPU_SUITE_STAGES:-}" || " $GPU_SUITE_STAGES " == *" $1 "* ]]
}

main() {
stage "environment" environment 30 'nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv;
    uname -m; "$PY" -c "import sys; sys.path.insert(0, \"bench\"); import common, torch; s = common.git_state()
print(\"commit:\", s[\"commit\"], \"dirty:\", s[\"dirty\"], \"from\", s[\"commit_source\"])
print(torch.__version__, torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())"; true'
if [[ -n "$SMOKE_FLAG" ]]; then  # the plumbing check: leave this machine's install and CPU alone
    SUMMARY+=("$(printf '%-22s %s' "install, main job, GPU tests" "skipped (GPU_SUITE_SMOKE=1)")")
else
    stage "install" install 60 'install_all'
    # the product first: if it does not train, resume and infer, nothing after it matters as much
    selected main-job && stage "main-job" main-job 300 'main_job'
    # real Triton on the GPU: tests/kernels/conftest.py turns the interpreter on only when there is no GPU;
    # per-shape tests pin a config and one test autotunes; the compiles run in GPU_TEST_WORKERS processes
    selected kernel-tests && stage "kernel tests (GPU)" kernel-tests 60 'kernel_tests'
    selected real-size && stage "real-size bf16 checks" real-size 60 \
        'env -u TRITON_INTERPRET "$PY" -m pytest tests/test_bench.py -q -rs -k gpu_real_size -p no:cacheprovider'
fi
# the goals' batches first (kernels and train at 64, infer at 256), so a short budget still measures them
# (caps in seconds: on the H200 in calls D1/D2 (bench/RESULTS.md) kernels-b64 took 169 s and kernels-b8-256
# 159 s, before the suite's `auto` rows; the rest are guesses: compiling the whole G and autotuning dominate)
# (infer-b256 compiles G three times and runs the writer rounds: 200 s)
for spec in "kernels-b64 240 kernels --batch 64" "launch-profile 60 -" "train-b64 100 train --batch 64" "profile 90 -" \
            "infer-b256 200 infer --batch 256" "kernels-b8-256 230 kernels --batch 8,256" "model 150 model" "data 50 data"; do
    read -r key cap args <<< "$spec"
    selected "$key" || continue
    if [[ "$key" == profile ]]; then
        stage "profile GAN step" profile "$cap" 'profile_step'
    elif [[ "$key" == launch-profile ]]; then  # the host path with real launches (D3: 27 s on the H200)
        stage "launch profile" launch-profile "$cap" \
            '"$PY" bench/launch_profile.py --device "$DEVICE" --iters 100 --json "$OUT/launch.json" --profile-out "$OUT/launch_top.txt"'
    else
        stage "bench $key" "$key" "$cap" "run_suite $key $args"
    fi
done
# merge whatever the stages wrote (a stage killed by its timeout left no part: say so in a row)
"$PY" - "$PARTS" "$OUT/bench.json" "$SMOKE_FLAG" <<'EOF'
import json, os, sys
from pathlib import Path
sys.path.insert(0, "bench")
from common import error_row, format_table
parts, out, smoke = Path(sys.argv[1]), Path(sys.argv[2]), bool(sys.argv[3])
env, rows = None, []
wanted = os.environ.get("GPU_SUITE_STAGES", "").split()
expected = ("main-job", "kernels-b64", "train-b64", "infer-b256", "kernels-b8-256", "model", "data")
for part in [p for p in expected if (not wanted or p in wanted) and not (smoke and p == "main-job")]:
    f = parts / f"{part}.json"
    if f.exists():
        data = json.loads(f.read_text())
        env = env or dict(data["env"], command="bash bench/gpu_suite.sh", part_commands=[])
        env["part_commands"].append(data["env"]["command"])
        rows += [dict(r, part=part) for r in data["rows"]]
    else:
        rows.append(error_row(part if part == "main-job" else part.split("-")[0], "(suite)",
                              f"no JSON from stage {part}: not run, or killed before it wrote (see the log)"))
out.write_text(json.dumps({"env": env, "rows": rows}, indent=1, default=str))
print()
print(format_table(rows))
EOF

echo
echo "=== summary ($(( $(date +%s) - START ))s of ${BUDGET_S}s) ==="
printf '%s\n' "${SUMMARY[@]}"
echo "results: $OUT/bench.json, log: $OUT/gpu_suite.log"
return $FAILED
}

# main's output goes to the terminal and the log; the pipeline ends only when tee has written it all
main 2>&1 | tee -a "$OUT/gpu_suite.log"
exit "${PIPESTATUS[0]}"

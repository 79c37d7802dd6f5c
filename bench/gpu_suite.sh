#!/usr/bin/env bash
# Everything a session with a GPU runs, in ONE device call of under 10 minutes (see bench/README.md):
#   1. install the carried wheels (wheels/*.whl; DALI from dali_parts/ if all its parts are there) and
#      the project itself, editable, with no registry;
#   2. the kernel correctness tests on the GPU (tests/kernels, real Triton, no interpreter), then the
#      real-size bf16 checks (tests/test_bench.py -k gpu_real_size: batch 64, 32x32, nf 64, gc 32);
#   3. every bench suite, each in its own process and under its own timeout, so one hang costs one
#      suite; their rows are merged into $OUT/bench.json;
#   4. a summary: one line per stage (ok / FAILED / TIMEOUT and seconds), then the merged table.
# The log is $OUT/gpu_suite.log. Stages are cut to what is left of GPU_SUITE_BUDGET_S (default 540 s,
# under the device call's 600 s), so the summary and the JSON always get written.
#
# GPU_SUITE_STAGES="model data" runs only those stages (a second call for what the first did not
# finish; install always runs). Stage keys: kernel-tests real-size kernels-b64 train-b64 infer-b256
# kernels-b8-256 model data.
# The device machine's copy of the tree has no .git: pass the commit as GAFH_GIT_COMMIT=<hash> and
# GAFH_GIT_DIRTY=0|1 (bench/README.md) so that the JSON says what was measured.
# Check the plumbing without a GPU:  GPU_SUITE_DEVICE=cpu GPU_SUITE_SMOKE=1 OUT=/tmp/gs bench/gpu_suite.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_suite_out}"
DEVICE="${GPU_SUITE_DEVICE:-cuda}"
BUDGET_S="${GPU_SUITE_BUDGET_S:-540}"
SMOKE_FLAG=""
[[ "${GPU_SUITE_SMOKE:-0}" == 1 ]] && SMOKE_FLAG="--smoke"
PY="${PYTHON:-python3}"
PARTS=/tmp/gafh_bench_parts   # per-suite JSON; only the merge goes to $OUT (at most 8 files come back)
mkdir -p "$OUT" "$PARTS"
rm -f "$PARTS"/*.json
export PYTHONUNBUFFERED=1

START=$(date +%s)
SUMMARY=()
FAILED=0

# stage NAME CAP_SECONDS 'COMMAND': run COMMAND (a bash string; the functions below are exported to it)
# under `timeout min(CAP, budget left)`, and record the outcome.
stage() {
    local name=$1 cap=$2 cmd=$3 left t t0 rc msg
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
    SUMMARY+=("$(printf '%-22s %-20s %4ss' "$name" "$msg" $(( $(date +%s) - t0 )))")
}

install_all() {
    shopt -s nullglob
    local wheels=(wheels/*.whl) parts=(dali_parts/*.part-*)
    if (( ${#parts[@]} )); then
        # DALI and its libraries travel as one tar split in <64 MiB parts over several calls
        # (bench/README.md); it is installed only when every part is here and the checksum matches
        cat "${parts[@]}" > /tmp/dali.tar
        if [[ -f dali_parts/SHA256 ]] && [[ "$(sha256sum < /tmp/dali.tar | cut -d' ' -f1)" == "$(cut -d' ' -f1 dali_parts/SHA256)" ]]; then
            mkdir -p /tmp/dali_wheels && tar xf /tmp/dali.tar -C /tmp/dali_wheels
            wheels+=(/tmp/dali_wheels/*.whl)
        else
            echo "dali_parts/ is incomplete or does not match dali_parts/SHA256: DALI not installed, its rows say so"
        fi
    fi
    if (( ${#wheels[@]} )); then
        "$PY" -m pip install --quiet --no-index --no-deps --no-cache-dir "${wheels[@]}" || return 1
    else
        echo "no wheels/*.whl carried: deepspeed and DALI rows will be skipped with the reason"
    fi
    if ! "$PY" -m pip install --quiet --no-index --no-deps --no-build-isolation -e .; then
        echo "editable install failed; installing a copy instead"
        "$PY" -m pip install --quiet --no-index --no-deps --no-build-isolation . || return 1
    fi
    "$PY" - <<'EOF'
import importlib.metadata as m
for name in ("torch", "triton", "deepspeed", "nvidia-dali-cuda130", "gafh-fast"):
    try:
        print(f"{name} {m.version(name)}")
    except m.PackageNotFoundError:
        print(f"{name} not installed")
import gafh_fast.kernels  # the package and its Triton kernels import
EOF
}

run_suite() {  # run_suite PART SUITE [ARGS...]: one suite in its own process, its JSON at $PARTS/PART.json
    local part=$1 suite=$2
    shift 2
    # shellcheck disable=SC2086  # SMOKE_FLAG is empty or one word
    "$PY" bench/throughput.py --suite "$suite" --device "$DEVICE" $SMOKE_FLAG "$@" --json "$PARTS/$part.json"
}
export -f install_all run_suite
export PY DEVICE PARTS SMOKE_FLAG

selected() {  # selected KEY: true when GPU_SUITE_STAGES is unset/empty or names KEY
    [[ -z "${GPU_SUITE_STAGES:-}" || " $GPU_SUITE_STAGES " == *" $1 "* ]]
}

main() {
stage "environment" 20 'nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv;
    uname -m; echo "commit: $(git rev-parse HEAD 2>/dev/null || echo "${GAFH_GIT_COMMIT:-unknown (set GAFH_GIT_COMMIT)}")";
    "$PY" -c "import torch; print(torch.__version__, torch.version.cuda,
    torch.cuda.is_available() and torch.cuda.get_device_name())"; true'
if [[ -n "$SMOKE_FLAG" ]]; then  # the plumbing check: leave this machine's install and CPU alone
    SUMMARY+=("$(printf '%-22s %s' "install, GPU tests" "skipped (GPU_SUITE_SMOKE=1)")")
else
    stage "install" 60 'install_all'
    # real Triton on the GPU: tests/kernels/conftest.py turns the interpreter on only when there is no GPU
    selected kernel-tests && stage "kernel tests (GPU)" 100 \
        'env -u TRITON_INTERPRET "$PY" -m pytest tests/kernels -q -rs -p no:cacheprovider'
    selected real-size && stage "real-size bf16 checks" 60 \
        'env -u TRITON_INTERPRET "$PY" -m pytest tests/test_bench.py -q -rs -k gpu_real_size -p no:cacheprovider'
fi
# the goals' batches first (kernels and train at 64, infer at 256), so a short budget still measures them
# (caps in seconds; guessed without a GPU: compiling the whole G and Triton's autotuning dominate)
for spec in "kernels-b64 150 kernels --batch 64" "train-b64 100 train --batch 64" "infer-b256 80 infer --batch 256" \
            "kernels-b8-256 120 kernels --batch 8,256" "model 150 model" "data 50 data"; do
    read -r key cap args <<< "$spec"
    selected "$key" && stage "bench $key" "$cap" "run_suite $key $args"
done
# merge whatever the suites wrote (a suite killed by its timeout left no part: say so in a row)
"$PY" - "$PARTS" "$OUT/bench.json" <<'EOF'
import json, os, sys
from pathlib import Path
sys.path.insert(0, "bench")
from common import error_row, format_table
parts, out = Path(sys.argv[1]), Path(sys.argv[2])
env, rows = None, []
wanted = os.environ.get("GPU_SUITE_STAGES", "").split()
expected = ("kernels-b64", "train-b64", "infer-b256", "kernels-b8-256", "model", "data")
for part in [p for p in expected if not wanted or p in wanted]:
    f = parts / f"{part}.json"
    if f.exists():
        data = json.loads(f.read_text())
        env = env or dict(data["env"], command="bash bench/gpu_suite.sh", part_commands=[])
        env["part_commands"].append(data["env"]["command"])
        rows += [dict(r, part=part) for r in data["rows"]]
    else:
        rows.append(error_row(part.split("-")[0], "(suite)",
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

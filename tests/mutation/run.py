"""Mutation testing of the model, loss, training-step and kernel code (issue 15, "a mutation score").

    git worktree add --detach /tmp/mut HEAD        # NEVER in the shared checkout: it rewrites files
    python /tmp/mut/tests/mutation/run.py --repo /tmp/mut --out /tmp/mutation
    python /tmp/mut/tests/mutation/run.py --repo /tmp/mut --out /tmp/mutation --planted-only

1. Map: the selected tests run once under tests/mutation/tracer.py, which records which test executes
   which line of the targets (and each test's duration). They must all pass.
2. Mutants: tests/mutation/mutants.py (operators listed there), plus the hand-planted bugs of
   tests/mutation/planted.py.
3. Run: each mutant is written into the file, and only the tests that execute its lines run (fastest
   first, stopping at the first failure; lines run only at import time select every test of the
   file; the torch.compile tests of COMPILED_BY join for the files they compile, whose lines Dynamo
   runs out of the tracer's sight; the 2-rank tests of SPAWNED_BY join for the functions their
   spawned ranks run). A fork server keeps torch, triton, deepspeed and pytest imported, so a mutant costs its
   tests' time, not a fresh interpreter. The original file is always restored.
4. Report: results.jsonl (one line per mutant, appended as it goes: --resume continues) and
   report.md (score per file, every survivor with its line).

Statuses: killed (a test failed, or the mutant broke collection), timeout (ran past 3x its tests'
time + 30 s: counted as killed, listed apart), survived, uncovered (no selected test executes the
line: nothing on CPU can see it; listed apart).
"""
from __future__ import annotations

import argparse
import ast
import gc
import glob
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from equivalent import EQUIVALENT_AT, OUT_OF_SCOPE, OUT_OF_SCOPE_AT, equivalent_reason, positional_reason  # noqa: E402
from mutants import Mutant, find_mutants  # noqa: E402
from planted import PLANTED  # noqa: E402

TARGETS = ["gafh_fast/models/*.py", "gafh_fast/ops.py", "gafh_fast/losses.py", "gafh_fast/train/step.py", "gafh_fast/train/ema.py",
           "gafh_fast/train/engine.py", "gafh_fast/train/optim.py", "gafh_fast/resize.py", "kernels/*.py"]
# Not mutated: kernels/compile_check.py (a static sm_90 compile report run by hand, no runtime role),
# kernels/tuning.py (which of two correct tile candidates is faster), gafh_fast/models/__main__.py (a
# parameter-count printer). kernels/cost_model.py is mutated: its floors go next to the GPU rows
# (bench/floors.py; tests/kernels/test_cost_model.py and tests/test_floors.py check it).
EXCLUDE = ["kernels/compile_check.py", "kernels/tuning.py", "gafh_fast/models/__main__.py"]
# In-process tests only (subprocess runs are not traced and take minutes each); see report.md.
TESTS = ["tests/test_spec.py", "tests/test_models.py", "tests/test_losses.py", "tests/test_vgg.py",
         "tests/test_ops.py", "tests/test_metrics.py", "tests/test_export.py", "tests/test_flops.py",
         "tests/test_train_features.py", "tests/kernels", "tests/test_train.py", "tests/test_train_sync_free.py",
         "tests/test_train_optim.py", "tests/test_floors.py"]
TRAIN_FILTER = "test_a_fp32 or test_a_bf16 or accumulation or test_e_"  # test_train.py's in-process tests
MEMORY_LIMIT = 6 << 30  # address space per mutant run (a torch process maps ~1 GiB at start)


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()


def check_copy(repo: Path) -> None:
    """Refuse the main checkout (others run tests there); make gafh_fast.kernels resolve inside the copy."""
    if git(repo, "rev-parse", "--absolute-git-dir") == os.path.realpath(git(repo, "rev-parse", "--git-common-dir")):
        if not (repo / ".mutation-copy").exists():
            sys.exit(f"{repo} is a main checkout: run in a `git worktree add` copy (or touch {repo}/.mutation-copy)")
    link = repo / "gafh_fast" / "kernels"
    if not link.exists():  # the editable install maps gafh_fast.kernels to the ORIGINAL checkout otherwise
        link.symlink_to("../kernels")
    for cache in list(repo.glob("gafh_fast/**/__pycache__")) + list(repo.glob("kernels/__pycache__")):
        shutil.rmtree(cache, ignore_errors=True)


def target_files(repo: Path, patterns: list[str]) -> list[str]:
    files = sorted({str(Path(p).relative_to(repo)) for pat in patterns for p in glob.glob(str(repo / pat))})
    return [f for f in files if f not in EXCLUDE and not f.endswith("__init__.py")]


def child_env(repo: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", TRITON_INTERPRET="1", DS_ACCELERATOR="cpu", PYTHONDONTWRITEBYTECODE="1",
               PYTHONPATH=os.pathsep.join([str(repo), str(HERE)]))
    return env


def pytest_args(tests: list[str]) -> list[str]:
    # plain asserts: rewriting ~90 modules per child costs 2 s (no bytecode is written, so nothing is
    # cached); hypothesis' plugin imports hypothesis at the end of every session (2 s); no test here uses it
    args = ["-q", "-p", "no:cacheprovider", "-p", "no:hypothesispytest", "--assert=plain", "--no-header",
            "-o", "addopts=", "-W", "ignore"]
    return args + tests


# ------------------------------------------------------------------------------------------------
# 1. map
# ------------------------------------------------------------------------------------------------
def build_map(repo: Path, files: list[str], tests: list[str], out: Path) -> dict:
    env = child_env(repo)
    env.update(MUTATION_TARGETS=os.pathsep.join(str(repo / f) for f in files), MUTATION_MAP=str(out / "map.json"))
    cmd = [sys.executable, "-m", "pytest", "-p", "tracer", *pytest_args(tests), "-k", TRAIN_FILTER_EXPR]
    t0 = time.time()
    result = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    (out / "map.log").write_text(result.stdout + result.stderr)
    data = json.loads((out / "map.json").read_text())
    print(f"map: {len(data['durations'])} tests in {time.time() - t0:.0f} s, {len(data['failed'])} failed", flush=True)
    if data["failed"]:
        sys.exit("the unmutated code fails these tests (see map.log): " + ", ".join(data["failed"]))
    # the tracer saw the kernels through the gafh_fast/kernels symlink; key by the repository path
    lines = {}
    for real, per in data["lines"].items():
        rel = os.path.relpath(real, os.path.realpath(repo))
        lines[rel] = {int(n): ids for n, ids in per.items()}
    return {"lines": lines, "durations": data["durations"], "shared": data.get("shared", {})}


# every test file but test_train.py is taken whole; of test_train.py only the in-process tests
TRAIN_FILTER_EXPR = f"not test_train.py or ({TRAIN_FILTER})"


# Dynamo evaluates the frames it compiles itself (symbolically), so the line tracer never sees the lines
# a torch.compile test runs through: these tests also run for every mutant of the files they compile.
COMPILED_BY = {
    "kernels/op.py": ["tests/kernels/test_host_code.py::test_compile_sees_one_custom_op_per_conv_and_per_idb",
                      "tests/kernels/test_conv3x3.py::test_torch_compile_fullgraph"],
}


# Tests that check from spawned ranks (2 gloo processes, which the tracer does not follow): they also
# run for every mutant inside the functions named here, whose multi-rank branches only those ranks take.
_CLIP_2 = "tests/test_train_sync_free.py::test_clip_norm_over_zero_partitions_is_the_global_norm"
_FLAGS_2 = "tests/test_train_features.py::test_non_finite_loss_on_one_rank_skips_on_all"
_SM90 = "tests/kernels/test_precompile.py::test_precompile_for_sm90_fills_the_jit_cache"
_SHM_2 = "tests/test_train_channels_last.py::test_cuda_layout_on_two_ranks_resumes"
SPAWNED_BY = {
    # DeepSpeed makes its CPU all-reduce buffer only for 2+ ranks: only the launcher's ranks can leak it
    ("gafh_fast/train/engine.py", "unlink_shm_allreduce_buffer"): [_SHM_2],
    ("gafh_fast/train/optim.py", "__init__"): [_CLIP_2],  # the `partitioned` default
    ("gafh_fast/train/optim.py", "_clip_"): [_CLIP_2],
    ("gafh_fast/train/step.py", "any_rank_nonfinite"): [_FLAGS_2],
    ("gafh_fast/train/step.py", "read"): [_FLAGS_2],  # StepWindow.read's stop flag (and StepOutput.read)
    # the real sm_90 compiles run in a subprocess without the interpreter (tests/kernels/sm90_precompile_check.py)
    **{("kernels/precompile.py", f): [_SM90] for f in ("compile_records", "_warmup", "precompile", "line")},
    **{("gafh_fast/models/generator.py", f): [_SM90] for f in ("_kernel_twin", "precompile_kernels", "run")},
}


def function_names(repo: Path, files: list[str]) -> dict:
    """{file: {(first line, last line): name}} of every function, as a mutant's scope names it."""
    out = {}
    for f in files:
        nodes = ast.walk(ast.parse((repo / f).read_bytes()))
        out[f] = {(n.lineno, n.end_lineno): n.name for n in nodes
                  if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    return out


def select_tests(m: Mutant, cover: dict, durations: dict, shared: dict, functions: dict | None = None) -> list[str]:
    """The tests that execute the mutant's lines. Lines run only at import time: every test of the
    file. Lines no traced test runs (e.g. the rank-gather path, run only in a test's spawned ranks):
    the tests that run the enclosing function. Planted bugs outside the targets: the whole selection."""
    per_line = cover.get(m.path)
    if per_line is None:
        return sorted(durations, key=lambda i: durations[i])
    ids: set[str] = set()
    for line in range(m.line, m.end_line + 1):
        ids.update(per_line.get(line, ()))
    if not ids and m.scope != (0, 0):
        for line in range(m.scope[0], m.scope[1] + 1):
            ids.update(per_line.get(line, ()))
    if "" in ids or m.op.startswith("planted"):
        ids.discard("")
        ids.update(i for per in per_line.values() for i in per if i)
    # tests that share a module-scoped fixture with a selected one read the same (mutated) run, but
    # the tracer saw its lines only under the test that set it up
    fixtures = {f for i in ids for f in shared.get(i, ())}
    ids.update(i for i, fs in shared.items() if fixtures.intersection(fs))
    ids.update(i for i in COMPILED_BY.get(m.path, ()) if i in durations)
    name = (functions or {}).get(m.path, {}).get(m.scope)
    ids.update(i for i in SPAWNED_BY.get((m.path, name), ()) if i in durations)
    return sorted(ids, key=lambda i: durations.get(i, 0.0))


# ------------------------------------------------------------------------------------------------
# 3. the fork server
# ------------------------------------------------------------------------------------------------
def preload(repo: Path) -> None:
    """Import the heavy third-party modules once; never gafh_fast (each child imports the mutant)."""
    os.environ.update(child_env(repo))
    sys.dont_write_bytecode = True
    import numpy  # noqa: F401
    import pytest  # noqa: F401
    import torch  # noqa: F401
    import triton  # noqa: F401
    import yaml  # noqa: F401
    from PIL import Image  # noqa: F401
    import safetensors.torch  # noqa: F401
    import deepspeed  # noqa: F401
    import torch.distributed.nn.functional  # noqa: F401
    import torch.multiprocessing  # noqa: F401
    import triton.language  # noqa: F401
    import skimage.metrics  # noqa: F401

    # pytest's unraisable-exception cleanup runs gc.collect() 5 times per session: over torch's and
    # deepspeed's heap that is 1 s per mutant. Frozen objects are never scanned again.
    gc.freeze()
    assert not any(name == "gafh_fast" or name.startswith("gafh_fast.") for name in sys.modules)
    sys.path[:0] = [str(repo), str(HERE)]
    os.chdir(repo)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run_tests(tests: list[str], log: Path, timeout: float) -> tuple[str, float, str]:
    """(status, seconds, first failing test) of one pytest run in a forked child."""
    t0 = time.time()
    pid = os.fork()
    if pid == 0:  # child
        code = 99
        try:
            os.setsid()
            # a mutant that allocates without bound (a wrong shape) must fail here, not wake the OOM
            # killer on a machine others share
            resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            import pytest

            code = int(pytest.main(["-x", *pytest_args(tests)]))
        finally:
            os._exit(code)
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.time() - t0 > timeout:
                os.killpg(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return "timeout", time.time() - t0, ""
            time.sleep(0.02)
    except BaseException:  # interrupted: take the child (and anything it started) down too
        os.killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    code = os.waitstatus_to_exitcode(status)
    killer = ""
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            killer = line.split(" ")[1]
            break
    if code < 0:  # died of a signal (a crash in native code): the tests did not pass
        return "killed", time.time() - t0, f"signal {-code}"
    if code == 0:
        return "survived", time.time() - t0, ""
    if code in (1, 2) or killer.startswith("tests"):  # failed, or broke collection (exit 2 or 4 under -x)
        return "killed", time.time() - t0, killer
    return f"error{code}", time.time() - t0, killer


def reviewed(repo: Path, m: Mutant) -> tuple[str, str] | None:
    """("out-of-scope" | "equivalent", reason) for a mutant tests/mutation/equivalent.py explains."""
    if m.op.startswith("planted"):
        return None
    names = OUT_OF_SCOPE.get(m.path, {})
    if names:
        tree = ast.parse((repo / m.path).read_bytes())
        for node in tree.body:
            if getattr(node, "name", None) in names and node.lineno <= m.line <= node.end_lineno:
                return "out-of-scope", names[node.name]
    source = (repo / m.path).read_bytes()
    for status, entries in (("out-of-scope", OUT_OF_SCOPE_AT), ("equivalent", EQUIVALENT_AT)):
        reason = positional_reason(entries, m.path, source, m.start, m.end, m.original, m.replacement)
        if reason:
            return status, reason
    line_text = source.decode().splitlines()[m.line - 1]
    reason = equivalent_reason(m.path, line_text, m.original, m.replacement)
    return ("equivalent", reason) if reason else None


def run_one(repo: Path, m: Mutant, tests: list[str], durations: dict, log: Path, run_reviewed: bool) -> dict:
    record = {"id": m.key, "file": m.path, "line": m.line, "op": m.op, "original": m.original,
              "replacement": m.replacement, "label": m.label, "tests": len(tests)}
    review = None if run_reviewed else reviewed(repo, m)
    if review is not None:
        return {**record, "status": review[0], "seconds": 0.0, "killer": "", "reason": review[1]}
    if not tests:
        return {**record, "status": "uncovered", "seconds": 0.0, "killer": ""}
    path = repo / m.path
    original = path.read_bytes()
    try:
        path.write_bytes(m.apply(original))
        timeout = 30 + 3 * sum(durations.get(t, 1.0) for t in tests)
        status, seconds, killer = run_tests(tests, log, timeout)
    finally:
        path.write_bytes(original)
    return {**record, "status": status, "seconds": round(seconds, 2), "killer": killer}


def planted_mutants(repo: Path) -> list[Mutant]:
    out = []
    for p in PLANTED:
        source = (repo / p["file"]).read_bytes()
        old = p["old"].encode()
        if source.count(old) != 1:  # the code moved on since the bug was written: say so, go on
            print(f"planted bug {p['name']!r} not applicable: its text occurs {source.count(old)} times "
                  f"in {p['file']}", flush=True)
            continue
        start = source.index(old)
        line = source[:start].count(b"\n") + 1
        out.append(Mutant(p["file"], line, line + p["old"].count("\n"), "planted:" + p["name"], p["old"], p["new"],
                          start, start + len(old)))
    return out


def write_report(out: Path, commit: str, command: str) -> None:
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines() if x.strip()]
    by_file = defaultdict(Counter)
    for r in rows:
        by_file[r["file"]][r["status"]] += 1
    cols = ["killed", "timeout", "survived", "equivalent", "out-of-scope", "uncovered"]
    lines = [f"Mutation run at commit `{commit}`", "", f"    {command}", "",
             "| file | mutants | " + " | ".join(cols) + " | error | score |", "|---" * (len(cols) + 4) + "|"]
    total = Counter()

    def row(name, c):
        err = sum(v for k, v in c.items() if k.startswith("error"))
        judged = sum(c.values()) - c["equivalent"] - c["out-of-scope"]
        score = f"{100 * (c['killed'] + c['timeout']) / judged:.1f} %" if judged else "-"
        return f"| {name} | {sum(c.values())} | " + " | ".join(str(c[k]) for k in cols) + f" | {err} | {score} |"

    for f in sorted(by_file):
        total.update(by_file[f])
        lines.append(row(f, by_file[f]))
    lines.append(row("**all**", total))
    seconds = sum(r["seconds"] for r in rows)
    lines += ["", "score = (killed + timeout) / (mutants - equivalent - out-of-scope); uncovered, survived and "
              "error count against it.", f"Mutant test time: {seconds / 60:.1f} min.", ""]
    for status in ("survived", "uncovered", "timeout"):
        picked = [r for r in rows if r["status"] == status]
        if picked:
            lines += [f"{status.capitalize()}:", ""] + [f"- {r['label']}" for r in picked] + [""]
    errors = [r for r in rows if r["status"].startswith("error")]
    if errors:
        lines += ["Errors:", ""] + [f"- [{r['status']}] {r['label']}" for r in errors] + [""]
    planted = [r for r in rows if r["op"].startswith("planted")]
    if planted:
        lines += ["Planted bugs (tests/mutation/planted.py):", ""]
        lines += [f"- {r['status']}{' by ' + r['killer'] if r['killer'] else ''}: {r['op'][8:]}" for r in planted]
        lines.append("")
    reasons = defaultdict(list)
    for r in rows:
        if r["status"] in ("equivalent", "out-of-scope"):
            reasons[(r["status"], r["reason"])].append(f"{r['file']}:{r['line']}")
    if reasons:
        lines += ["Equivalent / out of scope (tests/mutation/equivalent.py), by reason:", ""]
        for (status, reason), where in sorted(reasons.items()):
            lines.append(f"- {status}: {reason} ({len(where)}: {', '.join(sorted(set(where)))})")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:len(by_file) + 10]), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", required=True, type=Path, help="a copy of the repository (git worktree)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--targets", nargs="*", default=TARGETS)
    ap.add_argument("--tests", nargs="*", default=TESTS)
    ap.add_argument("--planted-only", action="store_true", help="only the hand-planted bugs")
    ap.add_argument("--resume", action="store_true", help="keep results.jsonl and the map, skip done mutants")
    ap.add_argument("--match", default="", help="only mutants whose label contains this")
    ap.add_argument("--only-survivors-of", type=Path, help="a results.jsonl: run only its non-killed mutants")
    ap.add_argument("--sample", action="append", default=[], metavar="PREFIX=N",
                    help="run a seeded random sample of N of the mutants in files under PREFIX (e.g. kernels/=300)")
    ap.add_argument("--seed", type=int, default=15)
    ap.add_argument("--run-equivalents", action="store_true",
                    help="also run the mutants tests/mutation/equivalent.py explains (they should survive)")
    args = ap.parse_args()
    repo = args.repo.resolve()
    check_copy(repo)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "logs").mkdir(exist_ok=True)
    files = target_files(repo, args.targets)
    commit = git(repo, "rev-parse", "HEAD")
    dirty = git(repo, "status", "--porcelain", "--untracked-files=no")
    left = [line for line in dirty.splitlines() if line[3:] in files + [p["file"] for p in PLANTED]]
    if left:  # a run killed with SIGKILL cannot restore its mutant
        sys.exit(f"target files differ from HEAD in {repo} (a mutant left by a killed run?): {left}; "
                 "restore them (git checkout -- FILE, in the copy) first")
    # SIGTERM / SIGINT: unwind, so the `finally` that restores the mutated file runs
    signal.signal(signal.SIGTERM, _interrupt)
    print(f"commit {commit}{' + local changes: ' + dirty if dirty else ''}; {len(files)} target files", flush=True)

    if args.resume and (args.out / "cover.json").exists():
        cover = json.loads((args.out / "cover.json").read_text())
        cover["lines"] = {f: {int(n): ids for n, ids in per.items()} for f, per in cover["lines"].items()}
    else:
        cover = build_map(repo, files, args.tests, args.out)
        (args.out / "cover.json").write_text(json.dumps(cover))
    mutants = planted_mutants(repo)
    if not args.planted_only:
        mutants += [m for f in files for m in find_mutants(f, (repo / f).read_bytes())]
    mutants = [m for m in mutants if args.match in m.label]
    for item in args.sample:  # uniform sampling: the killed fraction estimates the whole group's score
        prefix, n = item.rsplit("=", 1)
        group = [m for m in mutants if m.path.startswith(prefix) and not m.op.startswith("planted")]
        chosen = {m.key for m in random.Random(args.seed).sample(group, min(int(n), len(group)))}
        print(f"sample: {len(chosen)} of the {len(group)} mutants under {prefix}", flush=True)
        in_group = {m.key for m in group}
        mutants = [m for m in mutants if m.key not in in_group or m.key in chosen]
    if args.only_survivors_of:
        keep = {r["id"] for r in map(json.loads, args.only_survivors_of.read_text().splitlines())
                if r["status"] not in ("killed", "timeout")}
        mutants = [m for m in mutants if m.key in keep]
    results = args.out / "results.jsonl"
    done = set()
    if args.resume and results.exists():
        done = {json.loads(x)["id"] for x in results.read_text().splitlines() if x.strip()}
    elif results.exists():
        results.unlink()
    todo = [m for m in mutants if m.key not in done]
    print(f"{len(mutants)} mutants, {len(todo)} to run", flush=True)

    functions = function_names(repo, files)
    preload(repo)
    t0 = time.time()
    with open(results, "a") as sink:
        for i, m in enumerate(todo, start=1):
            tests = select_tests(m, cover["lines"], cover["durations"], cover.get("shared", {}), functions)
            r = run_one(repo, m, tests, cover["durations"], args.out / "logs" / f"{i:05d}.log", args.run_equivalents)
            sink.write(json.dumps(r) + "\n")
            sink.flush()
            if r["status"] not in ("killed", "equivalent", "out-of-scope"):
                print(f"[{i}/{len(todo)} {time.time() - t0:.0f}s] {r['status']}: {m.label}", flush=True)
            elif r["op"].startswith("planted"):
                print(f"[{i}/{len(todo)}] killed by {r['killer']}: {m.label}", flush=True)
    command = " ".join(["python", "tests/mutation/run.py", *sys.argv[1:]])
    write_report(args.out, commit, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())

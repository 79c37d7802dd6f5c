"""bench/gpu_suite.sh's plumbing on CPU, so a GPU session can trust it before spending device minutes on it.

One run of the real script (module fixture, ~1-2 min) does what a device call does, at a tiny size:
- the install stage in its offline form: a copy of the tree without .git inside someone else's repository,
  a fresh venv, PIP_NO_INDEX=1, a carried wheels/ and a DALI stand-in carried as dali_parts/ (packed by
  bench/dali_parts.sh), the project installed editable with no registry;
- the main-job stage (bench/main_job.py): `deepspeed launch/train.py` on configs/gafh_ridn_paper.yaml with
  bf16, ZeRO 1 and a random VGG on generated faces (tiny model, DS_ACCELERATOR=cpu), `--resume auto`, then
  `torchrun launch/infer.py` on the export; its summary line carries the trainer's own img/s;
- a stage cut by its timeout (the data bench capped at 1 s), the merged bench.json and the summary.
Cheap tests beside it: the dali_parts round trip and its damage reports, and GAFH_GIT_COMMIT winning over a
repository found above the tree.
"""
import base64
import hashlib
import importlib.util
import json
import os
import random
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import TINY_OVERRIDES
from test_install import copy_tree, make_venv, offline_env

REPO = Path(__file__).resolve().parents[1]
COMMIT = "c0ffee" * 6 + "abcd"  # what the session passes as GAFH_GIT_COMMIT


def make_wheel(out_dir: Path, dist: str, version: str, files: dict) -> Path:
    """A minimal valid pure-Python wheel holding `files` ({path in site-packages: bytes})."""
    name = dist.replace("-", "_")
    info = f"{name}-{version}.dist-info"
    files = dict(files)
    files[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode()
    files[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"

    def digest(data: bytes) -> str:
        return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()

    record = "".join(f"{p},{digest(d)},{len(d)}\n" for p, d in files.items()) + f"{info}/RECORD,,\n"
    path = out_dir / f"{name}-{version}-py3-none-any.whl"
    out_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        for p, d in files.items():
            z.writestr(p, d)
        z.writestr(f"{info}/RECORD", record)
    return path


def dali_standins(out_dir: Path) -> list[Path]:
    """Two wheels standing in for DALI and one of its libraries; random bytes so that the tar splits into
    several parts at a small part size (DALI's real parts are 50M)."""
    payload = random.Random(0).randbytes(250_000)
    return [make_wheel(out_dir, "gafh-standin-dali", "2.4.0", {
                "gafh_standin_dali/__init__.py": b"VERSION = '2.4.0'\n", "gafh_standin_dali/lib.bin": payload}),
            make_wheel(out_dir, "gafh-standin-nvimgcodec", "0.5.0", {
                "gafh_standin_nvimgcodec.py": b"VERSION = '0.5.0'\n"})]


def dali_parts(*args: str, parts_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "bench" / "dali_parts.sh"), *args], capture_output=True, text=True,
                          env=dict(os.environ, DALI_PARTS_DIR=str(parts_dir)), timeout=60)


def git_repo_with_a_commit(path: Path) -> str:
    """`path` becomes a git repository with one commit (someone else's, above our tree); its hash."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "other.txt").write_text("not the project\n")
    git = ["git", "-C", str(path), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    for cmd in (["init", "-q"], ["add", "other.txt"], ["commit", "-q", "-m", "other"]):
        subprocess.run(git + cmd, check=True, capture_output=True)
    return subprocess.run(git + ["rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()


# ----------------------------------------------------------------------------------------------------------
def test_dali_parts_round_trip_and_damage(tmp_path):
    wheels = dali_standins(tmp_path / "wheels")
    parts_dir = tmp_path / "dali_parts"
    assert dali_parts("unpack", str(tmp_path / "none"), parts_dir=parts_dir).returncode == 3  # nothing carried

    packed = dali_parts("pack", str(tmp_path / "wheels"), "100K", parts_dir=parts_dir)
    assert packed.returncode == 0, packed.stderr
    parts = sorted(parts_dir.glob("dali.tar.part-*"))
    assert [p.name[-2:] for p in parts] == ["aa", "ab", "ac"]  # ~250 kB of tar in 100 kB parts
    assert all(p.stat().st_size <= 100 * 1024 for p in parts)
    listed = (parts_dir / "SHA256").read_text().split()
    assert listed[1::2] == [p.name for p in parts] + ["dali.tar"]

    out = dali_parts("unpack", str(tmp_path / "dest"), parts_dir=parts_dir)
    assert out.returncode == 0, out.stderr
    got = [Path(line) for line in out.stdout.split()]
    assert sorted(p.name for p in got) == sorted(w.name for w in wheels)
    assert all(p.read_bytes() == (tmp_path / "wheels" / p.name).read_bytes() for p in got)

    # a part that a call did not bring, then a part damaged on the way: each is named, nothing is extracted
    good = parts[1].read_bytes()
    parts[1].unlink()
    out = dali_parts("unpack", str(tmp_path / "dest2"), parts_dir=parts_dir)
    assert out.returncode == 1 and "dali.tar.part-ab is missing" in out.stderr, out.stderr
    parts[1].write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    out = dali_parts("unpack", str(tmp_path / "dest2"), parts_dir=parts_dir)
    assert out.returncode == 1 and "dali.tar.part-ab does not match" in out.stderr, out.stderr
    assert not list((tmp_path / "dest2").glob("*.whl"))
    (parts_dir / "SHA256").unlink()
    parts[1].write_bytes(good)
    out = dali_parts("unpack", str(tmp_path / "dest2"), parts_dir=parts_dir)
    assert out.returncode == 1 and "SHA256 was not carried" in out.stderr, out.stderr


def test_git_commit_env_wins_over_a_repository_above(tmp_path, monkeypatch):
    """The first GPU run recorded the commit of a repository in a folder above the tree (no .git of its own)."""
    other = git_repo_with_a_commit(tmp_path / "outer")
    copy = tmp_path / "outer" / "checkout" / "bench" / "common.py"
    copy.parent.mkdir(parents=True)
    copy.write_bytes((REPO / "bench" / "common.py").read_bytes())
    spec = importlib.util.spec_from_file_location("common_in_a_copy", copy)
    common_copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common_copy)

    monkeypatch.setenv("GAFH_GIT_COMMIT", COMMIT)
    monkeypatch.setenv("GAFH_GIT_DIRTY", "1")
    assert common_copy.git_state() == {"commit": COMMIT, "dirty": True, "commit_source": "GAFH_GIT_COMMIT"}
    monkeypatch.delenv("GAFH_GIT_COMMIT")
    state = common_copy.git_state()
    assert state["commit"] is None and state["commit"] != other and "unknown" in state["commit_source"], state


# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_suite").resolve()
    git_repo_with_a_commit(root / "outer")
    tree = copy_tree(root / "outer" / "checkout")
    make_wheel(tree / "wheels", "gafh-standin-carried", "1.0", {"gafh_standin_carried.py": b"OK = True\n"})
    dali_standins(root / "dali_wheels")
    packed = dali_parts("pack", str(root / "dali_wheels"), "100K", parts_dir=tree / "dali_parts")
    assert packed.returncode == 0, packed.stderr
    python = make_venv(root / "venv")
    tiny = " ".join(TINY_OVERRIDES)
    env = dict(offline_env(), OUT=str(root / "out"), PYTHON=str(python), GPU_SUITE_DEVICE="cpu",
               GPU_SUITE_TMP=str(root / "scratch"), GPU_SUITE_STAGES="main-job launch-profile data", GPU_SUITE_CAPS="data=1",
               GAFH_GIT_COMMIT=COMMIT, GAFH_GIT_DIRTY="0",
               MAIN_JOB_ARGS=f"--steps 2 --more-steps 1 --batch 2 --faces 40 --loader pil --kernels torch {tiny} data.num_threads=1")
    proc = subprocess.run(["bash", str(tree / "bench" / "gpu_suite.sh")], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    log = (root / "out" / "gpu_suite.log").read_text()
    summary = log[log.rindex("=== summary"):]
    return {"proc": proc, "log": log, "summary": summary, "out": root / "out", "tree": tree, "python": python}


def summary_line(suite, name: str) -> str:
    lines = [line for line in suite["summary"].splitlines() if line.startswith(name + " ")]
    assert len(lines) == 1, suite["summary"]
    return lines[0]


def test_suite_stages_and_summary(suite):
    # the data stage was cut by its 1 s timeout, so the suite fails, after writing its summary and JSON
    assert suite["proc"].returncode == 1, suite["log"][-6000:]
    assert re.match(r"install\s+ok\b", summary_line(suite, "install")), suite["summary"]
    main = summary_line(suite, "main-job")
    assert re.match(r"main-job\s+ok\s+\d+s\s+train [0-9.]+ img/s, MFU n/a \(steps 2-2, batch 2, loader pil\); "
                    r"resumed 2->3; .*infer 4/4 ok", main), f"{main}\n{suite['log'][-6000:]}"
    assert re.match(r"bench data\s+TIMEOUT at 1s", summary_line(suite, "bench data")), suite["summary"]
    # the launch profile (its CPU plumbing here: the stand-in launcher) writes its rows and report to $OUT
    assert re.match(r"launch profile\s+ok\b", summary_line(suite, "launch profile")), suite["summary"]
    launch_rows = json.loads((suite["out"] / "launch.json").read_text())
    assert [r["path"] for r in launch_rows][:4] == ["eager", "triton, Triton's runner", "triton, direct runner",
                                                    "triton, direct runner, no tapes"]
    assert (suite["out"] / "launch_top.txt").read_text().count("cProfile, own time") == 2
    assert "kernel tests" not in suite["summary"]  # not selected
    assert f"commit: {COMMIT} dirty: False from GAFH_GIT_COMMIT" in suite["log"]


def test_offline_install_from_carried_wheels_and_dali_parts(suite):
    assert "DALI: 2 wheels from dali_parts/" in summary_line(suite, "install")
    probe = ("import json, gafh_standin_carried, gafh_standin_dali, gafh_standin_nvimgcodec, gafh_fast.kernels as k; "
             "print(json.dumps([gafh_standin_dali.VERSION, gafh_standin_nvimgcodec.VERSION, k.__file__]))")
    proc = subprocess.run([str(suite["python"]), "-c", probe], cwd="/", env=offline_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    dali, codec, kernels = json.loads(proc.stdout.splitlines()[-1])
    assert (dali, codec) == ("2.4.0", "0.5.0")
    assert Path(kernels).resolve() == suite["tree"] / "kernels" / "__init__.py"  # editable: the carried tree


def test_bench_json_has_main_job_row_with_the_trainers_numbers(suite):
    data = json.loads((suite["out"] / "bench.json").read_text())
    assert data["env"]["commit"] == COMMIT and data["env"]["dirty"] is False
    assert data["env"]["commit_source"] == "GAFH_GIT_COMMIT"
    rows = {(r["suite"], r["name"]): r for r in data["rows"]}
    train = rows[("main-job", "train: deepspeed launch/train.py")]
    # the row carries what the trainer wrote in its metrics.jsonl (kept in $OUT), not a number of its own
    records = [json.loads(line) for line in (suite["out"] / "main_job_metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r["kind"] == "train" and r["step"] <= 2][-1]
    assert train["status"] == "ok" and train["batch"] == 2
    assert (train["img_s"], train["ms"], train["mfu"]) == (last["img_s"], last["ms_step"], None)
    assert f"train {last['img_s']:.1f} img/s" in summary_line(suite, "main-job")
    assert rows[("main-job", "infer: torchrun launch/infer.py")]["status"] == "ok"
    assert rows[("data", "(suite)")]["status"] == "error"  # the stage cut by its timeout wrote no part


# ----------------------------------------------------------------------------------------------------------
def run_kernel_tests_stage(tmp_path: Path, *, has_xdist: bool, workers: str) -> tuple[list[str], str, str]:
    """Run gpu_suite.sh's `kernel_tests` function (the GPU kernel-test stage) with a stand-in interpreter
    that records how it is called; (the pytest command's argv, TRITON_INTERPRET as pytest saw it, the note)."""
    calls = tmp_path / "calls.txt"
    standin = tmp_path / "python"
    standin.write_text(f"""#!/usr/bin/env bash
if [[ "$1" == -c ]]; then exit {0 if has_xdist else 1}; fi   # the `import xdist` probe
printf '%s\\n' "${{TRITON_INTERPRET-unset}}" "$@" > {calls}
""")
    standin.chmod(0o755)
    function = subprocess.run(["sed", "-n", "/^kernel_tests() {/,/^}/p", str(REPO / "bench" / "gpu_suite.sh")],
                              capture_output=True, text=True, check=True).stdout
    assert function.startswith("kernel_tests() {"), "gpu_suite.sh has no kernel_tests function"
    env = dict(os.environ, PY=str(standin), NOTES=str(tmp_path), GPU_TEST_WORKERS=workers, TRITON_INTERPRET="1")
    proc = subprocess.run(["bash", "-c", function + "\nkernel_tests"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    interpret, *argv = calls.read_text().splitlines()
    return argv, interpret, (tmp_path / "kernel-tests.txt").read_text()


def test_gpu_kernel_test_stage_runs_pytest_xdist_workers_capped_at_the_cores(tmp_path):
    # call C ran the 62 GPU kernel tests serially: 23 in 80 s, compiling; the stage now splits the compiles
    argv, interpret, note = run_kernel_tests_stage(tmp_path, has_xdist=True, workers="100000")
    cores = os.cpu_count()
    assert argv[:3] == ["-m", "pytest", "tests/kernels"] and argv[-2:] == ["-n", str(cores)], argv
    assert "-x" in argv and interpret == "unset"  # real Triton: conftest turns the interpreter on only without CUDA
    assert note.strip() == f"kernel tests: {cores} pytest-xdist workers on {cores} cores"


def test_gpu_kernel_test_stage_says_when_it_runs_serially(tmp_path):
    argv, interpret, note = run_kernel_tests_stage(tmp_path, has_xdist=False, workers="8")
    assert argv[:3] == ["-m", "pytest", "tests/kernels"] and "-n" not in argv, argv
    assert interpret == "unset" and note.startswith("kernel tests: SERIAL (pytest-xdist not installed")

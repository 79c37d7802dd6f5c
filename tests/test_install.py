"""The project installs with no package registry, editable and as a copy, and `gafh_fast.kernels` imports
from any working directory afterwards, the checkout's root included (issue 10: the first GPU call failed both).

What the device machine does, reproduced: a copy of the tree (no .git), a fresh venv, PIP_NO_INDEX=1 (so any
pip that setuptools starts by itself fails at once instead of reaching the network), and
`pip install --no-index --no-deps --no-build-isolation [-e] .`.

The venvs see this interpreter's packages (torch, triton, setuptools, pip) through a .pth file that names
its site-packages directories, instead of `--system-site-packages`: that option would also run the system's
own .pth hooks, and an editable install of another checkout registers a finder there that answers for
`gafh_fast.kernels` and so hides exactly the failure this file is about.
"""
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# where gafh_fast and gafh_fast.kernels came from, and that the kernels module is the real one
_PROBE = ("import json, gafh_fast, gafh_fast.kernels as k; "
          "print(json.dumps([gafh_fast.__file__, k.__file__, callable(k.fused_conv3x3_triton)]))")


def copy_tree(dest: Path) -> Path:
    """What travels to the device machine: tracked files and untracked ones git does not ignore, no .git."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():  # a tracked file deleted in the work tree is listed too
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def make_venv(path: Path) -> Path:
    """A fresh venv that imports this interpreter's packages but runs none of its .pth hooks; its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    dirs = list(dict.fromkeys([*site.getsitepackages(), sysconfig.get_paths()["purelib"]]))
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        dirs.append(site.getusersitepackages())
    Path(purelib, "_outer_site_packages.pth").write_text("\n".join(dirs) + "\n")
    return python


def offline_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "PYTHONPATH"}
    # no pip.conf either: this machine's find-links and constraints are not on the device machine
    env.update(PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_CACHE_DIR="1")
    return env


def pip_install(python: Path, tree: Path, *extra: str) -> None:
    proc = subprocess.run([str(python), "-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation",
                           *extra], cwd=tree, env=offline_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (f"offline `pip install {' '.join(extra)}` failed (exit {proc.returncode}):\n"
                                  f"{proc.stdout[-2500:]}\n{proc.stderr[-4000:]}")


def probe(python: Path, cwd: Path) -> tuple[Path, Path]:
    proc = subprocess.run([str(python), "-c", _PROBE], cwd=cwd, env=offline_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"`import gafh_fast.kernels` from {cwd} failed:\n{proc.stderr[-3000:]}"
    pkg, kernels, is_op = json.loads(proc.stdout.strip().splitlines()[-1])
    assert is_op
    return Path(pkg).resolve().parent, Path(kernels).resolve().parent


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return copy_tree(tmp_path_factory.mktemp("checkout").resolve())


def test_editable_install_offline(tree, tmp_path):
    python = make_venv(tmp_path / "venv")
    pip_install(python, tree, "-e", ".")
    elsewhere = tmp_path.resolve() / "elsewhere"
    elsewhere.mkdir()
    for cwd in (tree, elsewhere):  # editable: the tree's own files either way
        assert probe(python, cwd) == (tree / "gafh_fast", tree / "kernels"), f"from {cwd}"


def test_copy_install_offline(tree, tmp_path):
    python = make_venv(tmp_path / "venv")
    pip_install(python, tree, ".")
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip()).resolve()
    # from the checkout's root the source tree comes first on sys.path; it must be a whole package
    assert probe(python, tree) == (tree / "gafh_fast", tree / "kernels")
    elsewhere = tmp_path.resolve() / "elsewhere"
    elsewhere.mkdir()
    assert probe(python, elsewhere) == (purelib / "gafh_fast", purelib / "gafh_fast" / "kernels")
    # nothing installs a top-level module named `kernels`: every installed file is under gafh_fast/
    record = next(purelib.glob("gafh_fast-*.dist-info")) / "RECORD"
    tops = {line.split(",")[0].split("/")[0] for line in record.read_text().splitlines() if line}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"gafh_fast"}, tops

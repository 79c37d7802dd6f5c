"""What every bench suite shares: timing, peak memory, the row format, the environment, the table, JSON.

A row is a dict with the keys of ROW_KEYS (make_row fills the missing ones with None):
  suite, name      which suite and what was timed ("G fwd", "IDB fwd+bwd", "GAN step", ...)
  path             the project's path or variant this row times ("triton", "bf16 fused step", ...)
  baseline         what `speedup` compares against (None on a baseline row itself)
  batch            images per call
  ms               median milliseconds per call
  img_s            images per second (batch / ms)
  tflops           achieved TFLOP/s from the analytical count (gafh_fast.flops)
  mfu              tflops / the card's dense bf16 peak; None where the card is unknown (printed n/a)
  speedup          baseline ms / this row's ms
  peak_mem_mb      peak device memory allocated during the timed calls, MiB (CUDA only)
  status           "ok" | "skipped" | "error"
  note             why a row was skipped, what failed, or anything a reader needs to trust the number
Suites may add keys (dtype, spread_pct, ...); the table shows the standard ones and the JSON keeps all.

Timing: warm-up calls first (autotune, cudnn.benchmark and compilation stay out of the numbers),
then `repeats` timed calls, each on the next of several input sets so that a cache holding the last
input is not what gets measured; the median is reported and the spread (max-min over median) kept
so a reader can tell a difference from noise. On CUDA each call is bracketed by CUDA events.
"""
from __future__ import annotations

import datetime
import gc
import importlib.metadata
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from gafh_fast.flops import mfu as _mfu
from gafh_fast.flops import peak_bf16_tflops

REPO_ROOT = Path(__file__).resolve().parents[1]
ROW_KEYS = ("suite", "name", "path", "baseline", "batch", "ms", "img_s", "tflops", "mfu", "speedup",
            "peak_mem_mb", "status", "note")


# ----------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------
def make_row(suite: str, name: str, **fields: Any) -> dict:
    row = {key: None for key in ROW_KEYS}
    row.update(suite=suite, name=name, status="ok")
    row.update(fields)
    return row


def skipped_row(suite: str, name: str, reason: str, **fields: Any) -> dict:
    return make_row(suite, name, status="skipped", note=reason, **fields)


def error_row(suite: str, name: str, message: str) -> dict:
    return make_row(suite, name, status="error", note=message)


def normalise_row(row: dict, peak_tflops: Optional[float]) -> dict:
    """Bring a suite's row to the standard keys: img_per_s -> img_s, detail -> note, {"skipped": reason}
    -> status skipped, status error from an `error` key, `speedup_vs_X` -> speedup + baseline X, ms and
    img/s from each other, TFLOP/s from `flops_per_image`, MFU from TFLOP/s and the card's peak. Keys already set are kept; extra keys
    stay as they are (the JSON keeps them)."""
    row = dict(row)
    for alias, key in (("img_per_s", "img_s"), ("images_per_s", "img_s"), ("detail", "note")):
        if row.get(key) is None and row.get(alias) is not None:
            row[key] = row[alias]
    if isinstance(row.get("skipped"), str) and row.get("status") is None:  # {"skipped": reason}
        row["status"], row["note"] = "skipped", row["skipped"]
    for key in list(row):
        if key.startswith("speedup_vs_") and row.get("speedup") is None:
            row["speedup"] = row[key]
            if row.get("baseline") is None and row.get("path") != key[len("speedup_vs_"):]:
                row["baseline"] = key[len("speedup_vs_"):]
    if row.get("status") is None:
        row["status"] = "error" if row.get("error") else "ok"
    if row.get("error") and not row.get("note"):
        row["note"] = str(row["error"])
    if row.get("img_s") is None and row.get("ms") and row.get("batch"):
        row["img_s"] = row["batch"] * 1000.0 / row["ms"]
    if row.get("ms") is None and row.get("img_s") and row.get("batch"):
        row["ms"] = row["batch"] * 1000.0 / row["img_s"]
    if row.get("tflops") is None and row.get("flops_per_image") and row.get("img_s"):
        row["tflops"] = row["flops_per_image"] * row["img_s"] / 1e12
    if row.get("mfu") is None and row.get("tflops") is not None and peak_tflops:
        row["mfu"] = row["tflops"] / peak_tflops
    for key in ROW_KEYS:
        row.setdefault(key, None)
    return row


def throughput_fields(ms: float, batch: int, flops_per_image: Optional[float],
                      peak_tflops: Optional[float]) -> dict:
    """ms per call of `batch` images -> img/s, TFLOP/s and MFU (None where the count or the peak is unknown)."""
    img_s = batch * 1000.0 / ms
    tflops = flops_per_image * img_s / 1e12 if flops_per_image else None
    util = _mfu(flops_per_image, img_s, peak_tflops) if flops_per_image else None
    return {"ms": ms, "img_s": img_s, "tflops": tflops, "mfu": util}


def add_speedups(rows: list[dict]) -> list[dict]:
    """Fill `speedup` = baseline ms / row ms for rows whose `baseline` names another row's `path`
    with the same suite, name and batch."""
    by_key = {(r["suite"], r["name"], r["batch"], r["path"]): r for r in rows if r.get("ms")}
    for r in rows:
        base = by_key.get((r["suite"], r["name"], r["batch"], r.get("baseline")))
        if r.get("ms") and base is not None and r.get("speedup") is None:
            r["speedup"] = base["ms"] / r["ms"]
    return rows


# ----------------------------------------------------------------------------------------------
# Devices and timing
# ----------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def peak_tflops_for(device: torch.device) -> Optional[float]:
    """The card's dense bf16 peak; None on CPU and on cards the table does not know (MFU prints n/a)."""
    return peak_bf16_tflops(device_name(device)) if device.type == "cuda" else None


def time_calls(fn: Callable[[Any], Any], inputs: Sequence[Any], device: torch.device, *,
               warmup: int, repeats: int) -> dict:
    """Median ms of fn(inputs[i % len(inputs)]) over `repeats` calls after `warmup` calls, and the
    peak device memory allocated during the timed calls (CUDA)."""
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    times: list[float] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        for i in range(repeats):
            starts[i].record()
            fn(inputs[i % len(inputs)])
            ends[i].record()
        torch.cuda.synchronize(device)  # a device sync point: the events are read after it
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        for i in range(repeats):
            t0 = time.perf_counter()
            fn(inputs[i % len(inputs)])
            times.append((time.perf_counter() - t0) * 1000.0)
        peak = None
    median = statistics.median(times)
    return {"ms": median, "spread_pct": 100.0 * (max(times) - min(times)) / median,
            "peak_mem_mb": peak, "repeats": repeats}


def free_device_memory(device: torch.device) -> None:
    gc.collect()  # drop the last variant's modules and engines before the next one measures its peak
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------
def _dist_version(*names: str) -> Optional[str]:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _dali_version() -> Optional[str]:
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith("nvidia-dali"):
            return f"{dist.metadata['Name']} {dist.version}"
    return None


def git_state() -> dict:
    """The measured commit. GAFH_GIT_COMMIT (and GAFH_GIT_DIRTY=0|1) win: the device machine's copy of the
    tree has no .git, and a repository found in a folder above the tree is someone else's (the first GPU
    run recorded such a commit). Otherwise git is asked, but only a repository whose top level is this tree."""
    if os.environ.get("GAFH_GIT_COMMIT"):
        return {"commit": os.environ["GAFH_GIT_COMMIT"],
                "dirty": {"1": True, "0": False}.get(os.environ.get("GAFH_GIT_DIRTY", "")),
                "commit_source": "GAFH_GIT_COMMIT"}

    def git(*args: str) -> Optional[str]:
        try:
            out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != REPO_ROOT.resolve():
        return {"commit": None, "dirty": None,
                "commit_source": "unknown: this tree is not a git checkout and GAFH_GIT_COMMIT is not set"}
    status = git("status", "--porcelain")  # untracked files count: they are not in the commit either
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status),
            "commit_source": "git"}


def env_info(device: torch.device) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": device.type,
        "device_name": device_name(device),
        "peak_bf16_tflops": peak_tflops_for(device),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1min": os.getloadavg()[0],  # >0 before we start: the CPU was shared (CPU rows are noisy)
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": _dist_version("triton", "pytorch-triton"),
        "deepspeed": _dist_version("deepspeed"),
        "dali": _dali_version(),
    }
    info.update(git_state())
    return info


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
_COLUMNS = (("suite", "{}"), ("name", "{}"), ("path", "{}"), ("baseline", "{}"), ("batch", "{}"),
            ("ms", "{:.3f}"), ("img/s", "{:.1f}"), ("TFLOP/s", "{:.3g}"), ("MFU", "{:.1%}"),
            ("speedup", "{:.2f}x"), ("x floor", "{:.1f}x"), ("peak MiB", "{:.0f}"), ("status", "{}"))
_KEY = {"img/s": "img_s", "TFLOP/s": "tflops", "MFU": "mfu", "peak MiB": "peak_mem_mb", "x floor": "x_floor"}


def _cell(row: dict, column: str, fmt: str) -> str:
    value = row.get(_KEY.get(column, column))
    if value is None:
        # MFU of a timed row on a card of unknown peak: say so rather than guess or leave a blank
        return "n/a" if column == "MFU" and row.get("tflops") is not None else ""
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


_MAX_WIDTH = 44  # longer names and paths are cut in the table (the JSON keeps them whole)


def format_table(rows: list[dict]) -> str:
    """The standard columns, each as wide as its widest cell; then one line per row that was not ok."""
    cells = [[_cell(row, c, f) for c, f in _COLUMNS] for row in rows]
    cells = [[c if len(c) <= _MAX_WIDTH else c[:_MAX_WIDTH - 1] + "~" for c in line] for line in cells]
    widths = [max([len(c)] + [len(line[i]) for line in cells]) for i, (c, _) in enumerate(_COLUMNS)]
    lines = ["  ".join(c.ljust(w) for (c, _), w in zip(_COLUMNS, widths)).rstrip()]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in cells]
    for row in rows:
        if row.get("note") and row.get("status") != "ok":
            lines.append(f"  [{row.get('suite')} / {row.get('name')} / {row.get('path') or '-'}] "
                         f"{row['status']}: {row['note']}")
    return "\n".join(lines)


def write_json(path: str, env: dict, rows: list[dict]) -> None:
    import json

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps({"env": env, "rows": rows}, indent=1, default=str))
    os.replace(tmp, path)  # atomic: a killed run never leaves half a JSON file


def markdown_rows(data: dict) -> str:
    """bench/RESULTS.md table rows for the `ok` rows of a JSON this script wrote (date, card, commit,
    command, then the numbers), so a session copies measured values instead of retyping them."""
    env = data["env"]
    card = env["device_name"]
    commit = (env.get("commit") or "?")[:10] + ("+dirty" if env.get("dirty") else "")
    shared = ""
    if env.get("device") == "cpu" and env.get("loadavg_1min") is not None:
        shared = f"CPU load {env['loadavg_1min']:.1f} on {env.get('cpu_count')} cores at start"
    out = []
    for r in data["rows"]:
        if r.get("status") != "ok" or not r.get("ms"):
            continue
        nums = [_cell(r, c, f) for c, f in _COLUMNS if c in ("ms", "img/s", "TFLOP/s", "MFU", "speedup", "peak MiB")]
        notes = [f"spread {r['spread_pct']:.0f}% over {r.get('repeats')} repeats"] if r.get("spread_pct") is not None else []
        notes += [shared] if shared else []
        if r.get("x_floor"):  # bench/floors.py: the cost model's time for this row's work
            notes.append(f"{r['x_floor']:.1f}x its floor {r['floor_ms']:.3f} ms ({r['floor_of']})")
        out.append("| " + " | ".join([env["date"][:16].replace("T", " "), card, commit, f"`{env['command']}`",
                                      r["suite"], r["name"], str(r["path"] or ""), str(r.get("baseline") or ""),
                                      str(r["batch"]), *nums, "; ".join(notes)]) + " |")
    return "\n".join(out)

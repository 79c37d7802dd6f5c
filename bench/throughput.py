"""Measure every speed claim of gafh_fast side by side: the project's path against its baseline, same process.

    python bench/throughput.py [--suite kernels,model,train,data,infer | all] [--device auto|cuda|cpu]
                               [--batch 8,64,256] [--smoke] [--json out.json]

Prints one table (suite, name, path, baseline, batch, ms, img/s, TFLOP/s, MFU, speedup, peak memory)
and writes JSON {"env": device, versions, git commit, command, date; "rows": [...]}. The suites live
in bench/<suite>_suite.py and are imported one at a time, so a missing or broken suite is an error
row, never an import crash. Exit code: 0 when no row is an error, 1 otherwise. See bench/README.md.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import signal
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))         # `import common`, `import model_suite`
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))     # `import bench.common` works too

import torch  # noqa: E402

from common import (env_info, error_row, format_table, markdown_rows, normalise_row,  # noqa: E402
                    resolve_device, skipped_row, write_json)
from floors import annotate  # noqa: E402

SUITES = ("kernels", "model", "train", "data", "infer")


class Terminated(BaseException):
    """SIGTERM (e.g. gpu_suite.sh's per-stage `timeout`). A BaseException, so that a suite's
    `except Exception` around one variant cannot swallow it; main() records it and writes the JSON."""


def _raise_terminated(signum, frame):
    raise Terminated(f"terminated by signal {signum} (a stage timeout?) while this suite ran")


class _Tee(io.StringIO):
    """Keeps what a suite prints (for the reason an empty suite gives) while still printing it."""

    def write(self, text: str) -> int:
        sys.__stdout__.write(text)
        return super().write(text)


def _run_suite(module, suite: str, device: str, batches: list[int] | None, smoke: bool) -> list[dict]:
    kwargs: dict = {"smoke": smoke}
    if batches:  # each suite takes its batch size(s) under its own keyword
        if suite in ("kernels", "model"):
            kwargs["batches"] = tuple(batches)
        elif suite in ("train", "infer"):
            kwargs["batch"] = batches[-1]
        elif suite == "data":
            kwargs["batch_size"] = batches[-1]
    return [dict(row, suite=row.get("suite") or suite) for row in module.run(device, **kwargs)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="all", help=f"comma-separated subset of {','.join(SUITES)}, or all")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--batch", default=None, help="batch size(s), comma-separated (default: each suite's own)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and few repeats (CI)")
    parser.add_argument("--json", default=None, help="write the environment and every row here")
    parser.add_argument("--markdown", default=None, metavar="JSON",
                        help="print bench/RESULTS.md rows for the ok rows of a JSON written earlier, and exit")
    args = parser.parse_args(argv)
    if args.markdown:  # JSONs written before bench/floors.py get their floors here
        data = json.loads(Path(args.markdown).read_text())
        annotate(data["rows"], data["env"].get("device_name"))
        print(markdown_rows(data))
        return 0

    suites = SUITES if args.suite == "all" else tuple(s.strip() for s in args.suite.split(",") if s.strip())
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        parser.error(f"unknown suite(s) {unknown}; choose from {', '.join(SUITES)} or all")
    batches = [int(b) for b in args.batch.split(",")] if args.batch else None
    try:
        device = resolve_device(args.device)
    except RuntimeError as e:
        parser.error(str(e))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every eager baseline gets cuDNN's best algorithm
    env = env_info(device)
    print(f"# {env['device_name']} | torch {env['torch']} | triton {env['triton']} | deepspeed "
          f"{env['deepspeed']} | dali {env['dali']} | commit {env['commit']}{' (dirty)' if env['dirty'] else ''}",
          flush=True)

    signal.signal(signal.SIGTERM, _raise_terminated)
    rows: list[dict] = []
    for suite in suites:
        print(f"# suite {suite} ...", flush=True)
        module = None
        try:
            module = importlib.import_module(f"{suite}_suite")
            with contextlib.redirect_stdout(_Tee()) as printed:
                suite_rows = _run_suite(module, suite, device.type, batches, args.smoke)
            said = printed.getvalue().strip().splitlines()
            rows += [normalise_row(r, env["peak_bf16_tflops"]) for r in suite_rows] or [
                skipped_row(suite, "(suite)", f"no rows; the suite said: {said[-1] if said else '(nothing)'}")]
        except Terminated as e:  # keep the rows a suite had finished, if it exposes them
            rows += [normalise_row(r, env["peak_bf16_tflops"]) for r in getattr(module, "partial_rows", [])]
            rows.append(error_row(suite, "(suite)", str(e)))
            break
        except Exception as e:  # reported as a row and in the exit code, never swallowed
            traceback.print_exc()
            rows.append(error_row(suite, "(suite)", f"{type(e).__name__}: {e}"))
        finally:
            annotate(rows, env["device_name"])  # each kernels row's floor (bench/floors.py)
            if args.json:  # after every suite, so a later hang or kill keeps what was measured
                write_json(args.json, env, rows)
    print(format_table(rows))
    errors = [r for r in rows if r.get("status") == "error"]
    if errors:
        print(f"# {len(errors)} error row(s)", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

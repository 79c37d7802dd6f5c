"""pytest plugin for tests/mutation/run.py: which test executes which line of the mutation targets.

    MUTATION_TARGETS=a.py:b.py MUTATION_MAP=out.json python -m pytest -p tracer ...

Writes {"lines": {file: {line: [nodeid, ...]}}, "durations": {nodeid: s}, "failed": [nodeid, ...],
"shared": {nodeid: [module/session-scoped fixtures it uses]}}.
Lines run outside any test (imports, class bodies, collection) are listed under the nodeid "".
A plain sys.settrace tracer (no coverage dependency): a global hook that only descends into frames
of the target files, so the rest of the suite runs at near full speed.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time

import pytest

_TARGETS = {os.path.realpath(p) for p in os.environ.get("MUTATION_TARGETS", "").split(os.pathsep) if p}
_OUT = os.environ.get("MUTATION_MAP", "mutation_map.json")
_known: dict[str, str | None] = {}
_hits: dict[str, dict[int, set]] = {}
_current = [""]
_durations: dict[str, float] = {}
_failed: list[str] = []
_shared: dict[str, list[str]] = {}  # nodeid -> its fixtures of module/class/session scope


def _target(filename: str):
    if filename not in _known:
        real = os.path.realpath(filename)
        _known[filename] = real if real in _TARGETS else None
    return _known[filename]


def _local(frame, event, arg):
    if event == "line":
        _hits[_known[frame.f_code.co_filename]].setdefault(frame.f_lineno, set()).add(_current[0])
    return _local


def _global(frame, event, arg):
    real = _target(frame.f_code.co_filename)
    if real is None:
        return None
    _hits.setdefault(real, {}).setdefault(frame.f_lineno, set()).add(_current[0])
    return _local


# from the plugin's import on, before any target module is collected
sys.settrace(_global)
threading.settrace(_global)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _current[0] = item.nodeid
    info = getattr(item, "_fixtureinfo", None)
    if info is not None:  # a shared fixture's lines are traced under whichever test set it up first
        # the suite's own module/class/session fixtures (run dirs); pytest's (tmp_path_factory, ...) have no baseid
        _shared[item.nodeid] = sorted(f"{defs[-1].baseid}::{name}" for name, defs in info.name2fixturedefs.items()
                                      if defs and defs[-1].scope != "function" and defs[-1].baseid)
    t0 = time.perf_counter()
    yield
    _durations[item.nodeid] = time.perf_counter() - t0
    _current[0] = ""


def pytest_runtest_logreport(report):
    if report.failed and report.nodeid not in _failed:
        _failed.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    sys.settrace(None)
    threading.settrace(None)
    lines = {f: {str(n): sorted(ids) for n, ids in sorted(per.items())} for f, per in _hits.items()}
    with open(_OUT, "w") as f:
        json.dump({"lines": lines, "durations": _durations, "failed": _failed, "shared": _shared}, f)

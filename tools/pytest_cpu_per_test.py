"""pytest plugin: the CPU-seconds each test costs the machine, its subprocesses included.

`--durations` gives wall time, which on a shared or 2-core machine mixes a test's own work with
waiting for the other xdist worker. This plugin puts each pytest process (each xdist worker, or
the single process of `-n 0`) in a cgroup of its own, `<CGROUP_ROOT>/vfnet-<worker>`, so that every
process a test starts (Ray's raylets and workers, `ray start`, compile jobs, subprocess CLIs)
counts too, and appends one line per test: CPU-seconds, wall seconds, worker, start and end
(Unix time), test id. Needs cgroup v1's `cpuacct` controller and the right to create cgroups
(root). Used for benchmarks/NOTES.md, "Where the CPU goes, per test":

    PYTHONPATH=tools CPU_PER_TEST_OUT=/tmp/cpu.tsv python -m pytest -q -n 2 -p pytest_cpu_per_test
    sort -rn /tmp/cpu.tsv | head      # the most expensive tests

Processes a test leaves running (a Ray cluster shutting down) are charged to the next test of
the same worker.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

CGROUP_ROOT = Path("/sys/fs/cgroup/cpuacct")
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")
OUT = Path(os.environ.get("CPU_PER_TEST_OUT", "cpu_per_test.tsv"))


def _cgroup() -> Path:
    return CGROUP_ROOT / f"vfnet-{WORKER}"


def pytest_configure(config: pytest.Config) -> None:
    _cgroup().mkdir(exist_ok=True)
    (_cgroup() / "tasks").write_text(str(os.getpid()))


def _cpu_seconds() -> float:
    return int((_cgroup() / "cpuacct.usage").read_text()) / 1e9


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    cpu, start = _cpu_seconds(), time.time()
    yield
    end = time.time()
    with OUT.open("a") as fh:
        fh.write(f"{_cpu_seconds() - cpu:.2f}\t{end - start:.2f}\t{WORKER}\t{start:.1f}\t{end:.1f}\t{item.nodeid}\n")

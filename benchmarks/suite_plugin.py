"""pytest plugin of `benchmarks.suite`: a per-test time limit without pytest-timeout (absent on
the GPU machine). `-p benchmarks.suite_plugin`; the limit in seconds comes from
`VFNET_TEST_TIMEOUT` (default 120). A test over it fails with TimeoutError and the session goes
on with the next test (SIGALRM: it interrupts Python code, not a running CUDA call)."""
from __future__ import annotations

import os
import signal

import pytest


def _expired(signum, frame):
    raise TimeoutError(f"test exceeded VFNET_TEST_TIMEOUT = {os.environ.get('VFNET_TEST_TIMEOUT', '120')} s")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    limit = int(os.environ.get("VFNET_TEST_TIMEOUT", "120"))
    previous = signal.signal(signal.SIGALRM, _expired)
    signal.alarm(limit)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)

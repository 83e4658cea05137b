"""Test-suite set-up.

Triton reads `TRITON_INTERPRET` when `@triton.jit` decorates a kernel, so it is decided here,
before any kernel module is imported (docs/design.md §6), unless the caller set it:
- without CUDA: `1`, the Triton kernels themselves run on CPU tensors through the interpreter
  (CI); tests marked `interpret` check them that way.
- with CUDA: `0`, the `gpu` tests run the compiled kernels. The `interpret` tests are skipped
  then (on CPU tensors they would only meet the references); run them with `TRITON_INTERPRET=1`.
"""
import os

import torch

if "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "0" if torch.cuda.is_available() else "1"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

import pytest  # noqa: E402

from kernels.dispatch import interpreter_enabled  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n 2` (the README's test command): each worker process gets one of the two cores
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    _group_for_workers(items)
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_interpret = pytest.mark.skip(reason="runs the Triton kernels through the interpreter: "
                                      "TRITON_INTERPRET=1 (the default without CUDA)")
    for item in items:
        if "gpu" in item.keywords:
            if not torch.cuda.is_available():
                item.add_marker(skip_gpu)
        elif "interpret" in item.keywords and not interpreter_enabled():
            item.add_marker(skip_interpret)


def _group_for_workers(items) -> None:
    """Scheduling for pytest-xdist's `--dist loadgroup`: every test of a module runs in one worker,
    so module fixtures (the exports) are built once; every Ray test in one more group, "ray", so one
    local Ray runs at a time (the cluster tests start and kill raylets on this machine). The long
    groups go first, each worker takes the next group when it is nearly done with its own: "ray"
    (mostly waiting for Ray's start-up and failure detection), then modules with `slow` tests, then
    the rest in collection order. Without xdist the markers do nothing and only the order changes."""
    def group(item) -> str:
        return "ray" if "ray" in item.keywords else item.nodeid.split("::")[0]

    slow = {group(item) for item in items if "slow" in item.keywords}
    rank = {name: (name != "ray", name not in slow) for name in map(group, items)}
    items.sort(key=lambda item: rank[group(item)])  # stable: collection order within a rank
    for item in items:
        item.add_marker(pytest.mark.xdist_group(group(item)))


@pytest.fixture
def one_thread():
    """One intra-op torch thread for the test: small convs on a 2-core CPU run several times
    slower with two threads when anything else is running."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def seeded():
    """A fresh, reproducible-per-test random state."""
    torch.manual_seed(0)
    return torch.Generator().manual_seed(0)

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


RAY_TESTS = "tests/orchestration/"  # the Ray tests, and a few quick ones beside them


def worker_group(nodeid: str) -> str:
    """Which tests one pytest-xdist worker runs together (`pytest -n 2`, the README's command):
    all of a test module, so its module fixtures (the exports) are built once, and every test under
    `RAY_TESTS` in one group, "ray", so that one local Ray runs at a time (the cluster tests start
    and kill raylets on this machine)."""
    path = nodeid.split("::", 1)[0]
    return "ray" if path.startswith(RAY_TESTS) else path


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    """xdist's scheduling by scope (whatever `--dist` says), the scope being `worker_group`; the
    groups go out in collection order (not xdist's largest-first), which
    `pytest_collection_modifyitems` sets: the long ones first."""
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return worker_group(nodeid)

    return GroupScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    _long_groups_first(items)
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_interpret = pytest.mark.skip(reason="runs the Triton kernels through the interpreter: "
                                      "TRITON_INTERPRET=1 (the default without CUDA)")
    for item in items:
        if "gpu" in item.keywords:
            if not torch.cuda.is_available():
                item.add_marker(skip_gpu)
        elif "interpret" in item.keywords and not interpreter_enabled():
            item.add_marker(skip_interpret)


def _long_groups_first(items) -> None:
    """Order the tests so that each xdist worker takes the next group when it is nearly done with
    its own, longest first: "ray" (mostly waiting for Ray's start-up and failure detection), then
    the modules with `slow` tests, then the rest in collection order (stable within a group).
    Without xdist only the order changes."""
    slow = {worker_group(item.nodeid) for item in items if "slow" in item.keywords}
    items.sort(key=lambda item: (worker_group(item.nodeid) != "ray", worker_group(item.nodeid) not in slow))


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

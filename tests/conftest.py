"""Test-suite set-up.

`TRITON_INTERPRET=1` is read when `@triton.jit` decorates a kernel, so it is set here, before any
kernel module is imported: the Triton kernels themselves then run on CPU tensors (DESIGN.md §6).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


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

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


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_interpret = pytest.mark.skip(reason="runs the Triton kernels through the interpreter: "
                                      "TRITON_INTERPRET=1 (the default without CUDA)")
    for item in items:
        if "gpu" in item.keywords:
            if not torch.cuda.is_available():
                item.add_marker(skip_gpu)
        elif "interpret" in item.keywords and not interpreter_enabled():
            item.add_marker(skip_interpret)


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

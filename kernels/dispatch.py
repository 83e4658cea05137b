"""Per-call choice between the Triton kernels and their PyTorch references.

Rules (docs/design.md §2):
- `VFNET_KERNELS=torch` forces the reference everywhere.
- CUDA tensors use Triton.
- CPU tensors use the reference, except under `TRITON_INTERPRET=1`, where the Triton kernels run
  on the CPU through Triton's interpreter (that is how CI tests them).
- `VFNET_DEBUG=1` turns on value checks (which would force a host-device sync) for CUDA tensors;
  they always run for CPU tensors.
"""
from __future__ import annotations

import os

import torch

_FORCE_ENV = "VFNET_KERNELS"
_DEBUG_ENV = "VFNET_DEBUG"


def interpreter_enabled() -> bool:
    """True when Triton kernels run through the interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def reference_forced() -> bool:
    """True when `VFNET_KERNELS=torch` asks for the PyTorch references everywhere."""
    value = os.environ.get(_FORCE_ENV, "").strip().lower()
    if value not in ("", "auto", "torch", "triton"):
        raise ValueError(f"{_FORCE_ENV} must be 'torch', 'triton' or 'auto', got {value!r}")
    return value == "torch"


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether an op whose inputs live on `tensor.device` runs its Triton kernel."""
    if reference_forced():
        return False
    if tensor.device.type == "cuda":
        return True
    return tensor.device.type == "cpu" and interpreter_enabled()


def value_checks_enabled(tensor: torch.Tensor) -> bool:
    """Whether checks that read tensor values (and so sync a GPU) should run."""
    return tensor.device.type == "cpu" or os.environ.get(_DEBUG_ENV, "0") == "1"

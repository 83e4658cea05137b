"""Per-call choice between the Triton kernels and their PyTorch references.

Rules (docs/design.md §2), by `VFNET_KERNELS`:
- unset or `auto`: CUDA tensors use Triton; CPU tensors use the reference, except under
  `TRITON_INTERPRET=1`, where the Triton kernels run on the CPU through Triton's interpreter (that
  is how CI tests them).
- `torch`: the reference everywhere.
- `triton`: the Triton kernels everywhere they can run (CUDA tensors; CPU tensors under
  `TRITON_INTERPRET=1`); a call whose tensors are elsewhere raises RuntimeError instead of
  quietly running the reference.
Any other value raises ValueError.

`VFNET_DEBUG=1` turns on value checks (which would force a host-device sync) for CUDA tensors;
they always run for CPU tensors.
"""
from __future__ import annotations

import os

import torch

_FORCE_ENV = "VFNET_KERNELS"
_DEBUG_ENV = "VFNET_DEBUG"
CHOICES = ("auto", "torch", "triton")


def interpreter_enabled() -> bool:
    """True when Triton kernels run through the interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def forced() -> str:
    """`VFNET_KERNELS` as one of CHOICES ("auto" when unset or empty); ValueError otherwise."""
    value = os.environ.get(_FORCE_ENV, "").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"{_FORCE_ENV} must be 'torch', 'triton' or 'auto', got {value!r}")
    return value


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether an op whose inputs live on `tensor.device` runs its Triton kernel. Under
    `VFNET_KERNELS=triton`, True or RuntimeError (the kernels cannot run on that device)."""
    choice = forced()
    if choice == "torch":
        return False
    runs = tensor.device.type == "cuda" or (tensor.device.type == "cpu" and interpreter_enabled())
    if choice == "triton" and not runs:
        where = ("CPU tensors need TRITON_INTERPRET=1 (set before the kernels are imported)"
                 if tensor.device.type == "cpu" else "they run on CUDA tensors only")
        raise RuntimeError(f"{_FORCE_ENV}=triton forces the Triton kernels, but they cannot run on "
                           f"{tensor.device} here: {where}; unset {_FORCE_ENV} (or set it to 'auto') "
                           "for the PyTorch reference")
    return runs


def value_checks_enabled(tensor: torch.Tensor) -> bool:
    """Whether checks that read tensor values (and so sync a GPU) should run."""
    return tensor.device.type == "cpu" or os.environ.get(_DEBUG_ENV, "0") == "1"

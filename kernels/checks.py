"""Argument checks shared by the ops in `kernels`, and the dtype they compute in.

A wrong type or dtype raises TypeError, a wrong device ValueError, each naming the argument.
(Which implementation runs is `kernels.dispatch`'s business.)
"""
from __future__ import annotations

import torch


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """Raise ValueError naming the first argument whose device differs from the first one's."""
    items = [(name, t) for name, t in tensors.items() if t is not None]
    if not items:
        return
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; "
                "all inputs must be on the same device"
            )


def check_tensor(name: str, value: object) -> torch.Tensor:
    """Raise TypeError unless `value` is a torch.Tensor; return it."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float(name: str, value: torch.Tensor) -> None:
    """Raise TypeError unless `value` has one of the supported floating dtypes."""
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {value.dtype}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels compute in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32

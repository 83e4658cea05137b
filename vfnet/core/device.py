"""The torch device a config's `train.device` names."""
from __future__ import annotations

import os

import torch

from vfnet.core.errors import ConfigError


def resolve_device(spec: str) -> torch.device:
    """`train.device` -> a torch device: "auto" = CUDA when available (the LOCAL_RANK-th GPU under
    a launcher that sets it, else the current one), otherwise the CPU."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device = 'cuda' but no CUDA device is available")
        local = os.environ.get("LOCAL_RANK")
        index = int(local) % torch.cuda.device_count() if local else torch.cuda.current_device()
        return torch.device("cuda", index)
    return torch.device(spec)

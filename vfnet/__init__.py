"""VarifocalNet: the detector, its data, training engine and inference API.

`from vfnet import Detector` (see `vfnet.api`) is imported lazily, so that `import vfnet.config`
stays light.
"""
from __future__ import annotations

__all__ = ["Detections", "Detector"]


def __getattr__(name: str):
    if name in __all__:
        from vfnet import api

        return getattr(api, name)
    raise AttributeError(f"module 'vfnet' has no attribute {name!r}")

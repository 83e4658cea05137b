"""VarifocalNet: the detector, its data, training engine and inference API.

The package is cut into areas: `core/` (config, errors, atomic writes, optional imports, the
checkpoint format), `model/` (the detector and its parts), `data/` (data sets, transforms,
loaders), `train/` (the engine), `interop/` (mmdetection conversion, export), `evaluate`
(COCO evaluation), `api` (the public API) and `cli` (the `vfnet` command).

`from vfnet import Detector, load_model` (see `vfnet.api`) is imported lazily, so that
`import vfnet.core.config` stays light; it never imports the trainer.
"""
from __future__ import annotations

__all__ = ["Detections", "Detector", "LoadedModel", "load_model"]


def __getattr__(name: str):
    if name in __all__:
        from vfnet import api

        return getattr(api, name)
    raise AttributeError(f"module 'vfnet' has no attribute {name!r}")

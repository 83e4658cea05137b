"""Optional third-party packages, imported where they are used.

pycocotools (COCO evaluation), tomli_w (writing TOML: saved configs and checkpoints) and Ray
(`orchestration`) are imported only by the functions that need them, so the kernels, the model,
the data loaders and the benchmarks import on a machine without them (e.g. a bare GPU box).
"""
from __future__ import annotations

import importlib
from types import ModuleType

from vfnet.core.errors import MissingPackageError

# import name -> pip distribution name, where they differ
_DISTRIBUTIONS = {"tomli_w": "tomli-w", "mlflow": "mlflow-skinny"}


def require(module: str, purpose: str) -> ModuleType:
    """`importlib.import_module(module)`, or MissingPackageError (a ModuleNotFoundError and a
    `UserError`) with one line naming the package to install and what it is needed for
    (`purpose`, e.g. "COCO evaluation")."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        top = module.split(".")[0]
        if exc.name is None or exc.name.split(".")[0] != top:
            raise  # the package is there but one of its own imports failed: show that
        dist = _DISTRIBUTIONS.get(top, top)
        raise MissingPackageError(f"{purpose} needs {dist}: pip install {dist}", name=top) from None

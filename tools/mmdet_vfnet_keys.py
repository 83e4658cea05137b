"""Write the state-dict key names and shapes of mmdetection's own VFNet R-50 and R-101 models.

Run outside CI, in an environment with mmdetection 3.3.0, mmengine and mmcv (lite is enough):

    pip install mmdet==3.3.0 mmengine mmcv-lite==2.1.0   # plus torch
    python tools/mmdet_vfnet_keys.py --out tests/vfnet/data

It builds the models from mmdetection's shipped configs (`vfnet_r50_fpn_1x_coco.py`,
`vfnet_r101_fpn_1x_coco.py`, backbone init disabled: nothing is downloaded) and writes
`mmdet_vfnet_r50_keys.tsv` and `mmdet_vfnet_r101_keys.tsv` (one `name<TAB>shape` line a tensor,
shape as comma-separated ints, empty for a scalar), which the tests check `vfnet.interop.mmdet` against.

Shim: mmcv-lite has no compiled ops, and `import mmcv.ops` fails. Building a VFNet needs only
`mmcv.ops.DeformConv2d` (the star conv) to exist as a module holding the same parameters; the
rest of `mmcv.ops` is only imported by other mmdetection models. So when `mmcv.ops` cannot be
imported, a stand-in module is installed whose `DeformConv2d` holds one `weight`
[out, in / groups, k, k] (mmcv's own layout; bias is refused there, as by mmcv) and whose other
names are inert placeholders. The shim never runs a forward pass. With a full mmcv nothing is
shimmed.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.abc
import importlib.machinery
import sys
import types
from pathlib import Path

import torch
from torch import nn

MODELS = {"r50": "vfnet_r50_fpn_1x_coco.py", "r101": "vfnet_r101_fpn_1x_coco.py"}


class _ShimDeformConv2d(nn.Module):
    """Parameters of mmcv's DeformConv2d only (no forward)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, deform_groups=1, bias=False, im2col_step=32):
        super().__init__()
        if bias:
            raise ValueError("mmcv's DeformConv2d has no bias")
        k = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *k))


class _Placeholder:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("mmcv.ops shim: only DeformConv2d is available")


class _ShimModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _ShimDeformConv2d if name == "DeformConv2d" else _Placeholder


class _ShimFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves `mmcv.ops` and any `mmcv.ops.*` submodule from the shim."""

    def find_spec(self, fullname, path, target=None):
        if fullname == "mmcv.ops" or fullname.startswith("mmcv.ops."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _ShimModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def install_shim_if_needed() -> bool:
    try:
        importlib.import_module("mmcv.ops")
        return False
    except (ImportError, OSError):
        for name in [n for n in sys.modules if n == "mmcv.ops" or n.startswith("mmcv.ops.")]:
            del sys.modules[name]
        sys.meta_path.insert(0, _ShimFinder())
        return True


def build(config_name: str) -> nn.Module:
    import mmdet
    from mmdet.registry import MODELS as REGISTRY
    from mmdet.utils import register_all_modules
    from mmengine.config import Config

    register_all_modules()
    path = Path(mmdet.__file__).parent / ".mim" / "configs" / "vfnet" / config_name
    cfg = Config.fromfile(str(path))
    cfg.model.backbone.init_cfg = None  # no download
    return REGISTRY.build(cfg.model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tests/vfnet/data")
    args = parser.parse_args()
    shimmed = install_shim_if_needed()
    import mmdet

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for depth, config_name in MODELS.items():
        model = build(config_name)
        lines = [f"# mmdetection {mmdet.__version__} {config_name}"
                 + (" (mmcv.ops shimmed: DeformConv2d parameters only)" if shimmed else "")]
        lines += [f"{k}\t{','.join(str(s) for s in v.shape)}" for k, v in model.state_dict().items()]
        target = out / f"mmdet_vfnet_{depth}_keys.tsv"
        target.write_text("\n".join(lines) + "\n")
        print(f"{target}: {len(lines) - 1} tensors")


if __name__ == "__main__":
    main()

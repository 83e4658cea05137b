"""Write the state-dict key names and shapes of mmdetection's own VFNet models (the whole zoo).

Run outside CI, in an environment with mmdetection 3.3.0, mmengine and mmcv (lite is enough):

    pip install mmdet==3.3.0 mmengine mmcv-lite==2.1.0   # plus torch
    python tools/mmdet_vfnet_keys.py --out tests/vfnet/data

It builds one model per architecture of mmdetection's shipped VFNet configs (`MODELS`: R-50,
R-101, X-101-32x4d, X-101-64x4d and R2-101, each with and without DCN; backbone init disabled:
nothing is downloaded) and writes `mmdet_vfnet_<name>_keys.tsv` (one `name<TAB>shape` line a
tensor, shape as comma-separated ints, empty for a scalar), which the tests check
`vfnet.interop.mmdet` against.

Shim: mmcv-lite has no compiled ops, and `import mmcv.ops` fails. Building a VFNet needs only
`mmcv.ops.DeformConv2d` (the star conv) and, for the DCN models, the `DCNv2` conv layer
(`ModulatedDeformConv2dPack`) to exist as modules holding the same parameters; the rest of
`mmcv.ops` is only imported by other mmdetection models. So when `mmcv.ops` cannot be imported, a
stand-in module is installed whose `DeformConv2d` holds one `weight` [out, in / groups, k, k]
(mmcv's own layout; bias is refused there, as by mmcv) and whose other names are inert
placeholders, and a stand-in `DCNv2` layer is registered (`ShimModulatedDeformConv2dPack`: `weight`,
`bias` when asked for, `conv_offset` as mmcv's, the same initialisation; its forward, for
`tools/check_against_mmdet.py`, is a bilinear-sampling DCNv2 written with `grid_sample`, not
vfnet's kernels; the star-conv stand-in runs the same with an all-ones mask). With a full mmcv
nothing is shimmed.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.abc
import importlib.machinery
import math
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# key-list name -> mmdetection 3.3.0 config (one per architecture; the 1x, 2x and ms-2x configs of
# a backbone share their tensors)
MODELS = {
    "r50": "vfnet_r50_fpn_1x_coco.py",
    "r101": "vfnet_r101_fpn_1x_coco.py",
    "r50_dcn": "vfnet_r50-mdconv-c3-c5_fpn_ms-2x_coco.py",
    "r101_dcn": "vfnet_r101-mdconv-c3-c5_fpn_ms-2x_coco.py",
    "x101_32x4d": "vfnet_x101-32x4d_fpn_ms-2x_coco.py",
    "x101_32x4d_dcn": "vfnet_x101-32x4d-mdconv-c3-c5_fpn_ms-2x_coco.py",
    "x101_64x4d": "vfnet_x101-64x4d_fpn_ms-2x_coco.py",
    "x101_64x4d_dcn": "vfnet_x101-64x4d-mdconv-c3-c5_fpn_ms-2x_coco.py",
    "r2_101": "vfnet_res2net-101_fpn_ms-2x_coco.py",
    "r2_101_dcn": "vfnet_res2net101-mdconv-c3-c5_fpn_ms-2x_coco.py",
}


def grid_sample_dcn(x, offset, mask, weight, bias, stride, padding, dilation, groups):
    """DCNv2 by bilinear sampling (`F.grid_sample`, zero padding, cell-centred), one tap at a
    time: offset [B, 2*dg*k*k, Ho, Wo] as (dy, dx) per tap, mask [B, dg*k*k, Ho, Wo]. An
    implementation independent of vfnet's kernels, for the mmdetection side of the checks."""
    b, cin, h, w = x.shape
    cout, _, kh, kw = weight.shape
    taps = kh * kw
    dg = offset.shape[1] // (2 * taps)
    ho, wo = offset.shape[2:]
    ys = torch.arange(ho, dtype=x.dtype) * stride - padding
    xs = torch.arange(wo, dtype=x.dtype) * stride - padding
    base_y, base_x = torch.meshgrid(ys, xs, indexing="ij")
    columns = []
    for i in range(kh):
        for j in range(kw):
            k = i * kw + j
            sampled = []
            for g in range(dg):
                q = g * taps + k
                py = base_y + i * dilation + offset[:, 2 * q]
                px = base_x + j * dilation + offset[:, 2 * q + 1]
                # cell-centred normalisation (align_corners=False): exact for every map size,
                # 1-cell maps included, where the corner-aligned form divides by W - 1 = 0
                grid = torch.stack([(2 * px + 1) / w - 1, (2 * py + 1) / h - 1], -1)
                part = x[:, g * cin // dg:(g + 1) * cin // dg]
                value = F.grid_sample(part, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
                sampled.append(value * mask[:, q:q + 1])
            columns.append(torch.cat(sampled, 1))  # [B, Cin, Ho, Wo] for tap k
    cols = torch.stack(columns, 2)  # [B, Cin, taps, Ho, Wo]
    cols = cols.reshape(b, groups, cin // groups, taps, ho, wo)
    wmat = weight.reshape(groups, cout // groups, cin // groups, taps)
    out = torch.einsum("bgctyx,goct->bgoyx", cols, wmat).reshape(b, cout, ho, wo)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


class ShimModulatedDeformConv2dPack(nn.Module):
    """mmcv's `ModulatedDeformConv2dPack` (`DCNv2`): its parameters and initialisation, a
    `grid_sample_dcn` forward."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, deform_groups=1, bias=True):
        super().__init__()
        k = kernel_size if isinstance(kernel_size, int) else kernel_size[0]
        self.in_channels, self.out_channels, self.stride, self.padding, self.dilation, self.groups = (
            in_channels, out_channels, stride, padding, dilation, groups)
        self.kernel_size, self.transposed, self.output_padding = (k, k), False, (0, 0)  # what ConvModule reads
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, k, k))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.conv_offset = nn.Conv2d(in_channels, deform_groups * 3 * k * k, k, stride, padding, dilation,
                                     bias=True)
        self.init_weights()

    def init_weights(self):
        bound = 1.0 / math.sqrt(self.in_channels * self.weight.shape[2] * self.weight.shape[3])
        self.weight.data.uniform_(-bound, bound)
        if self.bias is not None:
            self.bias.data.zero_()
        self.conv_offset.weight.data.zero_()
        self.conv_offset.bias.data.zero_()

    def forward(self, x):
        o1, o2, mask = torch.chunk(self.conv_offset(x), 3, dim=1)
        return grid_sample_dcn(x, torch.cat((o1, o2), 1), torch.sigmoid(mask), self.weight, self.bias,
                               self.stride, self.padding, self.dilation, self.groups)


class _ShimDeformConv2d(nn.Module):
    """mmcv's DeformConv2d (DCNv1, the star conv): its parameters, a `grid_sample_dcn` forward."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, deform_groups=1, bias=False, im2col_step=32):
        super().__init__()
        if bias:
            raise ValueError("mmcv's DeformConv2d has no bias")
        k = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *k))
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups

    def forward(self, x, offset):
        mask = offset.new_ones(offset.shape[0], offset.shape[1] // 2, *offset.shape[2:])
        return grid_sample_dcn(x, offset, mask, self.weight, None, self.stride, self.padding, self.dilation,
                               self.groups)


class _Placeholder:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("mmcv.ops shim: only DeformConv2d is available")


class _ShimModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        if name == "DeformConv2d":
            return _ShimDeformConv2d
        if name == "ModulatedDeformConv2dPack":
            return ShimModulatedDeformConv2dPack
        return _Placeholder


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
        from mmengine.registry import MODELS as ROOT

        ROOT.register_module("DCNv2", module=ShimModulatedDeformConv2dPack, force=True)
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
    for key, config_name in MODELS.items():
        model = build(config_name)
        lines = [f"# mmdetection {mmdet.__version__} {config_name}"
                 + (" (mmcv.ops shimmed: DeformConv2d and DCNv2 stand-ins)" if shimmed else "")]
        lines += [f"{k}\t{','.join(str(s) for s in v.shape)}" for k, v in model.state_dict().items()]
        target = out / f"mmdet_vfnet_{key}_keys.tsv"
        target.write_text("\n".join(lines) + "\n")
        print(f"{target}: {len(lines) - 1} tensors")


if __name__ == "__main__":
    main()

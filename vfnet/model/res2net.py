"""Res2Net-50/101 v1d backbone (mmdetection's `Res2Net`, as in VFNet R2-101), optionally with DCNv2.

v1d: a deep stem (three 3x3 conv-BN-ReLU layers, 32-32-64 channels, the first strided, then the
3x3 max pool) and "avg-down" shortcuts (a stage's first block projects its input with an average
pool of the block's stride, ceil mode, padding not counted, then a 1x1 conv and BN).

A Res2Net bottleneck splits the output of its 1x1 input conv (width * scales channels, width =
channels * base_width // 64) into `scales` groups of `width` channels x_1..x_s. Group 1 goes
through a 3x3 conv-BN-ReLU giving y_1; group i = 2..s-1 gives y_i = conv-BN-ReLU_i(x_i + y_{i-1})
(in a stage's first block without the "+ y_{i-1}"); the last group passes unchanged (in a stage's
first block with stride 2: through a 3x3 average pool of stride 2, padding 1). The concatenated
groups go through the 1x1 output conv and BN, are added to the shortcut, then ReLU. With DCN, every
3x3 conv of the block is a DCNv2 layer. Module names are mmdetection's (`stem.0`, `layer1.0.convs.0`,
`layer1.0.bns.0`, `layer1.0.downsample.1`, ...), so its ImageNet files and checkpoints load as they are.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kernels.ops import DeformConv2dOp
from vfnet.model.backbone import _ARCHS, Backbone, _check_dcn, conv3x3


class Bottle2neck(nn.Module):
    """The Res2Net bottleneck (see the module docstring); `first` marks a stage's first block."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int, downsample: nn.Module | None, *,
                 scales: int, base_width: int, first: bool, deform_conv: DeformConv2dOp | None = None):
        super().__init__()
        width = channels * base_width // 64
        self.width, self.scales, self.first = width, scales, first
        self.conv1 = nn.Conv2d(in_channels, width * scales, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width * scales)
        self.convs = nn.ModuleList(conv3x3(width, width, stride, 1, deform_conv) for _ in range(scales - 1))
        self.bns = nn.ModuleList(nn.BatchNorm2d(width) for _ in range(scales - 1))
        self.pool = nn.AvgPool2d(3, stride, 1) if first and stride != 1 else None
        self.conv3 = nn.Conv2d(width * scales, channels * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def last_norm(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        parts = torch.split(self.relu(self.bn1(self.conv1(x))), self.width, 1)
        outs = []
        previous = None
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            part = parts[i] if self.first or previous is None else previous + parts[i]
            previous = self.relu(bn(conv(part.contiguous())))
            outs.append(previous)
        outs.append(parts[-1] if self.pool is None else self.pool(parts[-1]))
        return self.relu(self.bn3(self.conv3(torch.cat(outs, 1))) + identity)


class Res2Net(Backbone):
    """Res2Net v1d trunk returning C3, C4, C5 (strides 8, 16, 32; 512, 1024, 2048 channels).

    `scales` (>= 2) groups of `base_width`-based width per block (R2-101 26w x 4s: base_width 26,
    scales 4); `stage_with_dcn`, `deform_conv`, `frozen_stages` and `norm_eval` as `ResNet`.
    """

    def __init__(self, depth: int, *, scales: int = 4, base_width: int = 26, frozen_stages: int = 1,
                 norm_eval: bool = True, stage_with_dcn: Sequence[bool] = (False, False, False, False),
                 deform_conv: DeformConv2dOp | None = None):
        super().__init__()
        if depth not in (50, 101):
            raise ValueError(f"Res2Net depth must be 50 or 101, got {depth}")
        if scales < 2 or base_width < 1:
            raise ValueError(f"Res2Net needs scales >= 2 and base_width >= 1, got {scales}, {base_width}")
        if not 0 <= frozen_stages <= 4:
            raise ValueError(f"frozen_stages must be in 0..4, got {frozen_stages}")
        stage_with_dcn = _check_dcn(stage_with_dcn, deform_conv)
        self.depth, self.scales, self.base_width, self.stage_with_dcn = depth, scales, base_width, stage_with_dcn
        self.frozen_stages, self.norm_eval = frozen_stages, norm_eval
        self.stem = nn.Sequential(
            nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
            nn.Conv2d(32, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
        )
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_channels = 64
        for index, (count, stride) in enumerate(zip(_ARCHS[depth][1], (1, 2, 2, 2))):
            channels = 64 * 2**index
            downsample = nn.Sequential(
                nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False),
                nn.Conv2d(in_channels, channels * 4, 1, bias=False),
                nn.BatchNorm2d(channels * 4),
            )
            layers = []
            for i in range(count):
                layers.append(Bottle2neck(
                    in_channels, channels, stride if i == 0 else 1, downsample if i == 0 else None,
                    scales=scales, base_width=base_width, first=i == 0,
                    deform_conv=deform_conv if stage_with_dcn[index] else None))
                in_channels = channels * 4
            self.add_module(f"layer{index + 1}", nn.Sequential(*layers))
        self.out_channels = [512, 1024, 2048]
        self._finish()

    def _stem_modules(self) -> list[nn.Module]:
        return [self.stem]

    def describe(self) -> str:
        return f"Res2Net-{self.depth} {self.base_width}w x {self.scales}s" + (
            " (DCN)" if any(self.stage_with_dcn) else "")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.stem(x))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c3, c4, c5]

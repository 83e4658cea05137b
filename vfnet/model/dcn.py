"""A DCNv2 (modulated deformable) convolution layer with its own offset branch.

The layer's state is laid out as mmcv's `ModulatedDeformConv2dPack` (mmdetection's `DCNv2`
convs): `weight` [out, in / groups, k, k], `bias` (or none), and `conv_offset`, a plain conv with
the layer's stride, padding and dilation and 3 * deform_groups * k * k output channels. Its output
splits into thirds: the first two are the (dy, dx) offsets per tap, the sigmoid of the last the
modulation mask (`kernels.reference.modulated_offsets`). The convolution itself is the `deform_conv`
op given to the constructor (`kernels.Ops.deform_conv2d`: `kernels.deform_conv2d` or its
reference), so the layer holds no kernel of its own.

With `conv_offset` at zero (its initial state) every offset is 0 and every mask 0.5: the layer
starts as half of the plain convolution with the same weight.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from kernels.ops import DeformConv2dOp
from kernels.reference import modulated_offsets


class ModulatedDeformConv(nn.Module):
    """forward(x [B, in, H, W]) -> [B, out, Ho, Wo], Ho/Wo as `nn.Conv2d` with the same settings.

    `weight` starts uniform in +-1/sqrt(in * k * k) (mmcv's default), `bias` (if any) and
    `conv_offset` at zero.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        deform_conv: DeformConv2dOp,
        *,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
        deform_groups: int = 1,
        bias: bool = False,
    ):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups = {groups} must divide in_channels = {in_channels} and "
                             f"out_channels = {out_channels}")
        if deform_groups < 1 or in_channels % deform_groups:
            raise ValueError(f"deform_groups = {deform_groups} must be >= 1 and divide in_channels = {in_channels}")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.groups, self.deform_groups = groups, deform_groups
        self.deform_conv = deform_conv
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.conv_offset = nn.Conv2d(in_channels, 3 * deform_groups * kernel_size * kernel_size, kernel_size,
                                     stride, padding, dilation, bias=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_channels * self.kernel_size * self.kernel_size)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset, mask = modulated_offsets(self.conv_offset(x))
        return self.deform_conv(x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation,
                                mask, groups=self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"deform_groups={self.deform_groups}, bias={self.bias is not None}")

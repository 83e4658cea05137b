"""Feature pyramid: C3-C5 in, P3-P7 out (strides 8 to 128), all with the same channel count.

Lateral 1x1 convs, a nearest-neighbour top-down pathway, 3x3 output convs; P6 is a stride-2 3x3
conv on P5's output and P7 a stride-2 3x3 conv on ReLU(P6) (the reference VFNet neck:
add_extra_convs "on_output", relu_before_extra_convs). Convs carry biases and start
Xavier-uniform with zero bias.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FPN(nn.Module):
    """forward([C3, C4, C5]) -> [P3, P4, P5, P6, P7], each [B, out_channels, H_l, W_l]."""

    def __init__(self, in_channels: list[int], out_channels: int):
        super().__init__()
        if len(in_channels) != 3:
            raise ValueError(f"in_channels must list the C3, C4, C5 channels, got {in_channels}")
        self.lateral = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.output = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels)
        self.p6 = nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        laterals = [conv(f) for conv, f in zip(self.lateral, features)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest"
            )
        outs = [conv(x) for conv, x in zip(self.output, laterals)]
        p6 = self.p6(outs[-1])
        p7 = self.p7(F.relu(p6))
        return outs + [p6, p7]

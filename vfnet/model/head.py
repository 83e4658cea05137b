"""The VFNet head (docs/design.md §3), shared across the pyramid levels.

Per level: a classification tower and a regression tower (stacked 3x3 conv (no bias) - GroupNorm -
ReLU); from the regression tower one more conv-GN-ReLU and a 3x3 conv to 4 channels give the
initial box (l, t, r, b) = exp(Scale_l(.)) * reg_denom_l. The star deformable conv (3x3, no bias,
then ReLU), sampling at the 9 star points of the initial box, runs on both towers' outputs; a 3x3
conv on the regression result gives the refinement factors, refined box = exp(Scale_refine_l(.))
* initial box (detached), and a 3x3 conv on the classification result gives the IoU-aware class
logits. Boxes are computed in float32 even under autocast (exp of low-precision logits is coarse).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn
from torch.profiler import record_function

from kernels.ops import DeformConv2dOp, StarPairOp
from vfnet.model.dcn import ModulatedDeformConv

PRIOR_PROB = 0.01  # initial foreground probability of the class logits


class HeadOutputs(NamedTuple):
    """Per-level head outputs (lists ordered P3..P7). A NamedTuple, so DDP and torch's pytree
    utilities see the tensors inside.

    cls_scores: [B, C, H_l, W_l] logits; bbox_init, bbox_refine: [B, 4, H_l, W_l] float32
    (l, t, r, b) distances in input-image pixels.
    """

    cls_scores: list[torch.Tensor]
    bbox_init: list[torch.Tensor]
    bbox_refine: list[torch.Tensor]


class Scale(nn.Module):
    """A learnable scalar multiplier (initialised to 1), applied in float32."""

    def __init__(self, value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() * self.scale.float()


def _conv_gn_relu(in_channels: int, out_channels: int, groups: int,
                  deform_conv: DeformConv2dOp | None = None) -> nn.Sequential:
    conv = (nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False) if deform_conv is None
            else ModulatedDeformConv(in_channels, out_channels, 3, deform_conv, padding=1))
    return nn.Sequential(
        conv,
        nn.GroupNorm(groups, out_channels),
        nn.ReLU(inplace=True),
    )


class VFNetHead(nn.Module):
    """forward(features: P3..P7 [B, in_channels, H_l, W_l]) -> HeadOutputs.

    `star_pair` computes both star convolutions of a level (`kernels.ops.StarPairOp`, e.g.
    `Ops.from_name(cfg.model.kernels).star_pair`). With `dcn_on_last_conv` the last conv of each
    tower is a DCNv2 layer (`vfnet.model.dcn.ModulatedDeformConv`, no bias, then GN and ReLU as
    the others) running `deform_conv` (`Ops.deform_conv2d`), as mmdetection's `dcn_on_last_conv`.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        star_pair: StarPairOp,
        *,
        channels: int = 256,
        stacked_convs: int = 3,
        gn_groups: int = 32,
        strides: list[int] | tuple[int, ...] = (8, 16, 32, 64, 128),
        reg_denoms: list[float] | tuple[float, ...] = (64.0, 128.0, 256.0, 512.0, 1024.0),
        gradient_mul: float = 0.1,
        dcn_on_last_conv: bool = False,
        deform_conv: DeformConv2dOp | None = None,
    ):
        super().__init__()
        if stacked_convs < 1:
            raise ValueError(f"stacked_convs must be >= 1, got {stacked_convs}")
        if len(reg_denoms) != len(strides):
            raise ValueError(f"reg_denoms {list(reg_denoms)} must have one entry per stride {list(strides)}")
        self.num_classes = num_classes
        self.strides = list(strides)
        self.reg_denoms = [float(d) for d in reg_denoms]
        self.gradient_mul = gradient_mul
        self.star_pair = star_pair
        if dcn_on_last_conv and deform_conv is None:
            raise ValueError("dcn_on_last_conv needs a deform_conv op")
        self.dcn_on_last_conv = dcn_on_last_conv

        def tower() -> nn.Sequential:
            return nn.Sequential(*[
                _conv_gn_relu(in_channels if i == 0 else channels, channels, gn_groups,
                              deform_conv if dcn_on_last_conv and i == stacked_convs - 1 else None)
                for i in range(stacked_convs)
            ])

        self.cls_convs = tower()
        self.reg_convs = tower()
        self.reg_init_conv = _conv_gn_relu(channels, channels, gn_groups)
        self.reg_init = nn.Conv2d(channels, 4, 3, padding=1)
        self.scales = nn.ModuleList(Scale() for _ in self.strides)
        self.star_reg_weight = nn.Parameter(torch.empty(channels, channels, 3, 3))
        self.star_cls_weight = nn.Parameter(torch.empty(channels, channels, 3, 3))
        self.reg_refine = nn.Conv2d(channels, 4, 3, padding=1)
        self.scales_refine = nn.ModuleList(Scale() for _ in self.strides)
        self.cls = nn.Conv2d(channels, num_classes, 3, padding=1)
        self._init_weights()

    def _init_weights(self) -> None:
        """Every conv weight (towers, star convs, outputs) normal(0, 0.01), biases 0 except the class
        logits' bias -log((1 - p) / p) with p = 0.01; GroupNorm at weight 1, bias 0. A DCN layer
        (`dcn_on_last_conv`) keeps its own start: weight uniform in +-1/sqrt(fan_in), offset conv at
        0 (what mmdetection 3.3.0's `init_weights` leaves in a DCN VFNet head)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, ModulatedDeformConv):
                m.reset_parameters()
        nn.init.normal_(self.star_reg_weight, std=0.01)
        nn.init.normal_(self.star_cls_weight, std=0.01)
        nn.init.constant_(self.cls.bias, -math.log((1 - PRIOR_PROB) / PRIOR_PROB))

    def forward(self, features: list[torch.Tensor]) -> HeadOutputs:
        if len(features) != len(self.strides):
            raise ValueError(f"expected {len(self.strides)} feature levels, got {len(features)}")
        cls_scores, bbox_init, bbox_refine = [], [], []
        for level, x in enumerate(features):
            cls_feat = self.cls_convs(x)
            reg_feat = self.reg_convs(x)
            init = self.scales[level](self.reg_init(self.reg_init_conv(reg_feat))).exp() * self.reg_denoms[level]
            with record_function("vfnet.star_conv"):
                cls_star, reg_star = self.star_pair(
                    cls_feat, reg_feat, init, self.star_cls_weight, self.star_reg_weight,
                    self.strides[level], gradient_mul=self.gradient_mul,
                )
            refine = self.scales_refine[level](self.reg_refine(torch.relu(reg_star))).exp() * init.detach()
            cls_scores.append(self.cls(torch.relu(cls_star)))
            bbox_init.append(init)
            bbox_refine.append(refine)
        return HeadOutputs(cls_scores=cls_scores, bbox_init=bbox_init, bbox_refine=bbox_refine)

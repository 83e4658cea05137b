"""The ops a VFNet runs in its hot paths, chosen once: `Ops.from_name(cfg.model.kernels)`.

`Ops` is handed to the detector, which gives `star_pair` to the head and `varifocal_loss` to the
loss as constructor arguments; nothing swaps them afterwards. `deform_conv2d` (DCNv2, for DCN
backbones) is in the set too; no model part calls it yet. Two sets ship:

- "triton": `kernels.star_deform_conv2d_pair`, `kernels.varifocal_loss` and
  `kernels.deform_conv2d`. Each call still follows the per-call device rule of `kernels.dispatch`
  (CUDA -> Triton; CPU -> the PyTorch reference unless `TRITON_INTERPRET=1`; `VFNET_KERNELS=torch`
  forces the reference).
- "torch": the PyTorch references `kernels.reference.star_deform_conv2d_pair_reference`,
  `kernels.reference.varifocal_loss_reference` and `kernels.reference.deform_conv2d_reference`, on
  every device.

Any other functions with the same signatures plug in the same way, e.g. a benchmark's
`torchvision.ops.deform_conv2d` star pair: `dataclasses.replace(Ops.from_name("torch"), star_pair=f)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from kernels import reference
from kernels.deform_conv import deform_conv2d
from kernels.star_conv import star_deform_conv2d_pair
from kernels.varifocal import varifocal_loss

NAMES = ("triton", "torch")


class StarPairOp(Protocol):
    """(x_cls, x_reg [B, Cin, H, W], bbox_pred [B, 4, H, W] (l, t, r, b) pixels, w_cls, w_reg
    [Cout, Cin, 3, 3], stride, *, gradient_mul) -> (out_cls, out_reg) [B, Cout, H, W]; the
    contract of `kernels.star_deform_conv2d_pair`."""

    def __call__(self, x_cls: torch.Tensor, x_reg: torch.Tensor, bbox_pred: torch.Tensor,
                 w_cls: torch.Tensor, w_reg: torch.Tensor, stride: float, *,
                 gradient_mul: float = ...) -> tuple[torch.Tensor, torch.Tensor]: ...


class VarifocalLossOp(Protocol):
    """(logits [N, C], labels [N], scores [N], *, alpha, gamma, iou_weighted, reduction) -> loss;
    the contract of `kernels.varifocal_loss`."""

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor, *,
                 alpha: float = ..., gamma: float = ..., iou_weighted: bool = ...,
                 reduction: str = ...) -> torch.Tensor: ...


class DeformConv2dOp(Protocol):
    """(input [B, Cin, H, W], offset [B, 2*dg*kh*kw, Ho, Wo], weight [Cout, Cin/groups, kh, kw],
    bias, stride, padding, dilation, mask [B, dg*kh*kw, Ho, Wo] or None, *, groups) ->
    [B, Cout, Ho, Wo]; the contract of `kernels.deform_conv2d` (docs/design.md §2.4)."""

    def __call__(self, input: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None = ..., stride: int | tuple[int, int] = ...,
                 padding: int | tuple[int, int] = ..., dilation: int | tuple[int, int] = ...,
                 mask: torch.Tensor | None = ..., *, groups: int = ...) -> torch.Tensor: ...


@dataclass(frozen=True)
class Ops:
    """The star-conv pair, the varifocal loss and the modulated deformable convolution (for
    DCN backbones) of one model; `name` labels the set (what `VFNet.kernels` reports)."""

    name: str
    star_pair: StarPairOp
    varifocal_loss: VarifocalLossOp
    deform_conv2d: DeformConv2dOp

    @classmethod
    def from_name(cls, name: str) -> Ops:
        """The shipped set called `name` ("triton" or "torch"; see the module docstring)."""
        if name == "triton":
            return cls(name, star_deform_conv2d_pair, varifocal_loss, deform_conv2d)
        if name == "torch":
            return cls(name, reference.star_deform_conv2d_pair_reference, reference.varifocal_loss_reference,
                       reference.deform_conv2d_reference)
        raise ValueError(f"kernels must be one of {NAMES}, got {name!r}")

"""Star deformable convolution: VFNet's 3x3 conv over the 9 star points of each location.

Public API (DESIGN.md §2):
    star_deform_conv2d(x, bbox_pred, weight, stride, *, bias=None, gradient_mul=0.1)
    star_deform_conv2d_pair(x_cls, x_reg, bbox_pred, w_cls, w_reg, stride, *, gradient_mul=0.1)

Negative distances are used as given (the sample lands on the other side of the location);
the head only produces positive ones.
"""
from __future__ import annotations

import math

import torch

from kernels import reference
from kernels.dispatch import check_float, check_same_device, check_tensor

__all__ = ["star_deform_conv2d", "star_deform_conv2d_pair"]


def _check_stride(stride: float) -> float:
    if isinstance(stride, bool) or not isinstance(stride, (int, float)):
        raise TypeError(f"stride must be a number, got {type(stride).__name__}")
    if not math.isfinite(stride) or stride <= 0:
        raise ValueError(f"stride must be a finite number > 0, got {stride}")
    return float(stride)


def _check_gradient_mul(gradient_mul: float) -> float:
    if isinstance(gradient_mul, bool) or not isinstance(gradient_mul, (int, float)):
        raise TypeError(f"gradient_mul must be a number, got {type(gradient_mul).__name__}")
    if not math.isfinite(gradient_mul):
        raise ValueError(f"gradient_mul must be finite, got {gradient_mul}")
    return float(gradient_mul)


def _check_input(name: str, x: object) -> torch.Tensor:
    x = check_tensor(name, x)
    check_float(name, x)
    if x.dim() != 4:
        raise ValueError(f"{name} must be [B, C, H, W], got shape {tuple(x.shape)}")
    if min(x.shape) == 0:
        raise ValueError(f"{name} must have no empty dimension, got shape {tuple(x.shape)}")
    return x


def _check_box(bbox_pred: object, x: torch.Tensor) -> torch.Tensor:
    bbox_pred = check_tensor("bbox_pred", bbox_pred)
    check_float("bbox_pred", bbox_pred)
    b, _, h, w = x.shape
    if tuple(bbox_pred.shape) != (b, 4, h, w):
        raise ValueError(f"bbox_pred must be [B, 4, H, W] = {[b, 4, h, w]}, got {tuple(bbox_pred.shape)}")
    return bbox_pred


def _check_weight(name: str, weight: object, cin: int) -> torch.Tensor:
    weight = check_tensor(name, weight)
    check_float(name, weight)
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3) or weight.shape[0] == 0:
        raise ValueError(f"{name} must be [Cout, Cin, 3, 3], got shape {tuple(weight.shape)}")
    if weight.shape[1] != cin:
        raise ValueError(f"{name} has Cin = {weight.shape[1]} but the input has {cin} channels")
    return weight


def _check_bias(bias: object, cout: int) -> torch.Tensor | None:
    if bias is None:
        return None
    bias = check_tensor("bias", bias)
    check_float("bias", bias)
    if tuple(bias.shape) != (cout,):
        raise ValueError(f"bias must be [Cout] = [{cout}], got shape {tuple(bias.shape)}")
    return bias


def star_deform_conv2d(
    x: torch.Tensor,
    bbox_pred: torch.Tensor,
    weight: torch.Tensor,
    stride: float,
    *,
    bias: torch.Tensor | None = None,
    gradient_mul: float = 0.1,
) -> torch.Tensor:
    """Star deformable 3x3 convolution.

    x: [B, Cin, H, W] features; bbox_pred: [B, 4, H, W] (l, t, r, b) distances in input-image
    pixels; weight: [Cout, Cin, 3, 3]; bias: [Cout] or None; stride: input pixels per feature
    cell (> 0). Tap (ky, kx) of location (y, x) samples x bilinearly at
    (y + (-t, 0, b)[ky] / stride, x + (-l, 0, r)[kx] / stride) with torchvision's boundary rule.
    Returns [B, Cout, H, W] in x's dtype, equal to
    `torchvision.ops.deform_conv2d(x, reference.star_offsets(bbox_pred, stride), weight, bias,
    padding=1)`. Gradients reach x, weight, bias and bbox_pred (the latter scaled by
    gradient_mul).
    """
    x = _check_input("x", x)
    bbox_pred = _check_box(bbox_pred, x)
    weight = _check_weight("weight", weight, x.shape[1])
    bias = _check_bias(bias, weight.shape[0])
    check_same_device(x=x, bbox_pred=bbox_pred, weight=weight, bias=bias)
    stride = _check_stride(stride)
    gradient_mul = _check_gradient_mul(gradient_mul)
    return reference.star_deform_conv2d_reference(
        x, bbox_pred, weight, stride, bias=bias, gradient_mul=gradient_mul
    )


def star_deform_conv2d_pair(
    x_cls: torch.Tensor,
    x_reg: torch.Tensor,
    bbox_pred: torch.Tensor,
    w_cls: torch.Tensor,
    w_reg: torch.Tensor,
    stride: float,
    *,
    gradient_mul: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's two star convolutions over one set of star points (no bias).

    x_cls, x_reg: [B, Cin, H, W] (same shape and dtype); bbox_pred: [B, 4, H, W];
    w_cls, w_reg: [Cout, Cin, 3, 3]. Returns (out_cls, out_reg), each [B, Cout, H, W], equal to
    `star_deform_conv2d(x_cls, bbox_pred, w_cls, stride)` and the same for x_reg; the sampling
    coordinates and bilinear weights are computed once for both.
    """
    x_cls = _check_input("x_cls", x_cls)
    x_reg = _check_input("x_reg", x_reg)
    if x_reg.shape != x_cls.shape:
        raise ValueError(f"x_reg must have x_cls's shape {tuple(x_cls.shape)}, got {tuple(x_reg.shape)}")
    if x_reg.dtype != x_cls.dtype:
        raise TypeError(f"x_reg must have x_cls's dtype {x_cls.dtype}, got {x_reg.dtype}")
    bbox_pred = _check_box(bbox_pred, x_cls)
    w_cls = _check_weight("w_cls", w_cls, x_cls.shape[1])
    w_reg = _check_weight("w_reg", w_reg, x_cls.shape[1])
    check_same_device(x_cls=x_cls, x_reg=x_reg, bbox_pred=bbox_pred, w_cls=w_cls, w_reg=w_reg)
    stride = _check_stride(stride)
    gradient_mul = _check_gradient_mul(gradient_mul)
    return reference.star_deform_conv2d_pair_reference(
        x_cls, x_reg, bbox_pred, w_cls, w_reg, stride, gradient_mul=gradient_mul
    )

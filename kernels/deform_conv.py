"""Modulated deformable convolution (DCNv2), torchvision's `deform_conv2d` contract.

Public API (docs/design.md §2.4)::

    deform_conv2d(input, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None, *, groups=1)

This module holds the argument checks and the dispatch; the math is
`kernels.reference.deform_conv2d_reference` (plain PyTorch, chunked over output positions).
The Triton kernels (issue #20) plug in at `_deform_conv2d_triton`, the one place `use_triton`
sends a call to; until they land it runs the reference, so a "triton" `Ops` works on every device.
"""
from __future__ import annotations

import torch

from kernels import reference
from kernels.checks import check_float, check_same_device, check_tensor
from kernels.dispatch import use_triton


def _check_int_pair(name: str, value: object, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, each >= minimum, as an (h, w) tuple."""
    items = value if isinstance(value, (tuple, list)) else (value, value)
    if len(items) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in items):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(items) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return items[0], items[1]


def _check_4d(name: str, value: object, layout: str) -> torch.Tensor:
    value = check_tensor(name, value)
    check_float(name, value)
    if value.dim() != 4:
        raise ValueError(f"{name} must be {layout}, got shape {tuple(value.shape)}")
    return value


def check_deform_conv2d_args(input, offset, weight, bias, stride, padding, dilation, mask, groups
                             ) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], int]:
    """Validate a `deform_conv2d` call; return (stride, padding, dilation) as pairs and dg.

    Shapes and dtypes only (no values are read): TypeError for a wrong type or dtype,
    ValueError for a wrong shape, size or device, each naming the argument.
    """
    input = _check_4d("input", input, "[B, Cin, H, W]")
    b, cin, h, w = input.shape
    if min(cin, h, w) == 0:
        raise ValueError(f"input must have Cin, H and W > 0 (B may be 0), got shape {tuple(input.shape)}")
    weight = _check_4d("weight", weight, "[Cout, Cin/groups, kh, kw]")
    cout, cin_g, kh, kw = weight.shape
    if min(cout, cin_g, kh, kw) == 0:
        raise ValueError(f"weight must have no empty dimension, got shape {tuple(weight.shape)}")
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise TypeError(f"groups must be an int, got {type(groups).__name__}")
    if groups < 1 or cin % groups or cout % groups:
        raise ValueError(f"groups must be >= 1 and divide Cin = {cin} and Cout = {cout}, got {groups}")
    if cin_g * groups != cin:
        raise ValueError(f"weight must be [Cout, Cin/groups, kh, kw] with Cin/groups = {cin // groups}, "
                         f"got shape {tuple(weight.shape)}")
    stride = _check_int_pair("stride", stride, 1)
    padding = _check_int_pair("padding", padding, 0)
    dilation = _check_int_pair("dilation", dilation, 1)
    ho = reference.conv_output_size(h, kh, stride[0], padding[0], dilation[0])
    wo = reference.conv_output_size(w, kw, stride[1], padding[1], dilation[1])
    if ho < 1 or wo < 1:
        raise ValueError(f"the output would be {ho} x {wo}: the {kh} x {kw} kernel with dilation {dilation} "
                         f"does not fit the {h} x {w} input padded by {padding}")
    offset = _check_4d("offset", offset, "[B, 2*dg*kh*kw, Ho, Wo]")
    taps = kh * kw
    dg = offset.shape[1] // (2 * taps)
    if offset.shape[1] % (2 * taps) or dg == 0 or tuple(offset.shape[2:]) != (ho, wo) or offset.shape[0] != b:
        raise ValueError(f"offset must be [B, 2*dg*kh*kw, Ho, Wo] = [{b}, 2*dg*{taps}, {ho}, {wo}] "
                         f"(dg >= 1 deform groups), got shape {tuple(offset.shape)}")
    if cin % dg:
        raise ValueError(f"offset has {offset.shape[1]} channels = 2*dg*kh*kw with dg = {dg} deform groups, "
                         f"which must divide Cin = {cin}")
    if mask is not None:
        mask = _check_4d("mask", mask, "[B, dg*kh*kw, Ho, Wo]")
        if tuple(mask.shape) != (b, dg * taps, ho, wo):
            raise ValueError(f"mask must be [B, dg*kh*kw, Ho, Wo] = {[b, dg * taps, ho, wo]}, "
                             f"got shape {tuple(mask.shape)}")
    if bias is not None:
        bias = check_tensor("bias", bias)
        check_float("bias", bias)
        if tuple(bias.shape) != (cout,):
            raise ValueError(f"bias must be [Cout] = [{cout}], got shape {tuple(bias.shape)}")
    check_same_device(input=input, offset=offset, weight=weight, bias=bias, mask=mask)
    return stride, padding, dilation, dg


def deform_conv2d(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    mask: torch.Tensor | None = None,
    *,
    groups: int = 1,
) -> torch.Tensor:
    """Modulated deformable convolution (DCNv2; DCNv1 when mask is None), docs/design.md §2.4.

    input [B, Cin, H, W]; offset [B, 2*dg*kh*kw, Ho, Wo] (dg deform groups, inferred; dg divides
    Cin); weight [Cout, Cin/groups, kh, kw]; bias [Cout] or None; mask [B, dg*kh*kw, Ho, Wo] or
    None (all ones); stride, padding, dilation an int or an (h, w) pair; groups divides Cin and
    Cout. Ho, Wo as conv2d: (H + 2*pad_h - dil_h*(kh - 1) - 1) // stride_h + 1.

    For deform group g and tap k = i*kw + j, offset channel 2*(g*kh*kw + k) is the row offset dy
    and the next one the column offset dx (input cells), mask channel g*kh*kw + k its factor;
    output position (y, x) samples input channels of group g bilinearly at row
    y*stride_h - pad_h + i*dil_h + dy, column x*stride_w - pad_w + j*dil_w + dx (torchvision's
    boundary rule: a point with row <= -1, row >= H, column <= -1 or column >= W reads 0, else each
    corner outside the map reads 0), multiplies by the mask and convolves with weight[:, :, i, j].
    The value of `torchvision.ops.deform_conv2d` (which infers groups from the weight) and of mmcv's
    modulated deformable convolution (`kernels.reference.modulated_offsets` gives its offset and
    mask). Returns [B, Cout, Ho, Wo] in input's dtype (channels-last memory); math in float64 for
    float64 input, else float32. Gradients reach input, offset, mask, weight and bias.
    """
    stride, padding, dilation, _ = check_deform_conv2d_args(
        input, offset, weight, bias, stride, padding, dilation, mask, groups)
    if use_triton(input):
        return _deform_conv2d_triton(input, offset, weight, bias, stride, padding, dilation, mask, groups)
    return reference.deform_conv2d_reference(
        input, offset, weight, bias, stride, padding, dilation, mask, groups=groups)


def _deform_conv2d_triton(input, offset, weight, bias, stride, padding, dilation, mask, groups) -> torch.Tensor:
    """THE TRITON PATH PLUGS IN HERE (issue #20): called with checked arguments (stride, padding,
    dilation as (h, w) pairs) whenever `use_triton(input)` is True. Until the kernels exist it
    runs the reference."""
    return reference.deform_conv2d_reference(
        input, offset, weight, bias, stride, padding, dilation, mask, groups=groups)

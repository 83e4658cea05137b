"""Modulated deformable convolution (DCNv2) in standard tensor operators, for ONNX and `torch.export`.

Same contract as `kernels.deform_conv2d` (docs/design.md §2.4) and the same sampling as
`kernels.reference`: output (y, x), tap k = i*kw + j of deform group g samples the input bilinearly
at row y*stride_h - pad_h + i*dil_h + offset[:, 2*(g*kh*kw + k)] and column
x*stride_w - pad_w + j*dil_w + offset[:, 2*(g*kh*kw + k) + 1], with torchvision's boundary rule
(`kernels.reference.bilinear_corner_stack`), times mask[:, g*kh*kw + k].

Written as: integer corner indices and bilinear weights of all 4 corners at once (Floor,
comparisons, Where, Cast), one row `Gather` from a channels-last table of the input (one row per
image, cell and deform group: the index has one entry per sample and corner, not per channel)
per corner, the weighted sum of the corners (the mask folded into the weights), then one `MatMul`
per conv group (batched) with the weight laid out as [groups, kh*kw*Cin/groups, Cout/groups].
Coordinates stay in cell units (no `GridSample` normalisation), so the values equal the
reference's up to the order of float32 additions. Forward only (inference), float32.
`sample_rows` is shared with the star conv's export (`vfnet.interop.export.star_conv`).
"""
from __future__ import annotations

import torch

from kernels.reference import bilinear_corner_stack, pair


def sample_rows(table: torch.Tensor, base: torch.Tensor, py: torch.Tensor, px: torch.Tensor, height: int,
                width: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Bilinear samples read from a channels-last row table.

    table: [rows, C'] float32, row (base + cell) * dg + g holding the C' channels of deform group
    g at map cell `cell` (= row * W + col) of the image whose first cell is `base`; py, px:
    [..., dg, taps] sampling rows / columns in cells (dg = 1: the table has one row per cell);
    base: int64, broadcastable to py; mask: py's shape or None, multiplied into the corner
    weights. Returns [..., dg, taps, C'] float32.
    """
    dg = py.shape[-2]
    index, weight = bilinear_corner_stack(py, px, height, width)  # [..., dg, taps, 4]
    base = base.unsqueeze(-1)
    rows = base + index if dg == 1 else (base + index) * dg + torch.arange(dg, device=py.device).view(dg, 1, 1)
    if mask is not None:
        weight = weight * mask.unsqueeze(-1)
    out = table[rows[..., 0]] * weight[..., 0, None]
    for corner in range(1, 4):  # one corner's rows at a time: a quarter of the memory of all 4
        out = out + table[rows[..., corner]] * weight[..., corner, None]
    return out


def deform_conv2d_export(
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
    """`kernels.deform_conv2d` in exportable operators (no argument checks: validate eagerly first).

    input [B, Cin, H, W]; offset [B, 2*dg*kh*kw, Ho, Wo]; weight [Cout, Cin/groups, kh, kw]; bias
    [Cout] or None; mask [B, dg*kh*kw, Ho, Wo] or None; stride, padding, dilation ints or (h, w)
    pairs (static). Returns [B, Cout, Ho, Wo] float32. B, H, W (and so Ho, Wo) may be dynamic.
    """
    (sh, sw), (ph, pw), (dh, dw) = pair(stride), pair(padding), pair(dilation)
    b, cin, h, w = input.shape
    cout, cin_g, kh, kw = weight.shape
    taps = kh * kw
    dg = offset.shape[1] // (2 * taps)
    ho, wo = offset.shape[2], offset.shape[3]
    device = input.device
    # [B, Ho, Wo, dg, taps, (dy, dx)]
    offsets = offset.float().reshape(b, dg, taps, 2, ho, wo).permute(0, 4, 5, 1, 2, 3).contiguous()
    tap_rows = torch.tensor([float(i * dh) for i in range(kh) for _ in range(kw)], device=device)
    tap_cols = torch.tensor([float(j * dw) for _ in range(kh) for j in range(kw)], device=device)
    window_rows = (torch.arange(ho, device=device) * sh - ph).float().view(1, ho, 1, 1, 1)
    window_cols = (torch.arange(wo, device=device) * sw - pw).float().view(1, 1, wo, 1, 1)
    py = window_rows + tap_rows + offsets[..., 0]  # [B, Ho, Wo, dg, taps]
    px = window_cols + tap_cols + offsets[..., 1]
    modulation = None if mask is None else mask.float().reshape(b, dg, taps, ho, wo).permute(0, 3, 4, 1, 2).contiguous()
    table = input.float().permute(0, 2, 3, 1).reshape(b * h * w * dg, cin // dg)
    base = (torch.arange(b, device=device) * (h * w)).view(b, 1, 1, 1, 1)
    samples = sample_rows(table, base, py, px, h, w, modulation)  # [B, Ho, Wo, dg, taps, Cin/dg]
    # -> [B, groups, Ho*Wo, taps * Cin/groups], row = tap * (Cin/groups) + channel
    samples = samples.transpose(3, 4).reshape(b, ho * wo, taps, groups, cin_g).permute(0, 3, 1, 2, 4)
    samples = samples.reshape(b, groups, ho * wo, taps * cin_g)
    matrix = weight.float().reshape(groups, cout // groups, cin_g, taps).permute(0, 3, 2, 1)
    out = samples @ matrix.reshape(groups, taps * cin_g, cout // groups)  # [B, groups, Ho*Wo, Cout/groups]
    out = out.permute(0, 2, 1, 3).reshape(b, ho, wo, cout)
    if bias is not None:
        out = out + bias.float()
    return out.permute(0, 3, 1, 2).contiguous()

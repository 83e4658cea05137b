"""The star deformable convolution in standard tensor operators, for ONNX and `torch.export`.

Same contract as `kernels.star_deform_conv2d_pair` (and the same sampling rule as
`kernels.reference`): location (y, x) with box distances (l, t, r, b) (input pixels) convolves a
3x3 kernel over the bilinear samples at rows (y - t, y, y + b) / stride and columns
(x - l, x, x + r) / stride, torchvision's `deform_conv2d` boundary rule: a point with
py <= -1, py >= H, px <= -1 or px >= W reads 0, otherwise each of its four corners outside the map
reads 0.

Written as: integer corner indices and bilinear weights (Floor, comparisons, Where), one row
gather from the channels-last feature map (ONNX `Gather` on axis 0: the index has one entry per
sample and corner, not per channel), the weighted sum of the four corners, then one matrix product
with the weights laid out as [9 * C_in, C_out]. The coordinates stay in cell units (no
normalisation to [-1, 1] as `GridSample` needs), so the samples equal the reference's up to the
order of float32 additions. Forward only (inference). The corner gather is `sample_rows`, shared
with the general deformable convolution (`vfnet.interop.export.deform_conv`).
"""
from __future__ import annotations

import torch

from kernels.reference import star_coordinates
from vfnet.interop.export.deform_conv import sample_rows


def star_sample(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The 9 star samples of every location, channels last.

    x [B, C, H, W]; rows, cols [B, 3, H, W] sampling rows / columns in cells (float32).
    Returns [B, H, W, 9 * C] float32, tap k = 3 * ky + kx major, channel minor.
    """
    b, c, h, w = x.shape
    # [B, H, W, 9]: tap 3 * ky + kx reads row rows[:, ky] and column cols[:, kx]
    py = torch.stack([rows[:, ky] for ky in range(3) for _ in range(3)], dim=-1)
    px = torch.stack([cols[:, kx] for _ in range(3) for kx in range(3)], dim=-1)
    table = x.float().permute(0, 2, 3, 1).reshape(b * h * w, c)  # one row per (image, cell)
    base = (torch.arange(b, device=x.device) * (h * w)).view(b, 1, 1, 1, 1)
    out = sample_rows(table, base, py.unsqueeze(-2), px.unsqueeze(-2), h, w)  # [B, H, W, 1, 9, C]
    return out.reshape(b, h, w, 9 * c)


def _matmul_weight(samples: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """samples [B, H, W, 9 * C_in] x weight [C_out, C_in, 3, 3] -> [B, C_out, H, W]."""
    cout, cin = weight.shape[:2]
    matrix = weight.float().permute(2, 3, 1, 0).reshape(9 * cin, cout)  # row = tap * C_in + channel
    return (samples @ matrix).permute(0, 3, 1, 2).contiguous()


def star_deform_conv2d_pair_export(
    x_cls: torch.Tensor,
    x_reg: torch.Tensor,
    bbox_pred: torch.Tensor,
    w_cls: torch.Tensor,
    w_reg: torch.Tensor,
    stride: float,
    *,
    gradient_mul: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's two star convolutions (no bias) at one set of sampling points.

    x_cls, x_reg [B, C_in, H, W]; bbox_pred [B, 4, H, W] (l, t, r, b) in input pixels; w_cls,
    w_reg [C_out, C_in, 3, 3]; stride in input pixels per cell. Returns (out_cls, out_reg), each
    [B, C_out, H, W] float32. `gradient_mul` only scales gradients; it is accepted for the
    signature of `kernels.star_deform_conv2d_pair`.
    """
    rows, cols = star_coordinates(bbox_pred.float(), stride, gradient_mul)
    cin = x_cls.shape[1]
    samples = star_sample(torch.cat([x_cls, x_reg], dim=1), rows, cols)  # one gather for both
    samples = samples.unflatten(-1, (9, 2 * cin))
    out_cls = _matmul_weight(samples[..., :cin].flatten(-2), w_cls)
    out_reg = _matmul_weight(samples[..., cin:].flatten(-2), w_reg)
    return out_cls, out_reg

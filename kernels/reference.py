"""Pure-PyTorch versions of every op in `kernels`: the CPU path and the tests' oracle.

They take already-validated inputs (the public functions in `kernels` check arguments) and are
written for clarity, with autograd providing the gradients.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# Varifocal loss


def varifocal_loss_dense_reference(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    alpha: float = 0.75,
    gamma: float = 2.0,
    iou_weighted: bool = True,
    reduction: str = "sum",
    avg_factor: float | None = None,
) -> torch.Tensor:
    """Varifocal loss with dense targets.

    logits: [N, C] raw scores; targets: [N, C] IoU targets q in [0, 1] (0 = negative).
    Elementwise, p = sigmoid(x):  q > 0: BCE(x, q) * (q if iou_weighted else 1);
                                  q <= 0: BCE(x, q) * alpha * |p - q|^gamma.
    The focal weight is not detached. Computed in the logits' dtype (float32 for half types).
    reduction "none" -> [N, C]; "sum" -> scalar; "mean" -> sum / (N*C) (0 when N*C == 0), or
    sum / avg_factor when given.
    """
    out_dtype = logits.dtype
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(compute)
    q = targets.to(compute)
    p = torch.sigmoid(x)
    positive = q > 0
    pos_weight = q if iou_weighted else torch.ones_like(q)
    neg_weight = alpha * (p - q).abs().pow(gamma)
    weight = torch.where(positive, pos_weight, neg_weight)
    loss = F.binary_cross_entropy_with_logits(x, q, reduction="none") * weight
    return _reduce(loss, reduction, avg_factor).to(out_dtype)


def varifocal_loss_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor,
    *,
    alpha: float = 0.75,
    gamma: float = 2.0,
    iou_weighted: bool = True,
    reduction: str = "sum",
    avg_factor: float | None = None,
) -> torch.Tensor:
    """Varifocal loss with sparse targets: labels [N] int (outside [0, C) = background) and
    scores [N] (the IoU target of that point's class). Same value as the dense form with
    targets[i, labels[i]] = scores[i] and 0 elsewhere."""
    return varifocal_loss_dense_reference(
        logits,
        dense_targets(labels, scores, logits.shape[1]),
        alpha=alpha,
        gamma=gamma,
        iou_weighted=iou_weighted,
        reduction=reduction,
        avg_factor=avg_factor,
    )


def dense_targets(labels: torch.Tensor, scores: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[N, C] targets from sparse labels [N] and scores [N]; background labels give a zero row."""
    n = labels.shape[0]
    targets = torch.zeros(n, num_classes, dtype=scores.dtype, device=scores.device)
    valid = (labels >= 0) & (labels < num_classes)
    rows = torch.arange(n, device=labels.device)[valid]
    targets[rows, labels[valid].long()] = scores[valid]
    return targets


def _reduce(loss: torch.Tensor, reduction: str, avg_factor: float | None) -> torch.Tensor:
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    if avg_factor is not None:
        return total / avg_factor
    return total / loss.numel() if loss.numel() else total


# ---------------------------------------------------------------------------------------------
# Star deformable convolution


def star_coordinates(
    bbox_pred: torch.Tensor, stride: float, gradient_mul: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The 3 sampling rows and 3 sampling columns of every location, in feature-map cells.

    bbox_pred: [B, 4, H, W] (l, t, r, b) distances in input-image pixels. Returns rows [B, 3, H, W]
    = (y - t, y, y + b) / stride-scaled and cols [B, 3, H, W] = (x - l, x, x + r), in the compute
    dtype (float64 for float64, else float32). The gradient reaching bbox_pred through them is
    scaled by `gradient_mul` (`(1 - g) * b.detach() + g * b`). Negative distances are used as
    given: the sample lands on the other side of the location.
    """
    compute = torch.float64 if bbox_pred.dtype == torch.float64 else torch.float32
    box = bbox_pred.to(compute)
    box = (1.0 - gradient_mul) * box.detach() + gradient_mul * box
    box = box / stride
    _, _, h, w = box.shape
    y = torch.arange(h, dtype=compute, device=box.device).view(1, h, 1)
    x = torch.arange(w, dtype=compute, device=box.device).view(1, 1, w)
    left, top, right, bottom = box.unbind(1)
    rows = torch.stack([y - top, y.expand_as(top), y + bottom], dim=1)
    cols = torch.stack([x - left, x.expand_as(left), x + right], dim=1)
    return rows, cols


def star_offsets(bbox_pred: torch.Tensor, stride: float, gradient_mul: float = 0.1) -> torch.Tensor:
    """torchvision `deform_conv2d` offsets [B, 18, H, W] of the star points (for padding=1).

    Channel 2k / 2k+1 hold the (dy, dx) displacement of tap k = 3 * ky + kx from its regular
    3x3 position (y + ky - 1, x + kx - 1), so that
    `torchvision.ops.deform_conv2d(x, star_offsets(b, s), weight, padding=1)` samples the same
    points as `star_deform_conv2d(x, b, weight, s)`.
    """
    rows, cols = star_coordinates(bbox_pred, stride, gradient_mul)
    _, _, h, w = rows.shape
    y = torch.arange(h, dtype=rows.dtype, device=rows.device).view(1, h, 1)
    x = torch.arange(w, dtype=rows.dtype, device=rows.device).view(1, 1, w)
    pairs = []
    for ky in range(3):
        for kx in range(3):
            pairs.append(rows[:, ky] - (y + ky - 1))
            pairs.append(cols[:, kx] - (x + kx - 1))
    return torch.stack(pairs, dim=1).to(bbox_pred.dtype)


def bilinear_sample(x: torch.Tensor, py: torch.Tensor, px: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of x [B, C, H, W] at points py, px [B, P] (cells) -> [B, C, P].

    torchvision's boundary rule: a point with py <= -1, py >= H, px <= -1 or px >= W reads 0;
    otherwise each of its 4 corners outside the map reads 0. Differentiable w.r.t. x and the
    coordinates (the rule's masks are constant, so points outside get exactly zero gradient).
    """
    b, c, h, w = x.shape
    inside = (py > -1) & (py < h) & (px > -1) & (px < w)
    y0 = torch.floor(py.detach())
    x0 = torch.floor(px.detach())
    ly, lx = py - y0, px - x0
    flat = x.reshape(b, c, h * w)
    out = torch.zeros(b, c, py.shape[1], dtype=x.dtype, device=x.device)
    for cy, wy in ((y0, 1 - ly), (y0 + 1, ly)):
        for cx, wx in ((x0, 1 - lx), (x0 + 1, lx)):
            valid = inside & (cy >= 0) & (cy <= h - 1) & (cx >= 0) & (cx <= w - 1)
            index = (cy.clamp(0, h - 1) * w + cx.clamp(0, w - 1)).long()
            values = torch.gather(flat, 2, index.unsqueeze(1).expand(b, c, -1))
            weight = torch.where(valid, wy * wx, torch.zeros_like(wy))
            out = out + values * weight.unsqueeze(1)
    return out


def star_columns(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The 9 star samples of every location: x [B, C, H, W] -> [B, C, 9, H, W] (tap 3*ky+kx)."""
    b, c, h, w = x.shape
    py = rows.unsqueeze(2).expand(b, 3, 3, h, w).reshape(b, 9 * h * w)
    px = cols.unsqueeze(1).expand(b, 3, 3, h, w).reshape(b, 9 * h * w)
    return bilinear_sample(x.to(rows.dtype), py, px).view(b, c, 9, h, w)


def _conv_columns(
    columns: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype
) -> torch.Tensor:
    """[B, Cin, 9, H, W] columns x weight [Cout, Cin, 3, 3] (+ bias [Cout]) -> [B, Cout, H, W]."""
    cout, cin = weight.shape[:2]
    out = torch.einsum("bckhw,ock->bohw", columns, weight.to(columns.dtype).reshape(cout, cin, 9))
    if bias is not None:
        out = out + bias.to(columns.dtype).view(1, cout, 1, 1)
    return out.to(out_dtype)


def star_deform_conv2d_reference(
    x: torch.Tensor,
    bbox_pred: torch.Tensor,
    weight: torch.Tensor,
    stride: float,
    *,
    bias: torch.Tensor | None = None,
    gradient_mul: float = 0.1,
) -> torch.Tensor:
    """Star deformable 3x3 convolution (docs/design.md §2), out [B, Cout, H, W] in x's dtype.

    x [B, Cin, H, W]; bbox_pred [B, 4, H, W] (l, t, r, b) in input pixels; weight
    [Cout, Cin, 3, 3]; bias [Cout] or None; stride in input pixels per cell. Tap (ky, kx) samples
    (y + (-t, 0, b)[ky] / stride, x + (-l, 0, r)[kx] / stride) bilinearly (torchvision's
    boundary rule). Computed in float32 (float64 for float64 inputs) with an explicit
    [B, Cin, 9, H, W] columns tensor.
    """
    rows, cols = star_coordinates(bbox_pred, stride, gradient_mul)
    return _conv_columns(star_columns(x, rows, cols), weight, bias, x.dtype)


def star_deform_conv2d_pair_reference(
    x_cls: torch.Tensor,
    x_reg: torch.Tensor,
    bbox_pred: torch.Tensor,
    w_cls: torch.Tensor,
    w_reg: torch.Tensor,
    stride: float,
    *,
    gradient_mul: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's two star convolutions (no bias) sharing one set of sampling coordinates:
    (star_deform_conv2d_reference(x_cls, bbox_pred, w_cls, stride),
     star_deform_conv2d_reference(x_reg, bbox_pred, w_reg, stride))."""
    rows, cols = star_coordinates(bbox_pred, stride, gradient_mul)
    out_cls = _conv_columns(star_columns(x_cls, rows, cols), w_cls, None, x_cls.dtype)
    out_reg = _conv_columns(star_columns(x_reg, rows, cols), w_reg, None, x_reg.dtype)
    return out_cls, out_reg

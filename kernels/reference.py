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
